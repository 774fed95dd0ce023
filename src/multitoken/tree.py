"""Tree speculation (Medusa-style) with the model's own heads.

A static tree of candidates: a node is a path (r_1, ..., r_d) of top-k ranks, meaning "rank
r_1 of head 2, then rank r_2 of head 3, ...", all read at the last accepted position (draft
head d+1 proposes the token d+1 places ahead). The root is the token just produced (not yet
fed, at position p). One forward feeds [root, nodes...] with

    positions   p + depth(node)          (tree positions: siblings share a position)
    slots       p, p+1, ..., p+N         (consecutive cache slots, one per node)
    mask        the accepted prefix (slots < p) + the node's ancestors and itself

then head 1 at each node verifies that node's children, the longest accepted path is kept,
its keys/values are moved from their node slots to their position slots (`KVCache.copy_slots`)
and the draft heads, run at the accepted node only, fill the next tree.

Greedy: a child is accepted iff it equals head 1's argmax at its parent; siblings are distinct
tokens (different ranks of one head), so at most one child matches and the result is plain
greedy decoding. Sampling (exact): at a node with processed distribution p, the children (one-hot
proposals, tried in rank order) are accepted by sequential rejection: child c with probability
p'(c) where p' is the current residual; on rejection c is zeroed out of p' (renormalised). If
every child is rejected, the next token is drawn from the final residual; at a leaf, from p.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cached_property

import torch
from torch import Tensor

from multitoken.engine import Engine
from multitoken.errors import MultitokenError
from multitoken.generate import Sampling, StepOut, pick, prefill, process_logits
from multitoken.model import DecodeContext, KVCache, MultiTokenModel

Path = tuple[int, ...]


class Tree:
    """A static candidate tree. Paths are closed under prefixes and kept in depth-first order,
    so the top-1 chain (0,), (0, 0), ... sits right after the root and needs no compaction."""

    def __init__(self, paths: Sequence[Sequence[int]], max_depth: int | None = None) -> None:
        clean: set[Path] = set()
        for p in paths:
            path = tuple(int(r) for r in p)
            if not path or min(path) < 0:
                raise MultitokenError(f"tree path {tuple(p)!r} must be a non-empty tuple of "
                                      "ranks >= 0")
            if max_depth is not None:
                path = path[:max_depth]
            clean.update(path[:d] for d in range(1, len(path) + 1))  # close under prefixes
        if not clean:
            raise MultitokenError("a tree needs at least one path")
        self.paths: list[Path] = sorted(clean)
        self.size = len(self.paths)  # nodes besides the root
        self.depth = max(len(p) for p in self.paths)
        self._tensors: dict[torch.device, dict[str, Tensor]] = {}

    def __repr__(self) -> str:
        return f"Tree(size={self.size}, depth={self.depth}, paths={self.paths})"

    @cached_property
    def _tables(self) -> dict[str, list]:
        index = {p: i + 1 for i, p in enumerate(self.paths)}  # node 0 = root
        nodes: list[Path] = [(), *self.paths]
        n, D = len(nodes), self.depth
        parent = [0] + [index.get(p[:-1], 0) for p in self.paths]
        anc = [[False] * n for _ in range(n)]
        path_nodes = []
        for j, p in enumerate(nodes):
            chain = [index[p[:d]] for d in range(1, len(p) + 1)]
            for i in [0, *chain]:
                anc[j][i] = True
            path_nodes.append(chain + list(range(len(p) + 1, D + 1)))  # pad: slot d -> itself
        kids: list[list[int]] = [[] for _ in range(n)]
        for j in range(1, n):
            kids[parent[j]].append(j)  # depth-first order = rank order among siblings
        width = max(len(c) for c in kids)
        return {
            "depth": [len(p) for p in nodes],
            "rank": [p[-1] if p else 0 for p in nodes],
            "parent": parent,
            "anc": anc,
            "path_nodes": path_nodes,
            "in_place": [pn == list(range(1, D + 1)) for pn in path_nodes],
            "children": [c + [-1] * (width - len(c)) for c in kids],
            "has_children": [int(bool(c)) for c in kids],
        }

    @property
    def max_rank(self) -> int:
        return max(max(p) for p in self.paths) + 1

    def tensors(self, device: torch.device) -> dict[str, Tensor]:
        if device not in self._tensors:
            t = {k: torch.tensor(v, device=device) for k, v in self._tables.items()}
            n = self.size + 1
            # One extra all-False column: where slots outside this step's tree point.
            t["anc_ext"] = torch.cat([t["anc"], torch.zeros(n, 1, dtype=torch.bool,
                                                            device=device)], dim=1)
            t["arange"] = torch.arange(n, device=device)
            self._tensors[device] = t
        return self._tensors[device]


def grow_tree(prob: Callable[[Path], float], max_nodes: int, max_depth: int,
              max_rank: int) -> list[Path]:
    """Greedily add the candidate with the largest P(accepted); returns the paths in order
    added, so every prefix of the result is itself a tree (the best of each size)."""
    chosen: list[Path] = []
    frontier = {(r,) for r in range(max_rank)}
    for _ in range(max_nodes):
        if not frontier:
            break
        best = max(frontier, key=lambda p: (prob(p), [-r for r in p]))
        if prob(best) <= 0.0:
            break
        chosen.append(best)
        frontier.remove(best)
        if len(best) < max_depth:
            frontier.update(best + (r,) for r in range(max_rank))
    return chosen


def default_tree(depth: int, size: int = 10) -> list[Path]:
    """A generic small tree for when there is no calibration: acceptance modelled as 0.7 per
    top-1 level and geometrically less for lower ranks. `multitoken calibrate` measures it."""
    rank_p = [0.7, 0.12, 0.05, 0.03]

    def prob(p: Path) -> float:
        out = 1.0
        for r in p:
            out *= rank_p[r] if r < len(rank_p) else 0.0
        return out

    return grow_tree(prob, size, depth, len(rank_p))


def top_candidates(logits: Tensor, r: int) -> Tensor:
    """Draft heads' logits [D, B, V] -> the table of candidates [B, D, r] (ranks 0..r-1)."""
    return logits.topk(r, dim=-1).indices.permute(1, 0, 2)


