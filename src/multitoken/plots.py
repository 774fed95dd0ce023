"""PNG figures of training runs (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if line:
            rows.append(json.loads(line))
    return rows


def plot_losses(metrics_path: str | Path, png_path: str | Path, title: str = "") -> Path | None:
    """Training and validation loss per head, and validation accuracy per head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [r for r in rows if r.get("kind") == "train"]
    val = [r for r in rows if r.get("kind") == "val"]
    if not train:
        return None
    n = len(train[0]["head_loss"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i in range(n):
        c = colors[i % len(colors)]
        axes[0].plot([r["step"] for r in train], [r["head_loss"][i] for r in train], color=c,
                     alpha=0.35, lw=1)
        if val:
            axes[0].plot([r["step"] for r in val], [r["head_loss"][i] for r in val], color=c,
                         marker="o", ms=3, label=f"head {i + 1} (val)")
            axes[1].plot([r["step"] for r in val], [r["head_acc"][i] for r in val], color=c,
                         marker="o", ms=3, label=f"head {i + 1}")
    axes[0].set(xlabel="step", ylabel="cross-entropy (nats)",
                title="loss per head (faint: train, dots: validation)")
    axes[0].legend(fontsize=8)
    axes[1].set(xlabel="step", ylabel="top-1 accuracy", title="validation accuracy per head",
                ylim=(0, 1))
    if val:
        axes[1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(png_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
