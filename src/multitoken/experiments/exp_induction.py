"""`multitoken experiment induction` (paper sec. 4.1): does n=2 form induction earlier?

Models of several widths (0.04M to 0.33M non-embedding parameters, 3 layers) are trained with
n_future 1 and 2 on the same generated children's stories, at equal training tokens, and scored
on held-out stories by head 1's top-1 accuracy on the second token of a name at its second and
later occurrences (`induction.induction_accuracy`): a token that can only be right by copying
it from the name's earlier occurrence. n_future=2 keeps the total number of layers (the paper's
parameter matching), so its head 1 sits on a trunk one layer shallower. Every size has at
least 3 layers: a 2-layer n=2 model would have no trunk at all, and induction needs two
attention layers in sequence.

Seed s draws the training stories (`make_stories(.., seed=s)`), the held-out stories
(`split="heldout"`), the initialisation and the batch order; every size and n of one seed
trains on the same stories.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes

from multitoken.config import DataConfig, ModelConfig
from multitoken.experiments import induction as ind
from multitoken.experiments.common import (
    Experiment,
    Job,
    errorbar_series,
    format_params,
    group_rows,
    markdown_table,
    metric_values,
    paired_diff,
    run_config,
    save_figure,
    stats_cell,
    write_once,
)
from multitoken.model import MultiTokenModel
from multitoken.tokenizer import Tokenizer

TOKENS_PER_STORY = 134  # measured mean over 1,000 stories; sizes the corpus


@dataclass(frozen=True)
class InductionScale:
    sizes: tuple[tuple[int, int, int], ...]  # (dim, n_layers, attention heads)
    n_futures: tuple[int, ...]
    steps: int
    batch_size: int
    seq_len: int  # also the model's context: held-out stories longer than it are skipped
    heldout_stories: int
    seeds: int
    lr: float = 3e-3
    eval_batches: int = 8


SCALES: dict[str, InductionScale] = {
    # 0.04M, 0.08M, 0.16M, 0.33M non-embedding parameters, 3.1M training tokens each: in a
    # one-seed probe d64 n=1 formed induction between steps 1,250 and 1,500 of these 2,000,
    # and no model (0.16M or 1.0M) formed it within 1.5M tokens. See docs/science.md (budget).
    "full": InductionScale(sizes=((32, 3, 2), (48, 3, 4), (64, 3, 4), (96, 3, 4)),
                           n_futures=(1, 2), steps=2000, batch_size=8, seq_len=192,
                           heldout_stories=500, seeds=3),
    "quick": InductionScale(sizes=((32, 3, 2), (64, 3, 4)), n_futures=(1, 2), steps=200,
                            batch_size=8, seq_len=192, heldout_stories=100, seeds=1),
    "test": InductionScale(sizes=((32, 3, 2),), n_futures=(1, 2), steps=4, batch_size=2,
                           seq_len=192, heldout_stories=12, seeds=1, eval_batches=1),
}


class InductionExperiment(Experiment):
    name = "induction"
    summary = "width x n_future in {1,2}: induction accuracy on held-out stories (paper 4.1)"

    def scale(self, name: str) -> InductionScale:
        return SCALES[name]

    def default_seeds(self, scale: InductionScale) -> int:
        return scale.seeds

    def _n_stories(self, scale: InductionScale) -> int:
        # About one pass over the corpus in training (windows are drawn at random), plus the
        # trainer's validation share.
        return scale.steps * scale.batch_size * scale.seq_len // TOKENS_PER_STORY + 100

    def jobs(self, scale: InductionScale, seeds: Sequence[int], out: Path) -> list[Job]:
        vocab = len(ind.vocabulary().ids)
        jobs = []
        for seed in seeds:
            data = DataConfig(paths=[str(out / "data" / f"stories-seed{seed}")],
                              tokenizer=str(out / "data" / "tokenizer"), val_fraction=0.05,
                              cache_dir=str(out / "cache"))
            for dim, layers, heads in scale.sizes:
                for n in scale.n_futures:
                    model = ModelConfig(vocab_size=vocab, dim=dim, n_layers=layers,
                                        n_heads=heads, n_future=n, max_seq_len=scale.seq_len)
                    cfg = run_config(model, data, steps=scale.steps, batch_size=scale.batch_size,
                                     seq_len=scale.seq_len, seed=seed, lr=scale.lr,
                                     eval_batches=scale.eval_batches)
                    jobs.append(Job(f"d{dim}-L{layers}-n{n}-s{seed}", seed, cfg,
                                    {"dim": dim, "n_layers": layers}))
        return jobs

    def prepare(self, job: Job, scale: InductionScale, out: Path) -> None:
        write_once(out / "data" / "tokenizer", ind.save_tokenizer)
        stories = self._n_stories(scale)
        write_once(Path(job.cfg.data.paths[0]), lambda d: ind.write_corpus(
            d, ind.make_stories(stories, seed=job.seed), stories_per_file=100))

    def evaluate(self, job: Job, model: MultiTokenModel, tokenizer: Tokenizer,
                 train_result: dict[str, Any], scale: InductionScale, out: Path
                 ) -> dict[str, Any]:
        held = [s for s in ind.make_stories(scale.heldout_stories, seed=job.seed, split="heldout")
                if len(s.tokens) <= model.cfg.max_seq_len]
        acc = ind.induction_accuracy(model, [s.tokens for s in held],
                                     [s.repeat_positions for s in held], batch_size=32)
        return {"induction_accuracy": acc, "val_loss": train_result["head_loss"][0],
                "heldout_positions": sum(len(s.repeat_positions) for s in held)}

    def table(self, rows: Sequence[dict[str, Any]]) -> str:
        lines = []
        for (params, dim, layers), group in sorted(
                group_rows(rows, ["params", "dim", "n_layers"]).items()):
            by_n = group_rows(group, ["n_future"])
            n1, n2 = by_n.get((1,), []), by_n.get((2,), [])
            lines.append([f"d{dim} L{layers}", format_params(params),
                          stats_cell(metric_values(n1, "induction_accuracy")),
                          stats_cell(metric_values(n2, "induction_accuracy")),
                          stats_cell(paired_diff(n1, n2, "induction_accuracy")),
                          stats_cell(metric_values(n1, "val_loss")),
                          stats_cell(metric_values(n2, "val_loss")),
                          len({r["seed"] for r in group})])
        return markdown_table(["model", "non-emb params", "induction acc n=1",
                               "induction acc n=2", "n=2 − n=1 (same seed)", "val loss n=1",
                               "val loss n=2", "seeds"], lines)

    def plot(self, rows: Sequence[dict[str, Any]], path: Path) -> None:
        series: dict[int, list[tuple[float, list[float]]]] = {}
        for (n, params), group in group_rows(rows, ["n_future", "params"]).items():
            series.setdefault(n, []).append(
                (params, [r["induction_accuracy"] for r in group]))

        def draw(axes: list[Axes]) -> None:
            ax = axes[0]
            errorbar_series(ax, series, lambda n: f"n_future={n}")
            ax.set_xscale("log")
            ax.set_xlabel("non-embedding parameters")
            ax.set_ylabel("induction accuracy (held-out stories)")

        save_figure(path, 1, draw, "Induction: accuracy on a repeated name's second token")

