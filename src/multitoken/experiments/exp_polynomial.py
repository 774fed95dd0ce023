"""`multitoken experiment polynomial` (paper sec. 4.2): polynomial arithmetic in F7[X]/(X^5).

Byte-level models of one size are trained with n_future 1, 2 and 4 (parameter matched: the
same total number of layers) on expressions of 1-5 operations, then decode greedily (head 1)
the answer to held-out expressions of 1..10 operations: in domain (1-5) and out of domain
(6-10), exact-match accuracy per difficulty (`polynomial.exact_match_accuracy`).

Seed s draws the test sets (`make_test_sets(s, ...)`), the training samples (disjoint from every
test expression), the initialisation and the batch order; all n of one seed share the data.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes

from multitoken.config import DataConfig, ModelConfig
from multitoken.experiments import polynomial as pm
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
from multitoken.tokenizer import ByteTokenizer, Tokenizer

BYTES_PER_SAMPLE = 47  # measured mean length of a training line (1-5 operations)
DIFFICULTIES = pm.IN_DOMAIN + pm.OUT_OF_DOMAIN


@dataclass(frozen=True)
class PolynomialScale:
    dim: int
    n_layers: int
    n_heads: int
    n_futures: tuple[int, ...]
    steps: int
    batch_size: int
    seq_len: int  # also the model's context (10-operation prompts + answers need ~180 bytes)
    test_per_difficulty: int
    seeds: int
    lr: float = 3e-3
    eval_batches: int = 8


SCALES: dict[str, PolynomialScale] = {
    "full": PolynomialScale(dim=96, n_layers=6, n_heads=4, n_futures=(1, 2, 4), steps=1100,
                            batch_size=8, seq_len=256, test_per_difficulty=2000, seeds=3),
    "quick": PolynomialScale(dim=64, n_layers=6, n_heads=4, n_futures=(1, 2, 4), steps=150,
                             batch_size=8, seq_len=256, test_per_difficulty=50, seeds=1),
    "test": PolynomialScale(dim=32, n_layers=5, n_heads=2, n_futures=(1, 2, 4), steps=3,
                            batch_size=2, seq_len=256, test_per_difficulty=3, seeds=1,
                            eval_batches=1),
}


def accuracy_key(k: int) -> str:
    return f"accuracy_{k}"


def majority_share(samples: Sequence[pm.Sample]) -> float:
    """The accuracy of always giving the test set's most frequent answer (often "0": products
    and compositions of polynomials without a constant term vanish mod X^5): what a model
    that ignores the expression can score."""
    counts = Counter(s.answer for s in samples)
    return counts.most_common(1)[0][1] / len(samples)


def mean_baseline(rows: Sequence[dict[str, Any]]) -> list[float]:
    """Per difficulty, the majority baseline averaged over the seeds' test sets."""
    per_seed = {r["seed"]: r["majority_baseline"] for r in rows}
    return [_mean(b[i] for b in per_seed.values()) for i in range(len(DIFFICULTIES))]


def _mean(xs: Iterable[float]) -> float:
    values = list(xs)
    return sum(values) / len(values)


