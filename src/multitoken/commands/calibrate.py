"""`multitoken calibrate --checkpoint DIR`: measure acceptance and forward costs, store the choice
of chain length and draft tree in the checkpoint's calibration.json (see
`multitoken.decoding.calibrate`); with `--sampling`, one choice per sampling setting too."""

from __future__ import annotations

from typing import Any

import torch

from multitoken import cliargs
from multitoken.checkpoint import load_checkpoint
from multitoken.decoding.calibrate import calibrate, save_calibration, validation_tokens
from multitoken.decoding.dynamic import parse_shapes
from multitoken.decoding.sampling import sampling_list
from multitoken.decoding.tree import Tree
from multitoken.devices import resolve_device
from multitoken.model import MultiTokenModel


def build_parser() -> cliargs.ArgumentParser:
    p = cliargs.ArgumentParser(prog="multitoken calibrate", description=(
        "Measure per-head top-k acceptance on held-out data and decode forward costs on this "
        "machine; store the best chain length and draft tree in <checkpoint>/calibration.json. "
        "With --sampling, also measure how often each node of a large draft tree is reached "
        "under sampled speculative decoding, and store a choice per sampling setting (used by "
        "`generate` and `bench decode` when they run that setting)."))
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint (or run) directory; calibration.json is written there")
    p.add_argument("--prompts", type=cliargs.positive_int, default=16,
                   help="held-out prompts decoded to measure acceptance (default 16)")
    p.add_argument("--prompt-len", type=cliargs.positive_int, default=128,
                   help="tokens per prompt, at most half the model's context (default 128)")
    p.add_argument("--gen-len", type=cliargs.positive_int, default=256,
                   help="tokens decoded per prompt (greedy, and per sampling setting), at most "
                   "what the context leaves (default 256)")
    p.add_argument("--max-rank", type=cliargs.positive_int, default=8,
                   help="top-k ranks considered per head (greedy; default 8)")
    p.add_argument("--max-nodes", type=cliargs.positive_int, default=32,
                   help="largest tree considered (default 32)")
    p.add_argument("--batch-sizes", type=cliargs.positive_int_list, default=[1],
                   help="batch sizes to choose for, comma-separated, e.g. 1,8 (default 1)")
    p.add_argument("--sampling", type=sampling_list, default=[],
                   help="sampling settings to calibrate besides greedy (always done): "
                   "comma-separated, each TEMPERATURE[:TOP_P[:TOP_K]], e.g. 0.8:0.95,1.0 (the "
                   "syntax of `bench decode --sampling`)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the sampled decoding of --sampling (default 0)")
    p.add_argument("--reps", type=cliargs.positive_int, default=20,
                   help="timed repetitions of each forward shape (default 20)")
    p.add_argument("--verify-prompts", type=cliargs.non_negative_int, default=8,
                   help="then decode this many other held-out prompts with the chains, the "
                   "predicted best tree and two trees of other sizes, against plain decoding, "
                   "and choose the fastest measured (per setting and batch size; at a larger "
                   "batch size, whole batches); 0: keep the predicted choice (default 8)")
    p.add_argument("--verify-tokens", type=cliargs.positive_int, default=256,
                   help="tokens decoded per verification prompt (default 256: short decodes "
                   "understate speedups at batch > 1, where a step waits for the slowest row)")
    p.add_argument("--dynamic", default="auto",
                   help="dynamic tree shapes (TOP_KxBEAM, comma-separated) verified by decoding "
                   "beside the static candidates; token-conditioned heads only (default auto: "
                   "2x1,2x2 for them, none otherwise; 'none' to skip)")
    cliargs.add_device_argument(p)
    cliargs.add_dtype_argument(p)
    cliargs.add_threads_argument(p)
    return p


def _pred(cand: dict[str, Any]) -> str:
    p = cand.get("predicted_speedup")
    return "-" if p is None else f"{p:.2f}x"


def dynamic_shapes(text: str, model: MultiTokenModel) -> list[str]:
    """--dynamic: the shapes to verify (checked here, so a typo fails before any decoding)."""
    if text == "auto":
        return ["2x1", "2x2"] if model.conditioned else []
    if text == "none":
        return []
    return [shape.label for shape in parse_shapes(text, model)]


def _report(name: str, part: dict[str, Any]) -> None:
    """Per batch size: the expected speedups and the model's choice; with verification, the
    measured speedups and the choice made from them."""
    for B, c in part["by_batch_size"].items():
        cost = part["forward_cost"][B]
        chain = ", ".join(f"k={k}: {v:.2f}x" for k, v in c["expected_speedup"]["chain"].items())
        model_choice = c.get("model_choice", c)  # the model's own choice, before verification
        tree = model_choice["tree"]
        trees = c["expected_speedup"]["tree"]
        best_tree = (f"tree of {len(tree)} nodes: "
                     f"{trees.get(str(len(Tree(tree).paths)), 0.0):.2f}x" if trees
                     else "no trees (token-conditioned heads decode chains)")
        print(f"{name}, batch {B}: plain forward {cost['plain_ms']:.2f} ms; expected speedup "
              f"chain {chain}; {best_tree} -> {model_choice['best_mode']}")
        if "verified" in c:
            v = c["verified"]
            runs = ", ".join(f"{n}: {x['measured_speedup']:.2f}x ({_pred(x)})"
                             for n, x in v["candidates"].items())
            print(f"{name}, batch {B}: measured (predicted) speedup over plain "
                  f"{v['plain_tok_s']:.1f} tok/s: {runs} -> {v['chosen']}, {c['best_mode']} "
                  f"({v['reason']})")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    batch_sizes = tuple(args.batch_sizes)
    model, tokenizer = load_checkpoint(args.checkpoint, device=device,
                                       dtype=cliargs.load_dtype(args.dtype))
    val = validation_tokens(args.checkpoint, tokenizer)
    cal = calibrate(model, val, n_prompts=args.prompts, prompt_len=args.prompt_len,
                    gen_len=args.gen_len, max_rank=args.max_rank, max_nodes=args.max_nodes,
                    batch_sizes=batch_sizes, reps=args.reps, sampling=args.sampling,
                    seed=args.seed, verify_prompts=args.verify_prompts,
                    verify_tokens=args.verify_tokens,
                    dynamic=dynamic_shapes(args.dynamic, model), log=print)
    out = save_calibration(args.checkpoint, cal)
    acc = ", ".join(f"{a:.2f}" for a in cal["acceptance"]["chain"])
    print(f"greedy: top-1 acceptance of heads 2..{model.n_future} (given earlier accepted): "
          f"{acc}")
    _report("greedy", cal)
    for label, part in cal.get("sampling", {}).items():
        acc = ", ".join(f"{a:.2f}" for a in part["acceptance"]["chain"])
        e = part["expected_tokens_per_forward"]
        print(f"{label}: acceptance of the first draft of heads 2..{model.n_future} (given "
              f"earlier accepted): {acc}; expected tokens/forward chain-{len(e['chain'])} "
              f"{e['chain'][str(len(e['chain']))]:.2f}"
              + (f", chosen tree {e['tree']:.2f}" if not model.conditioned else "")
              + f" ({part['measured_on']['steps']} steps measured)")
        _report(label, part)
    print(f"wrote {out}")
    return 0
