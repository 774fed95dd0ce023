"""load_checkpoint builds the model on the meta device and assigns the cast weights
(checkpoint.build_loaded, shared with interop._finish): bit-identical to building a randomly
initialised fp32 model on the device, loading, then casting (`_build_then_cast` below, the way
it was done before), without that random init or an fp32 copy. `convert --dtype` writes the
weights in the source's dtype by default, and the checkpoint keeps it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import Tensor

from conftest import tiny_model
from multitoken import checkpoint
from multitoken.checkpoint import (
    build_loaded,
    load_checkpoint,
    load_weights,
    read_config,
    save_checkpoint,
    stored_dtype,
)
from multitoken.cli import main as cli_main
from multitoken.errors import CheckpointError, ConfigError
from multitoken.interop import load_hf, load_meta, main
from multitoken.model import MultiTokenModel
from multitoken.tokenizer import ByteTokenizer
from test_interop_lazy_load import (
    _assert_identical,
    _constructed_on,
    _fp32_elements,
    _Materialised,
    _meta_dir,
)

V = 260  # the byte tokenizer's vocabulary
DType = torch.dtype | Literal["auto"] | None


def _build_then_cast(path: Path, device: str = "cpu",
                     dtype: DType = None) -> MultiTokenModel:
    """load_checkpoint's model as it was built before build_loaded: fp32, randomly initialised
    on `device`, loaded, then cast ("auto": to the stored dtype, what it stands for)."""
    ckpt = checkpoint.find_checkpoint(path)
    cfg = checkpoint.model_config_from(read_config(ckpt), ckpt)
    with torch.device(device):
        model = MultiTokenModel(cfg)
    load_weights(ckpt / checkpoint.WEIGHTS, model)
    if dtype == "auto":
        dtype = stored_dtype(load_file(str(ckpt / checkpoint.WEIGHTS)))
    if dtype is not None:
        model.to(dtype=dtype)
    return model.eval()


_MODELS = {
    "tied": dict(n_future=1, tie_embeddings=True),
    "qkv-bias-n3": dict(n_future=3, qkv_bias=True),
    "linear-heads": dict(n_future=2, head_type="linear"),
    "qk-norm-causal": dict(n_future=3, qk_norm=True, head_type="causal"),
}


def _saved(path: Path, kind: str, stored: torch.dtype) -> Path:
    model = tiny_model(seed=7, vocab_size=V, **_MODELS[kind])
    with torch.no_grad():  # biases start at zero, linear heads as the identity: make them count
        for name, p in model.named_parameters():
            if name.endswith(".bias") or name.startswith("heads."):
                p.normal_(0.0, 0.1)
    return save_checkpoint(path, model.to(stored), ByteTokenizer())


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16, torch.float16, "auto"])
@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", list(_MODELS))
def test_load_checkpoint_is_bit_identical_to_building_then_casting(
        tmp_path: Path, kind: str, stored: torch.dtype, dtype: DType) -> None:
    ck = _saved(tmp_path / "ck", kind, stored)
    got, tok = load_checkpoint(ck, dtype=dtype)
    want = stored if dtype == "auto" else dtype or torch.float32
    assert {p.dtype for p in got.parameters()} == {want}
    assert {b.dtype for b in got.buffers()} == {want}  # as model.to(dtype) leaves the tables
    assert tok.vocab_size == V
    _assert_identical(got, _build_then_cast(ck, dtype=dtype))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_load_checkpoint_on_cuda_is_bit_identical(tmp_path: Path, stored: torch.dtype,
                                                  dtype: DType) -> None:
    ck = _saved(tmp_path / "ck", "qkv-bias-n3", stored)
    got, _ = load_checkpoint(ck, device="cuda", dtype=dtype)
    ref = _build_then_cast(ck, "cuda", dtype)
    assert got.tok_embeddings.weight.device.type == got.rope_cos.device.type == "cuda"
    _assert_identical(got, ref)


def test_bf16_checkpoint_loads_without_random_init_or_fp32(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    ck = _saved(tmp_path / "ck", "qkv-bias-n3", torch.bfloat16)
    with _constructed_on() as devices, _Materialised() as ops:
        model, _ = load_checkpoint(ck, dtype=torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    assert devices == [torch.device("meta")]  # random init ran once, allocating nothing
    assert not any(p.is_meta for p in model.parameters())
    assert not [op for op, _, _ in ops.seen if "normal" in op or "uniform" in op]
    assert _fp32_elements(ops.seen) < n_params / 10  # the rotary tables only
    # The control: the old way is caught by the same checks.
    with _constructed_on() as devices, _Materialised() as ops:
        _build_then_cast(ck, dtype=torch.bfloat16)
    assert devices == [torch.device("cpu")] and _fp32_elements(ops.seen) >= n_params


def test_loaded_checkpoint_owns_its_weights(tmp_path: Path) -> None:
    """Rewriting the weights file in place leaves a loaded model as it was: the weights were
    copied out of the file's memory map even when no cast was needed."""
    ck = _saved(tmp_path / "ck", "tied", torch.float32)
    model, _ = load_checkpoint(ck)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    f = ck / checkpoint.WEIGHTS
    size, header = f.stat().st_size, 8 + int.from_bytes(f.read_bytes()[:8], "little")
    with f.open("r+b") as fh:
        fh.seek(header)
        fh.write(bytes(size - header))
    assert all(not v.any() for v in load_file(str(f)).values())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_mismatched_or_missing_weights_are_one_clear_error(tmp_path: Path) -> None:
    ck = _saved(tmp_path / "ck", "qkv-bias-n3", torch.bfloat16)
    f = ck / checkpoint.WEIGHTS
    good = load_file(str(f))
    save_file({k: v for k, v in good.items() if k != "layers.0.attention.wk.bias"}, str(f))
    with pytest.raises(CheckpointError, match=r"missing \['layers.0.attention.wk.bias'\]"):
        load_checkpoint(ck)
    save_file({**good, "norm.weight": torch.ones(5, dtype=torch.bfloat16)}, str(f))
    with pytest.raises(CheckpointError, match=r"norm.weight has shape \(5,\)"):
        load_checkpoint(ck, dtype="auto")
    f.unlink()
    with pytest.raises(CheckpointError, match="missing weights file"):
        load_checkpoint(ck)


