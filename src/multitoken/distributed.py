"""The process group a training run joins: rank, world size, device, collectives, teardown.

`join(cfg)` reads what torchrun puts in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, ...) and returns a `DistGroup`. A one-process run gets a group of one, whose
collectives return their input. How the model runs across the group (DDP, FSDP2) is
`multitoken.parallel`'s business; this module knows nothing about models.

Failures across processes:
- `with group:` closes the group and turns a failed collective (a peer died or stalled past
  `parallel.timeout_s`) into one clear `DistributedError`.
- `with group.agreement():` runs a block that may fail on some ranks only (a check done on rank
  0, a file one node cannot read). Afterwards every rank knows whether any rank failed: rank 0
  raises the error (its own, else the first failing rank's, naming that rank), so the user sees
  the real message once; every other rank waits until rank 0 has exited (so its message is
  out before a launcher stops the job) and stops quietly with `RankStopped` (exit status 2).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist

from multitoken.config import ParallelConfig
from multitoken.errors import ConfigError, MultitokenError


class DistributedError(MultitokenError):
    """A collective failed: another process died, stalled past the timeout, or was unreachable;
    or another rank failed (rank 0 reports its error)."""


class RankStopped(SystemExit):
    """This rank stops because another rank failed; rank 0 reports that rank's error.

    A SystemExit: it ends the process with status 2 and prints nothing (the CLI reports only
    MultitokenError), so a multi-process run shows the real message once, from rank 0.
    """

    def __init__(self) -> None:
        super().__init__(2)


@dataclass
class DistGroup:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # None: the trainer resolves train.device
    strategy: str = "none"  # none | ddp | fsdp, as resolved by `join`
    timeout_s: int = 0
    owns_group: bool = False  # True: `join` initialised torch.distributed, so close() ends it
    closes_at_exit: bool = False  # rank 0 after an agreed failure: peers wait for its exit

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return tdist.is_available() and tdist.is_initialized()

    def close(self, failed: bool = False) -> None:
        if self.closes_at_exit or not self.active or not self.owns_group:
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

    # `with group:` in train.train: closes the group and names a collective failure clearly.
    def __enter__(self) -> DistGroup:
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
        """Rank 0's `obj` on every rank."""
        if not self.active or self.world_size == 1:
            return obj
        box = [obj if self.is_main else None]
        tdist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order."""
        if not self.active or self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of `t` over ranks, on t's device (a host sync when there is more than one)."""
        if not self.active or self.world_size == 1:
            return t
        out = t.detach().to("cpu", copy=True)  # CPU collectives go through gloo on every setup
        tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
        return out.to(t.device)

    @contextlib.contextmanager
    def agreement(self) -> Iterator[None]:
        """Every rank leaves the block together: normally, or all failing (see the module
        docstring). Only the block's local work may fail per rank: it must not enter a
        collective that another rank could skip by failing first. One all-gather of a small
        object on the way out."""
        try:
            yield
        except Exception as e:
            self._settle(e)
            raise
        self._settle(None)

    def _settle(self, error: Exception | None) -> None:
        """Raises unless no rank failed; returns (so the caller re-raises `error`) where this
        rank's own error is the one to show."""
        if not self.active or self.world_size == 1:
            return
        mine = None
        if error is not None:
            mine = (type(error), str(error)) if isinstance(error, MultitokenError) else \
                (None, f"{type(error).__name__}: {error}")
        failed = [(r, rep) for r, rep in enumerate(self.all_gather_object(mine)) if rep]
        if not failed:
            return
        if not self.is_main:
            # Wait for rank 0 (it meets us at its exit, after reporting), then stop. A failure
            # that is not bad input (a bug) keeps its own traceback on this rank.
            self._meet_and_close()
            if error is not None and not isinstance(error, MultitokenError):
                return
            raise RankStopped from error
        self.closes_at_exit = True
        atexit.register(self._meet_and_close, at_exit=True)
        if error is not None:
            return
        rank, (cls, msg) = failed[0]
        where = f"rank {rank}/{self.world_size}"
        if cls is None:
            raise DistributedError(f"{where} failed: {msg}")
        raise cls(f"{where}: {msg}")

    def _meet_and_close(self, at_exit: bool = False) -> None:
        """One barrier with the other ranks, then close. Rank 0 runs it at exit after an agreed
        failure; every other rank at once, so they wait for rank 0's report."""
        if at_exit:
            self.closes_at_exit = False
        with contextlib.suppress(Exception):
            self.barrier()
        self.close()


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


def join(cfg: ParallelConfig) -> DistGroup:
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
        return DistGroup()
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
    return DistGroup(rank=tdist.get_rank(), world_size=tdist.get_world_size(),
                     local_rank=local_rank, device=device, strategy=strategy,
                     timeout_s=cfg.timeout_s, owns_group=owns_group)
