"""Self-speculative decoding with the model's own heads: one step verifies the drafts and
proposes the next ones, in ONE forward.

Chains and trees run the same step (a chain is `Tree.chain(k)`). State between steps, per
sequence: the root (the last token produced, not yet fed, at position p) and the drafts for
positions p+1.. proposed by the draft heads at position p-1 (`Drafts`: a token per tree node,
and when sampling the distributions they were drawn from). Which token a node holds
(`propose`):

- greedy: node (r_1..r_d) = rank r_d of draft head d+1 (the top-ranked tokens, as before);
- sampling: a node with k children gets k distinct tokens drawn without replacement from q,
  the processed distribution (same temperature / top-k / top-p as head 1's) of the draft head
  of the children's depth; child r is draw r+1. A tree gives the shape (how many children each
  node has), not ranks. `calibrate --sampling` measures, per sampling setting, how often each
  node of a large tree is reached (`StepOut.node`) and chooses the shape from that; without
  it, the greedy-calibrated tree (chosen from greedy ranks) is used as the shape, a sensible
  guess (earlier draws are likelier tokens on average, as lower ranks are).

One step:

1. feeds [root, nodes] at tree positions, into consecutive slots, under the tree mask
   (`tree.tree_context`);
2. head 1 at every node gives the distribution of the token after it, which verifies that
   node's children (`sampling`'s rules: greedy match, or recursive rejection sampling against
   q); the deepest node whose whole path was accepted is kept, and the next token is head 1's
   argmax there (greedy) or a draw from the residual there (sampling) -- the bonus token;
3. the draft heads, run at the accepted node only, propose the next drafts (engine phase 2);
4. the accepted path's keys/values move from their node slots to their position slots, unless
   they are in place already (always, for a chain).

A rejected node leaves keys/values behind in slots that the next step overwrites before anything
attends to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from multitoken.decoding.engine import Engine, Forward, prefill
from multitoken.decoding.sampling import (
    Sampling,
    accept_drafts,
    draw_distinct,
    greedy_accepts,
    pick,
    process_logits,
    sample,
)
from multitoken.decoding.tree import Tree, compact_path, deepest_accepted, tree_context
from multitoken.errors import MultitokenError
from multitoken.model import KVCache, MultiTokenModel


@dataclass
class StepOut:
    """What one decode step appends: tokens[b, :n[b] + 1] (accepted drafts, then the bonus).

    node: for speculation, the deepest accepted tree node of each row (0 = the root, j = node
    j of `Tree.paths`, 1-based); its path is what the step accepted, so n = its depth. None
    for plain decoding. (`calibrate` counts it to measure how often each node is reached.)
    """

    tokens: Tensor  # [B, W]
    n: Tensor  # [B] drafts accepted
    tried: Tensor  # [B] drafts verified (for per-head acceptance)
    node: Tensor | None = None  # [B] the accepted node (speculation only)


@dataclass
class Drafts:
    """What one step verifies: a draft token per tree node and, when sampling, the
    distributions they were drawn from."""

    tokens: Tensor  # [B, N] in node order (depth-first)
    q: Tensor | None = None  # [B, G, V] per sibling group: the draft head's processed distribution
    # [B, G]: the node each sibling group hangs off, per row (dynamic trees, `dynamic.py`)
    group_node: Tensor | None = None

    def select(self, rows: Tensor) -> Drafts:
        return Drafts(self.tokens[rows], None if self.q is None else self.q[rows],
                      None if self.group_node is None else self.group_node[rows])


def top_candidates(logits: Tensor, r: int) -> Tensor:
    """Draft heads' logits [D, B, V] -> the table of candidates [B, D, r] (ranks 0..r-1)."""
    if r == 1:  # a chain: argmax is cheaper than topk
        return logits.argmax(-1, keepdim=True).permute(1, 0, 2)
    return logits.topk(r, dim=-1).indices.permute(1, 0, 2)


def propose(logits: Tensor, tree: Tree, sampling: Sampling,
            generator: torch.Generator | None) -> Drafts:
    """Draft heads' logits [D, B, V] at the last accepted position -> the tree's drafts."""
    t = tree.tensors(logits.device)
    if sampling.greedy:
        table = top_candidates(logits, tree.max_rank)  # [B, D, R]
        # a chain's nodes are the top-1 drafts in order
        return Drafts(table[:, :, 0] if tree.is_chain else table.flatten(1)[:, t["table_index"]])
    # Every group's children come from the head of their depth: the same q for every group at
    # one depth, drawn independently per group.
    q = process_logits(logits.transpose(0, 1), sampling)  # [B, D, V]
    if not tree.is_chain:  # a chain's groups are its depths
        q = q[:, t["group_depth"]]  # [B, G, V]
    draws = draw_distinct(q, t["group_children"].shape[1], generator)  # [B, G, C]
    return Drafts(draws.flatten(1)[:, t["draw_index"]], q)


