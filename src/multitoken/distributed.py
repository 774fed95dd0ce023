"""Parallelism applied from outside the single-device model and training loop.

`train.py` calls the functions below at fixed points (setup, wrap, loss, gradient sync,
optimizer step, checkpoint save/load, metric reduction). Three strategies:

- none: one process; every hook is the plain single-process operation.
- ddp:  `DistributedDataParallel`. The paper's loss runs one backward per head plus one through
        the trunk (loss.py), which DDP's reducer cannot follow (see `finish_grads`), so gradients
        accumulate locally under `no_sync()` and are all-reduced once per optimizer step.
- fsdp: FSDP2 (`fully_shard`) on every transformer block, every head, and a root that owns the
        embedding, final norm and unembedding (see `_FSDPRoot`). Checkpoints: sharded
        `torch.distributed.checkpoint` (DCP) state in `checkpoint/dcp/` for resuming, plus a
        consolidated `model.safetensors` that single-process tools read.

Launch with torchrun (see docs/distributed.md); RANK / WORLD_SIZE / LOCAL_RANK come from it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from multitoken import checkpoint as ckpt_io
from multitoken.config import ParallelConfig
from multitoken.errors import CheckpointError, ConfigError, MultitokenError
from multitoken.loss import IGNORE_INDEX, LossOutput, mtp_loss, shift_targets
from multitoken.model import MultiTokenModel

DCP_DIR = "dcp"  # sharded model + optimizer state inside an FSDP checkpoint
_BUCKET_BYTES = 25 << 20  # DDP's default bucket size; bounds the flattened copy's memory


class DistributedError(MultitokenError):
    """A collective failed: another process died, stalled past the timeout, or was unreachable."""


@dataclass
class DistState:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # None: the trainer resolves train.device
    strategy: str = "none"
    timeout_s: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return tdist.is_available() and tdist.is_initialized()

    def close(self, failed: bool = False) -> None:
        if not self.active or not self.extra.get("owns_group", False):
            return
        abort = getattr(tdist.distributed_c10d, "_abort_process_group", None)
        if failed and abort is not None:
            # After a peer died, a graceful destroy can block on NCCL's in-flight work; abort
            # tears the communicators down without waiting.
            with contextlib.suppress(Exception):
                abort()
                return
        with contextlib.suppress(Exception):
            # Tear down together: a rank that destroyed its gloo group while a peer was still
            # inside its last collective's transport aborted at exit now and then ("terminate
            # called without an active exception", seen in the FSDP test about 1 run in 3).
            if self.world_size > 1:
                tdist.barrier()
            tdist.destroy_process_group()

    # `with dist:` in train.train: closes the group and names a collective failure clearly.
    def __enter__(self) -> DistState:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: Any) -> None:
        self.close(failed=e is not None)
        if e is not None and self.world_size > 1 and _is_collective_failure(e):
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DistributedError(
                f"rank {self.rank}/{self.world_size}: a collective operation failed, most likely "
                f"because another process died or stalled (collectives time out after "
                f"parallel.timeout_s={self.timeout_s}s); the first error is in that process's "
                f"log. Cause: {first[:300]}") from e

    def barrier(self) -> None:
        if self.active and self.world_size > 1:
            tdist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        if not self.active or self.world_size == 1:
            return obj
        box = [obj if self.is_main else None]
        tdist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
        return box[0]

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if not self.active or self.world_size == 1:
            return t
        out = t.detach().to("cpu", copy=True)  # CPU collectives go through gloo on every setup
        tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
        return out.to(t.device)


def _is_collective_failure(e: BaseException) -> bool:
    if isinstance(e, tdist.DistError):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and any(s in msg for s in (
        "gloo", "Gloo", "NCCL", "Connection closed", "Connection reset", "Timed out",
        "timed out", "ProcessGroup", "Broken pipe"))


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None


def setup(cfg: ParallelConfig) -> DistState:
    """Join the process group torchrun set up the environment for (RANK, WORLD_SIZE, ...).

    strategy=none under a multi-process launch picks ddp (running N independent copies that
    all write the same run directory is never what was meant) and says so on rank 0.
    strategy=ddp|fsdp without a launcher runs a 1-process group, which behaves like `none`.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    strategy = cfg.strategy
    if strategy == "none" and world > 1:
        strategy = "ddp"
        if rank == 0:
            print(f"parallel.strategy=none under a {world}-process launch: using ddp",
                  file=sys.stderr, flush=True)
    if strategy == "none":
        return DistState()
    if strategy not in ("ddp", "fsdp"):
        raise ConfigError(f"parallel.strategy must be none, ddp or fsdp, got {strategy!r}")
    if cfg.timeout_s < 1:
        raise ConfigError(f"parallel.timeout_s must be >= 1, got {cfg.timeout_s}")
    if not tdist.is_available():
        raise ConfigError("this torch build has no torch.distributed")
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"invalid RANK={rank} for WORLD_SIZE={world}")
    cuda = torch.cuda.is_available()
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local_rank} but this node has "
                              f"{torch.cuda.device_count()} GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        # nccl for the model's CUDA tensors; gloo for the small CPU ones (stats, objects).
        backend = "cpu:gloo,cuda:nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    owns_group = not tdist.is_initialized()  # else a caller joined one already: use, keep it
    if owns_group and ("MASTER_ADDR" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ):
        tdist.init_process_group(backend, timeout=timeout)  # env:// rendezvous from torchrun
    elif owns_group and world == 1:
        tdist.init_process_group(backend, store=tdist.HashStore(), rank=0, world_size=1,
                                 timeout=timeout)
    elif owns_group:
        raise ConfigError("WORLD_SIZE > 1 but MASTER_ADDR is not set: launch with torchrun")
    return DistState(rank=tdist.get_rank(), world_size=tdist.get_world_size(),
                     local_rank=local_rank, device=device, strategy=strategy,
                     timeout_s=cfg.timeout_s, extra={"owns_group": owns_group})


