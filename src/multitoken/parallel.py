"""How a training process runs its model: one interface, three implementations.

The model code stays single-device. A `Parallel` owns the wrapped model and the process group
(`distributed.DistGroup`) and gives the training loop the few operations that differ between
strategies:

    forward_backward(x, y, ...)  loss + backward of one micro-batch -> LossOutput (sums)
    finish_grads()               make the accumulated gradients global
    optimizer_step(opt)          the optimizer's step
    reduce_sum(t)                sum of metrics over ranks
    evaluate(batches, ...)       validation loss / accuracy per head (global)
    save(...) / load(...)        checkpoints: consolidated safetensors (+ DCP shards for FSDP)
    shard_batches(batches)       this rank's rows of the validation batches

- `SingleProcess`: one process; every operation is the plain one.
- `DDPParallel`: `DistributedDataParallel`. The paper's loss runs one backward per head plus
  one through the trunk (loss.py), which DDP's reducer cannot follow (see `finish_grads`), so
  gradients accumulate locally under `no_sync()` and are all-reduced once per optimizer step.
- `FSDPParallel`: FSDP2 (`fully_shard`) on every transformer block, every head, and a root that
  owns the embedding, final norm and unembedding (see `_FSDPRoot`). Checkpoints: sharded
  `torch.distributed.checkpoint` (DCP) state in `checkpoint/dcp/` for resuming, plus a
  consolidated `model.safetensors` that single-process tools read.

`make_parallel` picks one from the strategy `distributed.join` resolved. See docs/distributed.md.
"""

from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as tdist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from multitoken import checkpoint as ckpt_io
from multitoken.config import ModelConfig
from multitoken.distributed import DistGroup
from multitoken.errors import CheckpointError, ConfigError
from multitoken.loss import LossOutput, evaluate_stats, head_means, mtp_loss
from multitoken.model import MultiTokenModel

DCP_DIR = "dcp"  # sharded model + optimizer state inside an FSDP checkpoint
_BUCKET_BYTES = 25 << 20  # DDP's default bucket size; bounds the flattened copy's memory

Batches = list[tuple[torch.Tensor, torch.Tensor]]