def tree_context(cache: KVCache, base: Tensor, t: dict[str, Tensor], kv_len: int) -> DecodeContext:
    """Slots base..base+N hold the tree; each node sees slots < base and its ancestors."""
    n = t["arange"].shape[0]
    keys = torch.arange(kv_len, device=base.device)
    rel = keys[None, :] - base[:, None]  # [B, S] slot relative to the root's
    col = torch.where((rel >= 0) & (rel < n), rel, n)  # outside the tree -> the False column
    mask = t["anc_ext"][:, col].permute(1, 0, 2) | (rel < 0)[:, None, :]  # [B, N+1, S]
    return DecodeContext(cache, base[:, None] + t["arange"], mask.unsqueeze(1), kv_len)


def accept_tree(probs: Tensor, tok: Tensor, t: dict[str, Tensor], depth: int,
                generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Exact sampling walk: probs [B, N+1, V] processed head-1 distributions at every node,
    tok [B, N+1] node tokens. Returns (accepted node [B], next token [B])."""
    B = tok.shape[0]
    rows = torch.arange(B, device=tok.device)
    cur = torch.zeros(B, dtype=torch.long, device=tok.device)
    stopped = torch.zeros(B, dtype=torch.bool, device=tok.device)
    for _ in range(depth):
        kids = t["children"][cur]  # [B, C], -1 = none
        valid = (kids >= 0) & ~stopped[:, None]
        p_kid = probs[rows, cur].gather(1, tok.gather(1, kids.clamp(min=0))) * valid  # [B, C]
        # Child i is tried after children < i were rejected: the residual's mass is then
        # left_i = 1 - sum_{j<i} p(child j), and the residual gives child i p / left_i.
        left = 1.0 - (torch.cumsum(p_kid, dim=1) - p_kid)
        u = torch.rand(p_kid.shape, generator=generator, device=tok.device)
        take = valid & (p_kid > 0) & (u * left < p_kid)
        moved = take.any(dim=1)
        cur = torch.where(moved, kids[rows, take.int().argmax(dim=1)], cur)
        stopped |= ~moved
    kids = t["children"][cur]
    kid_tok = tok.gather(1, kids.clamp(min=0))
    final = probs[rows, cur]
    drop = torch.zeros_like(final).scatter_add_(1, kid_tok, (kids >= 0).to(final.dtype)) > 0
    final = final.masked_fill(drop, 0.0)  # every child was tried and rejected
    return cur, torch.multinomial(final, 1, generator=generator).squeeze(1)


def verify_greedy_tree(logits: Tensor, tok: Tensor, t: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Deepest node whose whole path matches head 1's argmaxes -> (node [B], next token [B])."""
    pred = logits.argmax(-1)  # [B, N+1]
    correct = tok == pred[:, t["parent"]]
    correct[:, 0] = True  # the root was produced by the previous step
    bad = (~correct).float() @ t["anc"].float().t()  # [B, N+1]: rejected nodes on each path
    score = torch.where(bad == 0, t["depth"] + 1, 0)
    acc = score.argmax(dim=1)
    return acc, pred.gather(1, acc[:, None]).squeeze(1)


def tree_step(engine: Engine, cache: KVCache, tree: Tree, root: Tensor, table: Tensor,
              base: Tensor, kv_len: int, sampling: Sampling,
              generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One tree step. root [B] at positions base [B]; table [B, D, R] top-R tokens of draft
    heads 2..D+1. Returns (accepted node [B], appended tokens [B, D+1], next token [B],
    next table [B, D, R])."""
    t = tree.tensors(root.device)
    nodes = table[:, t["depth"][1:] - 1, t["rank"][1:]]  # [B, N]
    inp = torch.cat([root[:, None], nodes], dim=1)  # [B, N+1]
    ctx = tree_context(cache, base, t, kv_len)
    fwd = engine.forward(inp, base[:, None] + t["depth"], ctx)
    logits = engine.logits(fwd.h0)  # [B, N+1, V]
    if sampling.greedy:
        acc, nxt = verify_greedy_tree(logits, inp, t)
    else:
        acc, nxt = accept_tree(process_logits(logits, sampling), inp, t, tree.depth, generator)
    n = t["depth"][acc]
    path = t["path_nodes"][acc]  # [B, D] node per depth along the accepted path
    tokens = torch.cat([inp.gather(1, path), nxt[:, None]], dim=1)
    tokens = tokens.scatter(1, n[:, None], nxt[:, None])  # accepted path, then the bonus
    # Next drafts from the accepted node, attending through the tree mask: before compaction.
    h = engine.drafts(fwd, acc)  # [D, B, dim]
    new_table = top_candidates(engine.draft_logits(h), table.shape[2])
    if not bool(t["in_place"][acc].all()):
        d = torch.arange(1, tree.depth + 1, device=base.device)
        cache.copy_slots(base[:, None] + path, base[:, None] + d)
    return acc, tokens, nxt, new_table


class TreeDecoder:
    """generate()'s driver for tree speculation."""

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

    def _table(self, h: Tensor) -> Tensor:
        return top_candidates(self.engine.draft_logits(h), self.tree.max_rank)

    def start(self, cache: KVCache, idx: Tensor, last: Tensor) -> Tensor:
        fwd = prefill(self.engine, cache, idx)
        h = fwd.h0[torch.arange(idx.shape[0], device=idx.device), last]
        self.tok = pick(self.engine.logits(h), self.sampling, self.generator)
        self.table = self._table(self.engine.drafts(fwd, last))
        return self.tok

    def select(self, rows: Tensor) -> None:
        self.tok, self.table = self.tok[rows], self.table[rows]

    def step(self, cache: KVCache, pos: Tensor, kv_len: int) -> StepOut:
        acc, tokens, self.tok, self.table = tree_step(
            self.engine, cache, self.tree, self.tok, self.table, pos, kv_len, self.sampling,
            self.generator)
        t = self.tree.tensors(pos.device)
        n = t["depth"][acc]
        return StepOut(tokens, n, n + t["has_children"][acc])
