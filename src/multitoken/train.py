"""The training program: data, model, AdamW + warmup/cosine, MTP loss, eval, checkpoints, plots.

The model and this loop are single-device code: `multitoken.parallel` runs them in one process
or, under torchrun, with DDP or FSDP2 (docs/distributed.md). The run folder (its layout,
resuming, stopping on a signal) is `multitoken.runs`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

from multitoken import checkpoint as ckpt_io
from multitoken.config import ModelConfig, RunConfig, to_dict
from multitoken.data import BatchSampler, DataBundle, prepare_data, val_batches
from multitoken.devices import resolve_device
from multitoken.distributed import DistGroup, join
from multitoken.errors import CheckpointError, ConfigError
from multitoken.loss import evaluate_stats, head_means
from multitoken.model import MultiTokenModel
from multitoken.parallel import check_supported, make_parallel, read_train_state
from multitoken.plots import plot_losses
from multitoken.runs import (
    RUN_FILES,
    MetricsLog,
    StopSignals,
    TrainingInterrupted,
    has_checkpoint,
    new_run_dir,
    resume_config,
    send_test_signal,
)
from multitoken.schedule import warmup_cosine
from multitoken.tokenizer import load_tokenizer


def autocast_factory(device: torch.device, dtype: str) -> Callable[[], Any]:
    """bf16 autocast on CUDA when asked; a no-op elsewhere (CPU runs stay fp32 and exact)."""
    if device.type == "cuda" and dtype == "bfloat16":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def lr_lambda(cfg: RunConfig) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to min_lr_ratio * lr at the last step."""
    return warmup_cosine(cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.min_lr_ratio)


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


