"""`multitoken experiment ntp-vs-mtp`: next-token vs multi-token training on the code corpus.

Byte-level models on the default corpus (the Python standard library; `data.max_files` bounds
it) with n_future 1, 2, 4 and 8 at equal compute: the paper's parameter matching keeps the
total number of layers (n_future=8 with 10 layers = 2 trunk + 8 head layers), so every model
runs the same layers per token, and all train for the same steps on the same batches (the only
extra work of n > 1 is one more unembedding per head: V = 260 here).

Metrics: head 1's validation loss in bits per byte (the trainer's validation set: fixed windows
of the held-out files, the same for every run), and for n > 1 the tokens per forward of greedy
self-speculative decoding (`generate(.., speculative="chain")`, all n - 1 draft heads) on
prompts from the validation split, next to the distinct-8-gram ratio of the text generated
(greedy: a looping model would make any speed figure meaningless). n=1 gets the ratio of its
plain greedy text.

Seed s sets the initialisation and the batch order; the corpus and its split are the same for
every seed, so seeds pair the n values on identical data.

Head types (`--head-types`, default `transformer` alone): the paper's parallel `transformer`
heads and DeepSeek-V3's `token_conditioned` MTP modules, side by side at the same n, layers,
steps and batches. Both take one of `n_layers` per head; a token-conditioned head k >= 2 also
holds a 2D x D projection and two norms, so its models have more parameters than the parallel
ones at the same n (the table's params column says how many; the shapes stay as they are). n=1
has no head beyond the next-token one, so one n=1 model per seed is the baseline of every head
type. The parallel heads' jobs keep the names they always had (`n4-s0`); the others are named
after their head type (`token_conditioned-n4-s0`), and every row carries `head_type`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes

from multitoken.config import HeadType
from multitoken.decoding.generate import generate
from multitoken.errors import ConfigError
from multitoken.experiments.common import (
    CodeScale,
    Experiment,
    Job,
    bits_per_byte,
    distinct_ngram_ratio,
    errorbar_series,
    format_params,
    markdown_table,
    metric_values,
    paired_diff,
    save_figure,
    stats_cell,
    validation_windows,
)
from multitoken.model import MultiTokenModel
from multitoken.tokenizer import Tokenizer

# What --head-types accepts, in the order of the table and the figure.
HEAD_TYPES: tuple[HeadType, ...] = ("transformer", "token_conditioned")
DEFAULT_HEAD_TYPES: tuple[HeadType, ...] = ("transformer",)


@dataclass(frozen=True)
class NtpScale(CodeScale):
    """A CodeScale and the head types of its models (n > 1)."""

    head_types: tuple[HeadType, ...] = DEFAULT_HEAD_TYPES


SCALES: dict[str, NtpScale] = {
    "full": NtpScale(dim=96, n_layers=10, n_heads=4, n_futures=(1, 2, 4, 8), steps=800,
                      batch_size=16, seq_len=128, max_files=300, eval_batches=32, prompts=32,
                      prompt_len=32, new_tokens=96, seeds=3),
    "quick": NtpScale(dim=48, n_layers=9, n_heads=4, n_futures=(1, 2, 4, 8), steps=100,
                       batch_size=8, seq_len=128, max_files=30, eval_batches=8, prompts=4,
                       prompt_len=32, new_tokens=64, seeds=1),
    "test": NtpScale(dim=32, n_layers=9, n_heads=2, n_futures=(1, 2, 4, 8), steps=2,
                      batch_size=2, seq_len=64, max_files=6, eval_batches=1, prompts=2,
                      prompt_len=16, new_tokens=16, seeds=1),
}


class NtpVsMtpExperiment(Experiment):
    name = "ntp-vs-mtp"
    summary = "n_future in {1,2,4,8} on code: head-1 bits/byte, speculative tokens/forward"

    def scale(self, name: str) -> NtpScale:
        return SCALES[name]

    def default_seeds(self, scale: NtpScale) -> int:
        return scale.seeds

    def with_head_types(self, scale: NtpScale, head_types: str) -> NtpScale:
        return replace(scale, head_types=parse_head_types(head_types))

    def options(self, scale: NtpScale) -> str:
        if scale.head_types == DEFAULT_HEAD_TYPES:
            return ""
        return "--head-types " + ",".join(scale.head_types)

    def jobs(self, scale: NtpScale, seeds: Sequence[int], out: Path) -> list[Job]:
        jobs = []
        for seed in seeds:
            for n in scale.n_futures:
                # n=1: one model for every head type (a plain Llama: no head beyond head 1).
                for head_type in scale.head_types if n > 1 else ("transformer",):
                    key = f"n{n}-s{seed}"
                    if head_type != "transformer":
                        key = f"{head_type}-{key}"
                    jobs.append(Job(key, seed, scale.run_config(n, seed, out, head_type),
                                    {"dim": scale.dim, "n_layers": scale.n_layers,
                                     "head_type": head_type}))
        return jobs

    def prepare(self, job: Job, scale: CodeScale, out: Path) -> None:
        """Nothing to write: the corpus ships with Python."""

    def evaluate(self, job: Job, model: MultiTokenModel, tokenizer: Tokenizer,
                 train_result: dict[str, Any], scale: CodeScale, out: Path) -> dict[str, Any]:
        prompts, reference = validation_windows(job.cfg.data, tokenizer, scale.prompts,
                                                scale.prompt_len, scale.new_tokens)
        n = model.n_future
        res = generate(model, prompts, scale.new_tokens, speculative="chain" if n > 1 else "off")
        return {"bits_per_byte": bits_per_byte(train_result["head_loss"][0]),
                "head_bits_per_byte": [bits_per_byte(x) for x in train_result["head_loss"]],
                "tokens_per_forward": res.stats.tokens_per_forward if n > 1 else None,
                "distinct_8": distinct_ngram_ratio(res.tokens, 8),
                "distinct_8_heldout": distinct_ngram_ratio(reference, 8),
                "tokens_seen": scale.steps * scale.batch_size * scale.seq_len}

    def table(self, rows: Sequence[dict[str, Any]]) -> str:
        groups = by_head_type(rows)
        base = groups.get(("transformer", 1), [])
        lines = []
        for (head_type, n), group in sorted(groups.items(), key=lambda kv: (
                kv[0][1], HEAD_TYPES.index(kv[0][0]))):
            lines.append([
                head_type if n > 1 else "- (n=1)", n, job_layers(group[0]),
                format_params(group[0]["params"]),
                stats_cell(metric_values(group, "bits_per_byte")),
                stats_cell(paired_diff(base, group, "bits_per_byte")) if n != 1 else "-",
                stats_cell(metric_values(group, "tokens_per_forward"), 2),
                stats_cell(metric_values(group, "distinct_8"), 2), len(group)])
        return markdown_table(["head type", "n_future", "trunk + head layers", "params",
                               "head-1 val bits/byte", "− n=1 (same seed)",
                               "tokens/forward (chain, all heads)", "distinct-8 ratio",
                               "seeds"], lines) + (
            "\n\nDistinct-8 ratio of the held-out text that follows the same prompts: "
            f"{rows[0]['distinct_8_heldout']:.2f}. n=1 has no head beyond the next-token one: "
            "its model is the n=1 point of every head type. Params are non-embedding; a "
            "token_conditioned head k >= 2 holds a 2D x D projection and two norms more than a "
            "transformer head.")

    def plot(self, rows: Sequence[dict[str, Any]], path: Path) -> None:
        groups = by_head_type(rows)
        types = [t for t in HEAD_TYPES if any(t == ht and n > 1 for ht, n in groups)] or [
            "transformer"]
        n1 = groups.get(("transformer", 1), [])

        def points(head_type: str, key: str, with_n1: bool) -> list[tuple[float, list[float]]]:
            pts = [(n, metric_values(g, key)) for (t, n), g in groups.items()
                   if t == head_type and n > 1]
            return [(1, metric_values(n1, key)), *pts] if with_n1 and n1 else pts

        bpb = {t: points(t, "bits_per_byte", True) for t in types}
        tpf = {t: pts for t in types if (pts := points(t, "tokens_per_forward", False))}
        ns = sorted({n for _, n in groups})

        def draw(axes: list[Axes]) -> None:
            errorbar_series(axes[0], bpb, lambda t: f"{t} heads")
            axes[0].set_ylabel("validation loss, bits per byte (head 1)")
            if tpf:
                errorbar_series(axes[1], tpf, lambda t: f"{t} heads: greedy chain")
            axes[1].set_ylabel("tokens per forward (self-speculative)")
            for ax in axes:
                ax.set_xscale("log", base=2)
                ax.set_xticks(ns, [str(n) for n in ns])
                ax.set_xlabel("n_future (layer-matched)")

        save_figure(path, 2, draw, "Next-token vs multi-token prediction on code (bytes)")


def parse_head_types(text: str) -> tuple[HeadType, ...]:
    """`--head-types`: comma-separated names from HEAD_TYPES -> those types in HEAD_TYPES order
    (so `token_conditioned,transformer` is the same sweep as `transformer,token_conditioned`)."""
    names = [t.strip() for t in text.split(",")]
    unknown = [t for t in names if t not in HEAD_TYPES]
    if unknown:
        raise ConfigError(f"--head-types: unknown head type {unknown[0]!r}; choose from "
                          f"{', '.join(HEAD_TYPES)}, comma-separated")
    if len(set(names)) != len(names):
        raise ConfigError(f"--head-types: a head type is named twice in {text!r}")
    return tuple(t for t in HEAD_TYPES if t in names)


def head_type(row: dict[str, Any]) -> str:
    """A row's head type; rows of sweeps run before head types were swept have none: theirs
    were the paper's parallel heads."""
    return str(row.get("head_type", "transformer"))


def by_head_type(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Rows grouped by (head type, n_future); n=1 rows all under ("transformer", 1)."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        key = (head_type(r) if r["n_future"] > 1 else "transformer", r["n_future"])
        groups.setdefault(key, []).append(r)
    return groups


def job_layers(row: dict[str, Any]) -> str:
    """'trunk+heads' for a row of this experiment (its n_layers is the scale's)."""
    return f"{row['n_layers'] - row['n_future']}+{row['n_future']}"
