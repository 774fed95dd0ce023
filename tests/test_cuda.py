"""The CUDA path (`pytest -m cuda`; scripts/gpu_check.sh runs it on a GPU).

Every test runs once per device of MULTITOKEN_TEST_DEVICES (default "cpu,cuda"): the CUDA cases
skip where torch sees no GPU, and the same bodies at tiny sizes on the CPU keep them from rotting
between GPU runs. bf16 on the CPU goes through CPU autocast / bf16 weights, so the tolerances
below are exercised here too.

- a bf16 (autocast) training step of the sequential and chunked losses against fp32 naive;
- torch.compile'd blocks (as `train.compile` does) against eager, and a compiled bf16 `train()`;
- speculative greedy == plain greedy in bf16, chain and tree, batch 1 and 8 (up to near-ties:
  see `assert_same_up_to_ties`), and exactly in fp32;
- the sampling chi-square on the device against the exact distribution computed on the CPU;
- KV-cache decoding against the full (uncached) forward.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from helpers_corpus import make_corpus
from helpers_decode import one_thread, pattern_tokens, random_model, trained_model  # noqa: F401
from multitoken.config import ModelConfig
from multitoken.decoding.engine import Engine, prefill
from multitoken.decoding.generate import decode_one, generate
from multitoken.decoding.sampling import Sampling
from multitoken.loss import mtp_loss
from multitoken.model import MultiTokenModel
from multitoken.train import autocast_factory
from test_generate import PROMPTS, chi_square_pvalue, exact_joint

pytestmark = pytest.mark.cuda

HAS_CHUNKED = hasattr(F, "linear_cross_entropy")  # torch >= 2.13
NO_CHUNKED = f"torch {torch.__version__} has no F.linear_cross_entropy (chunked loss: torch >= 2.13)"


def _devices() -> list[Any]:
    names = [d.strip() for d in os.environ.get("MULTITOKEN_TEST_DEVICES", "cpu,cuda").split(",")
             if d.strip()]
    return [pytest.param(d, id=d, marks=pytest.mark.skipif(
        d.startswith("cuda") and not torch.cuda.is_available(), reason="no CUDA device"))
        for d in names]


DEVICES = _devices()


def _bf16(device: torch.device) -> Callable[[], Any]:
    """The training loop's bf16 autocast on CUDA; CPU autocast to bf16 elsewhere."""
    if device.type == "cuda":
        return autocast_factory(device, "bfloat16")
    return lambda: torch.autocast("cpu", dtype=torch.bfloat16)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def _grad_model(device: torch.device) -> MultiTokenModel:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, dim=64, n_layers=5, n_heads=4, n_kv_heads=2, n_future=4,
                      max_seq_len=64)
    return MultiTokenModel(cfg).to(device)


def _grads(model: MultiTokenModel, idx: torch.Tensor, targets: torch.Tensor, method: str,
           autocast: Callable[[], Any] | None = None) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    mtp_loss(model, idx, targets, backward=True, method=method, autocast=autocast)
    return [p.grad.detach().float().clone() for p in model.parameters()]


def _batch(device: torch.device, vocab: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (4, 65), generator=g)
    return x[:, :-1].to(device), x[:, 1:].to(device)


METHODS = [pytest.param("sequential", id="sequential"),
           pytest.param("chunked", id="chunked",
                        marks=pytest.mark.skipif(not HAS_CHUNKED, reason=NO_CHUNKED))]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("device", DEVICES)
