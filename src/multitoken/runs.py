"""The run folder of `multitoken train`: where a run writes, how it resumes, how it stops.

A run directory holds:
    checkpoint/      what load_checkpoint reads (+ train_state.pt for --resume)
    metrics.jsonl    one JSON object per log line: {"kind": "train"|"val", "step": ..., ...}
    loss.png         train/validation loss and validation accuracy per head
    config.yaml      the resolved run config
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from multitoken import checkpoint as ckpt_io
from multitoken.config import RunConfig, resume_run_config
from multitoken.errors import CheckpointError

# Files a run writes next to its checkpoint: a folder holding them but no checkpoint is a run
# stopped before its first save, which may be started again from scratch.
RUN_FILES = ("metrics.jsonl", "config.yaml", "loss.png")


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


def send_test_signal(step: int) -> None:
    """Tests: MULTITOKEN_TEST_SIGNAL="STEP:SIGNAME" sends that signal to this process right
    after step STEP (SIGKILL for a hard crash, SIGINT/SIGTERM for an interrupt), exactly there."""
    spec = os.environ.get("MULTITOKEN_TEST_SIGNAL", "")
    at, _, name = spec.partition(":")
    if at == str(step):
        os.kill(os.getpid(), signal.Signals[name])


def new_run_dir(base: str | Path = "runs") -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(base) / stamp
    k = 1
    while path.exists():
        path = Path(base) / f"{stamp}-{k}"
        k += 1
    return path


def has_checkpoint(ckpt_dir: Path) -> bool:
    try:
        ckpt_io.find_checkpoint(ckpt_dir)
    except CheckpointError:
        return False
    return True


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
