"""How often each node of a draft tree is reached under sampling (for `calibrate --sampling`).

Under sampling, node (r_1..r_d) of a tree is "the (r_d + 1)-th draw without replacement from
the draft distribution q of depth d, below node (r_1..r_{d-1})", and a step's drafts are
verified by recursive rejection sampling (`sampling.py`). Greedy ranks say nothing about how
often such a node is accepted, so it is measured: sampled speculative decoding, with the exact
rule, runs on held-out prompts over a large *measurement tree* (`measurement_tree`: several
draws per node near the root, fewer below), and every step records the deepest node it
accepted (`StepOut.node`). P(v reached) = the share of steps whose accepted path goes through
v; a step that reaches v accepts v's path, so the expected tokens per forward of a tree are
1 + sum of P(reached) over its nodes (the bonus token, plus one token per node on the accepted
path).

Why the measured probabilities hold for sub-trees. Let S be a sub-tree of the measurement tree
M closed under parents and under earlier siblings (with node (..., r) it holds (..., r')
for every r' < r): every tree `grow_tree` builds is one. Then P(v reached) is the same in S
as in M for every node v of S, step by step, given the state the step starts from:

- Draws. A node's k children in M are its first k Gumbel-top-k draws (`draw_distinct`), whose
  order is that of successive draws without replacement: the first i of k draws are
  distributed exactly as i draws. A node of S with i <= k children draws its first i.
- Acceptance. The rule tries a node's children in order: child i is accepted iff children
  1..i-1 were rejected and child i passes its test, which reads p at the node, q, the tokens of
  children 1..i and their uniforms, never a later sibling. So P(child i accepted | node reached)
  is the same in every tree where the node has at least i children.
- Paths. v is reached iff every node on its path was accepted at its parent; each of those
  events depends only on that node and its earlier siblings (all in S: their draws and
  uniforms) and on p at the parent, which depends on the path's tokens only. q is the draft head's distribution of the depth at
  the last accepted position, the same in every tree. Nothing else of M (later siblings, other
  subtrees) enters, so the events "v reached" in M and in S have the same probability.

The one approximation. That holds per step, for a given starting state. Over a decoding, the
states steps start from depend on the tree: a step starts right after the token where the
previous one stopped, hard-to-draft tokens come in runs, and a smaller tree stops at more of
them, so its steps start in harder places, in proportion, than those of M, which gets past
some of them through later siblings. For a sub-tree the estimate therefore leans high; for M
itself it is right. (The same effect makes averaging acceptance over all positions misleading
under greedy: `calibrate.simulate_tokens_per_forward`.) Sampled text cannot be replayed the
way greedy text can (a step's accepted path is random), so this estimate is what one decoding
over M gives. Measured on the distilled `make demo` model (16 validation prompts of 64 bytes,
128 new bytes, 3 seeds to measure, 3 other seeds to decode, about 2,200 steps each): at T=0.8,
top-p 0.95, predicted / decoded tokens per forward were chain-1 1.58 / 1.59, chain-3 2.16 /
2.02, trees of 8, 16, 32 nodes 2.46 / 2.49, 2.62 / 2.56, 2.69 / 2.65, M (40 nodes) 2.70 /
2.69; at T=1.0, chain-3 2.13 / 2.05, 16 nodes 2.67 / 2.62 (decoded figures +-0.03).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from multitoken.decoding.generate import generate
from multitoken.decoding.sampling import Sampling
from multitoken.decoding.speculate import StepOut
from multitoken.decoding.tree import Path, Tree
from multitoken.errors import MultitokenError
from multitoken.model import MultiTokenModel

# Draws per node: at depth 1, at depth 2, and below (the last repeats).
MEASUREMENT_WIDTHS = (4, 3, 2)
MEASUREMENT_NODES = 64  # at most this many nodes: the deepest widths shrink to fit


def measurement_tree(depth: int, widths: Sequence[int] = MEASUREMENT_WIDTHS,
                     max_nodes: int = MEASUREMENT_NODES) -> list[Path]:
    """The complete tree with widths[d] children per node at depth d + 1 (the last width for
    deeper levels), `depth` levels; while it has more than max_nodes nodes, the deepest width
    above 1 is lowered by one (4, 3, 2, 2 -> 4, 3, 2, 1 -> ...)."""
    if depth < 1 or not widths or min(widths) < 1:
        raise MultitokenError(f"a measurement tree needs depth >= 1 and widths >= 1, got "
                              f"depth {depth}, widths {tuple(widths)}")
    w = [widths[min(d, len(widths) - 1)] for d in range(depth)]

    def size(w: list[int]) -> int:
        return sum(math.prod(w[: d + 1]) for d in range(len(w)))

    while size(w) > max_nodes and max(w) > 1:
        i = max(i for i, x in enumerate(w) if x > 1)
        w[i] -= 1
    return [p for d in range(1, depth + 1) for p in itertools.product(*(range(x) for x in w[:d]))]


class ReachCounter:
    """An `on_step` hook for `generate`: counts, per node of `tree`, the steps (one per
    sequence and decode call) that accepted it as their deepest node."""

    def __init__(self, tree: Tree) -> None:
        self.tree = tree
        self.counts = torch.zeros(tree.size + 1, dtype=torch.long)  # node 0 = the root

    def __call__(self, step: StepOut) -> None:
        if step.node is None:
            raise MultitokenError("counting accepted nodes needs speculative decoding")
        self.counts += torch.bincount(step.node.cpu(), minlength=self.tree.size + 1)

    @property
    def steps(self) -> int:
        return int(self.counts.sum())

    def reach(self) -> dict[Path, float]:
        """P(node reached) = share of the steps whose accepted path goes through the node."""
        anc = self.tree.tensors(torch.device("cpu"))["anc"].double()  # [j, i]: i on j's path
        reached = self.counts.double() @ anc  # [N+1]: steps whose path holds node i
        n = max(self.steps, 1)
        return {p: float(reached[i + 1]) / n for i, p in enumerate(self.tree.paths)}


def measure_reach(model: MultiTokenModel, prompts: list[list[int]], new_tokens: int,
                  sampling: Sampling, tree: Tree,
                  generator: torch.Generator | None) -> tuple[dict[Path, float], int]:
    """Decode `prompts` (one batch) with sampled tree speculation over `tree`; returns
    (P(node reached) per path of `tree`, the number of steps counted)."""
    if sampling.greedy:
        raise MultitokenError("measure_reach is for sampling; greedy acceptance is measured "
                              "from ranks (calibrate.draft_ranks)")
    counter = ReachCounter(tree)
    generate(model, prompts, new_tokens, temperature=sampling.temperature, top_k=sampling.top_k,
             top_p=sampling.top_p, speculative="tree", tree=tree.paths, generator=generator,
             on_step=counter)
    return counter.reach(), counter.steps
