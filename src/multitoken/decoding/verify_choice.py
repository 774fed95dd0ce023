"""Verify calibrate's choice by decoding (`multitoken calibrate --verify-prompts N`).

`calibrate.choose` ranks chains and trees by a model: expected tokens per forward x T_plain /
T_mode, with forwards timed in a tight loop. Under sampling that model is optimistic: it does
not time the acceptance rule and the step's bookkeeping (about 0.2 of a plain step under
sampling, 0.06 greedy), and the tight loop under-states the in-place forward. On code-n4 at
T=0.8 / top-p 0.95 it chose a 5-node tree that `bench decode` measured at 1.35x while chain-2
gave 1.47x. So, per setting and batch size, a few candidates are decoded for real
(`generate`): every chain k = 1..D, the model's best tree, and up to two trees of other sizes
(about 2/3 and 3/2 of it), with plain decoding as the reference, after a short warm-up, over
the same held-out prompts, interleaved candidate by candidate (the order rotating per batch so
that no candidate always runs first). The candidate with the highest measured tokens/s is
chosen; one within `TIE` of it with fewer nodes wins instead (timing noise should not buy a
bigger tree). Sampled runs use the setting's sampling with a generator seeded per batch, the
same seeds for every candidate.

The timing is a `DecodeTimer` (default `generate_timer`), so tests can inject one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from multitoken.data import prompts_from
from multitoken.decoding.dynamic import DynamicShape
from multitoken.decoding.generate import generate
from multitoken.decoding.sampling import Sampling
from multitoken.decoding.tree import Path as TreePath
from multitoken.decoding.tree import Tree
from multitoken.errors import MultitokenError
from multitoken.model import MultiTokenModel

TIE = 0.02  # a candidate this close to the fastest counts as equally fast
WARMUP_TOKENS = 16


@dataclass(frozen=True)
class Candidate:
    """A speculation tree to verify (a chain is a tree), with the model's expected speedup."""

    name: str  # "chain-2", "tree-5", "dynamic-2x2"
    paths: tuple[TreePath, ...]
    predicted: float | None  # None: no model (dynamic trees)
    dynamic: DynamicShape | None = None  # a dynamic tree (token-conditioned heads) instead

    @property
    def size(self) -> int:
        return len(self.paths) if self.dynamic is None else self.dynamic.size

    @property
    def is_chain(self) -> bool:
        return self.name.startswith("chain-")


# (setting, candidate or None for plain decoding, prompts of one batch, new tokens, seed)
#   -> (tokens decoded, seconds)
DecodeTimer = Callable[[Sampling, Candidate | None, list[list[int]], int, int],
                       tuple[int, float]]


def generate_timer(model: MultiTokenModel) -> DecodeTimer:
    """The default timer: one `generate` call (no stop token), its wall time."""
    device = model.tok_embeddings.weight.device

    def run(sampling: Sampling, cand: Candidate | None, batch: list[list[int]],
            new_tokens: int, seed: int) -> tuple[int, float]:
        mode: dict[str, Any] = ({"speculative": "off"} if cand is None else
                                {"speculative": "tree", "tree": cand.paths}
                                if cand.dynamic is None else
                                {"speculative": "dynamic", "dynamic": cand.dynamic.label,
                                 "num_drafts": cand.dynamic.depth})
        res = generate(model, batch, new_tokens, temperature=sampling.temperature,
                       top_k=sampling.top_k, top_p=sampling.top_p,
                       generator=torch.Generator(device=device).manual_seed(seed), **mode)
        return res.stats.new_tokens, res.stats.wall_time_s
    return run


def verification_prompts(tokens: np.ndarray | Tensor, n: int, length: int,
                         n_acceptance: int) -> list[list[int]]:
    """n prompts of `length` tokens from the held-out split, evenly spaced and shifted by half
    the spacing of calibrate's `n_acceptance` acceptance prompts, so that they are other text
    where the split is long enough."""
    size = int(tokens.numel() if isinstance(tokens, Tensor) else np.size(tokens))
    margin = max(size - length - 1, 0) // (2 * max(n_acceptance - 1, 1))
    return prompts_from(tokens, n, length, margin=margin)


