"""`multitoken bench train-memory`: peak memory of one training step (forward + backward).

Variants (each measured in its own fresh process, so no variant inherits another's heap):

- ntp:        n_future=1, the plain baseline: full [N, V] logits, `F.cross_entropy`, backward.
- naive:      n_future=n, `mtp_loss(method="naive")`: all n heads' logits alive, one backward.
- sequential: n_future=n, the paper's figure 2: one head's logits at a time.
- chunked:    n_future=n, sequential + torch's chunked `F.linear_cross_entropy` (no full logits).
- ntp_mtp_loss: (for reference, not in the JSON) n_future=1 through `mtp_loss(method="naive")`,
              i.e. the plain step with the library's own cross-entropy, which the n-head methods
              also use; it separates "fewer live logits" from "a leaner cross-entropy".

What is measured: the peak resident memory during ONE step, minus what the process held just
before it. Before the baseline is taken the model exists, every parameter's `.grad` is already
allocated (zeros) and the input batch exists, and a tiny warm-up step has run (one-off kernel and
thread-pool set-up). So each figure is the step's transient memory: activations, logits, their
gradients and temporaries, and not the parameters or gradient buffers, which every training loop
holds anyway and which differ between variants only by the extra head layers' weights.

Parameter matching (as in the paper) means the same total number of layers: with 4 layers in all,
ntp has a 3-layer trunk + 1 head layer while n=4 has a 0-layer trunk + 4 head layers. The trunk's
activations therefore differ between ntp and the n=4 variants; that is inherent to the matching.

`--head-types transformer,token_conditioned` also measures the n-head variants with the other
head types at the same shape (rows "sequential (token_conditioned)", ...; JSON key per type),
e.g. to show that a chain of heads keeps the memory-efficient schedule's peak.

Also reported: `max_grad_diff`, the largest absolute difference between the gradients of the
sequential / chunked methods and those of the naive one, relative to the largest naive gradient
magnitude (fp32, measured at `--grad-tokens` tokens in its own process).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from multitoken import cliargs
from multitoken.bench.common import (
    MIB,
    PeakMemory,
    Timer,
    format_table,
    last_json_line,
    print_json,
    set_threads,
    worker_env,
)
from multitoken.config import ModelConfig
from multitoken.devices import resolve_device
from multitoken.errors import ConfigError
from multitoken.loss import IGNORE_INDEX, mtp_loss
from multitoken.model import MultiTokenModel
from multitoken.train import autocast_factory

VARIANTS = ("ntp", "naive", "sequential", "chunked")  # the ones in the JSON line
ALL_VARIANTS = (*VARIANTS, "ntp_mtp_loss")
SWEEP_N = (2, 4, 8)
LOSS_METHOD = {"ntp_mtp_loss": "naive"}  # the mtp_loss method of a variant not named after one
TARGETS = {"sequential": 1.10, "chunked": 0.5}  # peak <= factor x ntp's peak (issue 2)
LAYER_HEAD_TYPES = ("transformer", "causal", "token_conditioned")  # one layer per head


class BenchError(Exception):
    """A measuring worker failed: reported as one line, exit 1 (bad options are ConfigErrors:
    exit 2, before any worker starts)."""


def build_parser() -> argparse.ArgumentParser:
    p = cliargs.ArgumentParser(
        prog="multitoken bench train-memory",
        description="Peak memory of one training step (forward + backward) for plain next-token "
                    "training and the three multi-token loss methods, each in its own process.")
    pos = cliargs.positive_int
    p.add_argument("--vocab", type=pos, default=32000, help="vocabulary size (default 32000)")
    p.add_argument("--dim", type=pos, default=512, help="model width (default 512)")
    p.add_argument("--layers", type=pos, default=4,
                   help="layers in all, trunk + head layers (default 4)")
    p.add_argument("--n-heads", type=pos, default=8, help="attention heads (default 8)")
    p.add_argument("--tokens", type=pos, default=8192, help="tokens per step (default 8192)")
    p.add_argument("--seq-len", type=pos, default=1024,
                   help="sequence length; batch = tokens / seq-len (default 1024, so 8 x 1024)")
    p.add_argument("--n-future", type=pos, default=4,
                   help="heads of the multi-token variants (default 4)")
    p.add_argument("--variants", default=",".join(ALL_VARIANTS),
                   help=f"comma-separated subset of {','.join(ALL_VARIANTS)} (default all)")
    p.add_argument("--grad-tokens", type=cliargs.non_negative_int, default=2048,
                   help="tokens of the gradient-equality check (0 = --tokens; default 2048)")
    p.add_argument("--sweep", action="store_true",
                   help=f"also measure naive/sequential/chunked at n_future in {SWEEP_N} and plot")
    p.add_argument("--png", default="docs/figures/train_memory.png",
                   help="where --sweep writes its plot")
    p.add_argument("--threads", type=pos, default=2, help="torch CPU threads (default 2)")
    cliargs.add_device_argument(p)
    p.add_argument("--seed", type=int, default=0, help="seed of weights and data (default 0)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="autocast dtype of the measured steps on CUDA, as train.dtype (default "
                        "float32; ignored on the CPU; the gradient check stays fp32)")
    p.add_argument("--check", action="store_true",
                   help="exit 1 if a target (sequential <= 1.10 x ntp, chunked <= 0.5 x ntp, "
                        "max_grad_diff <= 1e-5) is missed")
    p.add_argument("--head-types", default="transformer",
                   help="comma-separated head types whose n-head variants are measured side by "
                   "side, e.g. transformer,token_conditioned (default transformer)")
    p.add_argument("--head-type", default="transformer", help=argparse.SUPPRESS)  # worker's
    p.add_argument("--worker", default=None, choices=(*ALL_VARIANTS, "graddiff"),
                   help=argparse.SUPPRESS)  # internal: one measurement
    return p


# ---------------------------------------------------------------------------------------------
# Worker side: one measurement in a fresh process, printed as one JSON line.


def _shape(tokens: int, seq_len: int) -> tuple[int, int]:
    """(batch, seq) with batch * seq == tokens."""
    seq = min(seq_len, tokens)
    if seq < 2 or tokens % seq:
        raise ConfigError(f"--tokens ({tokens}) must be a multiple of --seq-len ({seq_len}), "
                          "which must be >= 2")
    return tokens // seq, seq


def _config(args: argparse.Namespace, n_future: int, layers: int, seq: int) -> ModelConfig:
    """ModelConfig rejects invalid shapes (e.g. --dim not divisible by --n-heads): ConfigError."""
    return ModelConfig(vocab_size=args.vocab, dim=args.dim, n_layers=layers,
                       n_heads=args.n_heads, max_seq_len=max(seq, 2), n_future=n_future,
                       head_type="transformer" if n_future == 1 else args.head_type)


def _model(args: argparse.Namespace, n_future: int, layers: int, seq: int,
           device: torch.device) -> MultiTokenModel:
    cfg = _config(args, n_future, layers, seq)
    torch.manual_seed(args.seed)
    return MultiTokenModel(cfg).to(device)


def _batch(args: argparse.Namespace, batch: int, seq: int,
           device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randint(0, args.vocab, (batch, seq + 1), generator=g)
    return x[:, :-1].contiguous().to(device), x[:, 1:].contiguous().to(device)


def train_step(model: MultiTokenModel, variant: str, idx: torch.Tensor,
               targets: torch.Tensor, meter: PeakMemory | None = None,
               autocast: Callable[[], Any] = contextlib.nullcontext) -> float | None:
    """Forward + backward of one step; gradients accumulate into the parameters' `.grad`.

    Returns the memory still held after the forward (the graph), for the one-backward variants
    (ntp, and the loss methods that call `after_forward`: naive); None for the others.
    """
    held: list[float] = []

    def measure() -> None:
        if meter is not None:
            held.append(meter.current_mib() - meter.baseline_mib)

    if variant == "ntp":
        # The textbook step: logits of the single head, cross-entropy, backward.
        with autocast():
            h = model.hidden(idx)[0]
            loss = F.cross_entropy(model.unembed(h).flatten(0, 1).float(), targets.flatten(),
                                   ignore_index=IGNORE_INDEX)
        measure()
        loss.backward()
    else:  # mtp_loss runs its own backward (one, or one per head)
        mtp_loss(model, idx, targets, backward=True, method=LOSS_METHOD.get(variant, variant),
                 after_forward=measure, autocast=autocast)
    return held[0] if held else None


def run_memory_worker(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    variant = args.worker
    n_future = 1 if variant.startswith("ntp") else args.n_future
    batch, seq = _shape(args.tokens, args.seq_len)
    model = _model(args, n_future, args.layers, seq, device)
    # Gradient buffers exist before the step, as in any training loop after its first step.
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    idx, targets = _batch(args, batch, seq, device)
    autocast = autocast_factory(device, args.dtype)
    train_step(model, variant, idx[:1, : min(seq, 16)], targets[:1, : min(seq, 16)],
               autocast=autocast)  # warm-up
    for p in model.parameters():
        p.grad.zero_()
    gc.collect()
    meter = PeakMemory(device)
    meter.start()
    with Timer(device) as t:
        held = train_step(model, variant, idx, targets, meter, autocast)
    peak = meter.peak_mib()
    finite = all(torch.isfinite(p.grad).all().item() for p in model.parameters())
    return {"variant": variant, "n_future": n_future, "layers": args.layers,
            "trunk_layers": model.cfg.n_trunk_layers, "tokens": batch * seq, "batch": batch,
            "seq": seq, "peak_mib": peak, "held_after_forward_mib": held,
            "baseline_mib": meter.baseline_mib, "step_s": t.seconds, "method": meter.method,
            "dtype": args.dtype,
            "grads_finite": finite}


def run_graddiff_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Max |grad(method) - grad(naive)| / max |grad(naive)| for sequential and chunked (fp32)."""
    device = resolve_device(args.device)
    batch, seq = _shape(args.tokens, args.seq_len)
    model = _model(args, args.n_future, args.layers, seq, device)
    idx, targets = _batch(args, batch, seq, device)
    params = list(model.parameters())
    grads: dict[str, list[torch.Tensor]] = {}
    for method in ("naive", "sequential", "chunked"):
        model.zero_grad(set_to_none=True)
        mtp_loss(model, idx, targets, backward=True, method=method)
        grads[method] = [p.grad.detach().clone() for p in params]
    ref = max(g.abs().max().item() for g in grads["naive"])
    diffs = {m: max((a - b).abs().max().item() for a, b in zip(grads[m], grads["naive"])) / ref
             for m in ("sequential", "chunked")}
    return {"variant": "graddiff", "tokens": batch * seq, "max_abs_grad": ref, **diffs,
            "max_grad_diff": max(diffs.values())}


