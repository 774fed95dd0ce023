"""Loading Meta / Hugging Face weights builds the model on the meta device and assigns the cast
weights (interop._finish): bit-identical to building an fp32 model, loading, then casting (the
way it was done before, `_build_then_cast` below), without ever holding the weights in fp32
when another dtype is asked for, and owning its weights rather than viewing the file."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import tiny_model
from multitoken import interop
from multitoken.checkpoint import load_state_dict_checked
from multitoken.config import ModelConfig
from multitoken.errors import CheckpointError
from multitoken.interop import export_hf, load_hf, load_meta
from multitoken.model import MultiTokenModel


def _build_then_cast(cfg: ModelConfig, sd: dict[str, Tensor], where: Path,
                     dtype: torch.dtype | None) -> MultiTokenModel:
    """interop._finish as it was: a randomly initialised fp32 model, loaded, then cast."""
    model = MultiTokenModel(cfg)
    load_state_dict_checked(model, sd, where)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def _hf_dir(path: Path, family: str, file_dtype: torch.dtype) -> Path:
    """An exported Hugging Face directory: a tied Llama, or a Qwen2 (q/k/v biases) with two
    extra heads in mtp_heads.safetensors."""
    if family == "llama-tied":
        model = tiny_model(seed=1, n_future=1, tie_embeddings=True)
    else:
        model = tiny_model(seed=2, n_future=3, qkv_bias=True)
    with torch.no_grad():  # biases start at zero: make them count
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_()
    return export_hf(model.to(file_dtype), path)


_META = dict(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=37, multiple_of=32,
             n_future_tokens=2)


def _meta_dir(path: Path, file_dtype: torch.dtype) -> Path:
    """params.json + consolidated.00.pth in Meta's layout: `layers` = trunk + head 1,
    `extra_heads` = heads 2..n, plus Meta's `rope.freqs` (ignored on load)."""
    p = _META
    cfg = ModelConfig(vocab_size=p["vocab_size"], dim=p["dim"], n_layers=p["n_layers"],
                      n_heads=p["n_heads"], n_kv_heads=p["n_kv_heads"], ffn_hidden=96,
                      max_seq_len=64, n_future=p["n_future_tokens"])  # 96: Meta's width rule
    torch.manual_seed(3)
    ours = MultiTokenModel(cfg).state_dict()
    n_trunk = cfg.n_trunk_layers
    raw: dict[str, Tensor] = {"rope.freqs": torch.randn(cfg.head_dim // 2)}
    for name, t in ours.items():
        kind, _, rest = name.partition(".")
        if kind == "heads":
            i, _, weight = rest.partition(".")
            name = (f"layers.{n_trunk}.{weight}" if i == "0"
                    else f"extra_heads.{int(i) - 1}.{weight}")
        raw[name] = t.to(file_dtype)
    path.mkdir()
    (path / "params.json").write_text(json.dumps(p))
    torch.save(raw, path / "consolidated.00.pth")
    return path


def _load(kind: str, path: Path, dtype: torch.dtype | None) -> MultiTokenModel:
    return load_meta(path, max_seq_len=64, dtype=dtype) if kind == "meta" else load_hf(
        path, dtype=dtype)


def _assert_identical(got: MultiTokenModel, ref: MultiTokenModel) -> None:
    got_p = dict(got.named_parameters(remove_duplicate=False))
    ref_p = dict(ref.named_parameters(remove_duplicate=False))
    assert got_p.keys() == ref_p.keys()
    for name, r in ref_p.items():
        g = got_p[name]
        assert (g.dtype, g.device, g.stride(), g.requires_grad) == (
            r.dtype, r.device, r.stride(), r.requires_grad), name
        assert torch.equal(g, r), name
    if ref.cfg.tie_embeddings:
        assert got.output.weight is got.tok_embeddings.weight
    got_b, ref_b = dict(got.named_buffers()), dict(ref.named_buffers())
    assert got_b.keys() == ref_b.keys() == {"rope_cos", "rope_sin"}
    for name, r in ref_b.items():
        assert got_b[name].dtype == r.dtype and torch.equal(got_b[name], r), name
    assert not got.training and not ref.training
    idx = torch.randint(0, got.cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(got(idx), ref(idx))


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("file_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["llama-tied", "qwen2-mtp", "meta"])
def test_lazy_load_is_bit_identical_to_building_then_casting(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, file_dtype: torch.dtype,
        dtype: torch.dtype | None) -> None:
    path = (_meta_dir(tmp_path / "meta", file_dtype) if kind == "meta"
            else _hf_dir(tmp_path / "hf", kind, file_dtype))
    got = _load(kind, path, dtype)
    assert {p.dtype for p in got.parameters()} == {dtype or torch.float32}
    with monkeypatch.context() as m:
        m.setattr(interop, "_finish", _build_then_cast)
        ref = _load(kind, path, dtype)
    _assert_identical(got, ref)
    # The rotary tables are those of a model built the ordinary way (then cast, as .to does).
    plain = MultiTokenModel(got.cfg).to(dtype or torch.float32)
    assert torch.equal(got.rope_cos, plain.rope_cos) and torch.equal(got.rope_sin, plain.rope_sin)


class _Materialised(TorchDispatchMode):
    """Every aten op's tensor outputs that are not on the meta device: (op, dtype, numel)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, torch.dtype, int]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor) and not t.is_meta:
                self.seen.append((str(func), t.dtype, t.numel()))
        return out


@contextmanager
def _constructed_on() -> Iterator[list[torch.device]]:
    """The devices MultiTokenModel.reset_parameters (random init) ran on."""
    devices: list[torch.device] = []
    orig: Callable[[MultiTokenModel], None] = MultiTokenModel.reset_parameters

    def spy(self: MultiTokenModel) -> None:
        devices.extend({p.device for p in self.parameters()})
        orig(self)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(MultiTokenModel, "reset_parameters", spy)
        yield devices


def _fp32_elements(seen: list[tuple[str, torch.dtype, int]]) -> int:
    return sum(n for _, dt, n in seen if dt == torch.float32)


@pytest.mark.parametrize("kind", ["qwen2-mtp", "meta"])
def test_bf16_load_never_holds_fp32_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             kind: str) -> None:
    path = (_meta_dir(tmp_path / "meta", torch.bfloat16) if kind == "meta"
            else _hf_dir(tmp_path / "hf", kind, torch.bfloat16))
    with _constructed_on() as devices, _Materialised() as ops:
        model = _load(kind, path, torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    assert devices == [torch.device("meta")]  # random init ran once, allocating nothing
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())
    assert not [op for op, _, _ in ops.seen if "normal" in op or "uniform" in op]
    # What fp32 there is, is the rotary tables (computed in fp32, as a built model has them).
    assert _fp32_elements(ops.seen) < n_params / 10
    # The control: building then casting does hold every weight in fp32, and is caught here.
    monkeypatch.setattr(interop, "_finish", _build_then_cast)
    with _constructed_on() as devices, _Materialised() as ops:
        _load(kind, path, torch.bfloat16)
    assert devices == [torch.device("cpu")] and _fp32_elements(ops.seen) >= n_params


def test_loaded_model_owns_its_weights(tmp_path: Path) -> None:
    """Weights are copied out of the file's memory map: rewriting the file in place (as an
    export into the same directory would) leaves the loaded model as it was."""
    path = _hf_dir(tmp_path / "hf", "llama-tied", torch.float32)  # file dtype == model dtype
    model = load_hf(path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    f = path / "model.safetensors"
    size = f.stat().st_size
    header = 8 + int.from_bytes(f.read_bytes()[:8], "little")
    with f.open("r+b") as fh:  # same size, every weight byte zero: a mapping would see it
        fh.seek(header)
        fh.write(bytes(size - header))
    assert all(not v.any() for v in load_file(str(f)).values())
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_mismatched_weights_are_one_clear_error(tmp_path: Path) -> None:
    path = _hf_dir(tmp_path / "hf", "llama-tied", torch.bfloat16)
    f = path / "model.safetensors"
    good = load_file(str(f))
    sd = dict(good)
    sd.pop("model.layers.0.mlp.up_proj.weight")
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match=r"missing \['layers.0.feed_forward.w3.weight'\]"):
        load_hf(path, dtype=torch.bfloat16)
    sd = dict(good)
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(5, 32, dtype=torch.bfloat16)
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match=r"w3.weight has shape \(5, 32\)"):
        load_hf(path, dtype=torch.bfloat16)
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_hf(path)


def test_reset_buffers_gives_a_meta_built_model_real_tables() -> None:
    cfg = tiny_model().cfg
    with torch.device("meta"):
        model = MultiTokenModel(cfg)
    assert model.rope_cos.is_meta
    model.reset_buffers(torch.device("cpu"), torch.float16)
    plain = MultiTokenModel(cfg).half()
    assert model.rope_cos.dtype == torch.float16 and not model.rope_cos.is_meta
    assert torch.equal(model.rope_cos, plain.rope_cos)
    assert torch.equal(model.rope_sin, plain.rope_sin)
    assert "rope_cos" not in model.state_dict()  # still non-persistent