def test_fp32_method_gradients_equal_naive(device, method):
    device = torch.device(device)
    model = _grad_model(device)
    idx, targets = _batch(device)
    ref = _grads(model, idx, targets, "naive")
    got = _grads(model, idx, targets, method)
    worst = max(_rel(a, b) for a, b in zip(got, ref))
    assert worst < 1e-5, worst


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("device", DEVICES)
def test_bf16_step_gradients_match_fp32_naive(device, method):
    device = torch.device(device)
    model = _grad_model(device)
    idx, targets = _batch(device)
    ref = _grads(model, idx, targets, "naive")  # fp32, no autocast
    got = _grads(model, idx, targets, method, autocast=_bf16(device))
    assert all(torch.isfinite(g).all() for g in got)
    total = _rel(torch.cat([g.flatten() for g in got]), torch.cat([g.flatten() for g in ref]))
    worst = max(_rel(a, b) for a, b in zip(got, ref))
    # bf16 operands (8-bit mantissa), fp32 accumulation: relative errors of 1e-3..1e-2
    assert total < 3e-2, total
    assert worst < 1e-1, worst
    assert total > 0 or device.type == "cpu"  # autocast really ran in bf16 on CUDA


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_blocks_match_eager(device):
    """`train.compile` compiles every block; gradients and three AdamW steps match eager.
    On the CPU the aot_eager backend (no C++ build): the dynamo + autograd plumbing only."""
    device = torch.device(device)
    eager = _grad_model(device)
    compiled = copy.deepcopy(eager)
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    for block in [*compiled.layers, *compiled.heads]:
        block.compile(backend=backend)
    idx, targets = _batch(device)
    ref = _grads(eager, idx, targets, "sequential")
    got = _grads(compiled, idx, targets, "sequential")
    worst = max(_rel(a, b) for a, b in zip(got, ref))
    assert worst < 1e-4, worst
    losses: dict[str, list[float]] = {}
    for name, m in (("eager", eager), ("compiled", compiled)):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        losses[name] = []
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            out = mtp_loss(m, idx, targets, backward=True, method="sequential")
            opt.step()
            losses[name].append(float(out.loss_sum.sum() / out.count.sum()))
    for a, b in zip(losses["eager"], losses["compiled"]):
        assert abs(a - b) < 1e-4 * max(1.0, abs(a)), losses


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_bf16_training_run(device, tmp_path):
    """The real path: `train()` with train.compile and bf16 autocast on the device."""
    if torch.device(device).type == "cpu":
        pytest.skip("inductor's CPU build takes minutes here; make demo compiles on the CPU")
    from multitoken.config import load_run_config
    from multitoken.train import train

    corpus = make_corpus(tmp_path / "corpus")
    cfg = load_run_config(None, [
        f"data.paths=[{str(corpus)!r}]", f"data.cache_dir={tmp_path / 'cache'}",
        "data.val_fraction=0.2", "model.dim=64", "model.n_layers=4", "model.n_heads=4",
        "model.n_future=2", "model.max_seq_len=64", "train.steps=12", "train.batch_size=8",
        "train.seq_len=64", "train.eval_every=12", "train.eval_batches=2",
        "train.ckpt_every=12", "train.log_every=1", f"train.device={device}",
        "train.dtype=bfloat16", "train.compile=true", "optim.warmup_steps=2", "optim.lr=3e-3"])
    val = train(cfg, tmp_path / "run", progress=False)
    losses = val["head_loss"]
    assert all(0 < x < 6.0 for x in losses), val  # bytes: log(256) = 5.5 at the start


# ---------------------------------------------------------------------------------------------
# Decoding.

NEAR_TIE = 0.02  # a tie within bf16 rounding: gap <= NEAR_TIE x max |logit| of that position


def _prompts(n: int) -> list[list[int]]:
    data = pattern_tokens(2000, seed=3).tolist()
    return [data[17 * i: 17 * i + 4 + (5 * i) % 13] for i in range(n)]


def assert_same_up_to_ties(model: MultiTokenModel, prompts: list[list[int]],
                           plain: list[list[int]], other: list[list[int]]) -> int:
    """Greedy outputs equal, or the first difference is a near-tie of head 1's logits there.

    In bf16 a k-token verification forward and plain's one-token forward round differently
    (other matmul shapes), so where two tokens' logits are within rounding, argmax may pick
    either: exact greedy is exact up to such ties. A wrong acceptance rule diverges where the
    logits are far apart and fails. Returns the number of sequences that differ."""
    differ = 0
    device = model.tok_embeddings.weight.device
    for p, a, b in zip(prompts, plain, other):
        if a == b:
            continue
        differ += 1
        i = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        assert i < min(len(a), len(b)), (a, b)  # same length: only a token can differ
        with torch.no_grad():
            logits = model(torch.tensor([p + a[:i]], device=device), heads=[0])[0, 0, -1].float()
        gap = (logits[a[i]] - logits[b[i]]).abs().item()
        assert gap <= NEAR_TIE * logits.abs().max().item(), (i, gap, a, b)
    assert differ <= len(prompts) // 2, f"{differ} of {len(prompts)} sequences differ"
    return differ


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("mode", ["chain", "tree"])
@pytest.mark.parametrize("device", DEVICES)
def test_speculative_greedy_equals_plain_bf16(device, mode, batch):
    model = copy.deepcopy(trained_model()).to(device=device, dtype=torch.bfloat16)
    prompts = _prompts(8 if batch == 8 else 3)
    kw: dict[str, Any] = {"speculative": mode, "num_drafts": 3}
    if batch == 1:
        plain = [generate(model, p, 30).tokens[0] for p in prompts]
        spec = []
        for p in prompts:
            res = generate(model, p, 30, **kw)
            spec.append(res.tokens[0])
            assert res.stats.tokens_per_forward > 1.5  # drafts were accepted
    else:
        plain = generate(model, prompts, 30).tokens
        res = generate(model, prompts, 30, **kw)
        spec = res.tokens
        assert res.stats.tokens_per_forward > 1.5
    assert_same_up_to_ties(model, prompts, plain, spec)


