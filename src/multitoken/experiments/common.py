"""What every experiment of `multitoken experiment` shares: the sweep's unit of work, metrics
used by several experiments, seed statistics, markdown tables, figures, and training one
configuration through the trainer.

An experiment (see `Experiment`) turns a scale (its sweep's sizes and budgets) and a list of
seeds into `Job`s; the runner (`multitoken.experiments.runner`) trains each job with
`multitoken.train.train`, the same code path as `multitoken train`, loads the checkpoint and
hands it to the experiment's `evaluate`, which returns the job's metrics.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import statistics
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from multitoken.checkpoint import find_checkpoint
from multitoken.config import (
    DataConfig,
    HeadType,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
)
from multitoken.data import prepare_data
from multitoken.errors import CheckpointError, ConfigError, MultitokenError
from multitoken.model import MultiTokenModel
from multitoken.tokenizer import ByteTokenizer, Tokenizer
from multitoken.train import train

SCALES = ("full", "quick", "test")  # "test": the smallest sweep, for the test suite (hidden)


# ---------------------------------------------------------------------------------------------
# Metrics shared by several experiments.


def bits_per_byte(loss_nats: float) -> float:
    """Cross-entropy per token in nats -> bits per byte, for a byte-level tokenizer.

    With one token per byte, bits per byte is the loss in bits: nats / ln 2. (The few EOS
    tokens between files count as bytes here; they are < 0.01% of a code corpus.)
    """
    return loss_nats / math.log(2)


def distinct_ngram_ratio(sequences: Iterable[Sequence[int]], n: int = 8) -> float:
    """Distinct n-grams / all n-grams, pooled over sequences.

    Each sequence's n-grams are counted within it (distinct per sequence, then summed), so the
    ratio measures repetition inside generated texts: a greedy loop scores near 0, varied text
    near 1 (held-out Python source in 96-byte windows: above 0.9). Sequences shorter than n
    add nothing.
    """
    if n < 1:
        raise MultitokenError(f"n must be >= 1, got {n}")
    distinct = total = 0
    for seq in sequences:
        grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
        distinct += len(set(grams))
        total += len(grams)
    if total == 0:
        raise MultitokenError(f"no sequence has {n} tokens: the distinct-{n}-gram ratio is "
                              "undefined")
    return distinct / total


# ---------------------------------------------------------------------------------------------
# Statistics over seeds and markdown tables.


@dataclass(frozen=True)
class SeedStats:
    mean: float
    std: float  # sample standard deviation (n - 1); 0 for one seed
    n: int

    def fmt(self, digits: int = 3) -> str:
        if self.n == 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def seed_stats(values: Sequence[float]) -> SeedStats:
    """Mean and spread of one metric over seeds."""
    if not values:
        raise MultitokenError("no values to summarise")
    xs = [float(v) for v in values]
    return SeedStats(statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0, len(xs))


def group_rows(rows: Sequence[dict[str, Any]], keys: Sequence[str]
               ) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    """Rows grouped by the values of `keys` (one group per configuration; seeds inside)."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return groups


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(x: Any) -> str:
        if isinstance(x, float):
            return f"{x:.3f}"
        if isinstance(x, int) and not isinstance(x, bool):
            return f"{x:,}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def metric_values(group: Sequence[dict[str, Any]], key: str) -> list[float]:
    """`key` over a group's rows (seeds), leaving out rows where it does not apply (None)."""
    return [r[key] for r in group if r.get(key) is not None]


def stats_cell(values: Sequence[float], digits: int = 3) -> str:
    """'mean ± std' over seeds; '-' when there is nothing to summarise."""
    return seed_stats(values).fmt(digits) if values else "-"


def paired_diff(base: Sequence[dict[str, Any]], other: Sequence[dict[str, Any]], key: str
                ) -> list[float]:
    """Per seed present in both: other[key] - base[key]. Seeds pair configurations trained on
    the same data, so the spread of the difference is smaller than that of each side."""
    by_seed = {r["seed"]: r[key] for r in base if r.get(key) is not None}
    return [r[key] - by_seed[r["seed"]] for r in other
            if r["seed"] in by_seed and r.get(key) is not None]


def format_params(p: int) -> str:
    return f"{p / 1e6:.2f}M" if p >= 1e5 else f"{p / 1e3:.0f}K"


# ---------------------------------------------------------------------------------------------
# Figures (matplotlib's object API: no pyplot, no global backend state).


