"""Parallelism applied from outside the single-device model and training loop.

`train.py` calls the functions below at fixed points (setup, wrap, loss, gradient sync,
optimizer step, checkpoint save/load, metric reduction). With `parallel.strategy = "none"` they
are the plain single-process operations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from multitoken import checkpoint as ckpt_io
from multitoken.config import ParallelConfig
from multitoken.errors import ConfigError
from multitoken.loss import LossOutput, mtp_loss
from multitoken.model import MultiTokenModel


@dataclass
class DistState:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # None: the trainer resolves train.device
    strategy: str = "none"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        pass

    def broadcast_object(self, obj: Any) -> Any:
        return obj

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t


def setup(cfg: ParallelConfig) -> DistState:
    if cfg.strategy != "none":
        raise ConfigError(f"parallel.strategy={cfg.strategy} is not available in this build")
    return DistState()


def wrap_model(model: MultiTokenModel, cfg: ParallelConfig, dist: DistState, dtype: str) -> Any:
    return model


@contextlib.contextmanager
def maybe_no_sync(wrapped: Any, dist: DistState, last: bool) -> Iterator[None]:
    yield


def loss_fn(wrapped: Any, model: MultiTokenModel, x: torch.Tensor, y: torch.Tensor,
            **kwargs: Any) -> LossOutput:
    return mtp_loss(model, x, y, **kwargs)


def finish_grads(wrapped: Any, model: MultiTokenModel, dist: DistState) -> None:
    pass


def optimizer_step(opt: torch.optim.Optimizer, model: MultiTokenModel, dist: DistState) -> None:
    opt.step()


def optimizer_state_for(state: dict[str, Any], model: MultiTokenModel, opt: torch.optim.Optimizer,
                        dist: DistState) -> dict[str, Any]:
    return state["optimizer"]


def load_train_state(ckpt_dir: Path, dist: DistState) -> dict[str, Any] | None:
    return ckpt_io.load_train_state(ckpt_dir)


def load_model_weights(ckpt_dir: Path, model: MultiTokenModel, dist: DistState) -> None:
    ckpt_io.load_weights(ckpt_io.find_checkpoint(ckpt_dir) / ckpt_io.WEIGHTS, model)


def save_checkpoint(ckpt_dir: Path, model: MultiTokenModel, wrapped: Any, opt: torch.optim.Optimizer,
                    tokenizer: Any, dist: DistState, *, run_config: dict[str, Any], step: int,
                    train_state: dict[str, Any]) -> None:
    ckpt_io.save_checkpoint(ckpt_dir, model, tokenizer, run_config=run_config, step=step,
                            train_state={**train_state, "optimizer": opt.state_dict()})


def reduce_eval(metrics: dict[str, list[float]], batches: list[Any],
                dist: DistState) -> dict[str, list[float]]:
    return metrics