def candidates(choice: dict[str, Any], grown: list[TreePath], depth: int,
               extra_trees: int = 2, dynamic: Sequence[str] = ()) -> list[Candidate]:
    """The chains 1..depth, the model's best tree (the first s nodes of `grown` with the
    highest expected speedup in `choice`) and up to `extra_trees` best-expected trees of about
    2/3 and 3/2 its size (a tree with the nodes of an earlier candidate is left out); then the
    dynamic trees `dynamic` ("TOP_KxBEAM", `depth` deep; token-conditioned heads only)."""
    speed = choice["expected_speedup"]
    out = [Candidate(f"chain-{k}", tuple(Tree.chain(k).paths), speed["chain"][str(k)])
           for k in range(1, depth + 1)]
    dyn = [Candidate(f"dynamic-{d}", (), None, DynamicShape.parse(d, depth)) for d in dynamic]
    trees = {int(s): v for s, v in speed["tree"].items()}
    if not trees:
        return out + dyn
    best = max(trees, key=trees.__getitem__)
    ranges = [lambda s: s == best, lambda s: 3 * s <= 2 * best, lambda s: 2 * s >= 3 * best]
    for keep in ranges[: 1 + max(0, extra_trees)]:
        sizes = [s for s in trees if keep(s)]
        if sizes:
            s = max(sizes, key=trees.__getitem__)
            paths = tuple(Tree(grown[:s]).paths)
            if all(paths != c.paths for c in out):
                out.append(Candidate(f"tree-{s}", paths, trees[s]))
    return out + dyn


def fastest(rates: dict[str, float], cands: list[Candidate]) -> Candidate:
    """The candidate with the highest rate, or the one with the fewest nodes (chains before
    trees of as many) among those within TIE of it."""
    top = max(rates[c.name] for c in cands)
    close = [c for c in cands if rates[c.name] >= (1.0 - TIE) * top]
    return min(close, key=lambda c: (c.size, not c.is_chain))


