"""The training program: data, model, AdamW + warmup/cosine, MTP loss, eval, checkpoints, plots.

Single-device by design; `multitoken.distributed` wraps it for torchrun (DDP / FSDP2).
A run directory holds:
    checkpoint/      what load_checkpoint reads (+ train_state.pt for --resume)
    metrics.jsonl    one JSON object per log line: {"kind": "train"|"val", "step": ..., ...}
    loss.png         train/validation loss and validation accuracy per head
    config.yaml      the resolved run config
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

from multitoken import checkpoint as ckpt_io
from multitoken import distributed as dist_mod
from multitoken.config import RunConfig, resume_run_config, to_dict
from multitoken.errors import CheckpointError, ConfigError
from multitoken.loss import LossOutput, evaluate_batch, head_weights
from multitoken.model import MultiTokenModel


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped training after a checkpoint of the last finished step was saved."""

    def __init__(self, signum: int, step: int, run_dir: Path) -> None:
        self.signum, self.step, self.run_dir = signum, step, run_dir
        name = signal.Signals(signum).name
        super().__init__(f"{name}: saved a checkpoint at step {step} in {run_dir}; continue with "
                         f"`multitoken train --out {run_dir} --resume`")


class StopSignals:
    """While active, SIGINT/SIGTERM only set `.signum`; the loop saves a checkpoint at the end of
    the step and stops. A second signal interrupts at once (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.signum = 0
        self._saved: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"train.device: unknown device {spec!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={spec} but CUDA is not available")
    return dev


def autocast_factory(device: torch.device, dtype: str) -> Callable[[], Any]:
    """bf16 autocast on CUDA when asked; a no-op elsewhere (CPU runs stay fp32 and exact)."""
    if device.type == "cuda" and dtype == "bfloat16":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def lr_lambda(cfg: RunConfig) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to min_lr_ratio * lr at the last step."""
    return warmup_cosine(cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.min_lr_ratio)


def warmup_cosine(warm: int, total: int, floor: float) -> Callable[[int], float]:
    """LR factor per step: linear warmup over `warm` steps, then cosine decay to `floor` at
    step `total` (and `floor` after it)."""

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def make_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.AdamW:
    # Weight decay on matrices only; norms (1-D) are not decayed, as in nanoGPT.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    o = cfg.optim
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr, betas=(o.beta1, o.beta2), fused=False)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def new_run_dir(base: str | Path = "runs") -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(base) / stamp
    k = 1
    while path.exists():
        path = Path(base) / f"{stamp}-{k}"
        k += 1
    return path


