"""`multitoken bench decode`: plain greedy vs chain and tree speculation, side by side.

Prompts are slices of the checkpoint's validation split (never trained on). All modes run in
one process, interleaved batch by batch (the order rotates), so drifts in machine load hit every
mode alike. Every speculative output is checked token for token against plain greedy's.
Speedup = plain greedy's wall time / the mode's, over the same prompts and the same number of
new tokens (prefill included). Tokens per forward counts the bonus token (see multitoken/decoding/generate.py).

Last line: one JSON object {"exact", "batch_size", "greedy_tok_s", "modes", "forward_cost"}
where forward_cost[m] = T(m)/T(1), the time of a speculative forward (all heads) over m tokens
relative to one token; the table also shows plain decoding's forward (head 1 only).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from multitoken import cliargs
from multitoken.bench.common import format_table, print_json, set_threads
from multitoken.devices import resolve_device
from multitoken.errors import MultitokenError


def _plot(path: Path, modes: dict[str, dict[str, Any]], heads: dict[str, int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    chain = sorted((heads[m], v) for m, v in modes.items() if m.startswith("chain"))
    for ax, key, label in ((axes[0], "speedup", "wall-clock speedup vs plain greedy"),
                           (axes[1], "tokens_per_forward", "tokens per forward")):
        ax.plot([1] + [h for h, _ in chain], [1.0] + [v[key] for _, v in chain], "o-",
                label="chain (greedy = 1 head)")
        if "tree" in modes:
            ax.plot([heads["tree"]], [modes["tree"][key]], "s", markersize=9, label="tree")
        ax.set_xticks(range(1, max(heads.values()) + 1))
        ax.set_xlabel("heads used (head 1 + draft heads)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> cliargs.ArgumentParser:
    p = cliargs.ArgumentParser(prog="multitoken bench decode",
                               description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint (or run) directory; prompts come from its validation split")
    p.add_argument("--prompts", type=cliargs.positive_int, default=32,
                   help="held-out prompts decoded by every mode (default 32)")
    p.add_argument("--prompt-len", type=cliargs.positive_int, default=128,
                   help="tokens per prompt, at most half the model's context (default 128)")
    p.add_argument("--new-tokens", type=cliargs.positive_int, default=256,
                   help="tokens generated per prompt, at most what the context leaves "
                   "(default 256)")
    p.add_argument("--batch-size", type=cliargs.positive_int, default=1,
                   help="prompts decoded together (default 1)")
    p.add_argument("--heads", type=cliargs.positive_int_list, default=None,
                   help="chain lengths to run, e.g. 1,2,3 (default: 1..n_future-1)")
    p.add_argument("--no-tree", action="store_true", help="skip tree speculation")
    p.add_argument("--tree-size", type=cliargs.positive_int, default=None,
                   help="tree of this many nodes: the first ones of the calibrated growth order "
                   "(most likely accepted first), instead of the calibrated best tree")
    p.add_argument("--out-png", default=None, help="plot path (default: none)")
    cliargs.add_device_argument(p)
    cliargs.add_threads_argument(p)
    p.add_argument("--reps", type=cliargs.positive_int, default=20,
                   help="repetitions of each forward timing (default 20)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)

    from multitoken.checkpoint import load_checkpoint
    from multitoken.decoding.calibrate import (
        load_calibration,
        prompts_from,
        time_forwards,
        validation_tokens,
    )
    from multitoken.decoding.generate import generate
    from multitoken.decoding.tree import Tree, default_tree

    device = resolve_device(args.device)
    set_threads(args.threads)
    model, tokenizer = load_checkpoint(args.checkpoint, device=device)
    n = model.n_future
    if n < 2:
        raise MultitokenError("bench decode needs a model with draft heads (n_future >= 2)")
    ks = list(range(1, n)) if args.heads is None else args.heads
    for k in ks:
        if not 1 <= k <= n - 1:
            raise MultitokenError(f"--heads: chain lengths must be in 1..{n - 1}, got {k}")
    max_len = model.cfg.max_seq_len
    prompt_len = min(args.prompt_len, max_len // 2)
    new_tokens = min(args.new_tokens, max_len - prompt_len)
    if (prompt_len, new_tokens) != (args.prompt_len, args.new_tokens):
        print(f"note: context {max_len}: using prompt-len {prompt_len}, new-tokens {new_tokens}")

    calib = load_calibration(args.checkpoint)
    tree_paths = None
    if not args.no_tree:
        by_b = (calib or {}).get("by_batch_size", {}).get(str(args.batch_size), calib)
        if args.tree_size:
            grown = (calib or {}).get("tree_order") or []
            tree_paths = grown[:args.tree_size] or default_tree(n - 1, size=args.tree_size)
            if not grown:
                print("note: no calibrated growth order: using the default tree of that size")
        elif by_b:
            tree_paths = by_b["tree"]
        else:
            tree_paths = default_tree(n - 1)
            print("note: no calibration.json (run `multitoken calibrate`): using the default tree")
    tree = Tree(tree_paths) if tree_paths else None

    prompts = prompts_from(validation_tokens(args.checkpoint, tokenizer), args.prompts, prompt_len)
    batches = [prompts[i:i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    modes: dict[str, dict[str, Any]] = {"greedy": {"speculative": "off"}}
    for k in ks:
        modes[f"chain-{k}"] = {"speculative": "chain", "num_drafts": k}
    if tree is not None:
        modes["tree"] = {"speculative": "tree", "tree": tree.paths}
    heads_used = {"greedy": 1, **{f"chain-{k}": k + 1 for k in ks}}
    if tree is not None:
        heads_used["tree"] = tree.depth + 1

    names = list(modes)
    for name in names:  # warm-up: first calls build stacked weights, allocate, etc.
        generate(model, batches[0], min(new_tokens, 16), **modes[name])
    acc = {m: {"time": 0.0, "tokens": 0, "forwards": 0, "tpf_rows": 0.0, "rows": 0,
               "exact": True} for m in names}
    print(f"decoding {len(prompts)} prompts x {new_tokens} tokens, batch {args.batch_size}, "
          f"modes: {', '.join(names)} (interleaved)", flush=True)
    for i, batch in enumerate(batches):
        order = names[i % len(names):] + names[: i % len(names)]
        outs = {}
        for name in order:
            res = generate(model, batch, new_tokens, **modes[name])
            outs[name] = res.tokens
            a, s = acc[name], res.stats
            a["time"] += s.wall_time_s
            a["tokens"] += s.new_tokens
            a["forwards"] += s.forwards
            # ratio of sums over all prompts (a mean of per-prompt ratios would overweight
            # the prompts that needed few forwards)
            a["tpf_rows"] += s.tokens_per_forward * s.sequence_forwards
            a["rows"] += s.sequence_forwards
        for name in names:
            if outs[name] != outs["greedy"]:
                acc[name]["exact"] = False

    greedy_tok_s = acc["greedy"]["tokens"] / acc["greedy"]["time"]
    results: dict[str, dict[str, Any]] = {}
    for name in names[1:]:
        a = acc[name]
        tok_s = a["tokens"] / a["time"]
        results[name] = {"tokens_per_forward": a["tpf_rows"] / a["rows"],
                         "speedup": tok_s / greedy_tok_s, "tok_s": tok_s}

    widths = sorted({1, *(k + 1 for k in ks), *([tree.size + 1] if tree else [])})
    shapes = [(1, 1)] + [(m, n) for m in widths]
    t = time_forwards(model, shapes, batch_size=args.batch_size, context=prompt_len,
                      reps=args.reps)
    t1 = t[(1, n)]
    forward_cost = {str(m): t[(m, n)] / t1 for m in widths}

    rows = [["greedy", 1, 1.0, greedy_tok_s, 1.0, acc["greedy"]["forwards"], "-"]]
    for name, r in results.items():
        rows.append([name, heads_used[name], r["tokens_per_forward"], r["tok_s"], r["speedup"],
                     acc[name]["forwards"], "yes" if acc[name]["exact"] else "NO"])
    print(format_table(["mode", "heads", "tokens/forward", "tok/s", "speedup", "forwards",
                        "= greedy"], rows))
    if tree is not None:
        print(f"tree: {tree.size} nodes, depth {tree.depth}: {tree.paths}")
    print(f"forward cost T(m)/T(1), all {n} heads, batch {args.batch_size}: " + ", ".join(
        f"{m}: {c:.2f}" for m, c in forward_cost.items())
        + f"  (T(1) = {t1 * 1e3:.2f} ms; plain decoding's forward, head 1 only: "
        f"{t[(1, 1)] * 1e3:.2f} ms = {t[(1, 1)] / t1:.2f} T(1))")
    if args.out_png:
        _plot(Path(args.out_png), results, heads_used)
        print(f"wrote {args.out_png}")
    sys.stdout.flush()
    print_json({"exact": all(a["exact"] for a in acc.values()), "batch_size": args.batch_size,
                "greedy_tok_s": greedy_tok_s, "modes": results, "forward_cost": forward_cost})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
