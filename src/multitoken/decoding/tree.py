"""Draft trees: which draft tokens one speculation step verifies, and how they attend.

A static tree of candidates: a node is a path (r_1, ..., r_d), meaning "child r_1 of the root,
then child r_2 of that node, ...": node (r_1..r_d) holds a draft for the token d places after
the root, proposed by draft head d+1 at the last accepted position. What child r is depends on
the decoding (`speculate.propose`):

- greedy: rank r of the draft head, i.e. "rank r_1 of head 2, then rank r_2 of head 3, ...";
- sampling: the (r+1)-th of the node's children drawn without replacement from the draft head's
  processed distribution. The tree then gives the shape only (how many children each node has);
  the tokens are drawn anew at every step, independently for every node's children.

A chain of k drafts (blockwise parallel decoding, Stern et al. 2018) is the tree
`Tree.chain(k)`: (0,), (0, 0), ..., one draft from each of heads 2..k+1. The root is the token
just produced (not yet fed, at position p). One forward feeds [root, nodes...] with

    positions   p + depth(node)          (tree positions: siblings share a position)
    slots       p, p+1, ..., p+N         (consecutive cache slots, one per node)
    mask        the accepted prefix (slots < p) + the node's ancestors and itself

After verification the accepted path's keys/values move from their node slots to their position
slots (`KVCache.copy_slots`). The top-1 chain sits right after the root (paths are kept in
depth-first order), so a path along it -- every path of a chain -- is already in place: for a
chain, slots == positions and the mask is causal in positions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cached_property

import torch
from torch import Tensor

from multitoken.errors import MultitokenError
from multitoken.model import DecodeContext, KVCache, causal_context

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
        # Only the top-1 drafts: one child per node. Its accepted path is always in place.
        self.is_chain = all(r == 0 for p in self.paths for r in p)
        self._tensors: dict[torch.device, dict[str, Tensor]] = {}

    @classmethod
    def chain(cls, k: int) -> Tree:
        """k drafts in a row: the top-1 draft of each of heads 2..k+1."""
        return cls([(0,) * k])

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
        child_pos = [-1] + [kids[parent[j]].index(j) for j in range(1, n)]
        groups = [j for j in range(n) if kids[j]]  # the nodes with children
        group = {j: g for g, j in enumerate(groups)}
        return {
            "depth": [len(p) for p in nodes],
            "parent": parent,
            "anc": anc,
            "path_nodes": path_nodes,
            "in_place": [pn == list(range(1, D + 1)) for pn in path_nodes],
            "children": [c + [-1] * (width - len(c)) for c in kids],
            # j's place among its parent's children (the root: -1)
            "child_pos": child_pos,
            # Sibling groups (sampling draws and verifies a node's children together): the
            # nodes with children, their depths (= the draft distribution their children are
            # drawn from), their children; each node's group (-1: a leaf) and its parent's
            # group (the root: 0, never read); node j's draw among [B, groups * width] draws.
            "group_node": groups,
            "group_depth": [len(nodes[j]) for j in groups],
            "group_children": [kids[j] + [-1] * (width - len(kids[j])) for j in groups],
            "node_group": [group.get(j, -1) for j in range(n)],
            "parent_group": [0] + [group[parent[j]] for j in range(1, n)],
            "draw_index": [group[parent[j]] * width + child_pos[j] for j in range(1, n)],
            # node j's token in the draft table [B, D, max_rank] flattened to [B, D * max_rank]
            "table_index": [(len(p) - 1) * self.max_rank + p[-1] for p in self.paths],
            # What a step that accepts node j appends, as indices into [node tokens, next token]:
            # j's path (its depth(j) drafts), then the next token (index n), then padding; and
            # two more columns: depth(j) (drafts accepted) and the drafts verified (j's path,
            # plus its children if any).
            "emit": [path_nodes[j][: len(p)] + [n] * (D + 1 - len(p))
                     + [len(p), len(p) + int(bool(kids[j]))] for j, p in enumerate(nodes)],
        }

    @property
    def max_rank(self) -> int:
        return max(max(p) for p in self.paths) + 1

    def tensors(self, device: torch.device) -> dict[str, Tensor]:
        """The tables on `device` (node 0 = the root; built once per device):

        depth, parent [N+1]; anc [N+1, N+1] (anc[j, i]: node i is on node j's path, j
        included); path_nodes [N+1, D] (the nodes of j's path by depth, padded with slot
        indices); in_place [N+1] (j's path needs no compaction); children [N+1, C] (-1 = none),
        child_pos [N+1] (j's place among its siblings); emit [N+1, D+3]; table_index [N] (each
        node's entry in the greedy draft table flattened); the sibling groups (the G nodes with
        children): group_node, group_depth [G], group_children [G, C], group_valid and
        group_child_index [G, C] (group_children >= 0, clamped to 0), node_group and
        parent_group [N+1], draw_index [N]; plus, for the step's arithmetic: mask_table
        [N+1, N+3] (the mask row of each node over slot - root slot + 1, clamped to 0..N+2:
        column 0 = the prefix (True), 1..N+1 = the tree, N+2 = past it (False)), path_t
        [N+1, N+1] (anc transposed, float, without the root), path_bias [N+1] (see
        `deepest_accepted`) and arange [N+1].
        """
        if device not in self._tensors:
            t = {k: torch.tensor(v, device=device) for k, v in self._tables.items()}
            n = self.size + 1
            ones = torch.ones(n, 1, dtype=torch.bool, device=device)
            t["mask_table"] = torch.cat([ones, t["anc"], ~ones], dim=1)
            t["group_valid"] = t["group_children"] >= 0
            t["group_child_index"] = t["group_children"].clamp(min=0)
            path_t = t["anc"].float().t().contiguous()
            path_t[0] = 0.0  # the root was produced by the previous step: not verified
            t["path_t"] = path_t
            t["path_bias"] = -n * t["depth"].float()
            t["arange"] = torch.arange(n, device=device)
            self._tensors[device] = t
        return self._tensors[device]


def grow_tree(prob: Callable[[Path], float], max_nodes: int, max_depth: int,
              max_rank: int) -> list[Path]:
    """Greedily add the candidate with the largest P(accepted); returns the paths in order
    added, so every prefix of the result is itself a tree (the best of each size).

    A candidate is a child of a chosen node (or of the root) whose earlier siblings are all
    chosen: node (..., r) only after (..., r - 1). Every prefix of the result is thus closed
    under parents and under earlier siblings, which sampling needs: there, child r of a node is
    the (r+1)-th draw without replacement, and a tree holding it must hold draws 1..r too (see
    `calibrate`). Under greedy, where P(rank r) rarely grows with r, this is the same choice.
    """
    chosen: list[Path] = []
    frontier = {(0,)}
    for _ in range(max_nodes):
        if not frontier:
            break
        best = max(frontier, key=lambda p: (prob(p), [-r for r in p]))
        if prob(best) <= 0.0:
            break
        chosen.append(best)
        frontier.remove(best)
        if best[-1] + 1 < max_rank:
            frontier.add(best[:-1] + (best[-1] + 1,))  # its next sibling
        if len(best) < max_depth:
            frontier.add(best + (0,))  # its first child
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


def tree_context(cache: KVCache, base: Tensor, tree: Tree, kv_len: int) -> DecodeContext:
    """Slots base..base+N hold the tree (root at base [B]); each node sees the slots before the
    root and its own path."""
    t = tree.tensors(base.device)
    slots = base[:, None] + t["arange"]  # [B, N+1]
    if tree.is_chain:  # the same mask, built with fewer ops: a chain's nodes see slots <= own
        return causal_context(cache, slots, kv_len)
    keys = torch.arange(1, kv_len + 1, device=base.device)
    col = (keys[None, :] - base[:, None]).clamp_(0, tree.size + 2)  # [B, S]: see mask_table
    mask = t["mask_table"][:, col].permute(1, 0, 2)  # [B, N+1, S]
    return DecodeContext(cache, slots, mask.unsqueeze(1), kv_len)


def compact_path(cache: KVCache, tree: Tree, base: Tensor, acc: Tensor) -> None:
    """Move the accepted path's keys/values from their node slots to their position slots:
    rows whose deepest accepted node acc [B] lies off the top-1 chain (root at base [B]).
    Nothing moves for a chain, or when every row's path is in place already."""
    if tree.is_chain:
        return
    t = tree.tensors(base.device)
    if not bool(t["in_place"][acc].all()):
        d = torch.arange(1, tree.depth + 1, device=base.device)
        cache.copy_slots(base[:, None] + t["path_nodes"][acc], base[:, None] + d)


def deepest_accepted(accepted: Tensor, t: dict[str, Tensor]) -> Tensor:
    """The deepest node whose whole path was accepted: accepted [B, N+1] (bool, per node; the
    root's entry is ignored, it was produced by the previous step) -> node [B]. The verifiers
    accept at most one child per node, so this node is unique."""
    # score = (N+2) (accepted nodes on the path - depth) + depth: the depth on a fully
    # accepted path (the root's is 0), negative elsewhere
    n = t["path_t"].shape[0]
    return torch.addmm(t["path_bias"], accepted.float(), t["path_t"], alpha=n + 1).argmax(dim=1)