def test_load_weights_into_a_training_model_is_unchanged(tmp_path: Path) -> None:
    """--resume and train --init copy weights into the fp32 model they build (load_weights):
    a bf16 checkpoint widens exactly, as load_checkpoint's default fp32 does."""
    ck = _saved(tmp_path / "ck", "qkv-bias-n3", torch.bfloat16)
    model = MultiTokenModel(load_checkpoint(ck)[0].cfg)
    params = dict(model.named_parameters())
    load_weights(ck / checkpoint.WEIGHTS, model)
    assert all(p is params[n] for n, p in model.named_parameters())  # copied into, in fp32
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    ref, _ = load_checkpoint(ck)
    assert all(torch.equal(p, ref.state_dict()[n]) for n, p in model.state_dict().items())


def test_stored_dtype_is_the_majority_of_floating_elements() -> None:
    bf, f32 = torch.bfloat16, torch.float32
    assert stored_dtype({"a": torch.zeros(10, dtype=bf), "b": torch.zeros(3),
                         "c": torch.zeros(4), "i": torch.zeros(99, dtype=torch.int64)}) == bf
    assert stored_dtype({"a": torch.zeros(3, dtype=bf), "b": torch.zeros(4)}) == f32
    assert stored_dtype({"a": torch.zeros(4, dtype=bf), "b": torch.zeros(4)}) == f32  # tie: wider
    assert stored_dtype({}) == f32


def test_auto_on_a_mixed_source_takes_the_majority(tmp_path: Path) -> None:
    """A bf16 model whose norm gains are fp32 (as some exports keep them) loads in bf16."""
    ck = _saved(tmp_path / "ck", "tied", torch.bfloat16)
    f = ck / checkpoint.WEIGHTS
    sd = {k: v.float() if k.endswith("norm.weight") else v for k, v in load_file(str(f)).items()}
    save_file(sd, str(f))
    model, _ = load_checkpoint(ck, dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    cfg = model.cfg
    got = build_loaded(cfg, dict(sd), f, "auto")
    _assert_identical(got, build_loaded(cfg, dict(sd), f, torch.bfloat16))


# -- convert --dtype ---------------------------------------------------------------------------

def _hf_llama(path: Path, dtype: torch.dtype) -> Path:
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).to(dtype).save_pretrained(path)
    ByteTokenizer().save(path.parent / "tok")
    return path


