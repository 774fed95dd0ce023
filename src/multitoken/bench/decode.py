"""`multitoken bench decode`: plain vs chain and tree speculation, greedy and sampling.

Prompts are slices of the checkpoint's validation split (never trained on), each followed in
that split by at least `--new-tokens` tokens: the prompt's real continuation.

Every sampling setting (greedy by default; one with `--temperature/--top-p/--top-k`, several
with `--sampling`) is one run: all modes decode the same prompts in one process, interleaved
batch by batch (the order rotates), so drifts in machine load hit every mode alike. Speedup =
plain decoding's wall time / the mode's, at the same setting, over the same prompts and the
same number of new tokens (prefill included). Tokens per forward counts the bonus token (see
multitoken/decoding/generate.py).

Exactness. Greedy: every speculative output is compared token for token with plain greedy's.
Sampling: an exact rule gives the same *distribution* as plain sampling, not the same draws
(the random numbers are consumed differently), so nothing is compared here; the evidence is the
chi-square tests of the suite (tests/test_speculative.py), and the table and JSON say so.

Which text: every mode's output and the real continuations get their distinct-8-gram ratio
(`bench.common.distinct_ngram_ratio`). Output that loops (a low ratio) is easy to draft; a speed
measured on it says little about text like the real continuation.

`--dynamic 2x1,2x2` (token-conditioned heads): also dynamic trees (EAGLE-2 style, re-shaped per
step and row; `decoding/dynamic.py`), one mode "dynamic-<shape>" each.

`--baselines` (greedy only): transformers' greedy `generate` and prompt-lookup decoding on the
same weights and prompts, in the same interleaved rotation (see bench/hf_baselines.py).

Last line: one JSON object
  {"batch_size", "prompts", "prompt_len", "new_tokens", "dtype": the model's parameter dtype
   (e.g. "float32"),
   "reference": {"distinct_8"}: the real continuations,
   "exact": every token-for-token comparison of our modes with plain greedy was equal (null
            when no greedy run made one),
   "runs": [{"label", "sampling": {"temperature", "top_p", "top_k", "seed", "greedy"},
             "exact": as above, for this run (null when sampling), "exact_check": how exactness
             is established ("token-for-token" or "chi-square (tests)"), "plain_tok_s",
             "modes": {name: {"heads", "tokens_per_forward", "tok_s", "speedup", "forwards",
                              "step_cost": time per forward / plain's, "acceptance": per
                              draft depth, pooled, "distinct_8", "exact"}},
             "baselines": {name: the same fields + "batch_size"} (greedy runs, --baselines),
             "tree": {"paths", "size", "depth", "source"}: the tree this setting ran (source:
                     "calibrated for <setting>", the setting's own calibration or greedy's,
                     or "default ..."); null with --no-tree}],
   "transformers": version or null,
   "forward_cost": {m: T(m)/T(1)}}
where T(m) is the time of a speculative forward (all heads) over m tokens; the text also shows
plain decoding's forward (head 1 only).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from multitoken import cliargs
from multitoken.bench.common import distinct_ngram_ratio, format_table, print_json, set_threads
from multitoken.bench.hf_baselines import Decoded, HFBaselines, require_transformers
from multitoken.checkpoint import dtype_name, load_checkpoint
from multitoken.decoding.calibrate import (
    load_calibration,
    prompts_from,
    setting_calibration,
    time_forwards,
    unseen_tokens,
    validation_tokens,
)
from multitoken.decoding.dynamic import parse_shapes
from multitoken.decoding.generate import generate
from multitoken.decoding.sampling import Sampling, checked_sampling
from multitoken.decoding.sampling import sampling_list as parse_sampling_settings
from multitoken.decoding.tree import Tree, default_tree
from multitoken.devices import resolve_device
from multitoken.errors import ConfigError, MultitokenError
from multitoken.model import MultiTokenModel

NGRAM = 8  # distinct-8: the n of the distinct-n-gram ratio every mode reports
CHI_SQUARE = "chi-square (tests)"
TOKEN_FOR_TOKEN = "token-for-token"
HF_GREEDY, HF_LOOKUP = "hf-greedy", "hf-prompt-lookup"


# ---------------------------------------------------------------------------------------------
# Sampling settings.


@dataclass(frozen=True)
class Setting:
    """One sampling setting of the benchmark (greedy when temperature is 0)."""

    sampling: Sampling

    @property
    def label(self) -> str:
        return self.sampling.label


def make_setting(temperature: float, top_p: float | None, top_k: int | None) -> Setting:
    """A checked setting (`sampling.checked_sampling`; raises ConfigError)."""
    return Setting(checked_sampling(temperature, top_p, top_k))


def sampling_list(text: str) -> list[Setting]:
    """argparse type of --sampling (the syntax of `sampling.parse_sampling_list`)."""
    return [Setting(s) for s in parse_sampling_settings(text)]


def settings_from(args: argparse.Namespace) -> list[Setting]:
    """The runs asked for: --sampling, or the one setting of --temperature/--top-p/--top-k."""
    single = (args.temperature, args.top_p, args.top_k) != (None, None, None)
    if args.sampling is not None:
        if single:
            raise ConfigError("give either --sampling or --temperature/--top-p/--top-k")
        return args.sampling
    try:
        return [make_setting(args.temperature or 0.0, args.top_p, args.top_k)]
    except ConfigError as e:
        raise ConfigError(f"--temperature/--top-p/--top-k: {e}") from None


# ---------------------------------------------------------------------------------------------
# Prompts and their real continuations.


def prompts_and_continuations(tokens: Any, n: int, prompt_len: int, new_tokens: int,
                              source: str = "the validation split",
                              ) -> tuple[list[list[int]], list[list[int]]]:
    """n prompts of prompt_len tokens, evenly spaced through `tokens`, and the new_tokens
    tokens that follow each one there (its real continuation)."""
    size = len(tokens)
    if size < prompt_len + new_tokens + 1:
        raise MultitokenError(
            f"{source} has {size} tokens: too few for prompts of {prompt_len} "
            f"tokens followed by {new_tokens} (lower --prompt-len or --new-tokens)")
    windows = prompts_from(tokens, n, prompt_len + new_tokens)
    return [w[:prompt_len] for w in windows], [w[prompt_len:] for w in windows]


# ---------------------------------------------------------------------------------------------
# One run: every mode at one sampling setting, interleaved.


Decoder = Callable[[list[list[int]], int, int], Decoded]  # (prompts, new tokens, batch index)


def decoder_for(model: MultiTokenModel, setting: Setting, seed: int,
                mode: dict[str, Any]) -> Decoder:
    """`generate` with keyword arguments `mode` (e.g. speculative="chain", num_drafts=3) at
    `setting`, as a bench decoder; batch i samples from seed + i."""
    s = setting.sampling
    device = model.tok_embeddings.weight.device

    def run(batch: list[list[int]], new_tokens: int, i: int) -> Decoded:
        # Sampling: the same seed for every mode on a batch (the draws still differ: the modes
        # consume random numbers differently).
        gen = None if s.greedy else torch.Generator(device=device).manual_seed(seed + i)
        res = generate(model, batch, new_tokens, temperature=s.temperature, top_k=s.top_k,
                       top_p=s.top_p, generator=gen, **mode)
        st = res.stats
        # ratio of sums over all prompts (a mean of per-prompt ratios would overweight the
        # prompts that needed few forwards)
        return Decoded(res.tokens, st.wall_time_s, st.forwards, st.sequence_forwards,
                       st.tokens_per_forward * st.sequence_forwards, st.draft_attempts,
                       st.draft_accepted)

    return run


def run_setting(decoders: dict[str, Decoder], batches: list[list[list[int]]], new_tokens: int,
                greedy: bool) -> dict[str, dict[str, Any]]:
    """Decode every batch with every decoder ("plain" first), the order rotating per batch.

    Returns per decoder: seconds, tokens, forwards, rows, appended, outputs (all sequences, in
    prompt order) and exact (greedy: equal to plain's output for every batch, else None).
    """
    names = list(decoders)
    for name in names:  # warm-up: first calls build stacked weights, allocate, etc.
        decoders[name](batches[0], min(new_tokens, 16), 0)
    acc: dict[str, dict[str, Any]] = {
        m: {"seconds": 0.0, "tokens": 0, "forwards": 0, "rows": 0, "appended": 0.0,
            "outputs": [], "attempts": [], "accepted": [],
            "exact": True if greedy and m != "plain" else None} for m in names}
    for i, batch in enumerate(batches):
        order = names[i % len(names):] + names[: i % len(names)]
        outs: dict[str, list[list[int]]] = {}
        for name in order:
            d = decoders[name](batch, new_tokens, i)
            outs[name] = d.tokens
            a = acc[name]
            a["seconds"] += d.seconds
            a["tokens"] += sum(len(t) for t in d.tokens)
            a["forwards"] += d.forwards
            a["rows"] += d.rows
            a["appended"] += d.appended
            a["attempts"] = _add(a["attempts"], d.attempts)
            a["accepted"] = _add(a["accepted"], d.accepted)
        for name in names:
            acc[name]["outputs"].extend(outs[name])
            if acc[name]["exact"] and outs[name] != outs["plain"]:
                acc[name]["exact"] = False
    return acc


def _add(a: list[int], b: list[int]) -> list[int]:
    """Elementwise sum of two count lists of possibly different lengths."""
    return [x + y for x, y in zip(a + [0] * (len(b) - len(a)), b + [0] * (len(a) - len(b)))]


def _summary(a: dict[str, Any], heads: int, plain: dict[str, Any]) -> dict[str, Any]:
    """A mode's figures. speedup = tokens_per_forward / step_cost (up to the prefill and
    the rows of a batch finishing at different times): step_cost is the mode's time per
    forward over plain decoding's, i.e. what a step's drafting, wider forward and acceptance
    rule cost. acceptance[d]: pooled over all calls, how often a draft at depth d+1 was
    accepted when it was verified."""
    tok_s = a["tokens"] / a["seconds"]
    plain_tok_s = plain["tokens"] / plain["seconds"]
    step = a["seconds"] / a["forwards"] if a["forwards"] else 0.0
    plain_step = plain["seconds"] / plain["forwards"] if plain["forwards"] else 0.0
    return {"heads": heads, "tokens_per_forward": a["appended"] / a["rows"] if a["rows"] else 0.0,
            "tok_s": tok_s, "speedup": tok_s / plain_tok_s, "forwards": a["forwards"],
            "step_cost": step / plain_step if plain_step else None,
            "acceptance": [x / t for x, t in zip(a["accepted"], a["attempts"]) if t],
            "distinct_8": distinct_ngram_ratio(a["outputs"], NGRAM), "exact": a["exact"]}


def _run_result(setting: Setting, acc: dict[str, dict[str, Any]], heads_used: dict[str, int],
                args: argparse.Namespace) -> dict[str, Any]:
    """One run's entry of the JSON's "runs" (see the module docstring)."""
    s, greedy = setting.sampling, setting.sampling.greedy
    plain = acc["plain"]
    plain_tok_s = plain["tokens"] / plain["seconds"]
    modes = {m: _summary(acc[m], h, plain) for m, h in heads_used.items()}
    run: dict[str, Any] = {
        "label": setting.label,
        "sampling": {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
                     "seed": None if greedy else args.seed, "greedy": greedy},
        # our modes only: a baseline that differs is transformers' numerics, not our decoding
        "exact": all(r["exact"] for m, r in modes.items() if m != "plain") if greedy else None,
        "exact_check": TOKEN_FOR_TOKEN if greedy else CHI_SQUARE,
        "plain_tok_s": plain_tok_s, "modes": modes}
    if HF_GREEDY in acc:
        run["baselines"] = {
            HF_GREEDY: {**_summary(acc[HF_GREEDY], 1, plain),
                        "batch_size": args.batch_size},
            HF_LOOKUP: {**_summary(acc[HF_LOOKUP], 1, plain), "batch_size": 1,
                        "prompt_lookup_num_tokens": args.prompt_lookup_tokens}}
    return run


# ---------------------------------------------------------------------------------------------
# Output.


def _exact_cell(name: str, exact: bool | None, greedy: bool) -> str | None:
    if name == "plain":
        return None  # the reference the others are compared with
    if not greedy:
        return CHI_SQUARE + " *"
    return "yes" if exact else "NO"


def print_run(run: dict[str, Any], batch_size: int) -> None:
    greedy = run["sampling"]["greedy"]
    rows = []
    for name, r in [*run["modes"].items(), *run.get("baselines", {}).items()]:
        shown = name
        if r.get("batch_size", batch_size) != batch_size:
            shown = f"{name} (batch {r['batch_size']})"
        rows.append([shown, r["heads"], r["tokens_per_forward"], r["step_cost"], r["tok_s"],
                     r["speedup"], r["forwards"], " ".join(f"{x:.2f}" for x in r["acceptance"]),
                     r["distinct_8"], _exact_cell(name, r["exact"], greedy)])
    seed = "" if greedy else f", seed {run['sampling']['seed']}"
    print(f"\n{run['label']}{seed} (speedup over plain decoding at this setting):")
    print(format_table(["mode", "heads", "tokens/forward", "step cost", "tok/s", "speedup",
                        "forwards", "acceptance by depth", f"distinct-{NGRAM}", "exact"], rows))
    print("step cost = time per forward / plain decoding's (the wider forward, drafting and "
          "the acceptance rule); speedup ~ tokens/forward / step cost")
    if not greedy:
        print("* sampling: outputs are not compared token by token (an exact rule matches plain "
              "sampling in distribution, not draw by draw); exactness rests on the suite's "
              "chi-square tests (tests/test_speculative.py)")


def _plot(path: Path, runs: list[dict[str, Any]], reference: float | None, n_heads: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    panels = ((axes[0], "speedup", "wall-clock speedup vs plain decoding"),
              (axes[1], "tokens_per_forward", "tokens per forward"))
    for j, run in enumerate(runs):
        c = colors[j % len(colors)]
        modes = run["modes"]
        line = [v for m, v in modes.items() if m == "plain" or m.startswith("chain")]
        line.sort(key=lambda v: v["heads"])
        d8 = modes["plain"]["distinct_8"]
        label = f"{run['label']} (plain distinct-{NGRAM} {_d8(d8)})"
        for ax, key, _ in panels:
            ax.plot([v["heads"] for v in line], [v[key] for v in line], "o-", color=c,
                    label=label)
            if "tree" in modes:
                ax.plot([modes["tree"]["heads"]], [modes["tree"][key]], "s", color=c,
                        markersize=9)
        # distinct-8 of each mode's own output, beside its point (the tree's on the left: it
        # shares its x with the longest chain)
        points = [(v, (5, 3 + 8 * j)) for v in line]
        if "tree" in modes:
            points.append((modes["tree"], (-26, -4 - 8 * j)))
        for v, offset in points:
            axes[1].annotate(_d8(v["distinct_8"]), (v["heads"], v["tokens_per_forward"]),
                             textcoords="offset points", xytext=offset, fontsize=7, color=c)
        dynamic = [v for m, v in modes.items() if m.startswith("dynamic-")]
        for ax, key, _ in panels:
            ax.plot([v["heads"] for v in dynamic], [v[key] for v in dynamic], "D", color=c,
                    markersize=6, fillstyle="none")
        for (name, v), marker in zip(run.get("baselines", {}).items(), ("^", "v")):
            for ax, key, _ in panels:
                ax.plot([v["heads"]], [v[key]], marker, color="black", markersize=8,
                        fillstyle="none", label=f"{name} (distinct-{NGRAM} {_d8(v['distinct_8'])})")
    if any("tree" in run["modes"] for run in runs):
        axes[0].plot([], [], "s", color="grey", markersize=9, label="tree (squares)")
    if any(m.startswith("dynamic-") for run in runs for m in run["modes"]):
        axes[0].plot([], [], "D", color="grey", fillstyle="none",
                     label="dynamic trees (diamonds)")
    for ax, _, ylabel in panels:
        ax.set_xticks(range(1, n_heads + 1))
        ax.set_xlabel("heads used (head 1 + draft heads)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].axhline(1.0, color="grey", lw=0.8)
    handles, labels = axes[0].get_legend_handles_labels()  # below the panels, hiding no point
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle(f"distinct-{NGRAM} of the prompts' real continuations: {_d8(reference)}; "
                 f"numbers beside the points: distinct-{NGRAM} of each mode's output", fontsize=9)
    fig.tight_layout(rect=(0, 0.05 + 0.03 * math.ceil(len(labels) / 3), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _d8(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


# ---------------------------------------------------------------------------------------------
# Command line.


def build_parser() -> cliargs.ArgumentParser:
    p = cliargs.ArgumentParser(prog="multitoken bench decode",
                               description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint (or run) directory; prompts come from its validation split")
    p.add_argument("--prompt-files", nargs="+", default=None, metavar="PATH",
                   help="take prompts (and their real continuations) from these files, folders "
                   "or globs instead of the validation split: text in no training data, e.g. "
                   "the standard library's test/ folder (refused if a file is in the run's "
                   "training split)")
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
    p.add_argument("--dynamic", default=None, metavar="SHAPES",
                   help="also run dynamic trees (token-conditioned heads, EAGLE-2 style), "
                   "comma-separated TOP_KxBEAM shapes, all draft heads deep, e.g. 2x1,2x2")
    p.add_argument("--temperature", type=float, default=None,
                   help="sample at this temperature (default: greedy)")
    p.add_argument("--top-p", type=float, default=None,
                   help="with --temperature: nucleus sampling, keep the smallest set of tokens "
                   "whose probability reaches this, in (0, 1]")
    p.add_argument("--top-k", type=cliargs.positive_int, default=None,
                   help="with --temperature: sample from the k most likely tokens")
    p.add_argument("--sampling", type=sampling_list, default=None,
                   help="several settings, one run each, instead of --temperature/--top-p/"
                   "--top-k: comma-separated, each `greedy` or TEMPERATURE[:TOP_P[:TOP_K]], "
                   "e.g. greedy,0.8:0.95,1.0")
    p.add_argument("--seed", type=int, default=0,
                   help="sampling seed: batch i of every mode uses seed + i (default 0)")
    p.add_argument("--baselines", action="store_true",
                   help="greedy runs also decode with transformers (greedy generate, and "
                   "prompt lookup one prompt at a time) on the exported trunk + head 1; needs "
                   "the `hf` extra")
    p.add_argument("--prompt-lookup-tokens", type=cliargs.positive_int, default=10,
                   help="with --baselines: prompt_lookup_num_tokens, drafts per step (default 10)")
    p.add_argument("--out-png", default=None, help="plot path (default: none)")
    cliargs.add_device_argument(p)
    cliargs.add_dtype_argument(p)
    cliargs.add_threads_argument(p)
    p.add_argument("--reps", type=cliargs.positive_int, default=20,
                   help="repetitions of each forward timing (default 20)")
    return p


def _tree_for(args: argparse.Namespace, n: int, calib: dict[str, Any] | None,
              sampling: Sampling) -> tuple[Tree | None, str]:
    """The tree a setting runs and where it comes from: --tree-size nodes of the calibrated
    growth order, else the calibrated best tree for this batch size, else the default tree;
    calibrated = for this sampling setting when `calibrate --sampling` measured it, else for
    greedy (`calibrate.setting_calibration`). (None, "") with --no-tree."""
    if args.no_tree:
        return None, ""
    part, source = setting_calibration(calib, sampling)
    if args.tree_size:
        grown = (part or {}).get("tree_order") or []
        if grown:
            where = f"first {args.tree_size} of the growth order {source}"
            return Tree(grown[:args.tree_size]), where
        return Tree(default_tree(n - 1, size=args.tree_size)), "default (no growth order)"
    by_b = (part or {}).get("by_batch_size", {}).get(str(args.batch_size), part)
    if by_b:
        return Tree(by_b["tree"]), source
    return Tree(default_tree(n - 1)), "default (no calibration.json)"


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_from(args)
    if args.baselines:
        require_transformers()
        if not any(s.sampling.greedy for s in settings):
            raise ConfigError("--baselines compares greedy decoding: include greedy in the "
                              "settings (e.g. --sampling greedy,0.8:0.95)")

    device = resolve_device(args.device)
    set_threads(args.threads)
    model, tokenizer = load_checkpoint(args.checkpoint, device=device,
                                       dtype=cliargs.load_dtype(args.dtype))
    n = model.n_future
    if n < 2:
        raise MultitokenError("bench decode needs a model with draft heads (n_future >= 2)")
    ks = list(range(1, n)) if args.heads is None else args.heads
    for k in ks:
        if not 1 <= k <= n - 1:
            raise MultitokenError(f"--heads: chain lengths must be in 1..{n - 1}, got {k}")
    # The export is refused before any decoding for a model whose head 1 is not a transformer
    # layer on the trunk (linear or anticausal heads).
    hf = HFBaselines(model, tokenizer) if args.baselines else None
    max_len = model.cfg.max_seq_len
    prompt_len = min(args.prompt_len, max_len // 2)
    new_tokens = min(args.new_tokens, max_len - prompt_len)
    if (prompt_len, new_tokens) != (args.prompt_len, args.new_tokens):
        print(f"note: context {max_len}: using prompt-len {prompt_len}, new-tokens {new_tokens}")

    dtype = model.tok_embeddings.weight.dtype
    calib = None if args.no_tree else load_calibration(args.checkpoint, dtype)
    if not args.no_tree and calib is None:
        print("note: no calibration.json (run `multitoken calibrate`): using the default tree")
    trees = {s: _tree_for(args, n, calib, s.sampling) for s in settings}  # (tree, source)
    files = args.prompt_files or []
    text_source = ("the validation split" if args.prompt_files is None
                   else f"unseen text ({' '.join(files)})" if len(files) <= 3
                   else f"unseen text ({len(files)} paths: {files[0]} ... {files[-1]})")
    tokens = (validation_tokens(args.checkpoint, tokenizer) if args.prompt_files is None
              else unseen_tokens(args.checkpoint, tokenizer, args.prompt_files))
    prompts, continuations = prompts_and_continuations(tokens, args.prompts, prompt_len,
                                                       new_tokens, text_source)
    reference = distinct_ngram_ratio(continuations, NGRAM)
    batches = [prompts[i:i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    modes: dict[str, dict[str, Any]] = {"plain": {"speculative": "off"}}
    for k in ks:
        modes[f"chain-{k}"] = {"speculative": "chain", "num_drafts": k}
    heads_used = {"plain": 1, **{f"chain-{k}": k + 1 for k in ks}}
    dyn_shapes = parse_shapes(args.dynamic or "", model)
    for shape in dyn_shapes:
        modes[f"dynamic-{shape.label}"] = {"speculative": "dynamic", "dynamic": shape.label}
        heads_used[f"dynamic-{shape.label}"] = n
    if not args.no_tree:
        modes["tree"] = {"speculative": "tree"}  # the setting's tree, below

    print(f"decoding {len(prompts)} prompts x {new_tokens} tokens, batch {args.batch_size}, "
          f"modes: {', '.join(modes)} (interleaved); settings: "
          f"{', '.join(s.label for s in settings)}", flush=True)
    print(f"reference: distinct-{NGRAM} of the prompts' real continuations ({new_tokens} tokens "
          f"after each, from {text_source}): {_d8(reference)}", flush=True)
    runs: list[dict[str, Any]] = []
    lookup = args.prompt_lookup_tokens
    for setting in settings:
        tree, source = trees[setting]
        kws = {**modes, "tree": {**modes["tree"], "tree": tree.paths}} if tree else modes
        decoders = {m: decoder_for(model, setting, args.seed, kw) for m, kw in kws.items()}
        if hf is not None and setting.sampling.greedy:
            decoders[HF_GREEDY] = lambda b, t, i: hf.greedy(b, t)
            decoders[HF_LOOKUP] = lambda b, t, i: hf.prompt_lookup(b, t, lookup)
        acc = run_setting(decoders, batches, new_tokens, setting.sampling.greedy)
        used = {**heads_used, "tree": tree.depth + 1} if tree else heads_used
        runs.append(_run_result(setting, acc, used, args))
        runs[-1]["tree"] = None if tree is None else {
            "paths": [list(p) for p in tree.paths], "size": tree.size, "depth": tree.depth,
            "source": source}
        print_run(runs[-1], args.batch_size)
        if tree is not None:
            print(f"tree: {tree.size} nodes, depth {tree.depth} ({source}): {tree.paths}")
        if hf is not None and setting.sampling.greedy:
            print(f"{HF_GREEDY}, {HF_LOOKUP}: transformers {hf.version} generate on the "
                  f"exported trunk + head 1 ({hf.architecture}, "
                  f"{str(model.tok_embeddings.weight.dtype).removeprefix('torch.')}, "
                  f"{device.type}); greedy only; speedup over our plain greedy; their "
                  "tokens/forward counts the prefill forward (it emits the first token)"
                  + ("; prompt lookup decodes one prompt at a time (transformers refuses "
                     "batches)" if args.batch_size > 1 else ""))
        sys.stdout.flush()
    if hf is not None:
        hf.close()

    widths = sorted({1, *(k + 1 for k in ks), *(t.size + 1 for t, _ in trees.values() if t),
                     *(d.size + 1 for d in dyn_shapes)})
    shapes = [(1, 1)] + [(m, n) for m in widths]
    t = time_forwards(model, shapes, batch_size=args.batch_size, context=prompt_len,
                      reps=args.reps)
    t1 = t[(1, n)]
    forward_cost = {str(m): t[(m, n)] / t1 for m in widths}
    print()
    print(f"forward cost T(m)/T(1), all {n} heads, batch {args.batch_size}: " + ", ".join(
        f"{m}: {c:.2f}" for m, c in forward_cost.items())
        + f"  (T(1) = {t1 * 1e3:.2f} ms; plain decoding's forward, head 1 only: "
        f"{t[(1, 1)] * 1e3:.2f} ms = {t[(1, 1)] / t1:.2f} T(1))")
    if args.out_png:
        _plot(Path(args.out_png), runs, reference,
              max(v["heads"] for r in runs for v in r["modes"].values()))
        print(f"wrote {args.out_png}")
    measured = [r["exact"] for r in runs if r["exact"] is not None]
    sys.stdout.flush()
    print_json({"batch_size": args.batch_size, "prompts": len(prompts), "prompt_source": text_source,
                "prompt_len": prompt_len,
                "new_tokens": new_tokens, "dtype": dtype_name(dtype),
                "reference": {"distinct_8": reference},
                "exact": all(measured) if measured else None, "runs": runs,
                "transformers": hf.version if hf is not None else None, "forward_cost": forward_cost})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