# ---------------------------------------------------------------------------------------------
# Parent side: spawn the workers, tabulate, plot.


def _spawn(args: argparse.Namespace, worker: str, *, n_future: int, layers: int,
           tokens: int, head_type: str = "transformer") -> dict[str, Any]:
    cmd = [sys.executable, "-m", "multitoken.bench.train_memory", "--worker", worker,
           "--head-type", head_type,
           "--vocab", str(args.vocab), "--dim", str(args.dim), "--layers", str(layers),
           "--n-heads", str(args.n_heads), "--tokens", str(tokens), "--seq-len", str(args.seq_len),
           "--n-future", str(n_future), "--threads", str(args.threads), "--device", args.device,
           "--seed", str(args.seed), "--dtype", args.dtype]
    print(f"  measuring {worker} (n_future={n_future}, {head_type} heads, layers={layers}, "
          f"tokens={tokens}) ...",
          file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=worker_env())
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BenchError(f"worker {worker} (n_future={n_future}) failed: {tail}")
    try:
        return last_json_line(proc.stdout)
    except ValueError as e:
        raise BenchError(f"worker {worker} printed no JSON result: {e}") from None


def _plot(sweep: dict[str, Any], ntp_mib: float, same_ce_mib: float | None,
          args: argparse.Namespace, tokens: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    ns = sweep["n_future"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for v, marker in (("naive", "o"), ("sequential", "s"), ("chunked", "^")):
        ax.plot(ns, sweep[v], marker=marker, label=v)
    ax.axhline(ntp_mib, color="gray", linestyle="--", label="ntp (n=1, F.cross_entropy)")
    if same_ce_mib:
        ax.axhline(same_ce_mib, color="gray", linestyle=":", label="ntp (n=1, via mtp_loss)")
    ax.set_xticks(ns)
    ax.set_xlabel("n_future (heads)")
    ax.set_ylabel("peak step memory above baseline (MiB)")
    more = [f"{lay} at n={n}" for n, lay in zip(ns, sweep["layers"]) if lay != args.layers]
    layers = f"{args.layers} layers in all" + (f" ({', '.join(more)})" if more else "")
    ax.set_title(f"Peak memory of one training step: {tokens} tokens, V={args.vocab}, "
                 f"d={args.dim}, {layers}", fontsize=8)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(args.png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _run(args: argparse.Namespace) -> int:
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in ALL_VARIANTS]
    if unknown or not variants:
        raise ConfigError(f"--variants: unknown or no variant(s) {unknown or args.variants!r}; "
                          f"choose from {','.join(ALL_VARIANTS)}")
    if args.layers < args.n_future:
        raise ConfigError(f"--layers ({args.layers}) must be >= --n-future ({args.n_future})")
    head_types = [h.strip() for h in args.head_types.split(",") if h.strip()]
    bad = [h for h in head_types if h not in LAYER_HEAD_TYPES]
    if bad or not head_types or head_types[0] != "transformer":
        raise ConfigError(f"--head-types: transformer first, then any of "
                          f"{', '.join(LAYER_HEAD_TYPES[1:])}; got {args.head_types!r}")
    batch, seq = _shape(args.tokens, args.seq_len)
    _shape(args.grad_tokens or args.tokens, args.seq_len)
    for n in {1, args.n_future, *(SWEEP_N if args.sweep else ())}:
        _config(args, n, max(args.layers, n), seq)
    print(f"train-memory: vocab {args.vocab}, dim {args.dim}, {args.layers} layers in all, "
          f"{batch} x {seq} = {args.tokens} tokens, device {args.device}, threads {args.threads}",
          file=sys.stderr, flush=True)

    res: dict[str, dict[str, Any]] = {}
    for v in variants:
        res[v] = _spawn(args, v, n_future=1 if v.startswith("ntp") else args.n_future,
                        layers=args.layers, tokens=args.tokens)
    grad_tokens = args.grad_tokens or args.tokens
    gd = _spawn(args, "graddiff", n_future=args.n_future, layers=args.layers, tokens=grad_tokens)
    # Other head types at the same shape: their n-head variants and gradient check.
    other: dict[str, dict[str, dict[str, Any]]] = {}
    for ht in head_types[1:]:
        other[ht] = {v: _spawn(args, v, n_future=args.n_future, layers=args.layers,
                               tokens=args.tokens, head_type=ht)
                     for v in variants if not v.startswith("ntp")}
        other[ht]["graddiff"] = _spawn(args, "graddiff", n_future=args.n_future,
                                       layers=args.layers, tokens=grad_tokens, head_type=ht)

    ntp = res.get("ntp", {}).get("peak_mib")
    logits_mib = args.tokens * args.vocab * 4 / MIB
    rows = []
    for v, r in res.items():
        held = r["held_after_forward_mib"]
        rows.append([v, r["n_future"], f"{r['trunk_layers']}+{r['layers'] - r['trunk_layers']}",
                     r["peak_mib"], r["peak_mib"] / ntp if ntp else "-",
                     held if held is not None else "-", r["step_s"]])
    for ht, rs in other.items():
        for v, r in rs.items():
            if v != "graddiff":
                held = r["held_after_forward_mib"]
                rows.append([f"{v} ({ht})", r["n_future"],
                             f"{r['trunk_layers']}+{r['layers'] - r['trunk_layers']}",
                             r["peak_mib"], r["peak_mib"] / ntp if ntp else "-",
                             held if held is not None else "-", r["step_s"]])
    print(format_table(["variant", "n_future", "trunk+head layers", "peak MiB", "x ntp",
                        "held after fwd MiB", "step s"], rows))
    print(f"(one fp32 [{args.tokens}, {args.vocab}] logits tensor = {logits_mib:,.1f} MiB; "
          f"measured as {res[variants[0]]['method']})")
    print(f"max_grad_diff (fp32, {gd['tokens']} tokens, relative to max |grad| "
          f"{gd['max_abs_grad']:.3g}): sequential {gd['sequential']:.3g}, "
          f"chunked {gd['chunked']:.3g}")

    for ht, rs in other.items():
        g = rs["graddiff"]
        print(f"max_grad_diff, {ht} heads: sequential {g['sequential']:.3g}, chunked "
              f"{g['chunked']:.3g}; peak vs transformer heads: " + ", ".join(
                  f"{v} {rs[v]['peak_mib'] / res[v]['peak_mib']:.3f} x" for v in rs
                  if v != "graddiff" and v in res))

    ok = max([gd["max_grad_diff"], *(rs["graddiff"]["max_grad_diff"]
                                      for rs in other.values())]) <= 1e-5
    if ntp:
        for v, factor in TARGETS.items():
            if v in res:
                r = res[v]["peak_mib"] / ntp
                met = r <= factor
                ok &= met
                print(f"target {v} <= {factor:.2f} x ntp: {r:.3f} x ntp -> "
                      f"{'met' if met else 'MISSED'}")
    same_ce = res.get("ntp_mtp_loss", {}).get("peak_mib")
    if same_ce:
        print("like for like (n=1 through mtp_loss, same cross-entropy code): " + ", ".join(
            f"{v} {res[v]['peak_mib'] / same_ce:.3f} x" for v in VARIANTS[1:] if v in res))

    result: dict[str, Any] = {f"{v}_mib": round(res[v]["peak_mib"], 1) if v in res else None
                              for v in VARIANTS}
    result["max_grad_diff"] = gd["max_grad_diff"]
    for ht, rs in other.items():
        result[ht] = {**{f"{v}_mib": round(r["peak_mib"], 1) for v, r in rs.items()
                         if v != "graddiff"}, "max_grad_diff": rs["graddiff"]["max_grad_diff"]}

    if args.sweep:
        sweep: dict[str, Any] = {"n_future": list(SWEEP_N), "layers": [], "naive": [],
                                 "sequential": [], "chunked": []}
        for n in SWEEP_N:
            layers = max(args.layers, n)  # each transformer head takes one layer
            sweep["layers"].append(layers)
            for v in ("naive", "sequential", "chunked"):
                r = res[v] if (n == args.n_future and layers == args.layers and v in res) else \
                    _spawn(args, v, n_future=n, layers=layers, tokens=args.tokens)
                sweep[v].append(round(r["peak_mib"], 1))
        if ntp is None:
            ntp = _spawn(args, "ntp", n_future=1, layers=args.layers,
                         tokens=args.tokens)["peak_mib"]
        sweep["ntp"] = round(ntp, 1)
        print()
        print(format_table(["n_future", "layers", "naive MiB", "sequential MiB", "chunked MiB"],
                           [[n, lay, a, b, c] for n, lay, a, b, c in zip(
                               SWEEP_N, sweep["layers"], sweep["naive"], sweep["sequential"],
                               sweep["chunked"])]))
        print(f"ntp (n=1, {args.layers} layers): {ntp:,.1f} MiB")
        png = _plot(sweep, ntp, same_ce, args, args.tokens)
        print(f"plot: {png}")
        result["sweep"] = sweep

    print_json(result)
    return 1 if (args.check and not ok) else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    resolve_device(args.device)
    set_threads(args.threads)
    try:
        if args.worker is not None:
            if args.worker == "graddiff":
                print_json(run_graddiff_worker(args))
            else:
                print_json(run_memory_worker(args))
            return 0
        return _run(args)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