def verify(logits: Tensor, tok: Tensor, q: Tensor | None, t: dict[str, Tensor],
           sampling: Sampling, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Head 1's logits at every node [B, N+1, V], the node tokens [B, N+1] and, when sampling,
    the groups' draft distributions q [B, G, V] -> (the deepest accepted node [B], the next
    token [B])."""
    if sampling.greedy:
        pred = logits.argmax(-1)  # [B, N+1]
        acc = deepest_accepted(greedy_accepts(tok, pred[:, t["parent"]]), t)
        return acc, pred.gather(1, acc[:, None]).squeeze(1)
    assert q is not None
    probs = process_logits(logits, sampling)  # [B, N+1, V]
    kid_tok = tok[:, t["group_child_index"]]  # [B, G, C] (a missing child reads the root's)
    choice, stop = accept_drafts(probs[:, t["group_node"]], q, kid_tok, t["group_valid"],
                                 generator)  # [B, G] (C = none), [B, G, V]
    # node j is accepted when its parent's choice is j's place among the siblings
    acc = deepest_accepted(choice[:, t["parent_group"]] == t["child_pos"], t)
    rows = torch.arange(tok.shape[0], device=tok.device)
    # At the accepted node every child was rejected: draw from what is left there (from p at a
    # leaf).
    g = t["node_group"][acc]  # [B]
    final = torch.where((g >= 0)[:, None], stop[rows, g.clamp(min=0)], probs[rows, acc])
    return acc, sample(final, generator)


def verify_step(engine: Engine, cache: KVCache, tree: Tree, root: Tensor, drafts: Drafts,
                base: Tensor, kv_len: int, sampling: Sampling,
                generator: torch.Generator | None) -> tuple[StepOut, Tensor, Forward]:
    """Steps 1-2: feed [root, nodes] and verify. root [B] at positions base [B]. Returns (what
    the step appends, the next root [B], the forward, for proposing the next drafts)."""
    t = tree.tensors(root.device)
    inp = torch.cat([root[:, None], drafts.tokens], dim=1)  # [B, N+1]
    fwd = engine.forward(inp, base[:, None] + t["depth"], tree_context(cache, base, tree, kv_len))
    acc, nxt = verify(engine.logits(fwd.h0), inp, drafts.q, t, sampling, generator)
    emit = t["emit"][acc]  # [B, D+3]
    D = tree.depth
    tokens = torch.cat([inp, nxt[:, None]], dim=1).gather(1, emit[:, :D + 1])  # path, bonus
    return StepOut(tokens, emit[:, D + 1], emit[:, D + 2], acc), nxt, fwd


def speculate_step(engine: Engine, cache: KVCache, tree: Tree, root: Tensor, drafts: Drafts,
                   base: Tensor, kv_len: int, sampling: Sampling,
                   generator: torch.Generator | None) -> tuple[StepOut, Tensor, Drafts]:
    """One step. root [B] at positions base [B]; drafts: the tree's nodes, proposed by draft
    heads 2..D+1. Returns (what the step appends, the next root [B], the next drafts)."""
    out, nxt, fwd = verify_step(engine, cache, tree, root, drafts, base, kv_len, sampling,
                                generator)
    acc = out.node
    assert acc is not None
    # Next drafts from the accepted node, attending through the tree mask: before compaction.
    new = propose(engine.draft_logits(engine.draft_hidden(fwd, acc)), tree, sampling, generator)
    compact_path(cache, tree, base, acc)
    return out, nxt, new


class SpeculativeDecoder:
    """generate()'s driver for speculation over a tree (a chain: `Tree.chain(k)`)."""

    def __init__(self, model: MultiTokenModel, tree: Tree, sampling: Sampling,
                 generator: torch.Generator | None) -> None:
        if tree.depth > model.n_future - 1:
            raise MultitokenError(f"tree depth {tree.depth} needs {tree.depth + 1} heads; the "
                                  f"model has {model.n_future}")
        if tree.max_rank > model.cfg.vocab_size:
            raise MultitokenError(f"tree uses rank {tree.max_rank - 1}, but the vocabulary has "
                                  f"only {model.cfg.vocab_size} tokens")
        self.engine = Engine(model, tree.depth + 1)
        self.tree, self.sampling, self.generator = tree, sampling, generator
        self.width, self.depth = tree.size + 1, tree.depth

    def start(self, cache: KVCache, idx: Tensor, last: Tensor) -> Tensor:
        """Prefill right-padded prompts idx [B, T] whose last tokens sit at last [B]; returns
        the first new token [B] and keeps the first drafts."""
        fwd = prefill(self.engine, cache, idx)
        h = fwd.h0[torch.arange(idx.shape[0], device=idx.device), last]
        self.tok = pick(self.engine.logits(h), self.sampling, self.generator)
        hidden = self.engine.draft_hidden(fwd, last)
        self.drafts = propose(self.engine.draft_logits(hidden), self.tree, self.sampling,
                              self.generator)
        return self.tok

    def select(self, rows: Tensor) -> None:
        self.tok, self.drafts = self.tok[rows], self.drafts.select(rows)

    def step(self, cache: KVCache, pos: Tensor, kv_len: int) -> StepOut:
        out, self.tok, self.drafts = speculate_step(
            self.engine, cache, self.tree, self.tok, self.drafts, pos, kv_len, self.sampling,
            self.generator)
        return out
