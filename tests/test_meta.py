"""Meta's MTP release, checked against an independent reference, not against our own writer.

`MetaTransformer` below re-states the model of Meta's release (facebook/multi-token-prediction,
`llama/model.py`) from its definition, without fairscale's parallel layers: a Llama trunk whose
`layers` end with head 1, `extra_heads` for heads 2..n, all heads reading the trunk's output,
shared `norm` and `output`; rotary embeddings as complex multiplication of interleaved pairs;
SwiGLU with Meta's width rule. Its state dict, saved the way Meta ships it (`params.json` with
`n_layers` counting every layer, `consolidated.00.pth`), must load into the same logits for
every head.

The SentencePiece tokenizer is checked against the `sentencepiece` package on a model trained
here with Llama 2's options (BPE, byte fallback, identity normalization, dummy prefix).
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multitoken.checkpoint import load_checkpoint
from multitoken.errors import CheckpointError
from multitoken.interop import export_hf_tokenizer, load_meta, main
from multitoken.tokenizer import SentencePieceTokenizer, load_tokenizer

# ---------------------------------------------------------------------------------------------
# Reference: Meta's released model, re-stated.


@dataclass
class MetaArgs:
    """The fields of Meta's `params.json` (ModelArgs)."""

    dim: int = 64
    n_layers: int = 4  # every layer: trunk + head 1 + extra heads
    n_heads: int = 4
    n_kv_heads: int | None = None
    vocab_size: int = 97
    multiple_of: int = 32
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    n_future_tokens: int = 1


class MetaRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def meta_freqs_cis(head_dim: int, end: int, theta: float) -> Tensor:
    """[end, head_dim // 2] complex: e^{i t f_j}, f_j = theta^(-2j / head_dim), in fp32."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(end, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def meta_rotary(x: Tensor, freqs_cis: Tensor) -> Tensor:
    """x [B, T, H, hd]: pairs (2j, 2j+1) as complex numbers, times freqs_cis [T, hd/2]."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    rotated = xc * freqs_cis[None, :, None, :]
    return torch.view_as_real(rotated).flatten(3).type_as(x)


