"""`multitoken experiment byte-heads` (paper Table S3 at our scale): how far 8 byte heads go.

A byte-level n_future=8 model is trained on the code corpus (the Python standard library), then
decodes prompts from the held-out split greedily, plainly (head 1) and self-speculatively with
the first 1..7 draft heads (`generate(.., speculative="chain", num_drafts=k)`: k + 1 heads
used). Per number of heads: tokens per forward (bonus token included), wall-clock speedup over
plain greedy decoding on the same prompts and tokens, whether the output equals plain greedy
decoding token for token ("exact": it must, greedy speculation is lossless), and the
distinct-8-gram ratio of that output (speed measured on looping text means little).

Prompts are decoded one at a time (batch 1); every mode decodes every prompt, in an order that
rotates from prompt to prompt, so drifts in machine load hit every mode alike. Seed s sets the
initialisation and the batch order; the corpus is the same for every seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes

from multitoken.decoding.generate import generate
from multitoken.experiments.common import (
    CodeScale,
    Experiment,
    Job,
    bits_per_byte,
    distinct_ngram_ratio,
    errorbar_series,
    format_params,
    group_rows,
    markdown_table,
    metric_values,
    save_figure,
    stats_cell,
    validation_windows,
)
from multitoken.model import MultiTokenModel
from multitoken.tokenizer import Tokenizer

SCALES: dict[str, CodeScale] = {
    "full": CodeScale(dim=96, n_layers=10, n_heads=4, n_futures=(8,), steps=2800,
                           batch_size=16, seq_len=128, max_files=300, eval_batches=32,
                           prompts=32, prompt_len=32, new_tokens=96, seeds=3),
    "quick": CodeScale(dim=48, n_layers=9, n_heads=4, n_futures=(8,), steps=150, batch_size=8,
                            seq_len=128, max_files=30, eval_batches=8, prompts=3, prompt_len=32,
                            new_tokens=64, seeds=1),
    "test": CodeScale(dim=32, n_layers=9, n_heads=2, n_futures=(8,), steps=2, batch_size=2,
                           seq_len=64, max_files=6, eval_batches=1, prompts=2, prompt_len=16,
                           new_tokens=16, seeds=1),
}


def _mode(num_drafts: int) -> dict[str, Any]:
    """generate() arguments using num_drafts + 1 heads (0 drafts = plain greedy)."""
    return {"speculative": "chain", "num_drafts": num_drafts} if num_drafts else {}


class ByteHeadsExperiment(Experiment):
    name = "byte-heads"
    summary = "byte-level n_future=8: tokens/forward, speedup, exactness vs heads used (S3)"

    def scale(self, name: str) -> CodeScale:
        return SCALES[name]

    def default_seeds(self, scale: CodeScale) -> int:
        return scale.seeds

    def jobs(self, scale: CodeScale, seeds: Sequence[int], out: Path) -> list[Job]:
        jobs = []
        for seed in seeds:
            cfg = scale.run_config(scale.n_futures[0], seed, out)
            jobs.append(Job(f"n{scale.n_futures[0]}-s{seed}", seed, cfg))
        return jobs

    def prepare(self, job: Job, scale: CodeScale, out: Path) -> None:
        """Nothing to write: the corpus ships with Python."""

    def evaluate(self, job: Job, model: MultiTokenModel, tokenizer: Tokenizer,
                 train_result: dict[str, Any], scale: CodeScale, out: Path
                 ) -> dict[str, Any]:
        prompts, reference = validation_windows(job.cfg.data, tokenizer, scale.prompts,
                                                scale.prompt_len, scale.new_tokens)
        drafts = list(range(model.n_future))  # 0 = plain greedy
        for k in drafts:  # warm-up: first calls allocate and build what later calls reuse
            generate(model, prompts[:1], min(8, scale.new_tokens), **_mode(k))
        seconds = dict.fromkeys(drafts, 0.0)
        tokens = dict.fromkeys(drafts, 0)
        tpf_weighted = dict.fromkeys(drafts, 0.0)
        forwards = dict.fromkeys(drafts, 0)
        outputs: dict[int, list[list[int]]] = {k: [] for k in drafts}
        for i, prompt in enumerate(prompts):
            for k in drafts[i % len(drafts):] + drafts[:i % len(drafts)]:
                res = generate(model, [prompt], scale.new_tokens, **_mode(k))
                seconds[k] += res.stats.wall_time_s
                tokens[k] += res.stats.new_tokens
                # Pooled over prompts: all tokens appended / all decode forwards.
                tpf_weighted[k] += res.stats.tokens_per_forward * res.stats.sequence_forwards
                forwards[k] += res.stats.sequence_forwards
                outputs[k].append(res.tokens[0])
        plain_rate = tokens[0] / seconds[0]
        per_heads = [{
            "heads": k + 1, "num_drafts": k,
            "tokens_per_forward": tpf_weighted[k] / forwards[k] if k else 1.0,
            "speedup": tokens[k] / seconds[k] / plain_rate if k else 1.0,
            "exact": outputs[k] == outputs[0],
            "distinct_8": distinct_ngram_ratio(outputs[k], 8)} for k in drafts]
        return {"per_heads": per_heads,
                "bits_per_byte": bits_per_byte(train_result["head_loss"][0]),
                "distinct_8_heldout": distinct_ngram_ratio(reference, 8),
                "plain_tokens_per_s": plain_rate, "batch_size": 1}

    def rows(self, job: Job, params: int, metrics: dict[str, Any]) -> list[dict[str, Any]]:
        """One row per number of heads used."""
        common = {k: v for k, v in metrics.items() if k != "per_heads"}
        return [{"n_future": job.n_future, "params": params, "seed": job.seed, **h, **common}
                for h in metrics["per_heads"]]

    def table(self, rows: Sequence[dict[str, Any]]) -> str:
        lines = []
        for (heads,), group in sorted(group_rows(rows, ["heads"]).items()):
            exact = sum(bool(r["exact"]) for r in group)
            lines.append([heads, stats_cell(metric_values(group, "tokens_per_forward"), 2),
                          stats_cell(metric_values(group, "speedup"), 2),
                          "yes" if exact == len(group) else f"NO ({len(group) - exact} seeds)",
                          stats_cell(metric_values(group, "distinct_8"), 2), len(group)])
        first = rows[0]
        bpb = stats_cell(metric_values(group_rows(rows, ["heads"])[(1,)], "bits_per_byte"))
        return (f"n_future={first['n_future']}, {format_params(first['params'])} non-embedding "
                f"parameters, batch 1; head-1 validation bits per byte {bpb}; distinct-8 ratio "
                f"of the held-out text that follows the same prompts "
                f"{first['distinct_8_heldout']:.2f}.\n\n"
                + markdown_table(["heads used", "tokens/forward", "speedup vs plain",
                                  "= plain greedy", "distinct-8 ratio", "seeds"], lines))

    def plot(self, rows: Sequence[dict[str, Any]], path: Path) -> None:
        groups = sorted(group_rows(rows, ["heads"]).items())
        tpf = {"tokens per forward": [(h, metric_values(g, "tokens_per_forward"))
                                      for (h,), g in groups]}
        speed = {"speedup": [(h, metric_values(g, "speedup")) for (h,), g in groups]}

        def draw(axes: list[Axes]) -> None:
            errorbar_series(axes[0], tpf, str)
            errorbar_series(axes[1], speed, lambda _: "wall clock, batch 1")
            axes[0].set_ylabel("tokens per forward")
            axes[1].set_ylabel("speedup vs plain greedy decoding")
            for ax in axes:
                ax.set_xticks([h for (h,), _ in groups])
                ax.set_xlabel("heads used (head 1 + draft heads)")

        save_figure(path, 2, draw, "Byte-level n_future=8: self-speculative decoding")