def _file_dtypes(path: Path) -> set[torch.dtype]:
    return {t.dtype for t in load_file(str(path)).values()}


def _logits(model: MultiTokenModel) -> Tensor:
    idx = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(idx)


def test_convert_keeps_a_bf16_source_in_bf16_by_default(tmp_path: Path) -> None:
    hf = _hf_llama(tmp_path / "hf", torch.bfloat16)
    tok = str(tmp_path / "tok")
    assert main(["--hf", str(hf), "--tokenizer", tok, "--out", str(tmp_path / "ck")]) == 0
    assert _file_dtypes(tmp_path / "ck" / checkpoint.WEIGHTS) == {torch.bfloat16}
    model, _ = load_checkpoint(tmp_path / "ck", dtype="auto")
    direct = load_hf(hf, dtype=torch.bfloat16)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    assert torch.equal(_logits(model), _logits(direct))
    # Callers that ask for nothing still get fp32: the same values, widened exactly.
    fp32, _ = load_checkpoint(tmp_path / "ck")
    assert torch.equal(_logits(fp32), _logits(load_hf(hf)))
    # --dtype float32: the weights written in fp32, the same values.
    assert main(["--hf", str(hf), "--tokenizer", tok, "--out", str(tmp_path / "f32"),
                 "--dtype", "float32"]) == 0
    assert _file_dtypes(tmp_path / "f32" / checkpoint.WEIGHTS) == {torch.float32}
    wide, _ = load_checkpoint(tmp_path / "f32", dtype="auto")
    assert wide.tok_embeddings.weight.dtype == torch.float32
    assert torch.equal(_logits(wide), _logits(fp32))
    # --to-hf: the checkpoint's dtype by default (config.json says so), or the one asked for.
    assert main(["--checkpoint", str(tmp_path / "ck"), "--to-hf", str(tmp_path / "out")]) == 0
    assert _file_dtypes(tmp_path / "out" / "model.safetensors") == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert main(["--checkpoint", str(tmp_path / "ck"), "--to-hf", str(tmp_path / "out32"),
                 "--dtype", "float32"]) == 0
    assert _file_dtypes(tmp_path / "out32" / "model.safetensors") == {torch.float32}


def test_convert_fp32_source_stays_fp32_and_can_be_narrowed(tmp_path: Path) -> None:
    hf = _hf_llama(tmp_path / "hf", torch.float32)
    tok = str(tmp_path / "tok")
    assert main(["--hf", str(hf), "--tokenizer", tok, "--out", str(tmp_path / "ck")]) == 0
    assert _file_dtypes(tmp_path / "ck" / checkpoint.WEIGHTS) == {torch.float32}
    assert main(["--hf", str(hf), "--tokenizer", tok, "--out", str(tmp_path / "h"),
                 "--dtype", "float16"]) == 0
    assert _file_dtypes(tmp_path / "h" / checkpoint.WEIGHTS) == {torch.float16}
    half, _ = load_checkpoint(tmp_path / "h", dtype="auto")
    assert torch.equal(_logits(half), _logits(load_hf(hf, dtype=torch.float16)))


def test_meta_release_auto_is_its_bf16(tmp_path: Path) -> None:
    d = _meta_dir(tmp_path / "meta", torch.bfloat16)
    model = load_meta(d, max_seq_len=64, dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    _assert_identical(model, load_meta(d, max_seq_len=64, dtype=torch.bfloat16))


def test_bad_dtype_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hf = _hf_llama(tmp_path / "hf", torch.bfloat16)
    capsys.readouterr()  # transformers' progress bars
    with pytest.raises(ConfigError, match="invalid choice: 'int8'"):
        main(["--hf", str(hf), "--out", str(tmp_path / "x"), "--dtype", "int8"])
    assert cli_main(["convert", "--hf", str(hf), "--out", str(tmp_path / "x"),
                     "--dtype", "fp8"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and "fp8" in err
    assert not (tmp_path / "x").exists()