# ---------------------------------------------------------------------------------------------
# Wrapping and running the model.


class _FSDPRoot(nn.Module):
    """The FSDP root: owns the model and runs a function of it inside its own forward.

    FSDP2 all-gathers a module's parameters in that module's forward pre-hook. The blocks and
    heads are their own FSDP units, so calling them directly is fine; but the root's parameters
    (embedding, final norm, unembedding) are gathered only by the ROOT's forward, and the MTP
    loss never calls `model.forward` (it calls trunk/head/unembed and runs its backwards
    itself). Running the whole loss as `root(mtp_loss, x, y)` puts every use of them inside it.
    """

    def __init__(self, module: MultiTokenModel) -> None:
        super().__init__()
        self.module = module

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(self.module, *args, **kwargs)


def wrap_model(model: MultiTokenModel, cfg: ParallelConfig, dist: DistState, dtype: str) -> Any:
    if dist.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # DDP broadcasts rank 0's parameters here, so every rank starts identical. The rope
        # tables are non-persistent buffers computed identically everywhere: nothing to sync.
        ids = [dist.device.index] if dist.device is not None and dist.device.type == "cuda" else None
        return DDP(model, device_ids=ids, broadcast_buffers=False)
    if dist.strategy == "fsdp":
        root = _wrap_fsdp(model, dist, dtype)
        dist.extra["root"] = root  # the DCP resume in optimizer_state_for needs it
        return root
    return model


