"""Choose the chain length and the draft tree from measurements (`multitoken calibrate`).

Two measurements, both on this machine and this checkpoint:

1. Acceptance. Greedy continuations of prompts from the held-out split are decoded (with chain
   speculation, which gives plain greedy's tokens), then one full forward over them gives, at
   every generated position t and for every draft head d = 1..D, the rank of the token that
   greedy decoding actually put d+1 places ahead in head d+1's ranking. A tree node (path of
   ranks r_1..r_d) is accepted at t exactly when those ranks are r_1..r_d, so P(node) is a
   count -- no independence assumption between heads. Expected tokens per forward of a chain
   or tree come from replaying greedy decoding over the measured ranks (see
   `simulate_tokens_per_forward`), not from averaging over positions.
2. Forward cost. The time of one decode forward (trunk + heads over m tokens, draft heads at
   one position) for the m the modes use, against plain decoding's forward (head 1 only, one
   token), with a KV cache holding a realistic context.

Expected speedup of a mode = expected tokens per forward x T_plain / T_mode. The chain length k
(1..D) and the tree size maximising it are written to `calibration.json` in the checkpoint
directory (`multitoken calibrate`, in `multitoken.commands.calibrate`); `multitoken generate`
and `bench decode` use them by default.

Sampling settings (`calibrate --sampling 0.8:0.95,1.0`). Greedy ranks do not describe sampled
drafts (under sampling, tree node (r_1..r_d) is a draw without replacement, not a rank), so
for each setting the acceptance is measured again: sampled speculative decoding over a large
measurement tree gives P(node reached) for each of its nodes (`reach.py`, whose docstring
says why these hold for every sub-tree closed under parents and earlier siblings, the trees
`grow_tree` builds). Expected tokens per forward of a chain or tree = 1 + sum of P(reached)
over its nodes; the forward costs are timed with that setting's sampling work (head 1's
processed distribution and a draw per row, the draft heads' processed distributions and
draws; the acceptance rule's own arithmetic is not timed). The choice per setting is stored
under "sampling" in calibration.json, keyed by `Sampling.label` (e.g. "T=0.8 top-p=0.95"),
with the same fields as the greedy choice; `setting_calibration` picks the part that applies
to a setting (its own, else the greedy one, as before settings existed). A calibration.json
without "sampling" is read as before.

calibration.json records the dtype it was measured in ("dtype"; a file without it: float32),
and `load_calibration` ignores, with a warning, one measured in another dtype than the model
decodes in, as it does a damaged one.

Verification (`calibrate --verify-prompts N`, `verify_choice.py`): the model above is
optimistic under sampling, so for each setting and batch size the chains, the model's best tree
and up to two trees of other sizes are then decoded for real, against plain decoding, and the
fastest measured one is chosen (best_k: the fastest chain). Each batch size's choice then
records "chosen_by": "measured", the model's own choice ("model_choice") and the predicted and
measured speedups ("verified"); without verification "chosen_by" is "model".
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from multitoken.checkpoint import dtype_name, find_checkpoint, read_config
from multitoken.config import DataConfig, from_dict
from multitoken.data import prepare_data, prompts_from, resolve_files, split_corpus, tokenize_files
from multitoken.decoding.conditioned import conditioned_drafts
from multitoken.decoding.engine import Engine
from multitoken.decoding.generate import generate
from multitoken.decoding.reach import measure_reach, measurement_tree
from multitoken.decoding.sampling import Sampling, draw_distinct, process_logits, sample
from multitoken.decoding.tree import Path as TreePath
from multitoken.decoding.tree import Tree, default_tree, grow_tree
from multitoken.decoding.verify_choice import DecodeTimer, Verification, make_verification
from multitoken.errors import MultitokenError
from multitoken.model import MultiTokenModel, causal_context

CALIBRATION_FILE = "calibration.json"


# ---------------------------------------------------------------------------------------------
# Forward costs.


def time_forwards(model: MultiTokenModel, shapes: list[tuple[int, int]], *, batch_size: int = 1,
                  context: int = 128, reps: int = 20,
                  sampling: Sampling | None = None) -> dict[tuple[int, int], float]:
    """Seconds of one decode forward (`typical_time` of `reps`) for each (tokens m, heads h).

    A forward is what a step runs: the trunk and head 1 over m tokens (keys/values of heads
    2..h too), head 1's logits at all m, and the draft heads' logits at one position per
    sequence (none when h == 1); then argmaxes (greedy, the default) or, with a sampling
    setting, the processed distributions and a draw from each. Token-conditioned draft heads
    instead run as a step runs them (`conditioned.refresh_and_draft`: one call per head, its
    exact columns and the query columns of a tree of m - 1 nodes, or of a chain). Shapes are
    timed round-robin so load drifts hit all alike.
    """
    if reps < 1:
        raise MultitokenError(f"reps must be >= 1, got {reps}")
    cfg = model.cfg
    context = max(1, min(context, cfg.max_seq_len - max(m for m, _ in shapes)))
    device = model.tok_embeddings.weight.device
    # Token-conditioned draft heads run outside the engine (decoding.conditioned).
    engines = {h: Engine(model, 1 if model.conditioned else h) for _, h in shapes}
    cache = model.new_cache(batch_size, context + max(m for m, _ in shapes))
    draft_cache = model.new_draft_cache(  # token-conditioned draft heads' own keys/values
        batch_size, context + 3 * max(h for _, h in shapes) + max(m for m, _ in shapes) + 2,
    ) if model.conditioned else None
    gen = torch.Generator(device="cpu").manual_seed(0)
    draws = torch.Generator(device=device).manual_seed(0)
    times: dict[tuple[int, int], list[float]] = {s: [] for s in shapes}
    sampled = sampling is not None and not sampling.greedy
    sampled_with = sampling if sampled else Sampling()

    def run(m: int, h: int) -> None:
        idx = torch.randint(0, cfg.vocab_size, (batch_size, m), generator=gen).to(device)
        pos = context + torch.arange(m, device=device).expand(batch_size, m)
        eng = engines[h]
        fwd = eng.forward(idx, pos, causal_context(cache, pos, context + m))
        logits = eng.logits(fwd.h0)
        if sampled:
            assert sampling is not None
            sample(process_logits(logits, sampling), draws)
        else:
            logits.argmax(-1)
        if h > 1 and draft_cache is not None:
            # m - 1 nodes over h - 1 heads: a tree of that size (its query columns), else a chain
            tree = Tree(default_tree(h - 1, size=m - 1)) if m > h else Tree.chain(h - 1)
            conditioned_drafts(model, eng, draft_cache, fwd.h0, idx, pos, sampled_with, draws,
                               tree)
        elif h > 1:
            sel = torch.full((batch_size,), m - 1, device=device)
            dl = eng.draft_logits(eng.draft_hidden(fwd, sel))
            if sampled:
                assert sampling is not None
                draw_distinct(process_logits(dl, sampling), 1, draws)
            else:
                dl.argmax(-1)

    with torch.inference_mode():
        idx = torch.randint(0, cfg.vocab_size, (batch_size, context), generator=gen).to(device)
        pos = torch.arange(context, device=device).expand(batch_size, context)
        engines[max(engines)].forward(idx, pos, causal_context(cache, pos, context))
        for s in shapes:  # warm-up
            run(*s)
        for _ in range(reps):
            for s in shapes:
                t0 = time.perf_counter()
                run(*s)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[s].append(time.perf_counter() - t0)
    return {s: typical_time(v) for s, v in times.items()}


def typical_time(samples: Sequence[float]) -> float:
    """The lower quartile of repeated timings, always within [min, max] of the samples.

    Lower quartile, not the mean: on a machine shared with other jobs, the slow tail is other
    processes' time slices, not the measured code's cost. It is computed with the "inclusive"
    method, which interpolates between the samples themselves; the default "exclusive" method
    extrapolates below the minimum for few samples (for two, (5 min - max) / 4, which is
    negative when max > 5 min), and a near-zero or negative forward cost turns into an absurd
    expected speedup.
    """
    if not samples:
        raise ValueError("typical_time needs at least one sample")
    if len(samples) == 1:
        return float(samples[0])
    return float(statistics.quantiles(samples, n=4, method="inclusive")[0])


# ---------------------------------------------------------------------------------------------
# Acceptance.


def draft_ranks(model: MultiTokenModel, seqs: Tensor, start: int, max_rank: int) -> np.ndarray:
    """ranks [sequences, positions, D]: at each position t >= start (with D+1 tokens after it),
    the rank of token x[t+1+d] in draft head d's logits at t, or max_rank if below the top
    max_rank."""
    D = model.n_future - 1
    T = seqs.shape[1]
    stop = T - 1 - D
    if stop <= start:
        raise MultitokenError("sequences too short to measure acceptance")
    out = []
    with torch.inference_mode():
        for chunk in seqs.split(4):
            hs = model.hidden(chunk)
            cols = []
            for d in range(1, D + 1):
                logits = model.unembed(hs[d][:, start:stop]).float()  # [b, P, V]
                target = chunk[:, start + 1 + d: stop + 1 + d]
                t_logit = logits.gather(-1, target[..., None])
                cols.append((logits > t_logit).sum(-1).clamp(max=max_rank))  # [b, P]
            out.append(torch.stack(cols, dim=-1))
    return torch.cat(out).cpu().numpy()


def simulate_tokens_per_forward(ranks: np.ndarray, tree_paths: list[TreePath]) -> float:
    """Tokens per forward that greedy decoding with this tree (a chain is a tree) achieves on
    the measured sequences: replay the steps, each accepting the longest tree path that matches
    the ranks at the last accepted position and moving past it.

    Averaging P(accepted) over all positions instead is biased, because decoding takes many
    short steps where the heads are wrong and few long ones where they are right: on an early
    code-n4 checkpoint it predicted 2.21 tokens per forward for 3 drafts, replaying 1.58, and
    decoding measured 1.60.
    """
    nodes = set(tree_paths)
    depth = max((len(p) for p in nodes), default=0)
    tokens = steps = 0
    for seq in ranks.tolist():
        t = 0
        while t < len(seq):
            row, n = seq[t], 0
            while n < depth and tuple(row[: n + 1]) in nodes:
                n += 1
            tokens, steps, t = tokens + n + 1, steps + 1, t + n + 1
    return tokens / steps if steps else 1.0


def path_probs(ranks: np.ndarray, max_rank: int) -> dict[TreePath, float]:
    """P(path r_1..r_d accepted) = share of positions whose first d ranks are r_1..r_d."""
    counts: Counter[TreePath] = Counter()
    ranks = ranks.reshape(-1, ranks.shape[-1])
    for row in ranks.tolist():
        for d in range(len(row)):
            if row[d] >= max_rank:
                break
            counts[tuple(row[: d + 1])] += 1
    return {p: c / len(ranks) for p, c in counts.items()}


# ---------------------------------------------------------------------------------------------
# The choice.


def chosen(choices: dict[str, Any], batch_sizes: Sequence[int]) -> dict[str, Any]:
    """The fields of calibration.json (greedy, or one sampling setting) that name the choice:
    the first batch size's mode, chain length and tree, and the choice per batch size."""
    first = choices[str(batch_sizes[0])]
    return {"best_mode": first["best_mode"], "best_k": first["best_k"], "tree": first["tree"],
            "chosen_by": first.get("chosen_by", "model"), "by_batch_size": choices}


