"""Dynamic draft trees for token-conditioned heads (EAGLE-2 style): re-shaped at every step and
for every row by the drafts' cumulative draft probability.

A shape (`DynamicShape`: depth K, top_k c, beam W <= c) fixes how many nodes each depth has,
not where they hang. Every step, for every row:

- depth 1: the root's c children, from head 1's query output h_1[q] (c draws without
  replacement from q_1 when sampling, the top c under greedy);
- depth d = 2..K: the W best-scored nodes of depth d-1 are expanded; ONE call of draft head d
  over their W query columns (each: its parent's h_{d-1} and its own token, as for static
  trees in `conditioned.py`) gives each of them c children.

The score. Greedy: EAGLE-2's cumulative draft probability, the product of the draft heads'
(temperature-1 softmax) probabilities along the node's path. Sampling: a node's siblings are
draws without replacement, verified in draw order, and a well-fitted draft's FIRST draw is
accepted with probability near sum(min(p, q)) whatever its own q(x) (min(1, p(x)/q(x)) is near 1
when q is near p); a later draw is only tried after the earlier ones were rejected. Ranking by
q alone expands the likelier token even where the first draw, less likely, is the one that gets
accepted: measured on code-n4-tc at T=0.8, a 2x1 tree so ranked gave 3.41 tokens/forward, fewer
than the plain chain's 3.50 (docs/decoding.md). So under sampling the score counts the draws
on the path that were not their parent's first (fewer first, `LATER_DRAW`), then the
cumulative draft probability (of the processed q each was drawn from).

So a tree has N = c + (K-1) W c nodes, the same for every row (one forward size for the
batch); what differs per row and step is which node each sibling group hangs off. A row whose
first draft is certain grows a deep narrow tree along it; a row with two likely first tokens
spends its beam on both.

Layout. Sibling group g (G = 1 + (K-1) W groups: group 0 is the root's, groups 1 + (d-1) W ..
d W hang off nodes of depth d) has children 1 + g c .. g c + c, in draw order (sampling) or rank
order (greedy); so N = G c. Static: each node's depth, group (`parent_group`) and place among
its siblings (`child_pos`). Per row: `group_node` [B, G], the node each group hangs off, and
from it the parents, paths and tree mask (`RowTree`). The tree sits in cache slots base..base+N
(root first) at positions base + depth, as static trees do (`tree.py`); the accepted path is
then moved to its position slots.

Exactness. Greedy: any tree gives plain greedy's tokens (verification keeps the deepest path
that head 1's argmaxes agree with). Sampling: the recursive rejection rule at a node
(`sampling.accept_drafts`) is exact for any number of children that is fixed before they are
drawn. Here whether a node gets children depends only on tokens drawn before them (its own,
its ancestors', its cousins'), never on its children's draws, and every drawn node is
verified, in draw order. EAGLE-2 also re-ranks all drafted nodes after drafting and verifies
only the best N; that choice reads each node's own draw and would bias sampling, so it is not
done here (each row's tree keeps its fixed size).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from multitoken.decoding.conditioned import ConditionedDecoder
from multitoken.decoding.engine import Engine
from multitoken.decoding.sampling import (
    Sampling,
    accept_drafts,
    draw_distinct,
    process_logits,
    sample,
)
from multitoken.decoding.speculate import Drafts, StepOut
from multitoken.errors import ConfigError, MultitokenError
from multitoken.model import DecodeContext, KVCache, MultiTokenModel

# Sampling: a node's score loses this much per draw on its path that was not its parent's
# first: it outranks every draft probability, so paths of first draws are expanded first.
LATER_DRAW = 1e3


@dataclass(frozen=True)
class DynamicShape:
    """depth K drafts deep; top_k: children per expanded node; beam: nodes expanded per depth
    (1 <= beam <= top_k). (1, 1) is a chain of K."""

    depth: int
    top_k: int = 2
    beam: int = 2

    def __post_init__(self) -> None:
        if self.depth < 1 or self.top_k < 1 or not 1 <= self.beam <= self.top_k:
            raise MultitokenError(f"dynamic tree {self.label}: needs depth >= 1, top_k >= 1 "
                                  "and 1 <= beam <= top_k")

    @classmethod
    def parse(cls, text: str, depth: int) -> DynamicShape:
        """'TOP_KxBEAM' (e.g. '2x2') at `depth`."""
        try:
            top_k, beam = (int(x) for x in text.lower().split("x"))
        except ValueError:
            raise MultitokenError(f"dynamic tree {text!r}: expected TOP_KxBEAM, e.g. 2x2") from None
        return cls(depth, top_k, beam)

    @property
    def label(self) -> str:
        return f"{self.top_k}x{self.beam}"

    @property
    def n_groups(self) -> int:
        return 1 + (self.depth - 1) * self.beam

    @property
    def size(self) -> int:  # nodes besides the root
        return self.n_groups * self.top_k

    def groups_at(self, d: int) -> range:
        """The sibling groups that hang off nodes of depth d (0 = the root's)."""
        return range(1) if d == 0 else range(1 + (d - 1) * self.beam, 1 + d * self.beam)

    def nodes_at(self, d: int) -> range:
        """The nodes of depth d >= 1: the children of the groups at depth d-1."""
        g = self.groups_at(d - 1)
        return range(1 + g.start * self.top_k, 1 + g.stop * self.top_k)

    @cached_property
    def _tables(self) -> dict[str, list]:
        c, n = self.top_k, self.size + 1
        depth = [0] * n
        for d in range(1, self.depth + 1):
            for j in self.nodes_at(d):
                depth[j] = d
        return {
            "depth": depth,
            "parent_group": [0] + [(j - 1) // c for j in range(1, n)],
            "child_pos": [-1] + [(j - 1) % c for j in range(1, n)],
            "group_children": [[1 + g * c + i for i in range(c)] for g in range(self.n_groups)],
            # node j's ancestor at depth d (1..K) is its (depth_j - d)-th ancestor
            "path_step": [[max(depth[j] - d, 0) for d in range(1, self.depth + 1)]
                          for j in range(n)],
            "path_valid": [[d <= depth[j] for d in range(1, self.depth + 1)] for j in range(n)],
        }

    def tensors(self, device: torch.device) -> dict[str, Tensor]:
        return {k: torch.tensor(v, device=device) for k, v in self._tables.items()}


def parse_shapes(text: str, model: MultiTokenModel) -> list[DynamicShape]:
    """Comma-separated TOP_KxBEAM shapes (`--dynamic`), all of the model's draft heads deep;
    checked before any decoding: a model without token-conditioned heads is refused."""
    shapes = [DynamicShape.parse(x.strip(), model.n_future - 1)
              for x in text.split(",") if x.strip()]
    if shapes and not model.conditioned:
        raise ConfigError("--dynamic: dynamic trees need token_conditioned heads")
    return shapes


class RowTree:
    """One step's trees, one per row, from group_node [B, G] (the node each sibling group hangs
    off; group 0: the root): parents, paths, the tree mask, verification and what follows it."""

    def __init__(self, shape: DynamicShape, t: dict[str, Tensor], group_node: Tensor) -> None:
        self.shape, self.t = shape, t
        B, n, K = group_node.shape[0], shape.size + 1, shape.depth
        self.group_node = group_node
        self.parent = group_node[:, t["parent_group"]]  # [B, N+1] (the root's: itself)
        anc = [torch.arange(n, device=group_node.device).expand(B, n)]
        for _ in range(K):
            anc.append(self.parent.gather(1, anc[-1]))
        self.anc = torch.stack(anc, 2)  # [B, N+1, K+1]: node, parent, grandparent, ...
        step = t["path_step"].expand(B, n, K)
        d = torch.arange(1, K + 1, device=group_node.device)
        # [B, N+1, K]: node j's path by depth; past its depth: slot index d (copies onto itself)
        self.path_nodes = torch.where(t["path_valid"], self.anc.gather(2, step), d)
        self.node_group = torch.full((B, n), -1, dtype=torch.long, device=group_node.device)
        self.node_group.scatter_(1, group_node, torch.arange(shape.n_groups,
                                                             device=group_node.device).expand(B, -1))

    def context(self, cache: KVCache, base: Tensor, kv_len: int) -> DecodeContext:
        """Slots base..base+N hold the trees (root at base [B]); each node sees the slots before
        the root and its own path (its ancestors: `anc`)."""
        B, n = self.anc.shape[:2]
        on_path = torch.zeros(B, n, n + 2, dtype=torch.bool, device=base.device)
        on_path.scatter_(2, self.anc + 1, True)  # column 1 + i: node i; column 0: the prefix
        on_path[..., 0] = True
        keys = torch.arange(kv_len, device=base.device)
        col = (keys[None, :] - base[:, None] + 1).clamp_(0, n + 1)  # [B, S]: n + 1 = past it
        mask = on_path.gather(2, col[:, None, :].expand(B, n, kv_len))  # [B, N+1, S]
        return DecodeContext(cache, base[:, None] + torch.arange(n, device=base.device),
                             mask.unsqueeze(1), kv_len)

    def deepest(self, accepted: Tensor) -> Tensor:
        """accepted [B, N+1] (per node; the root's entry is ignored) -> the deepest node whose
        whole path was accepted [B] (unique: at most one child per node is accepted)."""
        ok = accepted.clone()
        ok[:, 0] = True
        reached = ok
        for _ in range(self.shape.depth):  # a node is reached when it and its parent are
            reached = ok & reached.gather(1, self.parent)
        score = torch.where(reached, self.t["depth"], -1)
        return score.argmax(1)

    def verify(self, logits: Tensor, tok: Tensor, q: Tensor | None, sampling: Sampling,
               generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Head 1's logits at every node [B, N+1, V], the node tokens [B, N+1], the groups'
        draft distributions q [B, G, V] (sampling) -> (the deepest accepted node, the next
        token), by the rules of `speculate.verify`."""
        t = self.t
        if sampling.greedy:
            pred = logits.argmax(-1)  # [B, N+1]
            acc = self.deepest(tok == pred.gather(1, self.parent))
            return acc, pred.gather(1, acc[:, None]).squeeze(1)
        assert q is not None
        probs = process_logits(logits, sampling)  # [B, N+1, V]
        V = probs.shape[-1]
        at_groups = probs.gather(1, self.group_node[..., None].expand(-1, -1, V))  # [B, G, V]
        kid_tok = tok[:, t["group_children"]]  # [B, G, C]
        valid = torch.ones_like(t["group_children"], dtype=torch.bool)
        choice, stop = accept_drafts(at_groups, q, kid_tok, valid, generator)
        acc = self.deepest(choice[:, t["parent_group"]] == t["child_pos"])
        rows = torch.arange(tok.shape[0], device=tok.device)
        g = self.node_group[rows, acc]
        final = torch.where((g >= 0)[:, None], stop[rows, g.clamp(min=0)], probs[rows, acc])
        return acc, sample(final, generator)

    def accept(self, cache: KVCache, base: Tensor, inp: Tensor, h0: Tensor, nxt: Tensor,
               acc: Tensor) -> tuple[StepOut, Tensor]:
        """After verification, for the accepted nodes acc [B] (roots at base [B]; the fed
        tokens inp [B, N+1], head 1's outputs there h0 [B, N+1, D], the next tokens nxt [B]):
        move the accepted paths' keys/values from node slots to position slots and return
        (what the step appends: the path's tokens then nxt, head 1's outputs along the path
        [B, K+1, D], root first; past the path whatever: `refresh` does not read it)."""
        K, n = self.shape.depth, self.shape.size + 1
        rows = torch.arange(acc.shape[0], device=acc.device)
        d = torch.arange(1, K + 1, device=acc.device)
        src = self.path_nodes[rows, acc]  # [B, K]; past the path: slot index d
        depth = self.t["depth"][acc]
        col = torch.arange(K + 1, device=acc.device)
        path = torch.cat([src, torch.zeros_like(acc)[:, None]], 1)
        idx = torch.where(col[None] < depth[:, None], path, n)  # n: the bonus
        tokens = torch.cat([inp, nxt[:, None]], 1).gather(1, idx)
        tried = depth + (self.node_group[rows, acc] >= 0).long()
        along = torch.cat([torch.zeros_like(acc)[:, None], src], 1)
        h_path = h0.gather(1, along[..., None].expand(-1, -1, h0.shape[-1]))
        if not bool((src == d).all()):
            cache.copy_slots(base[:, None] + src, base[:, None] + d)
        return StepOut(tokens, depth, tried, acc), h_path


class DynamicDrafter:
    """Drafts a dynamic tree depth by depth (the `conditioned.Drafter` protocol): `children`
    draws the children of one depth's groups and scores them, `query` picks the next depth's
    groups (the beam) and hands over their query columns."""

    def __init__(self, engine: Engine, shape: DynamicShape, t: dict[str, Tensor], root: Tensor,
                 sampling: Sampling, generator: torch.Generator | None) -> None:
        self.engine, self.shape, self.t = engine, shape, t
        self.sampling, self.generator = sampling, generator
        B, n = root.shape[0], shape.size + 1
        self.tokens = root.new_zeros(B, n)
        self.tokens[:, 0] = root
        # the nodes' scores (module docstring); float64: LATER_DRAW must not swamp log q's bits
        self.score = torch.zeros(B, n, dtype=torch.float64, device=root.device)
        self.group_node = root.new_zeros(B, shape.n_groups)
        self.q: Tensor | None = None

    @property
    def n_groups(self) -> int:
        return self.shape.n_groups

    @property
    def depth(self) -> int:
        return self.shape.depth

    def children(self, d: int, h: Tensor) -> None:
        """The children of the groups at depth d from their draft head outputs h [B, G_d, D]."""
        groups = self.shape.groups_at(d)
        g = slice(groups.start, groups.stop)
        kids = self.t["group_children"][g].flatten()
        logits = self.engine.draft_logits(h)  # [B, G_d, V]
        c = self.shape.top_k
        if self.sampling.greedy:
            logp, draws = logits.float().log_softmax(-1).topk(c, dim=-1)  # [B, G_d, C]
        else:
            q = process_logits(logits, self.sampling)
            draws = draw_distinct(q, c, self.generator)
            # Draw order first (see the module docstring), then the draft probability.
            later = torch.arange(c, device=q.device) > 0
            logp = q.gather(-1, draws).double().log() - LATER_DRAW * later
            if self.q is None:
                self.q = q.new_zeros(q.shape[0], self.shape.n_groups, q.shape[-1])
            self.q[:, g] = q
        self.tokens[:, kids] = draws.flatten(1)
        parent_score = self.score.gather(1, self.group_node[:, g])  # [B, G_d]
        self.score[:, kids] = (parent_score[..., None] + logp.to(self.score.dtype)).flatten(1)

    def query(self, d: int, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The beam at depth d >= 1: its W best-scored nodes become the groups at depth d;
        returns their query columns (parent group's h [B, G_{d-1}, D] column, own token) and
        global group ids, as `TreeDrafter.query`."""
        nodes = self.shape.nodes_at(d)
        best = self.score[:, nodes.start:nodes.stop].topk(self.shape.beam, dim=1).indices
        chosen = best + nodes.start  # [B, W], best first
        groups = self.shape.groups_at(d)
        self.group_node[:, groups.start:groups.stop] = chosen
        local = self.t["parent_group"][chosen] - self.shape.groups_at(d - 1).start
        hq = h.gather(1, local[..., None].expand(-1, -1, h.shape[-1]))
        ids = torch.arange(groups.start, groups.stop, device=h.device)
        return hq, self.tokens.gather(1, chosen), ids

    def drafts(self) -> Drafts:
        return Drafts(self.tokens[:, 1:], self.q, self.group_node)


class DynamicDecoder(ConditionedDecoder):
    """generate()'s driver for dynamic trees (module docstring) with token-conditioned heads:
    `ConditionedDecoder`'s start, select and step (prefill, the draft heads' cache and carry,
    their refresh), its own drafter and verification."""

    def __init__(self, model: MultiTokenModel, shape: DynamicShape, sampling: Sampling,
                 generator: torch.Generator | None) -> None:
        # (not ConditionedDecoder.__init__: that one takes a static tree)
        if not model.conditioned:
            raise MultitokenError("dynamic trees need token_conditioned heads: parallel heads "
                                  "draft the same children for every node")
        if shape.depth > model.n_future - 1:
            raise MultitokenError(f"{shape.depth} drafts deep needs {shape.depth + 1} heads; the "
                                  f"model has {model.n_future}")
        if shape.top_k > model.cfg.vocab_size:
            raise MultitokenError(f"dynamic tree top_k {shape.top_k} exceeds the vocabulary "
                                  f"({model.cfg.vocab_size} tokens)")
        self.shape = shape
        self._init(model, shape.depth, shape.size, sampling, generator)
        self.t = shape.tensors(self.engine.device)

    def new_drafter(self, root: Tensor) -> DynamicDrafter:
        return DynamicDrafter(self.engine, self.shape, self.t, root, self.sampling, self.generator)

    def verify(self, cache: KVCache, pos: Tensor, kv_len: int) -> tuple[StepOut, Tensor, Tensor]:
        """`ConditionedDecoder.verify` for the rows' own trees (`RowTree`)."""
        assert self.drafts.group_node is not None
        rt = RowTree(self.shape, self.t, self.drafts.group_node)
        inp = torch.cat([self.tok[:, None], self.drafts.tokens], 1)  # [B, N+1]
        fwd = self.engine.forward(inp, pos[:, None] + self.t["depth"],
                                  rt.context(cache, pos, kv_len))
        acc, nxt = rt.verify(self.engine.logits(fwd.h0), inp, self.drafts.q, self.sampling,
                             self.generator)
        out, h0 = rt.accept(cache, pos, inp, fwd.h0, nxt, acc)
        return out, nxt, h0
