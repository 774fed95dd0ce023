"""What `multitoken experiment pretrained` measures on each model, and its table and figure.

Per model (the n=1 base, each way of training the added heads, the n=4 reference):

- head-1 validation loss in bits per byte (and every head's), on the windows the trainer
  validates on (`data.val_batches` of the held-out split, the n=1 recipe's seq_len, batch and
  eval_batches), so the base's figure is its training run's last validation loss;
- decoding, `bench decode`'s way (`bench.decode.run_setting`: warm-up, then plain and chain
  speculation with 1..n-1 drafts on the same prompts, batch 1, interleaved prompt by prompt):
  tokens per forward and speedup over the same model's plain decoding at each sampling
  setting, the distinct-8-gram ratio of each mode's output, and (greedy) whether every
  speculative output equals plain decoding token for token. Batch i of every mode and every
  model samples from seed + i, so two models with the same head 1 sample the same text in
  plain decoding: the check that heads-only training and distillation left head 1 untouched
  compares their plain outputs with the base model's, token for token, at every setting.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from multitoken.bench.common import distinct_ngram_ratio
from multitoken.bench.decode import NGRAM, Setting, decoder_for, make_setting, run_setting
from multitoken.data import val_batches
from multitoken.experiments.common import bits_per_byte, markdown_table
from multitoken.model import MultiTokenModel
from multitoken.train import evaluate

# Sampled as text is usually decoded, then hotter, then greedy (the paper's and bench's).
SETTINGS: tuple[Setting, ...] = (make_setting(0.8, 0.95, None), make_setting(1.0, None, None),
                                 make_setting(0.0, None, None))
VARIANTS = {  # name -> what it is, in the tables
    "base": "n=1 model (plain decoding only)",
    "heads": "(a) heads 2..4 only, the paper's loss on the corpus",
    "distill": "(b) heads 2..4 only, self-distillation on sampled continuations",
    "finetune": "(c) full n=1 -> n=4 fine-tuning",
    "reference": "n=4 trained from scratch (--reference)",
}


def head_bits_per_byte(model: MultiTokenModel, val: np.ndarray, seq_len: int, batch_size: int,
                       eval_batches: int) -> list[float]:
    """Validation loss per head in bits per byte (byte tokenizer: one token per byte)."""
    device = model.tok_embeddings.weight.device
    res = evaluate(model, val_batches(val, seq_len, batch_size, eval_batches), device)
    return [bits_per_byte(x) for x in res["head_loss"]]


def decode_runs(model: MultiTokenModel, prompts: list[list[int]], new_tokens: int, seed: int,
                speculative: bool) -> tuple[dict[str, Any], dict[str, list[list[int]]]]:
    """Every setting of SETTINGS: {label: run summary} and {label: plain decoding's outputs}.

    A summary: plain_tok_s, plain_distinct_8, modes {chain-k: heads, tokens_per_forward, tok_s,
    speedup, distinct_8, exact (greedy; None when sampling)} and best (the chain with the
    highest speedup, None without draft heads)."""
    batches = [[p] for p in prompts]
    ks = list(range(1, model.n_future)) if speculative else []
    runs: dict[str, Any] = {}
    outputs: dict[str, list[list[int]]] = {}
    for setting in SETTINGS:
        greedy = setting.sampling.greedy
        decoders = {"plain": decoder_for(model, setting, seed, {"speculative": "off"})}
        for k in ks:
            decoders[f"chain-{k}"] = decoder_for(model, setting, seed,
                                                 {"speculative": "chain", "num_drafts": k})
        acc = run_setting(decoders, batches, new_tokens, greedy)
        plain_tok_s = acc["plain"]["tokens"] / acc["plain"]["seconds"]
        modes = {}
        for k in ks:
            a = acc[f"chain-{k}"]
            tok_s = a["tokens"] / a["seconds"]
            modes[f"chain-{k}"] = {
                "heads": k + 1, "tokens_per_forward": a["appended"] / a["rows"], "tok_s": tok_s,
                "speedup": tok_s / plain_tok_s,
                "distinct_8": distinct_ngram_ratio(a["outputs"], NGRAM), "exact": a["exact"]}
        best = max(modes, key=lambda m: modes[m]["speedup"]) if modes else None
        runs[setting.label] = {
            "greedy": greedy, "plain_tok_s": plain_tok_s,
            "plain_distinct_8": distinct_ngram_ratio(acc["plain"]["outputs"], NGRAM),
            "modes": modes, "best": None if best is None else {"mode": best, **modes[best]}}
        outputs[setting.label] = acc["plain"]["outputs"]
    return runs, outputs


# ---------------------------------------------------------------------------------------------
# results.md


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _wall(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _cell(run: dict[str, Any]) -> str:
    """'tokens/forward / speedup (chain-k)' of a run's best chain, '-' without one."""
    b = run["best"]
    if b is None:
        return "-"
    return f"{b['tokens_per_forward']:.2f} / {b['speedup']:.2f}x ({b['mode']})"


def _same(flags: dict[str, bool] | None) -> str:
    if flags is None:
        return "-"
    return "yes" if all(flags.values()) else "NO (" + ", ".join(
        label for label, ok in flags.items() if not ok) + ")"


def markdown(summary: dict[str, Any]) -> str:
    """The tables of results.md: compute per stage, the models, decoding per setting."""
    b = summary["budget"]
    stage_rows = [[s["stage"], s["what"], s.get("steps", "-"), f"{s['flops']:.3g}",
                   _pct(s["flops"] / b["total"]), _wall(s["seconds"])]
                  for s in b["stages"]]
    rows = summary["results"]
    labels = [s.label for s in SETTINGS]
    model_rows = []
    for r in rows:
        flops = r["train_flops"]
        model_rows.append([
            r["variant"], VARIANTS[r["variant"]], r["n_future"],
            "-" if flops is None else f"{flops:.3g} ({_pct(flops / b['total'])})",
            _wall(r["train_seconds"]),
            f"{r['head_bits_per_byte'][0]:.4f}", _same(r["plain_equals_base"])])
    d = summary["decode"]
    decode_rows = [[r["variant"]] + [_cell(r["runs"][lb]) for lb in labels]
                   + [f"{r['runs'][lb]['plain_distinct_8']:.2f}" for lb in labels]
                   for r in rows]
    greedy = labels[-1]
    exact = [r["variant"] for r in rows
             if any(m["exact"] is False for m in r["runs"][greedy]["modes"].values())]
    return "\n\n".join([
        "## Compute\n\nBudget: the training of the n=4 recipe "
        f"(`{b['recipe']}`), {b['total']:.3g} FLOPs (estimated, "
        "`multitoken/flops.py`). Each way of training the heads gets what the n=1 "
        "pretraining leaves of it.\n\n" + markdown_table(
            ["stage", "what", "steps", "FLOPs", "of budget", "wall time"], stage_rows),
        "## Models\n\n`plain = base`: plain decoding equals the n=1 base model's token for "
        "token at every setting (" + ", ".join(labels) + ").\n\n" + markdown_table(
            ["model", "how", "heads", "training FLOPs (of budget)", "training wall time",
             "head-1 bits/byte", "plain = base"], model_rows),
        f"## Decoding\n\nBatch 1, {d['prompts']} held-out prompts of {d['prompt_len']} bytes, "
        f"{d['new_tokens']} new bytes each; cells: tokens per forward / speedup over the same "
        "model's plain decoding, of the chain with the highest speedup; distinct-8 of plain "
        f"decoding's output (the real continuations: {d['heldout_distinct_8']:.2f}). Greedy "
        "speculative output equal to plain greedy token for token: "
        + ("every model." if not exact else "NOT for " + ", ".join(exact) + ".") + "\n\n"
        + markdown_table(["model"] + labels + [f"distinct-8 plain, {lb}" for lb in labels],
                         decode_rows)])


# ---------------------------------------------------------------------------------------------
# results.png


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Tokens per forward (top) and speedup (bottom) against heads used, a panel per setting,
    a line per model with draft heads."""
    labels = [s.label for s in SETTINGS]
    most = max(r["n_future"] for r in rows)
    fig = Figure(figsize=(5.0 * len(labels), 8.0))
    axes = fig.subplots(2, len(labels), squeeze=False)
    for j, label in enumerate(labels):
        for r in rows:
            modes = r["runs"][label]["modes"]
            if not modes:
                continue
            xs = [1] + [m["heads"] for m in modes.values()]
            top = [1.0] + [m["tokens_per_forward"] for m in modes.values()]
            bottom = [1.0] + [m["speedup"] for m in modes.values()]
            axes[0][j].plot(xs, top, "o-", label=r["variant"])
            axes[1][j].plot(xs, bottom, "o-", label=r["variant"])
        axes[0][j].set_title(label)
        axes[0][j].set_ylabel("tokens per forward")
        axes[1][j].set_ylabel("speedup vs the model's plain decoding")
        axes[1][j].axhline(1.0, color="grey", lw=0.8)
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xticks(range(1, most + 1))
            ax.set_xlabel("heads used (head 1 + draft heads)")
            ax.grid(alpha=0.3)
            if most > 1:
                ax.legend(fontsize=8)
    fig.suptitle("n=1 model + added heads, trained three ways, at equal total training compute")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


__all__ = ["SETTINGS", "VARIANTS", "decode_runs", "head_bits_per_byte", "markdown", "plot"]