@pytest.mark.parametrize("mode", ["chain", "tree"])
@pytest.mark.parametrize("device", DEVICES)
def test_speculative_greedy_equals_plain_fp32(device, mode):
    """Token for token (CUDA's one- and k-token matmuls may still round a near-tie apart)."""
    model = random_model().to(device)
    plain = generate(model, PROMPTS, 25).tokens
    spec = generate(model, PROMPTS, 25, speculative=mode).tokens
    one = generate(model, PROMPTS[0], 25, speculative=mode).tokens
    if torch.device(device).type == "cpu":
        assert spec == plain and one == plain[:1]
    else:
        assert_same_up_to_ties(model, PROMPTS + PROMPTS[:1], plain + plain[:1], spec + one)


SAMPLING = [("off", Sampling(1.5, top_k=6)), ("chain", Sampling(1.2, top_p=0.9)),
            ("tree", Sampling(1.5))]


@pytest.mark.parametrize("mode, s", SAMPLING, ids=[m for m, _ in SAMPLING])
@pytest.mark.parametrize("device", DEVICES)
def test_sampling_matches_exact_distribution(device, mode, s):
    """Samples drawn on the device (its own generator) against P computed on the CPU."""
    cpu_model = trained_model()
    model = copy.deepcopy(cpu_model).to(device)
    prompt = [3, 5, 7, 9]
    expected = exact_joint(cpu_model, prompt, 3, s)
    g = torch.Generator(device=torch.device(device)).manual_seed(0)
    kw: dict[str, Any] = {} if mode == "off" else {"num_drafts": 2}
    res = generate(model, [prompt] * 4000, 3, temperature=s.temperature, top_k=s.top_k,
                   top_p=s.top_p, speculative=mode, generator=g, **kw)
    p, df = chi_square_pvalue([tuple(t) for t in res.tokens], expected)
    assert p > 1e-3, (p, df)
    if mode != "off":
        assert 0.2 < res.stats.acceptance[0] < 0.95


@pytest.mark.parametrize("head_type", ["transformer", "linear", "anticausal"])
@pytest.mark.parametrize("device", DEVICES)
def test_kv_cache_greedy_equals_full_forward(device, head_type):
    model = random_model(head_type).to(device)
    prompt, seq = PROMPTS[0], list(PROMPTS[0])
    with torch.no_grad():
        for _ in range(24):  # greedy by re-running the full forward for every token
            x = torch.tensor([seq], device=device)
            seq.append(int(model(x, heads=[0])[0, 0, -1].argmax()))
    assert generate(model, prompt, 24).tokens == [seq[len(prompt):]]


@pytest.mark.parametrize("device", DEVICES)
def test_kv_cache_logits_match_full_forward_bf16(device):
    """Teacher-forced: the cached one-token forwards' logits against one full forward, bf16."""
    model = random_model(max_seq_len=128).to(device=device, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    seq = torch.randint(0, model.cfg.vocab_size, (2, 48), generator=g).to(device)
    with torch.inference_mode():
        full = model(seq, heads=[0])[0].float()  # [B, T, V]
        eng = Engine(model, 1)
        cache = model.new_cache(2, 64)
        fwd = prefill(eng, cache, seq[:, :16])
        got = [eng.logits(fwd.h0[:, -1])]
        for t in range(16, 47):
            pos = torch.full((2,), t, device=seq.device)
            got.append(decode_one(eng, cache, seq[:, t], pos, t + 1))
    cached = torch.stack(got, 1)  # positions 15..46
    ref = full[:, 15:47]
    assert _rel(cached, ref) < 3e-2, _rel(cached, ref)
    agree = (cached.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree > 0.9, agree