@dataclass
class Verification:
    """How calibrate verifies its choice: `n_prompts` held-out prompts (`prompts`, at least as
    many as the largest batch size's round needs) x `new_tokens`, decoded by `timer`."""

    prompts: list[list[int]]
    n_prompts: int
    new_tokens: int
    timer: DecodeTimer
    seed: int = 0
    extra_trees: int = 2
    dynamic: tuple[str, ...] = ()  # dynamic tree shapes to try too (token-conditioned heads)
    warmup_tokens: int = WARMUP_TOKENS
    log: Callable[[str], Any] = field(default=lambda *_: None)

    def batches(self, batch_size: int) -> list[list[list[int]]]:
        """ceil(n_prompts / batch_size) full batches (batch 8, 4 prompts: one batch of 8)."""
        n = -(-self.n_prompts // batch_size) * batch_size
        if n > len(self.prompts):
            raise MultitokenError(f"verification needs {n} held-out prompts, got "
                                 f"{len(self.prompts)} (lower --verify-prompts, or 0 to skip "
                                 f"verification)")
        return [self.prompts[i:i + batch_size] for i in range(0, n, batch_size)]

    def rates(self, sampling: Sampling, cands: list[Candidate],
              batch_size: int) -> dict[str, float]:
        """Measured tokens/s of plain decoding ("plain") and of each candidate."""
        runs: list[tuple[Candidate | None, str]] = [(None, "plain"),
                                                    *((c, c.name) for c in cands)]
        done = {name: [0, 0.0] for _, name in runs}
        batches = self.batches(batch_size)
        for c, _ in runs:  # warm-up: first calls pay for allocations and tree tables
            self.timer(sampling, c, batches[0], min(self.warmup_tokens, self.new_tokens),
                       self.seed)
        for i, batch in enumerate(batches):
            turn = i % len(runs)
            for c, name in runs[turn:] + runs[:turn]:
                tokens, seconds = self.timer(sampling, c, batch, self.new_tokens, self.seed + i)
                done[name][0] += tokens
                done[name][1] += seconds
        return {n: t / s if s > 0 else 0.0 for n, (t, s) in done.items()}

    def apply(self, choice: dict[str, Any], grown: list[TreePath], depth: int,
              batch_size: int, sampling: Sampling) -> dict[str, Any]:
        """`choice` (one batch size's, from `calibrate.choose`) with best_k, tree and
        best_mode set from measured decoding, the model's own choice under "model_choice",
        and the measurements under "verified". When a dynamic tree wins, best_mode is
        "dynamic" and "dynamic" its shape; tree, best_k and "static_mode" then give the best
        static candidate, for decoders that run static trees only (the server)."""
        cands = candidates(choice, grown, depth, self.extra_trees, self.dynamic)
        self.log(f"verifying {', '.join(c.name for c in cands)} against plain decoding at "
                 f"batch {batch_size} ({sampling.label}, {self.n_prompts} prompts x "
                 f"{self.new_tokens} tokens)")
        rates = self.rates(sampling, cands, batch_size)
        plain = rates["plain"]
        win = fastest(rates, cands)
        static = fastest(rates, [c for c in cands if c.dynamic is None])
        win_chain = fastest(rates, [c for c in cands if c.is_chain])
        speedup = {c.name: rates[c.name] / plain if plain > 0 else 0.0 for c in cands}
        static_mode = "chain" if static.is_chain else "tree"
        mode = static_mode if win.dynamic is None else "dynamic"
        top = max(cands, key=lambda c: rates[c.name])
        reason = ("highest measured tokens/s" if top == win else
                  f"measured within {TIE:.0%} of {top.name}, with fewer nodes")
        if speedup[win.name] < 1.0:
            mode, reason = "off", "measured: plain decoding was faster than every candidate"
        extra = {} if win.dynamic is None else {"dynamic": win.dynamic.label,
                                                "static_mode": static_mode}
        return {
            **choice,
            **extra,
            "best_k": win_chain.size,
            "tree": [list(p) for p in static.paths],
            "best_mode": mode,
            "chosen_by": "measured",
            "model_choice": {k: choice[k] for k in ("best_k", "tree", "best_mode")},
            "verified": {
                "chosen": win.name,
                "reason": reason,
                "plain_tok_s": plain,
                "candidates": {c.name: {"nodes": c.size, "tree": [list(p) for p in c.paths],
                                        "dynamic": None if c.dynamic is None else c.dynamic.label,
                                        "predicted_speedup": c.predicted,
                                        "measured_speedup": speedup[c.name],
                                        "tok_s": rates[c.name]} for c in cands},
                "prompts": self.n_prompts, "new_tokens": self.new_tokens, "seed": self.seed,
            },
        }


def make_verification(model: MultiTokenModel, tokens: np.ndarray | Tensor, n_prompts: int,
                      new_tokens: int, prompt_len: int, n_acceptance: int,
                      batch_sizes: Sequence[int], *, seed: int = 0,
                      timer: DecodeTimer | None = None, dynamic: Sequence[str] = (),
                      log: Callable[[str], Any] | None = None) -> Verification:
    """calibrate's verification: enough held-out prompts for every batch size's round, new
    tokens capped to what the context leaves, `timer` or `generate_timer(model)`; `dynamic`:
    dynamic tree shapes to try beside the static candidates (token-conditioned heads only)."""
    need = max(-(-n_prompts // B) * B for B in batch_sizes)
    if dynamic and not model.conditioned:
        raise MultitokenError("dynamic trees need token_conditioned heads")
    return Verification(verification_prompts(tokens, need, prompt_len, n_acceptance), n_prompts,
                        min(new_tokens, model.cfg.max_seq_len - prompt_len),
                        timer or generate_timer(model), seed=seed, dynamic=tuple(dynamic),
                        log=log or (lambda *_: None))