def _wrap_fsdp(model: MultiTokenModel, dist: DistState, dtype: str) -> _FSDPRoot:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not model.layers:
        # The trunk's backward is what makes FSDP reduce-scatter the embedding's gradient (its
        # final callback is queued by an FSDP unit's backward hook); with no trunk layer nothing
        # would, and the embedding would silently stop training.
        raise ConfigError("parallel.strategy=fsdp needs at least one trunk layer "
                          "(model.n_layers > model.n_future for transformer-layer heads)")
    assert dist.device is not None
    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    mp = MixedPrecisionPolicy()
    if dist.device.type == "cuda" and dtype == "bfloat16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    # Bottom-up: each block and head is one all-gather / reduce-scatter unit. Ranks shard
    # identical full weights: the model was built after seed_everything(train.seed) everywhere.
    for block in [*model.layers, *model.heads]:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    root = _FSDPRoot(model)
    # reshard_after_forward=True on the root (FSDP's default keeps a root gathered for the
    # backward that follows its forward): the per-head losses run their backwards INSIDE the
    # root's forward, so by the time it returns the root's parameters are no longer needed.
    fully_shard(root, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    return root


def run_model(wrapped: Any, model: MultiTokenModel, fn: Callable[..., Any], *args: Any,
              **kwargs: Any) -> Any:
    """fn(model, *args, **kwargs), run where the parallel wrapper can see it (FSDP: the root)."""
    if isinstance(wrapped, _FSDPRoot):
        return wrapped(fn, *args, **kwargs)
    return fn(model, *args, **kwargs)


@contextlib.contextmanager
def maybe_no_sync(wrapped: Any, dist: DistState, last: bool) -> Iterator[None]:
    if dist.strategy == "ddp":
        # Always: DDP's reducer must stay out of the per-head backwards (see finish_grads).
        with wrapped.no_sync():
            yield
    elif dist.strategy == "fsdp":
        # Standard FSDP2 accumulation: reduce-scatter only in the last micro-step.
        wrapped.set_requires_gradient_sync(last)
        yield
    else:
        yield


def loss_fn(wrapped: Any, model: MultiTokenModel, x: torch.Tensor, y: torch.Tensor,
            **kwargs: Any) -> LossOutput:
    if not isinstance(wrapped, _FSDPRoot) or kwargs.get("method") == "naive":
        return run_model(wrapped, model, mtp_loss, x, y, **kwargs)
    # sequential / chunked: every head's backward ends with FSDP's post-backward callback,
    # which reduce-scatters the root's gradients so far (correct: reduce-scatter is linear and
    # FSDP adds it to the sharded .grad) and would then reshard the root, freeing the norm and
    # unembedding that the next head still needs. Keep them gathered until the root's forward
    # ends (it reshards then; see _wrap_fsdp). Cost: the unembedding's gradient is
    # reduce-scattered once per head instead of once per micro-step.
    wrapped.set_reshard_after_backward(False, recurse=False)
    try:
        return wrapped(mtp_loss, x, y, **kwargs)
    finally:
        wrapped.set_reshard_after_backward(True, recurse=False)


def finish_grads(wrapped: Any, model: MultiTokenModel, dist: DistState) -> None:
    """Make the gradients global: the mean over all ranks (each holds an equal share of rows).

    DDP: its reducer is armed by a forward of the DDP module and expects ONE backward after
    it, in which autograd hooks mark each parameter ready once. The MTP loss runs n_future + 1
    backwards per micro-step, through model.trunk / model.head directly (never DDP.forward),
    and the shared norm and unembedding get a gradient in n_future of them. The reported
    failure is "Expected to mark a variable ready only once"; measured on torch 2.13 with gloo
    it is worse: no error, and the ranks' gradients silently differ (default, static_graph and
    find_unused_parameters alike; see docs/distributed.md). So every backward
    runs under no_sync(), and here ONE all-reduce per optimizer step moves the accumulated
    gradients, flattened into DDP-sized buckets: the bytes DDP would move with no_sync
    accumulation, but not overlapped with the backward.
    """
    if dist.strategy == "ddp" and dist.world_size > 1:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        for bucket in _buckets(grads):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
            flat.div_(dist.world_size)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
    elif isinstance(wrapped, _FSDPRoot):
        # FSDP reduce-scattered during the backwards; make sure the root holds no stale
        # gathered copy across the optimizer step (a no-op when already sharded).
        wrapped.reshard()


def _buckets(grads: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    bucket: list[torch.Tensor] = []
    size = 0
    for g in grads:
        if bucket and (size + g.numel() * g.element_size() > _BUCKET_BYTES
                       or g.dtype != bucket[0].dtype or g.device != bucket[0].device):
            yield bucket
            bucket, size = [], 0
        bucket.append(g)
        size += g.numel() * g.element_size()
    if bucket:
        yield bucket


def optimizer_step(opt: torch.optim.Optimizer, model: MultiTokenModel, dist: DistState) -> None:
    opt.step()


# ---------------------------------------------------------------------------------------------
# Evaluation.


def shard_batches(batches: list[tuple[torch.Tensor, torch.Tensor]],
                  dist: DistState) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's rows of each GLOBAL validation batch (so the union is the 1-process set).

    Every rank gets the same number of batches, which FSDP needs (each forward is collective).
    A batch with fewer rows than ranks (only when the validation split holds less than one
    full batch, so it is the only batch) is evaluated whole by every rank; `reduce_eval`'s
    count-weighted mean is unchanged by that uniform duplication.
    """
    if dist.world_size == 1:
        return batches
    out = []
    for x, y in batches:
        if x.shape[0] < dist.world_size:
            out.append((x, y))
        else:
            out.append((x.tensor_split(dist.world_size)[dist.rank],
                        y.tensor_split(dist.world_size)[dist.rank]))
    return out


def reduce_eval(metrics: dict[str, list[float]], batches: list[Any],
                dist: DistState) -> dict[str, list[float]]:
    """Combine per-rank means into global ones, weighting each rank by its label counts."""
    if dist.world_size == 1:
        return metrics
    n = len(metrics["head_loss"])
    counts = torch.zeros(n, dtype=torch.float64)
    for _, y in batches:
        for i in range(n):
            counts[i] += float(shift_targets(y, i).ne(IGNORE_INDEX).sum())
    loss = torch.tensor(metrics["head_loss"], dtype=torch.float64) * counts
    acc = torch.tensor(metrics["head_acc"], dtype=torch.float64) * counts
    total = dist.all_reduce_sum(torch.stack([loss, acc, counts]))
    denom = total[2].clamp(min=1)
    return {**metrics, "head_loss": (total[0] / denom).tolist(),
            "head_acc": (total[1] / denom).tolist()}


# ---------------------------------------------------------------------------------------------
# Checkpoints.


def load_train_state(ckpt_dir: Path, dist: DistState) -> dict[str, Any] | None:
    path = ckpt_io.find_checkpoint(ckpt_dir)
    state = ckpt_io.load_train_state(path)
    if state is None:
        return None
    saved = state.get("parallel", {}).get("strategy", "none")
    sharded, want = saved == "fsdp", dist.strategy == "fsdp"
    if sharded != want:
        raise CheckpointError(
            f"--resume: {path} was written with parallel.strategy={saved}; resume it with "
            f"--parallel.strategy={'fsdp' if sharded else 'ddp or none'}")
    dist.extra["resume_dir"] = path
    return state


def load_model_weights(ckpt_dir: Path, model: MultiTokenModel, dist: DistState) -> None:
    if dist.strategy == "fsdp":
        return  # sharded weights are loaded with the optimizer, after wrapping (optimizer_state_for)
    ckpt_io.load_weights(ckpt_io.find_checkpoint(ckpt_dir) / ckpt_io.WEIGHTS, model)


def optimizer_state_for(state: dict[str, Any], model: MultiTokenModel, opt: torch.optim.Optimizer,
                        dist: DistState) -> dict[str, Any]:
    """The optimizer state dict that train.py passes to `opt.load_state_dict`.

    FSDP: loads the sharded model AND optimizer state from checkpoint/dcp (each rank reads its
    shards), then returns the optimizer's own (now loaded) state, which reloads as a no-op.
    """
    if dist.strategy != "fsdp":
        return state["optimizer"]
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    root = dist.extra["root"]
    src = dist.extra["resume_dir"] / DCP_DIR
    if not (src / ".metadata").is_file():
        raise CheckpointError(f"--resume: {src} holds no sharded (DCP) state")
    msd, osd = get_state_dict(root, opt)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=str(src))
    set_state_dict(root, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    return opt.state_dict()


def save_checkpoint(ckpt_dir: Path, model: MultiTokenModel, wrapped: Any, opt: torch.optim.Optimizer,
                    tokenizer: Any, dist: DistState, *, run_config: dict[str, Any], step: int,
                    train_state: dict[str, Any]) -> None:
    """Write the checkpoint atomically (see checkpoint.py). Collective: every rank calls it.

    none/ddp: rank 0 writes weights + optimizer state (identical on every rank); the others
    wait at the barrier so nobody races ahead of a checkpoint that is not committed yet.
    fsdp: every rank writes its shards with DCP into a staging folder, rank 0 gathers the
    consolidated weights, and after a barrier moves the staging folder into the new checkpoint
    as dcp/ before the checkpoint's atomic commit. A crash at any point leaves the previous
    checkpoint (or <dir>.old, which find_checkpoint recovers) complete.
    """
    ckpt_dir = Path(ckpt_dir)
    info = {"parallel": {"strategy": dist.strategy, "world_size": dist.world_size}}
    if dist.strategy != "fsdp":
        if dist.is_main:
            ckpt_io.save_checkpoint(ckpt_dir, model, tokenizer, run_config=run_config, step=step,
                                    train_state={**train_state, **info,
                                                 "optimizer": opt.state_dict()})
        dist.barrier()
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
    )

    staging = ckpt_dir.with_name(ckpt_dir.name + ".dcp.tmp")
    if dist.is_main:
        if staging.exists():  # left by a crash mid-save
            shutil.rmtree(staging)
        staging.parent.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    msd, osd = get_state_dict(wrapped, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(staging))
    full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True,
                                                                  cpu_offload=True))
    dist.barrier()  # every rank's shard files are closed
    if dist.is_main:
        prefix = "module."
        weights = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in full.items()}
        ckpt_io.save_checkpoint(ckpt_dir, model, tokenizer, run_config=run_config, step=step,
                                train_state={**train_state, **info}, state_dict=weights,
                                add_dirs={DCP_DIR: staging})
    dist.barrier()
