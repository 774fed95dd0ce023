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
    paired_diff,
    save_figure,
    stats_cell,
    validation_windows,
)
from multitoken.model import MultiTokenModel
from multitoken.tokenizer import Tokenizer

SCALES: dict[str, CodeScale] = {
    "full": CodeScale(dim=96, n_layers=10, n_heads=4, n_futures=(1, 2, 4, 8), steps=800,
                      batch_size=16, seq_len=128, max_files=300, eval_batches=32, prompts=32,
                      prompt_len=32, new_tokens=96, seeds=3),
    "quick": CodeScale(dim=48, n_layers=9, n_heads=4, n_futures=(1, 2, 4, 8), steps=100,
                       batch_size=8, seq_len=128, max_files=30, eval_batches=8, prompts=4,
                       prompt_len=32, new_tokens=64, seeds=1),
    "test": CodeScale(dim=32, n_layers=9, n_heads=2, n_futures=(1, 2, 4, 8), steps=2,
                      batch_size=2, seq_len=64, max_files=6, eval_batches=1, prompts=2,
                      prompt_len=16, new_tokens=16, seeds=1),
}


class NtpVsMtpExperiment(Experiment):
    name = "ntp-vs-mtp"
    summary = "n_future in {1,2,4,8} on code: head-1 bits/byte, speculative tokens/forward"

    def scale(self, name: str) -> CodeScale:
        return SCALES[name]

    def default_seeds(self, scale: CodeScale) -> int:
        return scale.seeds

    def jobs(self, scale: CodeScale, seeds: Sequence[int], out: Path) -> list[Job]:
        jobs = []
        for seed in seeds:
            for n in scale.n_futures:
                cfg = scale.run_config(n, seed, out)
                jobs.append(Job(f"n{n}-s{seed}", seed, cfg,
                                {"dim": scale.dim, "n_layers": scale.n_layers}))
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
        by_n = group_rows(rows, ["n_future"])
        base = by_n.get((1,), [])
        lines = []
        for (n,), group in sorted(by_n.items()):
            lines.append([
                n, job_layers(group[0]), format_params(group[0]["params"]),
                stats_cell(metric_values(group, "bits_per_byte")),
                stats_cell(paired_diff(base, group, "bits_per_byte")) if n != 1 else "-",
                stats_cell(metric_values(group, "tokens_per_forward"), 2),
                stats_cell(metric_values(group, "distinct_8"), 2), len(group)])
        return markdown_table(["n_future", "trunk + head layers", "params",
                               "head-1 val bits/byte", "− n=1 (same seed)",
                               "tokens/forward (chain, all heads)", "distinct-8 ratio",
                               "seeds"], lines) + (
            "\n\nDistinct-8 ratio of the held-out text that follows the same prompts: "
            f"{rows[0]['distinct_8_heldout']:.2f}.")

    def plot(self, rows: Sequence[dict[str, Any]], path: Path) -> None:
        groups = sorted(group_rows(rows, ["n_future"]).items())
        bpb = {"head 1": [(n, metric_values(g, "bits_per_byte")) for (n,), g in groups]}
        tpf = {"chain": [(n, metric_values(g, "tokens_per_forward")) for (n,), g in groups
                         if n > 1]}

        def draw(axes: list[Axes]) -> None:
            errorbar_series(axes[0], bpb, str)
            axes[0].set_ylabel("validation loss, bits per byte (head 1)")
            if tpf["chain"]:
                errorbar_series(axes[1], tpf, lambda _: "greedy self-speculative (chain)")
            axes[1].set_ylabel("tokens per forward")
            for ax in axes:
                ax.set_xscale("log", base=2)
                ax.set_xticks([n for (n,), _ in groups], [str(n) for (n,), _ in groups])
                ax.set_xlabel("n_future (parameter-matched)")

        save_figure(path, 2, draw, "Next-token vs multi-token prediction on code (bytes)")


def job_layers(row: dict[str, Any]) -> str:
    """'trunk+heads' for a row of this experiment (its n_layers is the scale's)."""
    return f"{row['n_layers'] - row['n_future']}+{row['n_future']}"