def save_figure(path: Path, n_panels: int, draw: Callable[[list[Axes]], None],
                title: str = "") -> None:
    fig = Figure(figsize=(5.2 * n_panels, 4.0))
    axes = list(fig.subplots(1, n_panels, squeeze=False)[0])
    draw(axes)
    for ax in axes:
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def errorbar_series(ax: Axes, groups: dict[Any, list[tuple[float, Sequence[float]]]],
                    label: Callable[[Any], str]) -> None:
    """One line per group key: points (x, values over seeds) drawn as mean ± std."""
    for key, points in groups.items():
        points = sorted(points)
        stats = [seed_stats(v) for _, v in points]
        ax.errorbar([x for x, _ in points], [s.mean for s in stats], yerr=[s.std for s in stats],
                    marker="o", capsize=3, label=label(key))
    ax.legend()


# ---------------------------------------------------------------------------------------------
# The code corpus (ntp-vs-mtp, byte-heads).


def code_data(max_files: int, out: Path) -> DataConfig:
    """The default code corpus (`data.paths` empty = the stdlib), bytes, capped at max_files."""
    return DataConfig(paths=[], tokenizer="bytes", max_files=max_files,
                      cache_dir=str(out / "cache"))


@dataclass(frozen=True)
class CodeScale:
    """One scale of a byte-level experiment on the code corpus: the models (one per n_future),
    their training, and the held-out prompts they decode."""

    dim: int
    n_layers: int
    n_heads: int
    n_futures: tuple[int, ...]
    steps: int
    batch_size: int
    seq_len: int
    max_files: int
    eval_batches: int
    prompts: int
    prompt_len: int
    new_tokens: int
    seeds: int
    lr: float = 3e-3

    def __post_init__(self) -> None:
        # Decoding stays within the trained context: positions past train.seq_len were never
        # trained, and text generated there would say little about the model.
        if self.prompt_len + self.new_tokens > self.seq_len:
            raise ConfigError(f"prompt_len + new_tokens ({self.prompt_len} + {self.new_tokens}) "
                              f"exceeds seq_len ({self.seq_len})")

    def run_config(self, n_future: int, seed: int, out: Path,
                   head_type: HeadType = "transformer") -> RunConfig:
        """The byte-level model with `n_future` heads of `head_type` at this scale, trained on
        the code corpus."""
        model = ModelConfig(vocab_size=ByteTokenizer.vocab_size, dim=self.dim,
                            n_layers=self.n_layers, n_heads=self.n_heads, n_future=n_future,
                            head_type=head_type, max_seq_len=self.seq_len)
        return run_config(model, code_data(self.max_files, out), steps=self.steps,
                          batch_size=self.batch_size, seq_len=self.seq_len, seed=seed, lr=self.lr,
                          eval_batches=self.eval_batches)