class MetaAttention(nn.Module):
    def __init__(self, a: MetaArgs) -> None:
        super().__init__()
        self.n_heads = a.n_heads
        self.n_kv = a.n_kv_heads or a.n_heads
        self.hd = a.dim // a.n_heads
        self.wq = nn.Linear(a.dim, self.n_heads * self.hd, bias=False)
        self.wk = nn.Linear(a.dim, self.n_kv * self.hd, bias=False)
        self.wv = nn.Linear(a.dim, self.n_kv * self.hd, bias=False)
        self.wo = nn.Linear(self.n_heads * self.hd, a.dim, bias=False)

    def forward(self, x: Tensor, freqs_cis: Tensor, mask: Tensor | None) -> Tensor:
        B, T, _ = x.shape
        q = meta_rotary(self.wq(x).view(B, T, self.n_heads, self.hd), freqs_cis)
        k = meta_rotary(self.wk(x).view(B, T, self.n_kv, self.hd), freqs_cis)
        v = self.wv(x).view(B, T, self.n_kv, self.hd)
        rep = self.n_heads // self.n_kv  # repeat_kv: query head h reads kv head h // rep
        k = k[:, :, :, None].expand(B, T, self.n_kv, rep, self.hd).reshape(B, T, -1, self.hd)
        v = v[:, :, :, None].expand(B, T, self.n_kv, rep, self.hd).reshape(B, T, -1, self.hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        scores = q @ k.transpose(2, 3) / math.sqrt(self.hd)
        if mask is not None:
            scores = scores + mask
        probs = F.softmax(scores.float(), dim=-1).type_as(q)
        return self.wo((probs @ v).transpose(1, 2).reshape(B, T, -1))


class MetaFeedForward(nn.Module):
    def __init__(self, a: MetaArgs) -> None:
        super().__init__()
        hidden = int(2 * (4 * a.dim) / 3)
        if a.ffn_dim_multiplier is not None:
            hidden = int(a.ffn_dim_multiplier * hidden)
        hidden = a.multiple_of * ((hidden + a.multiple_of - 1) // a.multiple_of)
        self.w1 = nn.Linear(a.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, a.dim, bias=False)
        self.w3 = nn.Linear(a.dim, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MetaBlock(nn.Module):
    def __init__(self, a: MetaArgs) -> None:
        super().__init__()
        self.attention = MetaAttention(a)
        self.feed_forward = MetaFeedForward(a)
        self.attention_norm = MetaRMSNorm(a.dim, a.norm_eps)
        self.ffn_norm = MetaRMSNorm(a.dim, a.norm_eps)

    def forward(self, x: Tensor, freqs_cis: Tensor, mask: Tensor | None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class MetaTransformer(nn.Module):
    def __init__(self, a: MetaArgs) -> None:
        super().__init__()
        self.args = a
        n = a.n_future_tokens
        self.tok_embeddings = nn.Embedding(a.vocab_size, a.dim)
        # `layers`: the trunk, then head 1; `extra_heads`: heads 2..n.
        self.layers = nn.ModuleList(MetaBlock(a) for _ in range(a.n_layers - n + 1))
        self.extra_heads = nn.ModuleList(MetaBlock(a) for _ in range(n - 1))
        self.norm = MetaRMSNorm(a.dim, a.norm_eps)
        self.output = nn.Linear(a.dim, a.vocab_size, bias=False)
        self.freqs_cis = meta_freqs_cis(a.dim // a.n_heads, 2 * 64, a.rope_theta)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens [B, T] (from position 0) -> logits of every head [B, T, n_future, V]."""
        T = tokens.shape[1]
        h = self.tok_embeddings(tokens)
        freqs_cis = self.freqs_cis[:T]
        mask = torch.triu(torch.full((T, T), float("-inf")), diagonal=1) if T > 1 else None
        for layer in self.layers[:-1]:
            h = layer(h, freqs_cis, mask)
        h_trunk = h
        latents = [layer(h_trunk, freqs_cis, mask)
                   for layer in [self.layers[-1], *self.extra_heads]]
        h = self.norm(torch.stack(latents, dim=-2))  # [B, T, n, D]
        return self.output(h).float()


def meta_model(a: MetaArgs, seed: int = 0) -> MetaTransformer:
    torch.manual_seed(seed)
    model = MetaTransformer(a)
    with torch.no_grad():  # norms away from 1, so a misplaced norm weight shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.mul_(1 + 0.3 * torch.randn_like(p))
    return model.eval()


def write_release(model: MetaTransformer, directory: Path, *, params: dict | None = None,
                  state_dict: dict[str, Tensor] | None = None,
                  weights_file: str = "consolidated.00.pth") -> Path:
    """The model as Meta ships it: its state dict as a .pth (bf16 there; fp32 here, so the
    comparison is exact up to arithmetic) and params.json."""
    directory.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else {
        k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(sd, directory / weights_file)
    (directory / "params.json").write_text(json.dumps(params or asdict(model.args)))
    return directory


CASES = {
    1: MetaArgs(dim=48, n_layers=3, n_heads=4, multiple_of=32, n_future_tokens=1),
    2: MetaArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=24,
                ffn_dim_multiplier=1.3, rope_theta=500000.0, n_future_tokens=2),
    4: MetaArgs(dim=64, n_layers=6, n_heads=8, n_kv_heads=2, multiple_of=16,
                ffn_dim_multiplier=0.9, norm_eps=1e-6, n_future_tokens=4),
}


@pytest.mark.parametrize("n_future", [1, 2, 4])
def test_load_meta_matches_reference_on_every_head(tmp_path: Path, n_future: int) -> None:
    args = CASES[n_future]
    ref = meta_model(args)
    # params.json as Meta writes it: n_layers counts all layers; vocab_size may be -1 (Llama's
    # params.json leaves it to the tokenizer), in which case the embedding gives it.
    params = {**asdict(args), "vocab_size": -1 if n_future == 4 else args.vocab_size}
    write_release(ref, tmp_path, params=params)
    assert len(ref.layers) == args.n_layers - n_future + 1 and len(ref.extra_heads) == n_future - 1
    ours = load_meta(tmp_path, max_seq_len=64)
    assert (ours.cfg.n_layers, ours.n_future, ours.cfg.n_trunk_layers) == \
        (args.n_layers, n_future, args.n_layers - n_future)
    assert ours.cfg.vocab_size == 97
    idx = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(idx)  # [B, T, n, V]
        got = ours(idx).permute(1, 2, 0, 3)  # [n, B, T, V] -> [B, T, n, V]
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4
    assert want.abs().max().item() > 0.1  # logits of a real size, so the bound means something


def test_load_meta_reads_consolidated_pth_and_ignores_rope_freqs(tmp_path: Path) -> None:
    ref = meta_model(CASES[2])
    sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    sd["rope.freqs"] = torch.zeros(8)  # Llama checkpoints carry Meta's precomputed table
    write_release(ref, tmp_path, state_dict=sd, weights_file="consolidated.pth")
    idx = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        got = load_meta(tmp_path, max_seq_len=64)(idx).permute(1, 2, 0, 3)
        assert (got - ref(idx)).abs().max().item() <= 1e-4


def _one_line_error(directory: Path, match: str) -> str:
    with pytest.raises(CheckpointError, match=match) as e:
        load_meta(directory, max_seq_len=64)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_load_meta_refuses_bad_params_and_mismatched_weights(tmp_path: Path) -> None:
    ref = meta_model(CASES[4])
    good = asdict(CASES[4])
    write_release(ref, tmp_path / "few", params={**good, "n_layers": 3})
    _one_line_error(tmp_path / "few", r"n_layers \(3\) must be >= n_future_tokens \(4\)")
    write_release(ref, tmp_path / "zero", params={**good, "n_future_tokens": 0})
    _one_line_error(tmp_path / "zero", r"n_future_tokens \(0\)")

    sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    del sd["extra_heads.2.ffn_norm.weight"]
    write_release(ref, tmp_path / "missing", state_dict=sd)
    msg = _one_line_error(tmp_path / "missing", "does not match params.json")
    assert "missing ['extra_heads.2.ffn_norm.weight']" in msg and "unexpected []" in msg

    sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    sd["extra_heads.3.attention.wq.weight"] = sd["extra_heads.2.attention.wq.weight"]
    write_release(ref, tmp_path / "extra", state_dict=sd)
    msg = _one_line_error(tmp_path / "extra", "does not match params.json")
    assert "unexpected ['extra_heads.3.attention.wq.weight']" in msg

    # A params.json whose n_layers does not count the file's layers: an error, not a misload.
    for delta in (-1, 1):
        write_release(ref, tmp_path / f"n{delta}", params={**good, "n_layers": 6 + delta})
        _one_line_error(tmp_path / f"n{delta}", "does not match params.json")

    sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    sd["layers.0.attention.wv.weight"] = torch.zeros(3, 3)
    write_release(ref, tmp_path / "shape", state_dict=sd)
    _one_line_error(tmp_path / "shape", "shape")


# ---------------------------------------------------------------------------------------------
# SentencePiece: Meta ships Llama 2's tokenizer.model.

WORDS = ["def", "return", "value", "self", "import", "print", "hello", "world", "café",
         "naïve", "für", "日本", "語", "x", "y", "=", "+", "(", ")", ":", "0", "1", "42"]
STRINGS = ["def f(x):\n    return x + 1\n", "hello world", " leading space", "  two leading",
           "trailing  ", "a\n\nb\tc", "café naïve für 日本語 ✓ 🐍 Ω", "", " ", "\n",
           "literal <s> and </s> and <unk> stay text", "1234567 + 42"]


def _train_spm(vocab_size: int) -> bytes:
    """A SentencePiece BPE trained here with the options of Llama 2's tokenizer.model."""
    gen = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(400):
        picks = torch.randint(0, len(WORDS), (10,), generator=gen).tolist()
        lines.append(" ".join(WORDS[i] for i in picks))
    lines.append("\t  indented(code) -> {ok}; [list], 'quote' \"dq\" ✓")
    buf = io.BytesIO()
    with open(os.devnull, "w") as log:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buf, model_type="bpe",
            vocab_size=vocab_size, byte_fallback=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
            add_dummy_prefix=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
            pad_id=-1, num_threads=1, logstream=log)
    return buf.getvalue()


@pytest.fixture(scope="module")
def spm_model() -> bytes:
    return _train_spm(420)


def test_sentencepiece_tokenizer_gives_sentencepiece_ids_and_text(spm_model: bytes) -> None:
    ref = spm.SentencePieceProcessor(model_proto=spm_model)
    tok = SentencePieceTokenizer(spm_model)
    assert tok.vocab_size == ref.get_piece_size() == 420
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (1, 2, 0, 2)  # no pad: eos
    for s in STRINGS:
        ids = ref.encode(s)
        assert tok.encode(s) == ids, s
        assert tok.decode(ids) == ref.decode(ids) == s
    assert tok.encode_batch(STRINGS) == [ref.encode(s) for s in STRINGS]
    assert [a.tolist() for a in tok.encode_arrays(STRINGS)] == [ref.encode(s) for s in STRINGS]
    assert tok.encode("x") == ref.encode("x", add_bos=False) != ref.encode("x", add_bos=True)
    assert any(ref.is_byte(i) for i in tok.encode("🐍"))  # unseen text goes through bytes
    # Specials are skipped, out-of-range ids dropped, broken UTF-8 decodes without raising.
    mixed = [tok.bos_id, *ref.encode("hi"), tok.eos_id, tok.unk_id, 10_000, -1]
    assert tok.decode(mixed) == "hi"
    assert tok.decode([ref.piece_to_id("<0xE6>"), *ref.encode("a")]) == ref.decode(
        [ref.piece_to_id("<0xE6>"), *ref.encode("a")])


def test_sentencepiece_save_load_round_trip(spm_model: bytes, tmp_path: Path) -> None:
    tok = SentencePieceTokenizer(spm_model)
    tok.save(tmp_path / "t")
    assert (tmp_path / "t" / "tokenizer.model").read_bytes() == spm_model
    for path in (tmp_path / "t", tmp_path / "t" / "tokenizer.model"):
        back = load_tokenizer(path)
        assert isinstance(back, SentencePieceTokenizer)
        assert back.fingerprint() == tok.fingerprint()
        assert back.encode(STRINGS[0]) == tok.encode(STRINGS[0])
    assert tok.fingerprint() != SentencePieceTokenizer(_train_spm(400)).fingerprint()
    (tmp_path / "bad.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(CheckpointError, match="corrupt tokenizer file") as e:
        load_tokenizer(tmp_path / "bad.model")
    assert "\n" not in str(e.value)


def test_sentencepiece_to_hf_gives_sentencepiece_ids(spm_model: bytes, tmp_path: Path) -> None:
    ref = spm.SentencePieceProcessor(model_proto=spm_model)
    tok = SentencePieceTokenizer(spm_model)
    hf = tok.to_hf()
    assert hf.get_vocab_size(with_added_tokens=True) == tok.vocab_size
    gen = torch.Generator().manual_seed(0)
    alphabet = sorted(set("".join(WORDS + STRINGS)))
    fuzz = ["".join(alphabet[i] for i in torch.randint(0, len(alphabet), (n,), generator=gen))
            for n in range(40)]
    for s in STRINGS + fuzz:
        ids = ref.encode(s)
        assert hf.encode(s, add_special_tokens=False).ids == ids, s
        assert hf.decode(ids) == ref.decode(ids)
    specials = [tok.bos_id, *ref.encode("a b"), tok.eos_id, tok.unk_id]
    assert hf.decode(specials, skip_special_tokens=True) == tok.decode(specials)
    transformers = pytest.importorskip("transformers")
    export_hf_tokenizer(tok, tmp_path, max_seq_len=64)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for s in STRINGS:
        assert auto(s).input_ids == ref.encode(s), s
    assert (auto.bos_token_id, auto.eos_token_id, auto.unk_token_id) == (1, 2, 0)


def test_sentencepiece_to_hf_refuses_what_it_cannot_reproduce() -> None:
    buf = io.BytesIO()
    with open(os.devnull, "w") as log:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(["hello world"] * 50 + ["abc def"] * 50), model_writer=buf,
            model_type="unigram", vocab_size=16, hard_vocab_limit=False,
            num_threads=1, logstream=log)
    tok = SentencePieceTokenizer(buf.getvalue())  # encodes and decodes as SentencePiece does
    assert tok.decode(tok.encode("hello world")) == "hello world"
    with pytest.raises(CheckpointError, match="model type is not BPE.*normalization rule"):
        tok.to_hf()


def test_convert_meta_release_with_its_tokenizer_model(spm_model: bytes, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A release laid out as Meta's: tokenizer.model beside the checkpoint folder."""
    ref_sp = spm.SentencePieceProcessor(model_proto=spm_model)
    args = MetaArgs(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=420,
                    n_future_tokens=2)
    ref = meta_model(args)
    release = tmp_path / "release"
    write_release(ref, release / "7B_tiny_2")
    (release / "tokenizer.model").write_bytes(spm_model)
    assert main(["--meta", str(release / "7B_tiny_2"), "--out", str(tmp_path / "ck"),
                 "--max-seq-len", "64"]) == 0
    model, tok = load_checkpoint(tmp_path / "ck")
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tmp_path / "ck" / "tokenizer" / "tokenizer.model").read_bytes() == spm_model
    assert (tok.bos_id, tok.eos_id) == (ref_sp.bos_id(), ref_sp.eos_id())
    for s in STRINGS:
        assert tok.encode(s) == ref_sp.encode(s), s
    idx = torch.tensor([[ref_sp.bos_id(), *ref_sp.encode("def f(x): return x")]])
    with torch.no_grad():
        assert (model(idx).permute(1, 2, 0, 3) - ref(idx)).abs().max().item() <= 1e-4
    # An explicit --tokenizer, and a clear error when the release has none.
    assert main(["--meta", str(release / "7B_tiny_2"), "--tokenizer",
                 str(release / "tokenizer.model"), "--out", str(tmp_path / "ck2")]) == 0
    (release / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer.model in .* give the tokenizer with "
                       "--tokenizer"):
        main(["--meta", str(release / "7B_tiny_2"), "--out", str(tmp_path / "ck3")])
    # The tokenizer must also fit the model's vocabulary.
    write_release(meta_model(CASES[1]), tmp_path / "v97")
    with pytest.raises(CheckpointError, match="420 tokens but the model's vocab_size is 97"):
        main(["--meta", str(tmp_path / "v97"), "--tokenizer", str(tmp_path / "ck" / "tokenizer"),
              "--out", str(tmp_path / "ck4")])
    assert capsys.readouterr().out.count("wrote") == 2