@torch.no_grad()
def evaluate(model: MultiTokenModel, batches: list[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device, autocast: Callable[[], Any] | None = None) -> dict[str, list[float]]:
    """Validation loss and top-1 accuracy per head, weighted by each head's label count."""
    was_training = model.training
    model.eval()
    n = model.cfg.n_future
    loss_sum, correct, count = [0.0] * n, [0] * n, [0] * n
    for x, y in batches:
        out = evaluate_batch(model, x.to(device), y.to(device), autocast)
        for i in range(n):
            c = int(out.head_counts[i])
            loss_sum[i] += float(out.head_losses[i]) * c
            correct[i] += int(out.head_correct[i])
            count[i] += c
    model.train(was_training)
    return {"head_loss": [s / max(1, c) for s, c in zip(loss_sum, count)],
            "head_acc": [k / max(1, c) for k, c in zip(correct, count)]}


class MetricsLog:
    """Append-only metrics.jsonl; on resume, drops lines past the checkpoint's step."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.is_file():
            return
        keep = [ln for ln in self.path.read_text().splitlines()
                if ln.strip() and json.loads(ln)["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, self.path)

    def write(self, row: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def train(cfg: RunConfig, out_dir: str | Path | None = None, *, resume: bool = False,
          progress: bool = True) -> dict[str, Any]:
    """Train per `cfg`; returns the final validation metrics. See the module docstring."""
    cfg.validate()
    dist = dist_mod.setup(cfg.parallel)
    with dist:  # closes the process group; names a dead or stalled peer clearly
        return _train(cfg, out_dir, resume, progress, dist)


def resume_config(run_dir: str | Path, recipe: str | Path | None = None,
                  overrides: list[str] | None = None) -> tuple[RunConfig, list[str]]:
    """The config to continue `run_dir` with: the one saved in its checkpoint, plus what the
    recipe and overrides change (see config.resume_run_config; model and data cannot change)."""
    try:
        ckpt = ckpt_io.find_checkpoint(Path(run_dir) / "checkpoint")
    except CheckpointError:
        raise CheckpointError(f"--resume: no checkpoint in {run_dir} to resume from "
                              "(start it again without --resume)") from None
    saved = ckpt_io.read_config(ckpt).get("run")
    if not saved:
        raise CheckpointError(f"--resume: {ckpt} records no run config")
    return resume_run_config(saved, recipe, overrides)


# Files a run writes next to its checkpoint: a folder holding them but no checkpoint is a run
# stopped before its first save, which may be started again from scratch.
RUN_FILES = ("metrics.jsonl", "config.yaml", "loss.png")


def _has_checkpoint(ckpt_dir: Path) -> bool:
    try:
        ckpt_io.find_checkpoint(ckpt_dir)
    except CheckpointError:
        return False
    return True


def _train(cfg: RunConfig, out_dir: str | Path | None, resume: bool, progress: bool,
           dist: dist_mod.DistState) -> dict[str, Any]:
    run = Path(out_dir) if out_dir is not None else dist.broadcast_object(new_run_dir() if dist.is_main else None)
    ckpt_dir = run / "checkpoint"
    created = dist.is_main and not run.exists()
    try:
        return _train_in(cfg, run, resume, progress, dist)
    except BaseException:
        # A failure before the first checkpoint leaves no new folder behind; an interrupt saves
        # a checkpoint first, and a folder that existed before is never removed.
        if created and run.exists() and not _has_checkpoint(ckpt_dir):
            shutil.rmtree(run, ignore_errors=True)
        raise


def _train_in(cfg: RunConfig, run: Path, resume: bool, progress: bool,
              dist: dist_mod.DistState) -> dict[str, Any]:
    from multitoken.data import BatchSampler, prepare_data, val_batches
    from multitoken.tokenizer import load_tokenizer

    t = cfg.train
    ckpt_dir = run / "checkpoint"
    device = dist.device if dist.device is not None else resolve_device(t.device)
    if t.threads:
        torch.set_num_threads(t.threads)
    autocast = autocast_factory(device, t.dtype)
    seed_everything(t.seed)

    # ---- resume: the checkpoint's tokenizer and state win; the model shape must match ----------
    state: dict[str, Any] | None = None
    tokenizer = None
    if resume:
        try:
            ckpt_io.find_checkpoint(ckpt_dir)
        except CheckpointError:
            raise CheckpointError(f"--resume: no checkpoint in {run} to resume from") from None
        meta = ckpt_io.read_config(ckpt_dir)
        tokenizer = load_tokenizer(ckpt_io.find_checkpoint(ckpt_dir) / ckpt_io.TOKENIZER)
        state = dist_mod.load_train_state(ckpt_dir, dist)
        if state is None:
            raise CheckpointError(f"--resume: {ckpt_dir} has no training state (train_state.pt)")
    elif dist.is_main and _has_checkpoint(ckpt_dir):
        raise ConfigError(
            f"{run} already holds a run; pass --resume to continue it or choose another --out")

    data = prepare_data(cfg.data, tokenizer)
    tokenizer = data.tokenizer
    if cfg.model.vocab_size != tokenizer.vocab_size:
        cfg.model.vocab_size = tokenizer.vocab_size  # the tokenizer decides the vocabulary
    cfg.validate()
    if resume:
        saved = ckpt_io.model_config_from(meta, ckpt_dir)
        if dataclasses.asdict(saved) != dataclasses.asdict(cfg.model):
            raise CheckpointError(f"--resume: the model config differs from the checkpoint's in {ckpt_dir}")

    with torch.device(device):
        model = MultiTokenModel(cfg.model)
    if resume:
        dist_mod.load_model_weights(ckpt_dir, model, dist)
    wrapped = dist_mod.wrap_model(model, cfg.parallel, dist, t.dtype)
    if t.compile:
        for block in [*model.layers, *model.heads]:
            block.compile()
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    micro = t.batch_size // t.grad_accum  # global rows per micro-step
    if micro % dist.world_size != 0:
        raise ConfigError(f"train.batch_size / train.grad_accum ({micro}) must be divisible by the "
                          f"number of processes ({dist.world_size})")
    sampler = BatchSampler(data.train, t.seq_len, micro, seed=t.seed, rank=dist.rank,
                           world_size=dist.world_size)
    # Each rank evaluates its rows of the same global batches: the union is the 1-process set.
    vbatches = dist_mod.shard_batches(val_batches(data.val, t.seq_len, micro, t.eval_batches), dist)
    weights = head_weights(cfg.loss.weights, cfg.model.n_future)
    metrics = MetricsLog(run / "metrics.jsonl", enabled=dist.is_main)
    start = 0
    if state is not None:
        opt.load_state_dict(dist_mod.optimizer_state_for(state, model, opt, dist))
        sched.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        start = int(state["step"])
        metrics.truncate_after(start)
    if dist.is_main:
        run.mkdir(parents=True, exist_ok=True)  # only now: bad input above leaves no folder
        if state is None:  # a folder without a checkpoint starts over: drop a stopped run's files
            for name in RUN_FILES:
                (run / name).unlink(missing_ok=True)
        (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        print(f"run: {run} | {model.num_params() / 1e6:.2f}M non-embedding params | "
              f"{cfg.model.n_future} heads ({cfg.model.head_type}) | tokenizer {tokenizer.name} "
              f"(vocab {tokenizer.vocab_size}) | train {len(data.train):,} / val {len(data.val):,} "
              f"tokens | device {device} x{dist.world_size}", flush=True)
        if data.split.skipped:
            print(f"skipped {data.split.skipped} file(s) that are not valid UTF-8", flush=True)
        if data.split.note:
            print(data.split.note, flush=True)
        if start >= t.steps:
            print(f"the run is already at step {start} and train.steps={t.steps}: nothing to "
                  f"train (pass --train.steps=N with N > {start} to continue)", flush=True)

    def save(step: int) -> None:
        train_state = {"step": step, "scheduler": sched.state_dict(), "sampler": sampler.state_dict()}
        dist_mod.save_checkpoint(ckpt_dir, model, wrapped, opt, tokenizer, dist,
                                 run_config=to_dict(cfg), step=step, train_state=train_state)

    model.train()
    tokens_per_step = t.batch_size * t.seq_len
    bar = tqdm(total=max(t.steps, start), initial=start,
               disable=not (progress and dist.is_main), dynamic_ncols=True, desc="train")
    last_val: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    with bar, StopSignals() as stop:
        for step in range(start, t.steps):
            n = cfg.model.n_future
            head_loss = torch.zeros(n, dtype=torch.float64)
            head_correct = torch.zeros(n, dtype=torch.float64)
            head_count = torch.zeros(n, dtype=torch.float64)
            for k in range(t.grad_accum):
                x, y = sampler.next()
                x, y = x.to(device), y.to(device)
                with dist_mod.maybe_no_sync(wrapped, dist, last=k == t.grad_accum - 1):
                    out: LossOutput = dist_mod.loss_fn(
                        wrapped, model, x, y, method=cfg.loss.method, weights=weights,
                        loss_scale=1.0 / t.grad_accum, autocast=autocast)
                    if cfg.loss.method == "naive":
                        (out.loss / t.grad_accum).backward()
                for i in range(n):
                    c = float(out.head_counts[i])
                    head_loss[i] += float(out.head_losses[i]) * c
                    head_correct[i] += float(out.head_correct[i])
                    head_count[i] += c
            dist_mod.finish_grads(wrapped, model, dist)
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip) \
                if cfg.optim.grad_clip > 0 else torch.tensor(0.0)
            dist_mod.optimizer_step(opt, model, dist)
            sched.step()
            opt.zero_grad(set_to_none=True)

            done = step + 1
            stats = dist.all_reduce_sum(torch.stack([head_loss, head_correct, head_count]))
            hl = (stats[0] / stats[2].clamp(min=1)).tolist()
            loss = float(sum(w * v for w, v in zip(weights, hl)))
            if not math.isfinite(loss):
                raise RuntimeError(f"loss became {loss} at step {done}; lower optim.lr or check the data")
            elapsed = time.perf_counter() - t0
            tok_s = (done - start) * tokens_per_step / max(elapsed, 1e-9)
            bar.set_postfix(loss=f"{loss:.3f}", h1=f"{hl[0]:.3f}", tok_s=f"{tok_s:,.0f}")
            bar.update(1)
            if done % t.log_every == 0 or done == t.steps or done == start + 1:
                metrics.write({"kind": "train", "step": done, "loss": loss, "head_loss": hl,
                               "head_acc": (stats[1] / stats[2].clamp(min=1)).tolist(),
                               "lr": sched.get_last_lr()[0], "grad_norm": float(gnorm),
                               "tokens": done * tokens_per_step, "tok_s": tok_s,
                               "elapsed_s": elapsed})
            if done % t.eval_every == 0 or done == t.steps:
                last_val = dist_mod.reduce_eval(dist_mod.run_model(
                    wrapped, model, evaluate, vbatches, device, autocast), vbatches, dist)
                metrics.write({"kind": "val", "step": done, "loss": float(sum(
                    w * v for w, v in zip(weights, last_val["head_loss"]))), **last_val})
                if dist.is_main:
                    bar.write(f"step {done}: val loss/head {fmt(last_val['head_loss'])} "
                              f"acc/head {fmt(last_val['head_acc'])}")
            if done % t.ckpt_every == 0 or done == t.steps:
                save(done)
            _test_signal(done)
            # Agree on stopping across ranks, so that every rank takes part in the final save.
            if dist.all_reduce_sum(torch.tensor([float(stop.signum != 0)]))[0] > 0:
                if done % t.ckpt_every != 0 and done != t.steps:
                    save(done)
                raise TrainingInterrupted(stop.signum or signal.SIGTERM, done, run)
    if not last_val:  # resumed a finished run
        last_val = dist_mod.reduce_eval(dist_mod.run_model(
            wrapped, model, evaluate, vbatches, device, autocast), vbatches, dist)
    if dist.is_main:
        from multitoken.plots import plot_losses

        plot_losses(run / "metrics.jsonl", run / "loss.png",
                    title=f"n_future={cfg.model.n_future} ({cfg.model.head_type} heads)")
    return {"run_dir": str(run), "step": t.steps, **last_val}


def _test_signal(step: int) -> None:
    """Tests: MULTITOKEN_TEST_SIGNAL="STEP:SIGNAME" sends that signal to this process right
    after step STEP (SIGKILL for a hard crash, SIGINT/SIGTERM for an interrupt), exactly there."""
    spec = os.environ.get("MULTITOKEN_TEST_SIGNAL", "")
    at, _, name = spec.partition(":")
    if at == str(step):
        os.kill(os.getpid(), signal.Signals[name])


def fmt(xs: list[float]) -> str:
    return " ".join(f"{x:.3f}" for x in xs)


__all__ = ["evaluate", "train"]
