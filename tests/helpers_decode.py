"""Tiny models for the decoding tests: random ones (exactness) and trained ones (acceptance)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from multitoken.config import ModelConfig
from multitoken.model import MultiTokenModel

HEAD_TYPES = ("transformer", "linear", "causal", "anticausal")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: a second intra-op thread only adds synchronisation, and on a machine shared
    with other jobs an OpenMP barrier waiting for a descheduled thread costs milliseconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_model(head_type: str = "transformer", seed: int = 0, **kw) -> MultiTokenModel:
    cfg = dict(vocab_size=37, dim=32, n_layers=5, n_heads=4, n_kv_heads=2, n_future=4,
               max_seq_len=64, head_type=head_type)
    cfg.update(kw)
    torch.manual_seed(seed)
    return MultiTokenModel(ModelConfig(**cfg)).eval()


def pattern_tokens(n: int, vocab: int = 16, period: int = 11, noise: float = 0.1,
                   seed: int = 0) -> torch.Tensor:
    """A periodic sequence with some random substitutions: predictable but not perfectly."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randperm(vocab, generator=g)[:period].repeat(n // period + 1)[:n]
    flip = torch.rand(n, generator=g) < noise
    return torch.where(flip, torch.randint(0, vocab, (n,), generator=g), base)


@functools.cache
def trained_model(head_type: str = "transformer", n_future: int = 4, steps: int = 80,
                  vocab: int = 16) -> MultiTokenModel:
    """A tiny model trained briefly on `pattern_tokens`, so its heads agree often (~1-3 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second thread only adds sync cost on a busy machine
    try:
        return _train(head_type, n_future, steps, vocab)
    finally:
        torch.set_num_threads(threads)


def _train(head_type: str, n_future: int, steps: int, vocab: int) -> MultiTokenModel:
    torch.manual_seed(0)
    model = MultiTokenModel(ModelConfig(vocab_size=vocab, dim=32, n_layers=n_future + 1,
                                        n_heads=4, n_future=n_future, max_seq_len=64,
                                        head_type=head_type))
    data = pattern_tokens(4096, vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 33, (8,), generator=g)
        idx = torch.stack([data[s:s + 32] for s in starts])
        logits = model(idx)  # [n, B, T, V]
        loss = sum(F.cross_entropy(logits[i, :, : 32 - i - 1].reshape(-1, vocab),
                                   idx[:, i + 1:].reshape(-1)) for i in range(n_future))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def reference_greedy(model: MultiTokenModel, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by re-running the full (uncached) forward for every token."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]), heads=[0])[0, 0, -1].argmax()))
    return seq[len(prompt):]


def make_checkpoint(root):
    """A saved byte-level checkpoint (random weights) with a small corpus for its val split."""
    from helpers_corpus import make_corpus
    from multitoken.checkpoint import save_checkpoint
    from multitoken.tokenizer import ByteTokenizer

    corpus = make_corpus(root / "corpus", n_files=6, lines=20)
    model = random_model(vocab_size=260, max_seq_len=128)
    run = {"data": {"paths": [str(corpus)], "cache_dir": str(root / "cache"),
                    "val_fraction": 0.3}}
    save_checkpoint(root / "ck", model, ByteTokenizer(), run_config=run, step=1)
    return root / "ck"