class Parallel(ABC):
    """The model as this process runs it, and the group it runs in. Collective methods must be
    called by every rank, in the same order."""

    strategy: ClassVar[str]

    def __init__(self, model: MultiTokenModel, group: DistGroup) -> None:
        self.model = model  # the single-device model (FSDP: its parameters are DTensor shards)
        self.group = group
        self.device = next(model.parameters()).device

    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def world_size(self) -> int:
        return self.group.world_size

    @property
    def is_main(self) -> bool:
        return self.group.is_main

    # ---- one optimizer step --------------------------------------------------------------

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, *, last: bool, method: str,
                         weights: list[float], loss_scale: float,
                         autocast: Callable[[], Any] | None = None) -> LossOutput:
        """Loss of one micro-batch, its backward run (gradients accumulate in `.grad`);
        `last`: the optimizer step's last micro-batch. Returns this rank's sums."""
        return mtp_loss(self.model, x, y, backward=True, method=method, weights=weights,
                        loss_scale=loss_scale, autocast=autocast)

    @abstractmethod
    def finish_grads(self) -> None:
        """Make the accumulated gradients global: the mean over ranks (each holds an equal share
        of rows). Collective."""

    def optimizer_step(self, opt: torch.optim.Optimizer) -> None:
        opt.step()

    # ---- metrics and evaluation ----------------------------------------------------------

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over ranks (collective; a host sync when there is more than one)."""
        return self.group.all_reduce_sum(t)

    def barrier(self) -> None:
        self.group.barrier()

    def shard_batches(self, batches: Batches) -> Batches:
        """This rank's rows of each GLOBAL validation batch (so the union is the 1-process set).

        Every rank gets the same number of batches, which FSDP needs (each forward is
        collective). A batch with fewer rows than ranks (only when the validation split holds
        less than one full batch, so it is the only batch) is evaluated whole by every rank;
        the summed counts and losses scale alike, so the means do not change.
        """
        if self.world_size == 1:
            return batches
        out = []
        for x, y in batches:
            if x.shape[0] < self.world_size:
                out.append((x, y))
            else:
                out.append((x.tensor_split(self.world_size)[self.rank],
                            y.tensor_split(self.world_size)[self.rank]))
        return out

    def evaluate(self, batches: Batches, autocast: Callable[[], Any] | None = None
                 ) -> dict[str, list[float]]:
        """Validation loss and top-1 accuracy per head over every rank's batches, weighted by
        label counts. Collective."""
        return head_means(self.reduce_sum(self._eval_stats(batches, self.device, autocast)))

    def _eval_stats(self, batches: Batches, device: torch.device,
                    autocast: Callable[[], Any] | None) -> torch.Tensor:
        return evaluate_stats(self.model, batches, device, autocast)

    # ---- checkpoints ---------------------------------------------------------------------

    @abstractmethod
    def save(self, ckpt_dir: Path, opt: torch.optim.Optimizer, tokenizer: Any, *,
             run_config: dict[str, Any], step: int, train_state: dict[str, Any]) -> None:
        """Write the checkpoint atomically (see checkpoint.py). Collective."""

    @abstractmethod
    def load(self, ckpt: Path, opt: torch.optim.Optimizer, train_state: dict[str, Any]) -> None:
        """Load model weights and optimizer state from the checkpoint folder `ckpt`, whose
        train_state.pt (`read_train_state`) is `train_state`. Collective."""

    def _info(self) -> dict[str, Any]:
        return {"parallel": {"strategy": self.strategy, "world_size": self.world_size}}


class _Replicated(Parallel):
    """Every rank holds the whole model and optimizer state: rank 0 saves them."""

    def save(self, ckpt_dir: Path, opt: torch.optim.Optimizer, tokenizer: Any, *,
             run_config: dict[str, Any], step: int, train_state: dict[str, Any]) -> None:
        # Rank 0 writes weights + optimizer state (identical on every rank); the others wait at
        # the barrier so nobody races ahead of a checkpoint that is not committed yet.
        if self.is_main:
            ckpt_io.save_checkpoint(ckpt_dir, self.model, tokenizer, run_config=run_config,
                                    step=step, train_state={**train_state, **self._info(),
                                                            "optimizer": opt.state_dict()})
        self.barrier()

    def load(self, ckpt: Path, opt: torch.optim.Optimizer, train_state: dict[str, Any]) -> None:
        ckpt_io.load_weights(ckpt / ckpt_io.WEIGHTS, self.model)
        opt.load_state_dict(train_state["optimizer"])


class SingleProcess(_Replicated):
    strategy = "none"

    def finish_grads(self) -> None:
        pass  # one process: its gradients are the global ones


class DDPParallel(_Replicated):
    """DDP: the wrapper broadcasts rank 0's weights at start; gradients are averaged by one
    bucketed all-reduce per optimizer step (`finish_grads`)."""

    strategy = "ddp"

    def __init__(self, model: MultiTokenModel, group: DistGroup) -> None:
        super().__init__(model, group)
        # The rope tables are non-persistent buffers computed identically everywhere: nothing
        # to broadcast but the parameters.
        cuda = group.device is not None and group.device.type == "cuda"
        self.ddp = DistributedDataParallel(model, device_ids=[group.device.index] if cuda else None,
                                           broadcast_buffers=False)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, *, last: bool, method: str,
                         weights: list[float], loss_scale: float,
                         autocast: Callable[[], Any] | None = None) -> LossOutput:
        # Always no_sync, even in the last micro-step: DDP's reducer must stay out of the
        # per-head backwards (see finish_grads).
        with self.ddp.no_sync():
            return super().forward_backward(x, y, last=last, method=method, weights=weights,
                                            loss_scale=loss_scale, autocast=autocast)

    def finish_grads(self) -> None:
        """One all-reduce of the accumulated gradients, flattened into DDP-sized buckets.

        DDP's reducer is armed by a forward of the DDP module and expects ONE backward after
        it, in which autograd hooks mark each parameter ready once. The MTP loss runs
        n_future + 1 backwards per micro-step, through model.trunk / model.head directly (never
        DDP.forward), and the shared norm and unembedding get a gradient in n_future of them.
        The reported failure is "Expected to mark a variable ready only once"; measured on
        torch 2.13 with gloo it is worse: no error, and the ranks' gradients silently differ
        (default, static_graph and find_unused_parameters alike; see docs/distributed.md). So
        every backward runs under no_sync(), and here ONE all-reduce per optimizer step moves
        the accumulated gradients: the bytes DDP would move with no_sync accumulation, but not
        overlapped with the backward.
        """
        if self.world_size == 1:
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        for bucket in _buckets(grads):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
            flat.div_(self.world_size)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()


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


class FSDPParallel(Parallel):
    """FSDP2: one all-gather / reduce-scatter unit per block and head, plus the root."""

    strategy = "fsdp"

    def __init__(self, model: MultiTokenModel, group: DistGroup, dtype: str) -> None:
        super().__init__(model, group)
        check_supported(self.strategy, model.cfg)
        assert group.device is not None
        mesh = init_device_mesh(group.device.type, (group.world_size,))
        mp = MixedPrecisionPolicy()
        if group.device.type == "cuda" and dtype == "bfloat16":
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        # Bottom-up: each block and head is one all-gather / reduce-scatter unit. Ranks shard
        # identical full weights: the model was built after seed_everything(train.seed).
        for block in [*model.layers, *model.heads]:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        self.root = _FSDPRoot(model)
        # reshard_after_forward=True on the root (FSDP's default keeps a root gathered for the
        # backward that follows its forward): the losses run their backwards INSIDE the root's
        # forward, so by the time it returns the root's parameters are no longer needed.
        fully_shard(self.root, mesh=mesh, mp_policy=mp, reshard_after_forward=True)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, *, last: bool, method: str,
                         weights: list[float], loss_scale: float,
                         autocast: Callable[[], Any] | None = None) -> LossOutput:
        # Standard FSDP2 accumulation: reduce-scatter only in the last micro-step.
        self.root.set_requires_gradient_sync(last)
        # Every backward that passes through an FSDP unit ends with FSDP's post-backward
        # callback, which reduce-scatters the root's gradients so far (correct: reduce-scatter
        # is linear and FSDP adds it to the sharded .grad) and would then reshard the root,
        # freeing the norm and unembedding that the next head still needs. Keep them gathered
        # until the root's forward ends (it reshards then). Cost: the unembedding's gradient is
        # reduce-scattered once per head instead of once per micro-step.
        self.root.set_reshard_after_backward(False, recurse=False)
        try:
            return self.root(mtp_loss, x, y, backward=True, method=method, weights=weights,
                             loss_scale=loss_scale, autocast=autocast)
        finally:
            self.root.set_reshard_after_backward(True, recurse=False)

    def finish_grads(self) -> None:
        # FSDP reduce-scattered during the backwards; make sure the root holds no stale
        # gathered copy across the optimizer step (a no-op when already sharded).
        self.root.reshard()

    def _eval_stats(self, batches: Batches, device: torch.device,
                    autocast: Callable[[], Any] | None) -> torch.Tensor:
        return self.root(evaluate_stats, batches, device, autocast)

    def save(self, ckpt_dir: Path, opt: torch.optim.Optimizer, tokenizer: Any, *,
             run_config: dict[str, Any], step: int, train_state: dict[str, Any]) -> None:
        """Every rank writes its shards with DCP into a staging folder, rank 0 gathers the
        consolidated weights, and after a barrier moves the staging folder into the new
        checkpoint as dcp/ before the checkpoint's atomic commit. A crash at any point leaves
        the previous checkpoint (or <dir>.old, which find_checkpoint recovers) complete."""
        ckpt_dir = Path(ckpt_dir)
        staging = ckpt_dir.with_name(ckpt_dir.name + ".dcp.tmp")
        if self.is_main:
            if staging.exists():  # left by a crash mid-save
                shutil.rmtree(staging)
            staging.parent.mkdir(parents=True, exist_ok=True)
        self.barrier()
        msd, osd = get_state_dict(self.root, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(staging))
        full = get_model_state_dict(self.root, options=StateDictOptions(full_state_dict=True,
                                                                        cpu_offload=True))
        self.barrier()  # every rank's shard files are closed
        if self.is_main:
            prefix = "module."
            weights = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in full.items()}
            ckpt_io.save_checkpoint(ckpt_dir, self.model, tokenizer, run_config=run_config,
                                    step=step, train_state={**train_state, **self._info()},
                                    state_dict=weights, add_dirs={DCP_DIR: staging})
        self.barrier()

    def load(self, ckpt: Path, opt: torch.optim.Optimizer, train_state: dict[str, Any]) -> None:
        """The sharded model AND optimizer state from ckpt/dcp; each rank reads its shards
        (DCP reshards, so the world size may differ from the saving run's)."""
        msd, osd = get_state_dict(self.root, opt)
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=str(ckpt / DCP_DIR))
        set_state_dict(self.root, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def check_supported(strategy: str, cfg: ModelConfig) -> None:
    """Config errors a strategy finds in the model, raised before any collective."""
    if strategy == "fsdp" and cfg.n_trunk_layers == 0:
        # The trunk's backward is what makes FSDP reduce-scatter the embedding's gradient (its
        # final callback is queued by an FSDP unit's backward hook); with no trunk layer nothing
        # would, and the embedding would silently stop training.
        raise ConfigError("parallel.strategy=fsdp needs at least one trunk layer "
                          "(model.n_layers > model.n_future for transformer-layer heads)")


def read_train_state(ckpt: Path, strategy: str) -> dict[str, Any]:
    """The training state saved in the checkpoint folder `ckpt`, checked against the strategy
    that is to resume it (a local check, done before any collective)."""
    state = ckpt_io.load_train_state(ckpt)
    if state is None:
        raise CheckpointError(f"--resume: {ckpt} has no training state (train_state.pt)")
    saved = state.get("parallel", {}).get("strategy", "none")
    sharded, want = saved == "fsdp", strategy == "fsdp"
    if sharded != want:
        raise CheckpointError(
            f"--resume: {ckpt} was written with parallel.strategy={saved}; resume it with "
            f"--parallel.strategy={'fsdp' if sharded else 'ddp or none'}")
    if sharded and not (ckpt / DCP_DIR / ".metadata").is_file():
        raise CheckpointError(f"--resume: {ckpt / DCP_DIR} holds no sharded (DCP) state")
    return state


def make_parallel(model: MultiTokenModel, group: DistGroup, *, dtype: str) -> Parallel:
    """The implementation for the strategy `distributed.join` resolved, wrapping `model`
    (DDP broadcasts rank 0's weights; FSDP shards them). Collective for ddp and fsdp."""
    if group.strategy == "ddp":
        return DDPParallel(model, group)
    if group.strategy == "fsdp":
        return FSDPParallel(model, group, dtype)
    return SingleProcess(model, group)
