"""Interop against reference implementations: Hugging Face's own Llama, and Meta's rotary
convention (complex multiplication of interleaved pairs) reimplemented here from its
definition. Loading Meta's whole release is checked against a re-statement of Meta's model in
tests/test_meta.py; the other Hugging Face families and their options in
tests/test_hf_families.py."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from multitoken.checkpoint import save_checkpoint
from multitoken.decoding.generate import generate
from multitoken.errors import CheckpointError
from multitoken.interop import (
    export_hf,
    export_hf_tokenizer,
    interleaved_to_halves,
    load_hf,
    load_meta,
    main,
)
from multitoken.model import apply_rope, rope_tables
from multitoken.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, train_bpe

transformers = pytest.importorskip("transformers")


def _hf_model(tie: bool = False):
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-5, tie_word_embeddings=tie)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_load_hf_llama_matches_transformers(tmp_path, tie):
    hf = _hf_model(tie)
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path)
    assert ours.n_future == 1 and ours.cfg.tie_embeddings == tie
    idx = torch.randint(0, 50, (2, 17))
    with torch.no_grad():
        ref = hf(idx).logits
        got = ours(idx)[0]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_export_hf_llama_reproduces_head_1(tmp_path):
    model = tiny_model(vocab_size=37, n_future=3).eval()
    export_hf(model, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 37, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx, heads=[0])[0], atol=1e-4,
                                   rtol=1e-4)
        back = load_hf(tmp_path)  # and back: head 1 only
        torch.testing.assert_close(back(idx)[0], model(idx, heads=[0])[0], atol=1e-5, rtol=1e-5)


def _meta_rope(x: torch.Tensor, pos: int, theta: float = 10000.0) -> torch.Tensor:
    """Meta's llama `apply_rotary_emb`: pairs (2j, 2j+1) as complex numbers times e^{i pos f_j}."""
    hd = x.shape[-1]
    freqs = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    rot = torch.polar(torch.ones(hd // 2, dtype=torch.float64), pos * freqs)
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], hd // 2, 2))
    return torch.view_as_real(xc * rot).reshape(x.shape).float()


def test_meta_rotary_permutation_preserves_attention_scores():
    torch.manual_seed(0)
    n_heads, hd, D = 2, 8, 16
    wq, wk = torch.randn(n_heads * hd, D), torch.randn(n_heads * hd, D)
    x_m, x_n = torch.randn(D), torch.randn(D)
    m, n = 5, 2
    cos, sin = rope_tables(hd, 16, 10000.0)
    for h in range(n_heads):
        rows = slice(h * hd, (h + 1) * hd)
        ref = _meta_rope(wq[rows] @ x_m, m) @ _meta_rope(wk[rows] @ x_n, n)
        q = (interleaved_to_halves(wq, n_heads)[rows] @ x_m).view(1, 1, 1, hd)
        k = (interleaved_to_halves(wk, n_heads)[rows] @ x_n).view(1, 1, 1, hd)
        got = (apply_rope(q, cos[m][None, None], sin[m][None, None])
               * apply_rope(k, cos[n][None, None], sin[n][None, None])).sum()
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
        # Without the permutation the scores are wrong (so the check above can fail).
        q0, k0 = (wq[rows] @ x_m).view(1, 1, 1, hd), (wk[rows] @ x_n).view(1, 1, 1, hd)
        wrong = (apply_rope(q0, cos[m][None, None], sin[m][None, None])
                 * apply_rope(k0, cos[n][None, None], sin[n][None, None])).sum()
        assert abs(wrong - ref) > 1e-2


def test_interop_errors(tmp_path):
    with pytest.raises(CheckpointError, match="params.json"):
        load_meta(tmp_path)
    (tmp_path / "params.json").write_text("{}")
    with pytest.raises(CheckpointError, match="consolidated"):
        load_meta(tmp_path)
    (tmp_path / "consolidated.00.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_meta(tmp_path)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="model_type 'gpt2' .* is not supported"):
        load_hf(hf)
    (hf / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="cannot build a model config"):
        load_hf(hf)
    _hf_model().config.save_pretrained(hf)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_hf(hf)
    (hf / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_hf(hf)
    with pytest.raises(CheckpointError, match="anticausal"):
        export_hf(tiny_model(head_type="anticausal"), tmp_path / "x")


def test_cli_convert_hf_in_and_out(tmp_path, capsys):
    from multitoken.checkpoint import load_checkpoint
    from multitoken.errors import MultitokenError
    from multitoken.interop import main
    from multitoken.tokenizer import ByteTokenizer

    cfg = transformers.LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    ByteTokenizer().save(tmp_path / "tok")
    assert main(["--hf", str(tmp_path / "hf"), "--tokenizer", str(tmp_path / "tok"),
                 "--out", str(tmp_path / "ck")]) == 0
    model, tok = load_checkpoint(tmp_path / "ck")
    idx = torch.tensor([tok.encode("def f(x):")])
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-4, rtol=1e-4)
    assert main(["--checkpoint", str(tmp_path / "ck"), "--to-hf", str(tmp_path / "hf2")]) == 0
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(idx).logits, hf(idx).logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(MultitokenError, match="not empty"):
        main(["--checkpoint", str(tmp_path / "ck"), "--to-hf", str(tmp_path / "hf2")])
    with pytest.raises(MultitokenError, match="--tokenizer"):
        main(["--meta", str(tmp_path / "hf"), "--out", str(tmp_path / "m")])
    # a tokenizer whose vocabulary does not match the model's
    small = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4)
    transformers.LlamaForCausalLM(small).save_pretrained(tmp_path / "hf50")
    with pytest.raises(CheckpointError, match="260 tokens but the model's vocab_size is 50"):
        main(["--hf", str(tmp_path / "hf50"), "--tokenizer", str(tmp_path / "tok"),
              "--out", str(tmp_path / "ck50")])


# ---------------------------------------------------------------------------------------------
# Exports that work with AutoTokenizer + AutoModelForCausalLM + generate as they are.

TEXTS = ["def f(x):\n\treturn x * 2  # done\n", "héllo wörld, 日本語 ✓ 🐍", "a\r\n\n\t  b . , !",
         "literal <eos> and <bos> and <pad> stay text", " leading space", ""]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> BPETokenizer:
    root = tmp_path_factory.mktemp("bpe_corpus")
    files = []
    for i in range(3):
        f = root / f"m{i}.py"
        f.write_text("".join(f"def fn_{i}_{j}(value):\n    return value + {j}  # café\n\n"
                             for j in range(40)), encoding="utf-8")
        files.append(f)
    return train_bpe(files, 300)


@contextmanager
def no_warnings() -> Iterator[None]:
    """Python warnings are errors, and anything transformers logs at WARNING or above fails."""
    logged: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logged.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    log = logging.getLogger("transformers")
    log.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield
    finally:
        log.removeHandler(handler)
    assert logged == []


def _byte_or_bpe(kind: str, bpe: BPETokenizer) -> Tokenizer:
    return ByteTokenizer() if kind == "bytes" else bpe


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_exported_tokenizer_gives_multitoken_ids_and_text(tmp_path: Path, kind: str,
                                                          bpe: BPETokenizer) -> None:
    tok = _byte_or_bpe(kind, bpe)
    export_hf_tokenizer(tok, tmp_path, max_seq_len=123)
    with no_warnings():
        hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for s in TEXTS:
        ids = tok.encode(s)
        assert hf(s, add_special_tokens=False).input_ids == ids, s
        assert hf(s).input_ids == ids, s  # no bos or eos added by default: multitoken adds none
        assert hf.decode(ids) == s
    assert hf.model_max_length == 123
    assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id) == (tok.eos_id, tok.pad_id,
                                                                   tok.bos_id)
    # Any id sequence (specials, half a UTF-8 character, a lone continuation byte) decodes to
    # multitoken's text once specials are skipped.
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids = torch.randint(0, tok.vocab_size, (12,), generator=gen).tolist()
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids), ids


