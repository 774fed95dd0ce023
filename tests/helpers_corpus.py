"""A small deterministic text corpus for training tests (fast, no stdlib scan)."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = ["def", "return", "self", "value", "import", "class", "for", "while", "if", "else", "print", "range", "len", "list", "dict", "None", "True", "False", "yield", "lambda", "with", "open", "as", "try", "except", "raise", "pass"]


def make_corpus(root: Path, n_files: int = 12, lines: int = 60, seed: int = 0) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        body = []
        for j in range(lines):
            name = rng.choice(WORDS) + str(j % 7)
            body.append(f"def {name}(x):\n    return x + {rng.randint(0, 9)}\n")
        (root / f"f{i:02d}.py").write_text("".join(body))
    return root


def tiny_overrides(corpus: Path, cache: Path, steps: int = 8) -> list[str]:
    return ["--" + o for o in [f"data.paths=[{str(corpus)!r}]", f"data.cache_dir={cache}", "data.val_fraction=0.2",
            "model.dim=32", "model.n_layers=3", "model.n_heads=2", "model.n_future=2",
            "model.max_seq_len=64", f"train.steps={steps}", "train.batch_size=4",
            "train.seq_len=32", "train.eval_every=4", "train.eval_batches=2",
            "train.ckpt_every=2", "train.log_every=1", "optim.warmup_steps=2", "train.threads=1"]]