class PolynomialExperiment(Experiment):
    name = "polynomial"
    summary = "n_future in {1,2,4}: exact match on F7[X]/(X^5) arithmetic, 1-10 ops (paper 4.2)"

    def __init__(self) -> None:
        self._tests: dict[tuple[int, int], dict[int, list[pm.Sample]]] = {}

    def scale(self, name: str) -> PolynomialScale:
        return SCALES[name]

    def default_seeds(self, scale: PolynomialScale) -> int:
        return scale.seeds

    def test_sets(self, seed: int, scale: PolynomialScale) -> dict[int, list[pm.Sample]]:
        key = (seed, scale.test_per_difficulty)
        if key not in self._tests:
            self._tests = {key: pm.make_test_sets(seed, scale.test_per_difficulty, DIFFICULTIES)}
        return self._tests[key]

    def jobs(self, scale: PolynomialScale, seeds: Sequence[int], out: Path) -> list[Job]:
        jobs = []
        for seed in seeds:
            data = DataConfig(paths=[str(out / "data" / f"samples-seed{seed}")], tokenizer="bytes",
                              val_fraction=0.05, cache_dir=str(out / "cache"))
            for n in scale.n_futures:
                model = ModelConfig(vocab_size=ByteTokenizer.vocab_size, dim=scale.dim,
                                    n_layers=scale.n_layers, n_heads=scale.n_heads, n_future=n,
                                    max_seq_len=scale.seq_len)
                cfg = run_config(model, data, steps=scale.steps, batch_size=scale.batch_size,
                                 seq_len=scale.seq_len, seed=seed, lr=scale.lr,
                                 eval_batches=scale.eval_batches)
                jobs.append(Job(f"n{n}-s{seed}", seed, cfg))
        return jobs

    def prepare(self, job: Job, scale: PolynomialScale, out: Path) -> None:
        def write(directory: Path) -> None:
            tests = self.test_sets(job.seed, scale)
            banned = {s.expression for samples in tests.values() for s in samples}
            # About one pass over the corpus in training, plus the validation share.
            n = scale.steps * scale.batch_size * scale.seq_len // BYTES_PER_SAMPLE + 400
            pm.write_corpus(directory, pm.make_train_samples(n, job.seed, exclude=banned),
                            samples_per_file=200)

        write_once(Path(job.cfg.data.paths[0]), write)

    def evaluate(self, job: Job, model: MultiTokenModel, tokenizer: Tokenizer,
                 train_result: dict[str, Any], scale: PolynomialScale, out: Path
                 ) -> dict[str, Any]:
        tests = self.test_sets(job.seed, scale)
        acc = {accuracy_key(k): pm.exact_match_accuracy(model, tokenizer, tests[k],
                                                        batch_size=256)
               for k in DIFFICULTIES}
        return {
            "accuracy_in_domain": _mean(acc[accuracy_key(k)] for k in pm.IN_DOMAIN),
            "accuracy_out_of_domain": _mean(acc[accuracy_key(k)] for k in pm.OUT_OF_DOMAIN),
            **acc, "majority_baseline": [majority_share(tests[k]) for k in DIFFICULTIES],
            "test_per_difficulty": scale.test_per_difficulty,
            "val_loss": train_result["head_loss"][0]}

    def table(self, rows: Sequence[dict[str, Any]]) -> str:
        by_n = group_rows(rows, ["n_future"])
        base = by_n.get((1,), [])
        lines = []
        for (n,), group in sorted(by_n.items()):
            lines.append([
                n, format_params(group[0]["params"]),
                *(stats_cell(metric_values(group, accuracy_key(k)), 2) for k in DIFFICULTIES),
                stats_cell(metric_values(group, "accuracy_in_domain")),
                stats_cell(metric_values(group, "accuracy_out_of_domain")),
                stats_cell(paired_diff(base, group, "accuracy_in_domain")) if n != 1 else "-",
                stats_cell(paired_diff(base, group, "accuracy_out_of_domain")) if n != 1 else "-",
                len(group)])
        baseline = mean_baseline(rows)
        lines.append(["always the most frequent answer", "-", *(f"{b:.2f}" for b in baseline),
                      f"{_mean(baseline[:5]):.3f}", f"{_mean(baseline[5:]):.3f}", "-", "-", "-"])
        return markdown_table(["n_future", "params", *(f"{k} ops" for k in DIFFICULTIES),
                               "in domain (1-5)", "out of domain (6-10)", "in dom. − n=1",
                               "out of dom. − n=1", "seeds"], lines)

    def plot(self, rows: Sequence[dict[str, Any]], path: Path) -> None:
        series = {n: [(k, [r[accuracy_key(k)] for r in group]) for k in DIFFICULTIES]
                  for (n,), group in sorted(group_rows(rows, ["n_future"]).items())}

        def draw(axes: list[Axes]) -> None:
            ax = axes[0]
            ax.axvspan(pm.OUT_OF_DOMAIN[0] - 0.5, pm.OUT_OF_DOMAIN[-1] + 0.5, color="0.9",
                       label="out of domain")
            errorbar_series(ax, series, lambda n: f"n_future={n}")
            ax.plot(list(DIFFICULTIES), mean_baseline(rows), "k--", linewidth=1,
                    label="most frequent answer")
            ax.legend()
            ax.set_xticks(list(DIFFICULTIES))
            ax.set_xlabel("operations in the expression")
            ax.set_ylabel("exact-match accuracy (greedy)")

        save_figure(path, 1, draw, "Polynomial arithmetic in F7[X]/(X^5)")