def test_exported_byte_tokenizer_ids_are_bytes(tmp_path: Path) -> None:
    tok = ByteTokenizer()
    export_hf_tokenizer(tok, tmp_path, max_seq_len=64)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    # Every byte value that UTF-8 text can contain: ASCII, continuation bytes, lead bytes.
    text = "".join(chr(c) for c in [*range(128), 0x80, 0xBF, 0x7FF, 0x800, 0xFFFF, 0x10000,
                                    0x10FFFF, 0x40000])
    text += "".join(chr(c) for c in range(0xA0, 0x800, 7))
    ids = hf(text, add_special_tokens=False).input_ids
    assert ids == list(text.encode("utf-8"))
    assert hf.decode(ids) == text
    assert len(hf) == tok.vocab_size == 260
    assert {hf.convert_tokens_to_ids(n): n for n in ("<bos>", "<eos>", "<pad>", "<unk>")} == \
        {256: "<bos>", 257: "<eos>", 258: "<pad>", 259: "<unk>"}
    assert hf.decode([0xE6, 0x97, 0x41, 257, 0x80, 0x42], skip_special_tokens=True) == \
        "\ufffdA\ufffdB"


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_convert_to_hf_generates_like_multitoken(tmp_path: Path, kind: str,
                                                 bpe: BPETokenizer) -> None:
    tok = _byte_or_bpe(kind, bpe)
    model = tiny_model(vocab_size=tok.vocab_size, n_future=2, max_seq_len=48).eval()
    save_checkpoint(tmp_path / "ck", model, tok)
    assert main(["--checkpoint", str(tmp_path / "ck"), "--to-hf", str(tmp_path / "hf")]) == 0
    out = tmp_path / "hf"
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == \
        (tok.bos_id, tok.eos_id, tok.pad_id)
    with no_warnings():
        gc = transformers.GenerationConfig.from_pretrained(out)
        hf_tok = transformers.AutoTokenizer.from_pretrained(out)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        assert (gc.eos_token_id, gc.bos_token_id, gc.pad_token_id) == \
            (tok.eos_id, tok.bos_id, tok.pad_id)
        assert hf_model.generation_config.eos_token_id == tok.eos_id
        for prompt in ["def f(x):", "héllo ✓\n"]:
            inputs = hf_tok(prompt, return_tensors="pt")
            with torch.no_grad():
                got = hf_model.generate(**inputs, max_new_tokens=8, do_sample=False)
            new = got[0, inputs.input_ids.shape[1]:].tolist()
            ours = generate(model, tok.encode(prompt), max_new_tokens=8, stop=tok.eos_id)
            assert inputs.input_ids[0].tolist() == tok.encode(prompt)
            assert new == ours.tokens[0]
            assert hf_tok.decode(new, skip_special_tokens=True) == tok.decode(ours.tokens[0])


def test_export_without_tokenizer_has_null_special_ids(tmp_path: Path) -> None:
    export_hf(tiny_model(vocab_size=37, n_future=1), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == \
        (None, None, None)
    assert not (tmp_path / "tokenizer.json").exists()
    with no_warnings():
        gc = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert gc.eos_token_id is None and not gc.do_sample


def test_export_refuses_a_tokenizer_of_another_vocabulary(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="260 tokens but the model's vocab_size is 37"):
        export_hf(tiny_model(vocab_size=37), tmp_path / "x", ByteTokenizer())
    assert not (tmp_path / "x").exists()