def evaluate(model: MultiTokenModel, batches: list[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device, autocast: Callable[[], Any] | None = None) -> dict[str, list[float]]:
    """Validation loss and top-1 accuracy per head, weighted by each head's label count."""
    return head_means(evaluate_stats(model, batches, device, autocast))


def train(cfg: RunConfig, out_dir: str | Path | None = None, *, resume: bool = False,
          progress: bool = True) -> dict[str, Any]:
    """Train per `cfg`; returns the final validation metrics. See multitoken.runs for the
    folder it writes."""
    cfg.validate()
    group = join(cfg.parallel)
    with group:  # closes the process group; names a dead or stalled peer clearly
        run = Path(out_dir) if out_dir is not None else group.broadcast_object(
            new_run_dir() if group.is_main else None)
        created = group.is_main and not run.exists()
        try:
            return _train(cfg, run, resume, progress, group)
        except BaseException:
            # A failure before the first checkpoint leaves no new folder behind; an interrupt
            # saves a checkpoint first, and a folder that existed before is never removed.
            if created and run.exists() and not has_checkpoint(run / "checkpoint"):
                shutil.rmtree(run, ignore_errors=True)
            raise


@dataclasses.dataclass
class _Inputs:
    """What the setup reads and checks before the model exists: each rank on its own."""

    device: torch.device
    data: DataBundle
    ckpt: Path | None = None  # the checkpoint to resume from
    state: dict[str, Any] | None = None  # its training state
    init: Path | None = None  # train.init: the checkpoint whose weights start a new run


def _read_inputs(cfg: RunConfig, run: Path, resume: bool, group: DistGroup) -> _Inputs:
    """Every check of the user's input; local to this rank (no collective), so that a failure
    on one rank can be agreed on (`DistGroup.agreement`). Updates cfg.model.vocab_size."""
    t = cfg.train
    device = group.device if group.device is not None else resolve_device(t.device, "train.device")
    ckpt_dir = run / "checkpoint"
    ckpt, state, tokenizer = None, None, None
    # ---- resume: the checkpoint's tokenizer and state win; the model shape must match ----------
    init = None
    if t.init and not resume:  # resuming such a run loads its own checkpoint instead
        init = ckpt_io.find_checkpoint(t.init)
        tokenizer = load_tokenizer(init / ckpt_io.TOKENIZER)
        cfg.model = _init_model_config(cfg.model, ckpt_io.model_config_from(
            ckpt_io.read_config(init), init), t.init)
    if resume:
        try:
            ckpt = ckpt_io.find_checkpoint(ckpt_dir)
        except CheckpointError:
            raise CheckpointError(f"--resume: no checkpoint in {run} to resume from") from None
        tokenizer = load_tokenizer(ckpt / ckpt_io.TOKENIZER)
        state = read_train_state(ckpt, group.strategy)
    elif group.is_main and has_checkpoint(ckpt_dir):
        raise ConfigError(
            f"{run} already holds a run; pass --resume to continue it or choose another --out")

    data = prepare_data(cfg.data, tokenizer)
    if cfg.model.vocab_size != data.tokenizer.vocab_size:
        cfg.model.vocab_size = data.tokenizer.vocab_size  # the tokenizer decides the vocabulary
    cfg.validate()
    if ckpt is not None:
        saved = ckpt_io.model_config_from(ckpt_io.read_config(ckpt_dir), ckpt_dir)
        if dataclasses.asdict(saved) != dataclasses.asdict(cfg.model):
            raise CheckpointError(f"--resume: the model config differs from the checkpoint's in {ckpt_dir}")
    check_supported(group.strategy, cfg.model)
    if group.strategy == "fsdp" and t.trainable != "all":
        raise ConfigError("train.trainable=draft_heads is not supported with parallel.strategy="
                          "fsdp (use ddp: the frozen trunk needs no sharding)")
    micro = t.batch_size // t.grad_accum  # global rows per micro-step
    if micro % group.world_size != 0:
        raise ConfigError(f"train.batch_size / train.grad_accum ({micro}) must be divisible by the "
                          f"number of processes ({group.world_size})")
    return _Inputs(device, data, ckpt, state, init)


def _init_model_config(asked: ModelConfig, saved: ModelConfig, where: str) -> ModelConfig:
    """train.init: the model is the checkpoint's. A model field the recipe or the command line
    set (a value other than the default) must agree with it; anything else is an error naming
    the field, not a silent change of the model."""
    default = ModelConfig()
    for f in dataclasses.fields(ModelConfig):
        mine, theirs = getattr(asked, f.name), getattr(saved, f.name)
        if f.name != "vocab_size" and mine != getattr(default, f.name) and mine != theirs:
            raise ConfigError(f"train.init: model.{f.name}={mine!r} differs from the "
                              f"checkpoint's {theirs!r} in {where}")
    return saved


def _freeze(model: MultiTokenModel, trainable: str) -> None:
    """train.trainable=draft_heads: only heads 2..n keep requires_grad (see TrainConfig)."""
    if trainable == "draft_heads":
        for p in model.parameters():
            p.requires_grad_(False)
        for head in model.heads[1:]:
            head.requires_grad_(True)


def _open_run_folder(cfg: RunConfig, run: Path, inputs: _Inputs, model: MultiTokenModel,
                     world_size: int, start: int) -> None:
    """Rank 0: create the folder (only now: bad input leaves none) and say what runs."""
    t, data = cfg.train, inputs.data
    run.mkdir(parents=True, exist_ok=True)
    if inputs.state is None:  # a folder without a checkpoint starts over: drop a stopped run's files
        for name in RUN_FILES:
            (run / name).unlink(missing_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    print(f"run: {run} | {model.num_params() / 1e6:.2f}M non-embedding params | "
          f"{cfg.model.n_future} heads ({cfg.model.head_type}) | tokenizer {data.tokenizer.name} "
          f"(vocab {data.tokenizer.vocab_size}) | train {len(data.train):,} / val {len(data.val):,} "
          f"tokens | device {inputs.device} x{world_size}", flush=True)
    if data.split.skipped:
        print(f"skipped {data.split.skipped} file(s) that are not valid UTF-8", flush=True)
    if data.split.note:
        print(data.split.note, flush=True)
    if start >= t.steps:
        print(f"the run is already at step {start} and train.steps={t.steps}: nothing to "
              f"train (pass --train.steps=N with N > {start} to continue)", flush=True)


def _train(cfg: RunConfig, run: Path, resume: bool, progress: bool,
           group: DistGroup) -> dict[str, Any]:
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    seed_everything(t.seed)  # before the data (a tokenizer may be trained) and the model
    # ---- setup: bad input on any rank stops every rank, and rank 0 reports it once ------------
    with group.agreement():
        inputs = _read_inputs(cfg, run, resume, group)
    device, data = inputs.device, inputs.data
    autocast = autocast_factory(device, t.dtype)
    with torch.device(device):
        model = MultiTokenModel(cfg.model)
    if inputs.init is not None:
        ckpt_io.load_weights(inputs.init / ckpt_io.WEIGHTS, model)
    _freeze(model, t.trainable)
    parallel = make_parallel(model, group, dtype=t.dtype)
    if t.compile:
        for block in [*model.layers, *model.heads]:
            block.compile()
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    micro = t.batch_size // t.grad_accum  # global rows per micro-step
    sampler = BatchSampler(data.train, t.seq_len, micro, seed=t.seed, rank=group.rank,
                           world_size=group.world_size)
    # Each rank evaluates its rows of the same global batches: the union is the 1-process set.
    vbatches = parallel.shard_batches(val_batches(data.val, t.seq_len, micro, t.eval_batches))
    metrics = MetricsLog(run / "metrics.jsonl", enabled=group.is_main)
    start = 0
    with group.agreement():
        if inputs.state is not None:
            assert inputs.ckpt is not None
            parallel.load(inputs.ckpt, opt, inputs.state)
            sched.load_state_dict(inputs.state["scheduler"])
            sampler.load_state_dict(inputs.state["sampler"])
            start = int(inputs.state["step"])
            metrics.truncate_after(start)
        if group.is_main:
            _open_run_folder(cfg, run, inputs, model, group.world_size, start)

    def save(step: int) -> None:
        state = {"step": step, "scheduler": sched.state_dict(), "sampler": sampler.state_dict()}
        parallel.save(run / "checkpoint", opt, data.tokenizer, run_config=to_dict(cfg),
                      step=step, train_state=state)

    # ---- the loop ------------------------------------------------------------------------------
    n = cfg.model.n_future
    weights = cfg.loss.head_weights(n)
    tokens_per_step = t.batch_size * t.seq_len
    bar = tqdm(total=max(t.steps, start), initial=start,
               disable=not (progress and group.is_main), dynamic_ncols=True, desc="train")
    last_val: dict[str, list[float]] = {}
    # Statistics stay on the device: the step's per-head sums ([3, n]: loss, correct, labels)
    # and the loss sums of the steps since the host last read them (`interval`). The host reads
    # them, summed over ranks, only to log and before a checkpoint, and checks there that the
    # loss stayed finite, naming the steps since the last check.
    interval = torch.zeros(n, dtype=torch.float64, device=device)
    checked = start  # the last step whose loss was checked

    def host_stats(stats: torch.Tensor, done: int) -> torch.Tensor:
        nonlocal checked
        both = parallel.reduce_sum(torch.cat([stats, interval[None]])).cpu()
        if not torch.isfinite(both[3]).all():
            bad = float(sum(w * v for w, v in zip(weights, both[3].tolist())))
            where = f"step {done}" if checked + 1 == done else f"a step in {checked + 1}..{done}"
            raise RuntimeError(f"loss became {bad} at {where}; lower optim.lr or check the data")
        interval.zero_()
        checked = done
        return both[:3]

    def checkpoint(stats: torch.Tensor, done: int) -> None:
        if checked != done:
            host_stats(stats, done)  # never save weights trained on a non-finite loss
        save(done)

    t0 = time.perf_counter()
    with bar, StopSignals() as stop:
        for step in range(start, t.steps):
            stats = torch.zeros(3, n, dtype=torch.float64, device=device)
            for k in range(t.grad_accum):
                x, y = sampler.next()
                stats += parallel.forward_backward(
                    x.to(device), y.to(device), last=k == t.grad_accum - 1,
                    method=cfg.loss.method, weights=weights, loss_scale=1.0 / t.grad_accum,
                    autocast=autocast).stats()
            parallel.finish_grads()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip) \
                if cfg.optim.grad_clip > 0 else torch.tensor(0.0)
            parallel.optimizer_step(opt)
            sched.step()
            opt.zero_grad(set_to_none=True)
            interval += stats[0]

            done = step + 1
            bar.update(1)
            if done % t.log_every == 0 or done == t.steps or done == start + 1:
                means = head_means(host_stats(stats, done))
                hl = means["head_loss"]
                loss = float(sum(w * v for w, v in zip(weights, hl)))
                elapsed = time.perf_counter() - t0
                tok_s = (done - start) * tokens_per_step / max(elapsed, 1e-9)
                bar.set_postfix(loss=f"{loss:.3f}", h1=f"{hl[0]:.3f}", tok_s=f"{tok_s:,.0f}")
                metrics.write({"kind": "train", "step": done, "loss": loss, "head_loss": hl,
                               "head_acc": means["head_acc"], "lr": sched.get_last_lr()[0],
                               "grad_norm": float(gnorm), "tokens": done * tokens_per_step,
                               "tok_s": tok_s, "elapsed_s": elapsed})
            if done % t.eval_every == 0 or done == t.steps:
                last_val = parallel.evaluate(vbatches, autocast)
                metrics.write({"kind": "val", "step": done, "loss": float(sum(
                    w * v for w, v in zip(weights, last_val["head_loss"]))), **last_val})
                if group.is_main:
                    bar.write(f"step {done}: val loss/head {fmt(last_val['head_loss'])} "
                              f"acc/head {fmt(last_val['head_acc'])}")
            if done % t.ckpt_every == 0 or done == t.steps:
                checkpoint(stats, done)
            send_test_signal(done)
            # Agree on stopping across ranks, so that every rank takes part in the final save.
            if parallel.reduce_sum(torch.tensor([float(stop.signum != 0)]))[0] > 0:
                if done % t.ckpt_every != 0 and done != t.steps:
                    checkpoint(stats, done)
                raise TrainingInterrupted(stop.signum or signal.SIGTERM, done, run)
    if not last_val:  # resumed a finished run
        last_val = parallel.evaluate(vbatches, autocast)
    if group.is_main:
        plot_losses(run / "metrics.jsonl", run / "loss.png",
                    title=f"n_future={cfg.model.n_future} ({cfg.model.head_type} heads)")
    return {"run_dir": str(run), "step": t.steps, **last_val}


def fmt(xs: list[float]) -> str:
    return " ".join(f"{x:.3f}" for x in xs)


__all__ = ["TrainingInterrupted", "evaluate", "resume_config", "train"]
