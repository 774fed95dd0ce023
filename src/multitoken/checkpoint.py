"""Checkpoints: safetensors weights + JSON config + tokenizer (+ training state), written atomically.

Layout of a checkpoint directory (what `load_checkpoint` reads):

    config.json          {"format": "multitoken/1", "model": {...}, "run": {...}, "step": N, ...}
    model.safetensors    the weights, Llama-style names (see docs/weights.md)
    tokenizer/           tokenizer.json (+ meta), see multitoken.tokenizer
    train_state.pt       optional: optimizer, schedule, data position (torch.save of tensors and
                         plain containers only, so it loads with weights_only=True)
    calibration.json     optional: written by `multitoken calibrate`

Atomicity: a new checkpoint is written to `<dir>.tmp`, then the current one is renamed to
`<dir>.old`, the new one renamed into place, and `<dir>.old` retired. Directories are only ever
created complete (by renaming a finished `.tmp`) and only ever deleted after being renamed out of
the way (so no half-deleted checkpoint is ever visible), and `<dir>.old` is retired only while a
complete `<dir>` exists. Hence, through any number of crashes at any point, one complete checkpoint
exists under `<dir>` or `<dir>.old`; `find_checkpoint` recovers the latter.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from multitoken.config import ModelConfig, from_dict
from multitoken.errors import CheckpointError, ConfigError
from multitoken.model import MultiTokenModel
from multitoken.tokenizer import load_tokenizer

FORMAT = "multitoken/1"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer"
TRAIN_STATE = "train_state.pt"


def find_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint directory or a run directory holding `checkpoint/`.

    Falls back to `<dir>.old` when a save was interrupted between its two renames.
    """
    p = Path(path)
    for cand in (p, p / "checkpoint"):
        if (cand / CONFIG).is_file():
            return cand
        old = cand.with_name(cand.name + ".old")
        if (old / CONFIG).is_file() and not cand.exists():
            return old
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    raise CheckpointError(f"{p} is not a checkpoint: no {CONFIG} in it or in {p / 'checkpoint'}")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(directory: str | Path, model: MultiTokenModel, tokenizer: Any | None = None, *,
                    run_config: dict[str, Any] | None = None, step: int | None = None,
                    train_state: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None,
                    state_dict: dict[str, torch.Tensor] | None = None,
                    add_dirs: dict[str, Path] | None = None) -> Path:
    """Write a complete checkpoint to `directory`, replacing any previous one atomically.

    `state_dict` overrides `model.state_dict()` (e.g. a consolidated state dict from FSDP).
    `add_dirs` {name: folder} are moved into the checkpoint as `name/` before it is committed
    (FSDP's sharded state), so they appear and disappear atomically with it.
    """
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(final.name + ".tmp")
    old = final.with_name(final.name + ".old")
    _sweep_trash(final)
    if tmp.exists():  # an unfinished save; never the only complete copy (see the module docstring)
        _remove(tmp)
    _crash_point("tmp-cleared")
    tmp.mkdir()

    sd = state_dict if state_dict is not None else model.state_dict()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    if model.cfg.tie_embeddings:  # safetensors refuses shared storage; the tie is in the config
        tensors.pop("output.weight", None)
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
    meta: dict[str, Any] = {"format": FORMAT, "model": model.cfg.__dict__.copy(),
                            "run": run_config or {}, "step": step}
    if tokenizer is not None:
        tokenizer.save(tmp / TOKENIZER)
        meta["tokenizer"] = {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size,
                             "fingerprint": tokenizer.fingerprint()}
    meta.update(extra or {})
    if train_state is not None:
        torch.save(train_state, tmp / TRAIN_STATE)
    for name, src in (add_dirs or {}).items():
        os.replace(src, tmp / name)
    # Carry over calibration results made for the same weights' shape, if any.
    for prev in (final, old):
        if (prev / "calibration.json").is_file():
            shutil.copy2(prev / "calibration.json", tmp / "calibration.json")
            break
    _write_json(tmp / CONFIG, meta)  # last: a directory with config.json is complete
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(tmp)

    _crash_point("tmp-complete")

    if final.exists():
        # `final` is complete (it only ever appears by renaming a finished tmp), so the previous
        # `old` is redundant now. When `final` is missing (a crash between the two renames),
        # `old` is the only complete checkpoint and must survive until the new one is in place.
        if old.exists():
            _remove(old)
            _crash_point("old-removed")
        os.replace(final, old)
        _crash_point("final-moved")
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    _crash_point("committed")
    if old.exists():
        _remove(old)
    return final