def validation_windows(data: DataConfig, tokenizer: Tokenizer, n: int, prompt_len: int,
                       new_tokens: int) -> tuple[list[list[int]], list[list[int]]]:
    """n prompts of `prompt_len` tokens evenly spaced through the held-out split, and the
    `new_tokens` tokens that follow each there (the text a model's continuation is compared
    with, e.g. for its distinct-8-gram ratio)."""
    val = prepare_data(data, tokenizer).val
    span = prompt_len + new_tokens
    if len(val) < span:
        raise MultitokenError(f"the held-out split has {len(val)} tokens, fewer than one prompt "
                              f"and its continuation ({span})")
    step = max(1, (len(val) - span) // n)
    starts = range(0, step * n, step)
    return ([val[i:i + prompt_len].astype(int).tolist() for i in starts],
            [val[i + prompt_len:i + span].astype(int).tolist() for i in starts])


# ---------------------------------------------------------------------------------------------
# Jobs and experiments.


@dataclass
class Job:
    """One configuration of a sweep: a run directory name, its seed and its training config."""

    key: str  # unique within the sweep; the run's folder is runs/<key>
    seed: int
    cfg: RunConfig
    info: dict[str, Any] = field(default_factory=dict)  # extra columns of the job's result row

    @property
    def n_future(self) -> int:
        return self.cfg.model.n_future


class Experiment(ABC):
    """A sweep: its data, its configurations, its metric, its table and figure."""

    name: str
    summary: str  # one line for --help and results.md

    @abstractmethod
    def scale(self, name: str) -> Any:
        """The sweep's sizes and budgets at scale `name` (one of SCALES); a frozen dataclass."""

    @abstractmethod
    def default_seeds(self, scale: Any) -> int: ...

    @abstractmethod
    def jobs(self, scale: Any, seeds: Sequence[int], out: Path) -> list[Job]:
        """Every configuration to train, in order (deterministic)."""

    @abstractmethod
    def prepare(self, job: Job, scale: Any, out: Path) -> None:
        """Write what `job` trains on; idempotent (called before every job)."""

    @abstractmethod
    def evaluate(self, job: Job, model: MultiTokenModel, tokenizer: Tokenizer,
                 train_result: dict[str, Any], scale: Any, out: Path) -> dict[str, Any]:
        """The job's metrics (JSON values) from its trained model."""

    def rows(self, job: Job, params: int, metrics: dict[str, Any]) -> list[dict[str, Any]]:
        """The result rows of one job (default: one row)."""
        return [{"n_future": job.n_future, "params": params, "seed": job.seed, **job.info,
                 **metrics}]

    def with_head_types(self, scale: Any, head_types: str) -> Any:
        """`scale` sweeping the head types `head_types` names (`--head-types`, comma-separated);
        refused by experiments that sweep one head type."""
        raise ConfigError(f"--head-types: experiment {self.name} has no choice of head type "
                          "(ntp-vs-mtp has)")

    def options(self, scale: Any) -> str:
        """The command-line options beyond --quick, --seeds and --out that give `scale` ('' when
        there are none): part of the sweep's command, and of its plan.json when not ''."""
        return ""

    @abstractmethod
    def table(self, rows: Sequence[dict[str, Any]]) -> str:
        """Markdown: one line per configuration, mean ± std over seeds."""

    @abstractmethod
    def plot(self, rows: Sequence[dict[str, Any]], path: Path) -> None: ...


def run_config(model: ModelConfig, data: DataConfig, *, steps: int, batch_size: int,
               seq_len: int, seed: int, lr: float, eval_batches: int = 16) -> RunConfig:
    """A RunConfig for one job: one evaluation and one checkpoint, at the end of training."""
    warmup = max(1, min(100, steps // 10))
    cfg = RunConfig(
        model=model, data=data,
        optim=OptimConfig(lr=lr, warmup_steps=warmup),
        loss=LossConfig(),
        train=TrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len,
                          eval_every=steps, ckpt_every=steps, log_every=max(1, steps // 20),
                          eval_batches=eval_batches, seed=seed))
    cfg.validate()
    return cfg


def eval_device() -> torch.device:
    """Where trained models are evaluated: this process's GPU when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def train_quietly(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    """`multitoken.train.train` without its progress bar, its printed lines going to
    `run_dir/train.log` (the sweep has one progress bar, and stdout ends with the results).

    A run directory holding a checkpoint (a job stopped by Ctrl-C, or finished but not yet
    evaluated) is resumed: the trainer continues it, or only evaluates it when it is done.
    """
    try:
        find_checkpoint(run_dir)
        resume = True
    except CheckpointError:
        resume = False
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "train.log", "a", encoding="utf-8") as log, \
            contextlib.redirect_stdout(log):
        return train(cfg, run_dir, resume=resume, progress=False)


def write_once(target: Path, write: Callable[[Path], object]) -> Path:
    """Create directory `target` by `write(tmp)` then an atomic rename, unless it exists.

    Data are deterministic, so when several processes (torchrun ranks) race, whichever rename
    lands first is the same data; the others discard theirs.
    """
    if target.is_dir():
        return target
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    write(tmp)
    try:
        os.replace(tmp, target)
    except OSError:
        if not target.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------
# Output directories of experiments (the sweeps' runner and `experiment pretrained`).

RESULTS, PLAN = "results.json", "plan.json"


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (a temporary file, then a rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def claim_out_dir(out: Path, plan: dict[str, Any], what: str, settings: str) -> bool:
    """Check that `out` may receive this run (`what`: "sweep", "run"); True when it continues
    an unfinished one with the same plan, which is then kept; otherwise `plan.json` is written.

    Refused: a DIR with results.json, a file, or a non-empty DIR that is not this same run.
    `settings` names the saved plan's fields to show when plans differ, e.g. "scale, seeds".
    """
    if (out / RESULTS).exists():
        raise ConfigError(f"{out} already holds results ({out / RESULTS}); choose a new --out")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()):
        try:
            saved = json.loads((out / PLAN).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            raise ConfigError(f"{out} is not empty and holds no unfinished {what}; choose a new "
                              "--out") from None
        if saved != plan:
            shown = ", ".join(f"{k} {saved.get(k, 'none')}" for k in settings.split(", "))
            raise ConfigError(
                f"{out} holds an unfinished {what} with other settings ({shown}); run the same "
                "command again to continue it, or choose a new --out")
        return True
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / PLAN, plan)
    return False