def chain_acceptance(prob: Callable[[TreePath], float], depth: int) -> list[float]:
    """Acceptance of chain draft d given drafts 1..d-1 were: P(reach (0,)*d) / P(reach
    (0,)*(d-1)), for d = 1..depth."""
    return [prob((0,) * d) / max(prob((0,) * (d - 1)) if d > 1 else 1.0, 1e-12)
            for d in range(1, depth + 1)]


def calibrate(model: MultiTokenModel, val_tokens: np.ndarray | Tensor, *, n_prompts: int = 16,
              prompt_len: int = 128, gen_len: int = 256, max_rank: int = 8, max_nodes: int = 32,
              batch_sizes: tuple[int, ...] = (1,), reps: int = 20,
              sampling: Sequence[Sampling] = (), seed: int = 0, verify_prompts: int = 0,
              verify_tokens: int = 128, decode_timer: DecodeTimer | None = None,
              dynamic: Sequence[str] = (), log: Any = None) -> dict[str, Any]:
    """Measure acceptance and forward costs; return the calibration (see module docstring):
    greedy's, and one per sampling setting in `sampling` (greedy ones there are skipped: greedy
    is always calibrated). seed: the sampled decoding's (and the verification's).
    verify_prompts > 0: choose by decoding that many held-out prompts x verify_tokens with the
    candidates, timed by decode_timer (default: `generate` calls), and the dynamic trees
    `dynamic` ("TOP_KxBEAM"; token-conditioned heads) beside them; 0: the model's choice."""
    cfg = model.cfg
    D = model.n_future - 1
    if D < 1:
        raise MultitokenError("calibration needs draft heads, but this model has n_future=1")
    prompt_len = min(prompt_len, cfg.max_seq_len // 2)
    gen_len = max(D + 2, min(gen_len, cfg.max_seq_len - prompt_len))
    say = log or (lambda *_: None)
    model.eval()

    prompts = prompts_from(val_tokens, n_prompts, prompt_len)
    say(f"decoding {n_prompts} held-out prompts x {gen_len} greedy tokens")
    res = generate(model, prompts, gen_len, speculative="chain")
    device = model.tok_embeddings.weight.device
    seqs = torch.tensor([p + t for p, t in zip(prompts, res.tokens)], device=device)
    ranks = draft_ranks(model, seqs, prompt_len - 1, max_rank)
    probs = path_probs(ranks, max_rank)
    prob = lambda p: probs.get(tuple(p), 0.0)  # noqa: E731
    chain_e = {k: simulate_tokens_per_forward(ranks, [(0,) * d for d in range(1, k + 1)])
               for k in range(1, D + 1)}
    grown = grow_tree(prob, max_nodes, D, max_rank)  # candidates in order of P(accepted)
    tree_e = {s: simulate_tokens_per_forward(ranks, grown[:s]) for s in tree_sizes(len(grown))}
    context = prompt_len + gen_len // 2
    verify = None if verify_prompts <= 0 else make_verification(
        model, val_tokens, verify_prompts, verify_tokens, prompt_len, n_prompts, batch_sizes,
        seed=seed, timer=decode_timer, dynamic=dynamic, log=say)
    choices, costs = choose(model, chain_e, tree_e, grown, batch_sizes, reps, context, None, say,
                            verify)
    first = choices[str(batch_sizes[0])]
    cal = {
        "version": 1,
        "dtype": dtype_name(model.tok_embeddings.weight.dtype),  # what the costs were timed in
        **chosen(choices, batch_sizes),
        "expected_tokens_per_forward": {
            "chain": {str(k): v for k, v in chain_e.items()},
            "tree": simulate_tokens_per_forward(ranks, [tuple(p) for p in first["tree"]]),
        },
        "acceptance": {
            "chain": chain_acceptance(prob, D),
            "top_r": [[prob((0,) * (d - 1) + (r,)) for r in range(max_rank)]
                      for d in range(1, D + 1)],
        },
        "tree_order": [list(p) for p in grown],
        "path_probs": {",".join(map(str, p)): prob(p) for p in grown},
        "forward_cost": costs,
        "measured_on": {"positions": int(ranks.shape[0] * ranks.shape[1]), "prompts": n_prompts,
                        "prompt_len": prompt_len, "gen_len": gen_len, "max_rank": max_rank,
                        "threads": torch.get_num_threads(), "device": str(device)},
    }
    settings = [x for x in dict.fromkeys(sampling) if not x.greedy]
    if settings:
        cal["sampling"] = {x.label: calibrate_setting(
            model, prompts, gen_len, x, max_nodes=max_nodes, batch_sizes=batch_sizes, reps=reps,
            context=context, seed=seed, verify=verify, log=say) for x in settings}
    return cal


def tree_sizes(n: int) -> list[int]:
    """The tree sizes timed and compared, for a growth order of n nodes."""
    return sorted({*range(1, min(n, 16) + 1), *range(16, n + 1, 4), n} - {0})


def choose(model: MultiTokenModel, chain_e: dict[int, float], tree_e: dict[int, float],
           grown: list[TreePath], batch_sizes: Sequence[int], reps: int, context: int,
           sampling: Sampling | None, say: Any,
           verify: Verification | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Time the forwards at each batch size and pick, from the expected tokens per forward of
    chain lengths (chain_e) and tree sizes (tree_e: the first s nodes of `grown`), the chain
    length, the tree and the mode (off when neither pays); then, with `verify`, pick again
    among a few candidates by decoding them (`Verification.apply`). Returns (choices, forward
    costs), keyed by batch size."""
    D = model.n_future - 1
    costs: dict[str, Any] = {}
    choices: dict[str, Any] = {}
    sizes = sorted(tree_e)
    for B in batch_sizes:
        shapes = [(1, 1)] + [(k + 1, k + 1) for k in range(1, D + 1)]
        shapes += [(s + 1, D + 1) for s in sizes if (s + 1, D + 1) not in shapes]
        say(f"timing {len(shapes)} forward shapes at batch {B}"
            + ("" if sampling is None else f", {sampling.label}"))
        t = time_forwards(model, shapes, batch_size=B, context=context, reps=reps,
                          sampling=sampling)
        plain = t[(1, 1)]
        chain_speed = {k: chain_e[k] * plain / t[(k + 1, k + 1)] for k in chain_e}
        best_k = max(chain_speed, key=chain_speed.get)
        tree_speed = {s: tree_e[s] * plain / t[(s + 1, D + 1)] for s in sizes}
        best_s = max(tree_speed, key=tree_speed.get) if tree_speed else 0
        tree_paths = [list(p) for p in Tree(grown[:best_s]).paths] if best_s else [[0]]
        mode = "tree" if tree_speed and tree_speed[best_s] > chain_speed[best_k] else "chain"
        if max(chain_speed[best_k], tree_speed.get(best_s, 0.0)) < 1.0:
            mode = "off"  # speculation would not pay on this machine for this checkpoint
        choices[str(B)] = {
            "best_k": best_k,
            "tree": tree_paths,
            "best_mode": mode,
            "expected_speedup": {"chain": {str(k): v for k, v in chain_speed.items()},
                                 "tree": {str(s): v for s, v in tree_speed.items()}},
            "chosen_by": "model",
        }
        if verify is not None:
            choices[str(B)] = verify.apply(choices[str(B)], grown, D, B, sampling or Sampling())
        costs[str(B)] = {
            "plain_ms": plain * 1e3,
            "chain_ms": {str(k): t[(k + 1, k + 1)] * 1e3 for k in chain_e},
            "spec_ms": {str(s + 1): t[(s + 1, D + 1)] * 1e3 for s in sizes},
        }
    return choices, costs


def calibrate_setting(model: MultiTokenModel, prompts: list[list[int]], gen_len: int,
                      sampling: Sampling, *, max_nodes: int, batch_sizes: Sequence[int],
                      reps: int, context: int, seed: int, verify: Verification | None = None,
                      log: Any = None) -> dict[str, Any]:
    """The choice for one sampling setting: P(reached) of every node of the measurement tree
    (`reach.measure_reach`, decoding `prompts` with `seed`), trees grown from it, expected
    tokens per forward = 1 + sum of P(reached), forward costs timed with that sampling; with
    `verify`, the choice checked by decoding (see `choose`)."""
    say = log or (lambda *_: None)
    D = model.n_future - 1
    mtree = Tree(measurement_tree(D))
    device = model.tok_embeddings.weight.device
    say(f"{sampling.label}: decoding {len(prompts)} held-out prompts x {gen_len} sampled tokens "
        f"over a measurement tree of {mtree.size} nodes")
    reach, steps = measure_reach(model, prompts, gen_len, sampling, mtree,
                                 torch.Generator(device=device).manual_seed(seed))
    prob = lambda p: reach.get(tuple(p), 0.0)  # noqa: E731
    chain_e = {k: 1.0 + sum(prob((0,) * d) for d in range(1, k + 1)) for k in range(1, D + 1)}
    grown = grow_tree(prob, max_nodes, D, mtree.max_rank)
    tree_e = {s: 1.0 + sum(prob(p) for p in grown[:s]) for s in tree_sizes(len(grown))}
    choices, costs = choose(model, chain_e, tree_e, grown, batch_sizes, reps, context, sampling,
                            say, verify)
    first = choices[str(batch_sizes[0])]
    return {
        "sampling": {"temperature": sampling.temperature, "top_p": sampling.top_p,
                     "top_k": sampling.top_k},
        **chosen(choices, batch_sizes),
        "expected_tokens_per_forward": {
            "chain": {str(k): v for k, v in chain_e.items()},
            "tree": 1.0 + sum(prob(p) for p in first["tree"]),
            "tree_by_size": {str(s): v for s, v in tree_e.items()},
        },
        "acceptance": {"chain": chain_acceptance(prob, D)},
        "tree_order": [list(p) for p in grown],
        "reach": {",".join(map(str, p)): prob(p) for p in mtree.paths},
        "forward_cost": costs,
        "measured_on": {"steps": steps, "measurement_nodes": mtree.size, "prompts": len(prompts),
                        "gen_len": gen_len, "seed": seed},
    }


def setting_calibration(calib: dict[str, Any] | None,
                        sampling: Sampling) -> tuple[dict[str, Any] | None, str]:
    """The part of a calibration that decoding with `sampling` uses, and which it is: the
    setting's own (`calibrate --sampling`; "calibrated for T=0.8 top-p=0.95"), else the greedy
    one ("calibrated for greedy": what every setting used before per-setting calibration),
    else (None, "default"). Both parts have best_mode, best_k, tree, by_batch_size and
    tree_order."""
    if not calib:
        return None, "default"
    if not sampling.greedy:
        own = (calib.get("sampling") or {}).get(sampling.label)
        if own:
            return own, f"calibrated for {sampling.label}"
    return calib, "calibrated for greedy"


def load_calibration(checkpoint: str | Path,
                     dtype: torch.dtype = torch.float32) -> dict[str, Any] | None:
    """The stored calibration of a checkpoint for decoding in `dtype` (the model's), or None. A
    damaged file is reported and ignored, and so is one measured in another dtype: the forward
    costs, hence the chosen mode, chain length and tree, are the dtype's (on a CPU without bf16
    instructions, a bf16 matmul costs more than an fp32 one). A file without "dtype" was
    measured in float32 (before the field, every checkpoint decoded in its fp32 weights)."""
    path = find_checkpoint(checkpoint) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        for part in [data, *(data.get("sampling") or {}).values()]:
            Tree(part["tree"])
            int(part["best_k"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, MultitokenError) as e:
        print(f"warning: ignoring unreadable {path}: {e}", file=sys.stderr)
        return None
    measured, now = data.get("dtype", "float32"), dtype_name(dtype)
    if measured != now:
        print(f"warning: ignoring {path}: measured in {measured}, decoding in {now} (run "
              f"`multitoken calibrate --dtype {now}` for a calibration in {now})",
              file=sys.stderr)
        return None
    return data


def run_data_config(checkpoint: str | Path) -> DataConfig:
    """The data section of the checkpoint run's config."""
    meta = read_config(checkpoint)
    run = meta.get("run") or meta
    return from_dict(DataConfig, run.get("data", {}), prefix="data.")


def data_splits(checkpoint: str | Path, tokenizer: Any) -> Any:
    """The checkpoint run's corpus split (a `DataBundle`: .train, .val), tokenized as it was."""
    return prepare_data(run_data_config(checkpoint), tokenizer)


def validation_tokens(checkpoint: str | Path, tokenizer: Any) -> np.ndarray:
    """The held-out split the checkpoint's run never trained on, tokenized as it was."""
    return data_splits(checkpoint, tokenizer).val


def unseen_tokens(checkpoint: str | Path, tokenizer: Any, paths: list[str]) -> np.ndarray:
    """The tokens of `paths` (files, folders, globs), refused if any file is in the checkpoint
    run's training split (e.g. the standard library's test/ folder, which the default corpus
    leaves out, or this repository's own source)."""
    files = resolve_files(paths)
    if not files:
        raise MultitokenError(f"no files in {' '.join(paths)}")
    dcfg = run_data_config(checkpoint)
    trained = {os.path.realpath(f) for f in split_corpus(dcfg).train}
    seen = [f for f in files if os.path.realpath(f) in trained]
    if seen:
        raise MultitokenError(f"{seen[0]} (and {len(seen) - 1} more) is in the training split "
                              f"of {checkpoint}: choose text the model never trained on")
    return tokenize_files(files, tokenizer, dcfg.cache_dir)


def save_calibration(checkpoint: str | Path, cal: dict[str, Any]) -> Path:
    """Write `cal` to the checkpoint's calibration.json (atomically: a reader sees the old file
    or the new one); returns its path."""
    out = find_checkpoint(checkpoint) / CALIBRATION_FILE
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(cal, indent=2) + "\n")
    tmp.replace(out)
    return out