def _crash_point(name: str) -> None:
    """Called between the steps of the save protocol; tests replace it to inject a crash."""


def _remove(path: Path) -> None:
    """Delete a directory without ever exposing it half-deleted under its own name: rename it to
    a unique `*.trash-*` name first (atomic), then delete that."""
    trash = path.with_name(f"{path.name}.trash-{os.getpid()}-{time.monotonic_ns()}")
    os.replace(path, trash)
    _crash_point("renamed-to-trash")
    shutil.rmtree(trash, ignore_errors=True)


def _sweep_trash(final: Path) -> None:
    """Delete what a crash inside `_remove` left behind."""
    if final.parent.is_dir():
        for t in final.parent.glob(f"{glob.escape(final.name)}.*.trash-*"):
            shutil.rmtree(t, ignore_errors=True)


def read_config(path: str | Path) -> dict[str, Any]:
    ckpt = find_checkpoint(path)
    try:
        meta = json.loads((ckpt / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {ckpt / CONFIG}: {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt / CONFIG}: unknown checkpoint format {meta.get('format')!r}")
    return meta


def model_config_from(meta: dict[str, Any], where: Path | str) -> ModelConfig:
    try:
        return from_dict(ModelConfig, meta["model"], prefix="model.")
    except (ConfigError, KeyError) as e:
        raise CheckpointError(f"{where}: invalid model config in checkpoint: {e}") from None


def new_output_dir(path: str | Path, flag: str) -> Path:
    """An output directory that may be created: refuse one that already holds files, so a
    command never writes over earlier results."""
    d = Path(path)
    if d.exists() and not d.is_dir():
        raise CheckpointError(f"{d} is a file, not a directory; choose a new {flag}")
    if d.exists() and any(d.iterdir()):
        raise CheckpointError(f"{d} already exists and is not empty; choose a new {flag}")
    return d


def read_weights(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file `path`, as stored (dtype included); on the CPU they
    view a private memory map of the file, so nothing is read until a tensor is used. A missing
    or truncated file is one CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"missing weights file: {path}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"corrupt or truncated weights file {path}: {e}") from None


def load_weights(path: Path, model: MultiTokenModel, *, strict: bool = True) -> None:
    """Load safetensors weights into `model` (copied into its parameters, cast to their dtype),
    with a clear error for any mismatch."""
    tensors = read_weights(path, model.tok_embeddings.weight.device)
    load_state_dict_checked(model, tensors, path, strict=strict)


def check_state_dict(model: MultiTokenModel, tensors: dict[str, torch.Tensor],
                     path: Path | str, *, strict: bool = True) -> None:
    """One clear error for any missing, unexpected or wrongly shaped weight of `tensors` (from
    the file or directory `path`) for `model`; reads shapes only (a meta model will do)."""
    expected = model.state_dict()
    if model.cfg.tie_embeddings:
        expected.pop("output.weight", None)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"weights in {path} do not match the config: missing {missing[:4]}"
            f"{'...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
            f"{'...' if len(unexpected) > 4 else ''}")
    for name, t in tensors.items():
        if name in expected and expected[name].shape != t.shape:
            raise CheckpointError(
                f"weights in {path} do not match the config: {name} has shape "
                f"{tuple(t.shape)}, the config implies {tuple(expected[name].shape)}")


def load_state_dict_checked(model: MultiTokenModel, tensors: dict[str, torch.Tensor],
                            path: Path | str, *, strict: bool = True,
                            assign: bool = False) -> None:
    """Load `tensors` (from the file or directory `path`) into `model`; any missing,
    unexpected or wrongly shaped weight is one clear error. `assign`: the tensors become the
    parameters (as they are: device, dtype) instead of being copied into them, for a model
    built on the meta device; a tied unembedding is tied again to the new embedding."""
    check_state_dict(model, tensors, path, strict=strict)
    model.load_state_dict(tensors, strict=False, assign=assign)
    if assign and model.cfg.tie_embeddings:  # assigning replaced only the embedding's Parameter
        model.output.weight = model.tok_embeddings.weight
    if assign and (left := [n for n, p in model.named_parameters() if p.is_meta]):
        raise CheckpointError(f"weights in {path} do not match the config: missing {left[:4]}")


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype as the JSON files and reports write it, e.g. "float32"."""
    return str(dtype).removeprefix("torch.")


def stored_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype weights `tensors` are stored in: that of most of their floating-point elements
    (a mixed file's majority; a tie goes to the wider dtype, which loses nothing); fp32 when
    there are none."""
    counts: dict[torch.dtype, int] = {}
    for t in tensors.values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    if not counts:
        return torch.float32
    return max(counts, key=lambda d: (counts[d], d.itemsize, str(d)))


def build_loaded(cfg: ModelConfig, tensors: dict[str, torch.Tensor], where: Path | str,
                 dtype: torch.dtype | Literal["auto"] | None = None,
                 device: str | torch.device = "cpu") -> MultiTokenModel:
    """The model of `cfg` holding the weights `tensors` (our names; from the file or directory
    `where`, named by errors), on `device`, in eval mode. `dtype`: None is fp32 (the dtype of a
    model built without one), "auto" the dtype the weights are stored in (`stored_dtype`).
    `tensors`' entries are replaced as they are cast.

    Bit for bit the model that building a randomly initialised fp32 model on `device`, loading
    `tensors` into it and casting it to `dtype` gives, without doing any of that: the model is
    built on the meta device (nothing allocated or randomly initialised), the names and shapes
    are checked before any time is spent, and each tensor is moved to `device` as stored, then
    cast there once into memory of its own, which becomes the parameter. So the weights are
    never held in fp32 unless fp32 is asked for; the peak is the model in `dtype` plus one
    tensor, plus the file's mapped pages, which the system can drop. Owning the weights, not
    viewing the file's mapping, keeps the model valid if the file is rewritten (a checkpoint
    saved again in place)."""
    target = (stored_dtype(tensors) if dtype == "auto"
              else torch.float32 if dtype is None else dtype)
    device = torch.device(device)
    with torch.device("meta"):
        model = MultiTokenModel(cfg)
    check_state_dict(model, tensors, where)
    for name in list(tensors):  # one at a time, so an intermediate is freed before the next
        stored = tensors[name]
        moved = stored.to(device=device)  # cast on `device`, as loading there then .to did
        tensors[name] = moved.to(dtype=target, memory_format=torch.contiguous_format,
                                 copy=moved is stored)  # a copy: never a view of the file
        del stored, moved
    load_state_dict_checked(model, tensors, where, assign=True)
    with device:  # the rotary tables computed where a model built on `device` computes them
        model.reset_buffers(device, target)  # and cast as `model.to(dtype)` would
    return model.eval()


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | Literal["auto"] | None = None,
                    ) -> tuple[MultiTokenModel, Any]:
    """Load (model, tokenizer) from a checkpoint directory (or a run directory holding one).

    The model is on `device` in `dtype`: None is fp32 whatever the file holds, "auto" the dtype
    the weights are stored in (what `convert --dtype` wrote). It is built without random init
    or an fp32 copy (`build_loaded`). Training state (train_state.pt) is not read here:
    `--resume` loads weights and optimizer into the model it builds (`load_weights`)."""
    ckpt = find_checkpoint(path)
    meta = read_config(ckpt)
    cfg = model_config_from(meta, ckpt / CONFIG)
    tok_dir = ckpt / TOKENIZER
    if not tok_dir.exists():
        raise CheckpointError(f"checkpoint {ckpt} has no tokenizer/ directory")
    tokenizer = load_tokenizer(tok_dir)
    check_tokenizer(tokenizer, cfg, meta.get("tokenizer"), ckpt)
    weights = ckpt / WEIGHTS
    return build_loaded(cfg, read_weights(weights), weights, dtype, device), tokenizer


def check_tokenizer(tokenizer: Any, cfg: ModelConfig, recorded: dict[str, Any] | None,
                    where: Path | str) -> None:
    if tokenizer.vocab_size != cfg.vocab_size:
        raise CheckpointError(
            f"{where}: tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{cfg.vocab_size}")
    if recorded and recorded.get("fingerprint") not in (None, tokenizer.fingerprint()):
        raise CheckpointError(f"{where}: tokenizer does not match the one the model was trained with")


def load_train_state(path: str | Path) -> dict[str, Any] | None:
    f = find_checkpoint(path) / TRAIN_STATE
    if not f.is_file():
        return None
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise CheckpointError(f"corrupt training state {f}: {e}".splitlines()[0]) from None
