"""Self-speculative decoding with the model's own heads: one step verifies the drafts and
proposes the next ones, in ONE forward.

Chains and trees run the same step (a chain is `Tree.chain(k)`). State between steps, per
sequence: the root (the last token produced, not yet fed, at position p) and the table of the
draft heads' top-ranked tokens for positions p+1.., proposed at position p-1; the tree picks its
nodes from it (node (r_1..r_d) = rank r_d of head d+1). One step:

1. feeds [root, nodes] at tree positions, into consecutive slots, under the tree mask
   (`tree.tree_context`);
2. head 1 at every node gives the distribution of the token after it, which verifies that
   node's children (`sampling`'s rules); the deepest node whose whole path was accepted is
   kept, and the next token is head 1's argmax there (greedy) or a draw from the residual
   there (sampling) -- the bonus token;
3. the draft heads, run at the accepted node only, propose the next table (engine phase 2);
4. the accepted path's keys/values move from their node slots to their position slots, unless
   they are in place already (always, for a chain).

A rejected node leaves keys/values behind in slots that the next step overwrites before anything
attends to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from multitoken.decoding.engine import Engine, prefill
from multitoken.decoding.sampling import (
    Sampling,
    accept_one_hot,
    greedy_accepts,
    pick,
    process_logits,
    residual_one_hot,
    sample,
)
from multitoken.decoding.tree import Tree, deepest_accepted, tree_context
from multitoken.errors import MultitokenError
from multitoken.model import KVCache, MultiTokenModel


@dataclass
class StepOut:
    """What one decode step appends: tokens[b, :n[b] + 1] (accepted drafts, then the bonus)."""

    tokens: Tensor  # [B, W]
    n: Tensor  # [B] drafts accepted
    tried: Tensor  # [B] drafts verified (for per-head acceptance)


def top_candidates(logits: Tensor, r: int) -> Tensor:
    """Draft heads' logits [D, B, V] -> the table of candidates [B, D, r] (ranks 0..r-1)."""
    if r == 1:  # a chain: argmax is cheaper than topk
        return logits.argmax(-1, keepdim=True).permute(1, 0, 2)
    return logits.topk(r, dim=-1).indices.permute(1, 0, 2)


def verify(logits: Tensor, tok: Tensor, t: dict[str, Tensor], sampling: Sampling,
           generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Head 1's logits at every node [B, N+1, V] and the node tokens [B, N+1] -> (the deepest
    accepted node [B], the next token [B])."""
    if sampling.greedy:
        pred = logits.argmax(-1)  # [B, N+1]
        acc = deepest_accepted(greedy_accepts(tok, pred[:, t["parent"]]), t)
        return acc, pred.gather(1, acc[:, None]).squeeze(1)
    probs = process_logits(logits, sampling)  # [B, N+1, V]
    valid = t["child_valid"]  # [N+1, C]
    kid_tok = tok[:, t["child_index"]]  # [B, N+1, C] (a missing child reads the root's token)
    choice = accept_one_hot(probs, kid_tok, valid, generator)  # [B, N+1], C = none
    # node j is accepted when its parent's choice is j's place among the siblings
    acc = deepest_accepted(choice[:, t["parent"]] == t["child_pos"], t)
    rows = torch.arange(tok.shape[0], device=tok.device)
    # At the accepted node every child was tried and rejected (none at a leaf).
    final = residual_one_hot(probs[rows, acc], kid_tok[rows, acc], valid[acc])
    return acc, sample(final, generator)


def speculate_step(engine: Engine, cache: KVCache, tree: Tree, root: Tensor, table: Tensor,
                   base: Tensor, kv_len: int, sampling: Sampling,
                   generator: torch.Generator | None) -> tuple[StepOut, Tensor, Tensor]:
    """One step. root [B] at positions base [B]; table [B, D, R]: the top-R tokens of draft heads
    2..D+1. Returns (what the step appends, the next root [B], the next table [B, D, R])."""
    t = tree.tensors(root.device)
    # [B, N]: a chain's nodes are the top-1 drafts in order
    nodes = table[:, :, 0] if tree.is_chain else table.flatten(1)[:, t["table_index"]]
    inp = torch.cat([root[:, None], nodes], dim=1)  # [B, N+1]
    fwd = engine.forward(inp, base[:, None] + t["depth"], tree_context(cache, base, tree, kv_len))
    acc, nxt = verify(engine.logits(fwd.h0), inp, t, sampling, generator)
    emit = t["emit"][acc]  # [B, D+3]
    D = tree.depth
    tokens = torch.cat([inp, nxt[:, None]], dim=1).gather(1, emit[:, :D + 1])  # path, bonus
    # Next drafts from the accepted node, attending through the tree mask: before compaction.
    new_table = top_candidates(engine.draft_logits(engine.draft_hidden(fwd, acc)), table.shape[2])
    if not tree.is_chain and not bool(t["in_place"][acc].all()):
        d = torch.arange(1, D + 1, device=base.device)
        cache.copy_slots(base[:, None] + t["path_nodes"][acc], base[:, None] + d)
    return StepOut(tokens, emit[:, D + 1], emit[:, D + 2]), nxt, new_table


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
        self.table = top_candidates(self.engine.draft_logits(hidden), self.tree.max_rank)
        return self.tok

    def select(self, rows: Tensor) -> None:
        self.tok, self.table = self.tok[rows], self.table[rows]

    def step(self, cache: KVCache, pos: Tensor, kv_len: int) -> StepOut:
        out, self.tok, self.table = speculate_step(
            self.engine, cache, self.tree, self.tok, self.table, pos, kv_len, self.sampling,
            self.generator)
        return out
