"""Chain and tree speculation with token-conditioned draft heads (DeepSeek-V3-style MTP modules).

Draft head k (code index k = 1..K, K drafts) at position q reads head k-1's output h_{k-1}[q]
and the embedding of token x_{q+k}, so the drafts are made one after another: with the root
x_{q+1} (the token just produced, at position r = q+1)

    h_1[q] = head_1(h_0[q], x_{q+1})       -> draft x^_{q+2}  (argmax, or a draw from q_1)
    h_2[q] = head_2(h_1[q], x^_{q+2})      -> draft x^_{q+3}
    ...                                     (draft k+1 conditions on draft k)

Head 1 (code index 0) verifies them exactly as for the other head types (`speculate.verify`:
greedy match, or min(1, p/q) with the residual, q_k being the distribution draft k was drawn
from), so the output is plain decoding's, token for token (greedy) or in distribution.

Keys and values. The draft heads attend over earlier positions, each to its own layer of the
drafter's cache (`Drafter.cache`, one layer per draft head, slot = position). Head k's entry
at position u reads x_{u+k}, so it can be computed exactly (from accepted tokens only, as in
training) once x_{u+k} is known: for u <= r - k. Head k is trained to attend only to such
entries and to its own (`model.conditioned_visible`), so what decoding computes at q is what a
full forward over the accepted tokens, the root and the drafts computes there (tested). To keep
the cache right every step ENDS by bringing each head's exact entries up to the new frontier:

- after a step accepted a drafts, it emitted x_{p+1..p+a+1} (the drafts, then the bonus, the new
  root at r' = p+a+1; p was the old root's position);
- head 1 runs over positions p..p+a with h_0 there (from the verification forward) and the
  emitted tokens: its exact entries, and at q' = r'-1 its output h_1[q'];
- head k >= 2 runs over positions p-k+1..r'-k with the same emitted tokens and the hidden states
  head k-1 produced at those positions (the first of them in the step before: `carry`), plus
  ONE query column at q' with h_{k-1}[q'] and draft k-1: the draft it makes.

So a step costs one call per draft head over K+2 columns, in order (head k needs head k-1's
outputs). Rows accept different numbers of drafts: a row's unused columns write to slots past
its query (never attended: every query sees slots <= its own position), never to a slot that
holds something needed. Prefill does the same over the whole prompt, then the query chain.

Trees. A chain is `Tree.chain(K)`; any static tree (`tree.Tree`) decodes the same way, each
node's children drafted by the module run on THAT node's token (so siblings' subtrees differ):
the root's children come from h_1[q]; a node v at depth d >= 1 with children runs head d+1 on
(h_d of v's parent, v's token) -> the distribution its children are drawn from (greedy: its
top ranks; sampling: draws without replacement from it, verified by recursive rejection
sampling against that node's own q, as `speculate.verify` does per sibling group). All nodes
with children at one depth are query columns of ONE call of that depth's head, beside its exact
columns; each query column writes its keys/values to its own scratch slot past the frontier
(q + K + 2 + its group), which only it attends to. After verification the accepted path is a
chain again: the exact runs above read head 1's outputs along it (its nodes' columns of the
verification forward), and the engine's cache is compacted as for the other head types.

Batches with several sampling settings (the server, `serve/rows.py`): the head calls stay
batched over every row (`refresh`, `draft_tree`); only drafting runs per part of the rows
(`TreeDrafter`'s parts: settings and a random stream), between the calls of consecutive depths.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from multitoken.decoding.engine import Engine, prefill
from multitoken.decoding.sampling import Sampling, draw_distinct, pick, process_logits
from multitoken.decoding.speculate import Drafts, StepOut, verify_step
from multitoken.decoding.tree import Tree, compact_path
from multitoken.errors import MultitokenError
from multitoken.model import DecodeContext, KVCache, MultiTokenModel, conditioned_visible


def run_draft_head(model: MultiTokenModel, k: int, cache: KVCache, h: Tensor, tok: Tensor,
                   pos: Tensor, slots: Tensor, kv_len: int) -> Tensor:
    """Draft head k (code index >= 1) over columns h [B, M, D] (head k-1's outputs), tok [B, M]
    (x_{pos+k}) at positions pos [B, M], writing its keys/values to `slots` [B, M] of cache
    layer k-1 -> h_k [B, M, D]."""
    cos, sin = model.rope(pos.shape[1], pos.clamp(max=model.cfg.max_seq_len - 1))
    keys = torch.arange(kv_len, device=pos.device)
    mask = conditioned_visible(k, pos, keys, slots).unsqueeze(1)  # [B, 1, M, S]
    ctx = DecodeContext(cache, slots, mask, kv_len)
    return model.heads[k](h, model.tok_embeddings(tok), cos, sin, ctx, k - 1)


class Levels:
    """A tree by depth, for drafting one depth at a time (built once per decoder).

    groups[d]: the sibling groups (nodes with children, global group ids of `Tree.tensors`)
    whose node is at depth d, group_nodes[d] those nodes; parent[d] (d >= 1): for each, the
    place of its node's parent among groups[d-1]; kids[d]: the nodes at depth d+1, and where each one's token is in the flattened
    [B, len(groups[d]) * C] draws (sampling: draw order) or [B, len(groups[d]) * R] top ranks
    (greedy: its rank)."""

    def __init__(self, tree: Tree, device: torch.device) -> None:
        t = tree._tables
        depth, groups, parent, pos = t["depth"], t["group_node"], t["parent"], t["child_pos"]
        self.width, self.ranks = len(t["group_children"][0]), tree.max_rank
        self.n_groups, self.depth, self.size = len(groups), tree.depth, tree.size
        group_of = {j: g for g, j in enumerate(groups)}
        by_depth = [[g for g, j in enumerate(groups) if depth[j] == d] for d in range(tree.depth)]
        local = {g: i for ids in by_depth for i, g in enumerate(ids)}

        def at(xs: list[int]) -> Tensor:
            return torch.tensor(xs, dtype=torch.long, device=device)

        self.groups = [at(ids) for ids in by_depth]
        self.group_nodes = [at([groups[g] for g in ids]) for ids in by_depth]
        self.parent = [at([local[group_of[parent[groups[g]]]] for g in ids]) for ids in by_depth]
        kids = [[j for j in range(1, tree.size + 1) if depth[j] == d + 1]
                for d in range(tree.depth)]
        self.kids = [at(js) for js in kids]
        self.kid_draw = [at([local[group_of[parent[j]]] * self.width + pos[j] for j in js])
                         for js in kids]
        self.kid_rank = [at([local[group_of[parent[j]]] * self.ranks + tree.paths[j - 1][-1]
                             for j in js]) for js in kids]


# Rows of a batch (None: all of them, in order) that draft with one sampling setting and one
# random stream: generate() has one such part, the server one per group of rows (serve/rows.py).
Part = tuple[Tensor | None, Sampling, torch.Generator | None]


class Drafter(Protocol):
    """What `refresh` and `draft_tree` draft through, depth by depth: a static tree's
    `TreeDrafter`, or `dynamic.DynamicDrafter` (a tree re-shaped per step and per row)."""

    tokens: Tensor  # [B, N+1]: node 0 = the root

    @property
    def n_groups(self) -> int: ...  # sibling groups: scratch slots past q + K + 2

    @property
    def depth(self) -> int: ...

    def children(self, d: int, h: Tensor) -> None: ...

    def query(self, d: int, h: Tensor) -> tuple[Tensor, Tensor, Tensor]: ...


class TreeDrafter:
    """Draws a tree's drafts depth by depth from the draft heads' outputs at its sibling groups
    (see the module docstring): `children` fills the node tokens of one depth, `drafts` hands
    over the tree's Drafts. Each part of the rows draws with its own settings and generator,
    in the order of `parts` (a part's draws are then exactly what it would draw alone)."""

    def __init__(self, engine: Engine, levels: Levels, root: Tensor, parts: list[Part]) -> None:
        self.engine, self.levels, self.parts = engine, levels, parts
        B = root.shape[0]
        self.tokens = root.new_zeros(B, levels.size + 1)  # [B, N+1]: node 0 = the root
        self.tokens[:, 0] = root
        self.q: Tensor | None = None  # [B, G, V] when some part samples

    def children(self, d: int, h: Tensor) -> None:
        """The children of the groups at depth d from their draft head outputs h [B, G_d, D]."""
        lv = self.levels
        logits = self.engine.draft_logits(h)  # [B, G_d, V]: one unembedding for every part
        for rows, s, generator in self.parts:
            part = logits if rows is None else logits.index_select(0, rows)
            where = slice(None) if rows is None else rows[:, None]
            if s.greedy:
                table = (part.argmax(-1, keepdim=True) if lv.ranks == 1
                         else part.topk(lv.ranks, dim=-1).indices)  # [b, G_d, R]
                self.tokens[where, lv.kids[d]] = table.flatten(1)[:, lv.kid_rank[d]]
                continue
            q = process_logits(part, s)
            draws = draw_distinct(q, lv.width, generator)  # [b, G_d, C]
            self.tokens[where, lv.kids[d]] = draws.flatten(1)[:, lv.kid_draw[d]]
            if self.q is None:
                self.q = q.new_zeros(self.tokens.shape[0], lv.n_groups, q.shape[-1])
            self.q[where, lv.groups[d]] = q

    @property
    def n_groups(self) -> int:
        return self.levels.n_groups

    @property
    def depth(self) -> int:
        return self.levels.depth

    def query(self, d: int, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The query columns of draft head d+1 (d >= 1), which drafts the children of the
        groups at depth d: each group's input h_d (its parent group's column of h [B, G_{d-1},
        D], the previous head's query outputs), its node's token [B, G_d], and its global group
        id [G_d] (its scratch slot is q + K + 2 + that id)."""
        lv = self.levels
        return h[:, lv.parent[d]], self.tokens[:, lv.group_nodes[d]], lv.groups[d]

    def drafts(self) -> Drafts:
        return Drafts(self.tokens[:, 1:], self.q)


def refresh(model: MultiTokenModel, cache: KVCache, carry: list[Tensor], h0: Tensor,
            emitted: Tensor, pos: Tensor, a: Tensor, drafter: Drafter,
            depth: int | None = None) -> list[Tensor]:
    """The end of a step (module docstring): bring draft heads 1..depth (default: the tree's
    depth K) up to the new frontier, and draft the next tree (the drafter's, depth K) through
    `drafter` between the head calls (head k+1's query columns read the drafts of depth k).
    Heads past K (a server keeps the heads of its deepest tree exact while a step runs a
    shallower one) run their exact columns only.

    h0 [B, K+1, D]: head 1's outputs along the accepted path at positions pos + 0..K (pos [B]:
    the old root's); emitted [B, K+1]: the tokens the step emitted there (a [B] accepted drafts,
    then the bonus, then unused columns); carry: head k's output at its last exact position
    before this step, k = 1..depth-1 (longer is fine). Returns the next carry, k = 1..depth
    (its first entry is h_1[q], the root group's query)."""
    K = h0.shape[1] - 1
    depth = K if depth is None else depth
    B = pos.shape[0]
    rows = torch.arange(B, device=pos.device)
    col = torch.arange(K + 1, device=pos.device)  # exact-run columns i = 0..K
    q = pos + a  # the new draft position (the new root is at q + 1)
    valid = col[None] <= a[:, None]  # [B, K+1]
    garbage = q[:, None] + 1 + col[None]  # slots past q for unused columns
    scratch = q[:, None] + K + 2  # + group id: each query column's own slot
    kv = int(q.max()) + K + 2 + drafter.n_groups
    # head 1: positions p..p+a, h_0 there (chain node i sits at position p+i)
    p1 = pos[:, None] + col[None]
    h = run_draft_head(model, 1, cache, h0, emitted, p1, torch.where(valid, p1, garbage), kv)
    h_query = h[rows, a][:, None]  # [B, 1, D]: h_1[q], the root's group
    drafter.children(0, h_query)
    new_carry = [h_query[:, 0]]
    for k in range(2, depth + 1):
        pk = pos[:, None] + col[None] - k + 1  # exact positions p-k+1.. (< 0: none there)
        ok = valid & (pk >= 0)
        hin = torch.cat([carry[k - 2][:, None], h[:, :K]], 1)
        tin, pin, sin = emitted, pk.clamp(min=0), torch.where(ok, pk, garbage)
        drafts = k <= K
        if drafts:  # query columns beside the exact ones: the groups at depth k-1
            hq, tq, g = drafter.query(k - 1, h_query)
            hin = torch.cat([hin, hq], 1)
            tin = torch.cat([tin, tq], 1)
            pin = torch.cat([pin, q[:, None].expand(B, g.shape[0])], 1)
            sin = torch.cat([sin, scratch + g[None]], 1)
        out_k = run_draft_head(model, k, cache, hin, tin, pin, sin, kv)
        h, h_query = out_k[:, :K + 1], out_k[:, K + 1:]
        new_carry.append(h[rows, a])
        if drafts:
            drafter.children(k - 1, h_query)
    return new_carry


def refresh_and_draft(model: MultiTokenModel, engine: Engine, cache: KVCache, levels: Levels,
                      carry: list[Tensor], h0: Tensor, emitted: Tensor, pos: Tensor, a: Tensor,
                      sampling: Sampling,
                      generator: torch.Generator | None) -> tuple[Drafts, list[Tensor]]:
    """`refresh` for one sampling setting and generator: (the next drafts, the next carry,
    k = 1..K-1)."""
    K = h0.shape[1] - 1
    rows = torch.arange(pos.shape[0], device=pos.device)
    drafter = TreeDrafter(engine, levels, emitted[rows, a], [(None, sampling, generator)])
    new_carry = refresh(model, cache, carry, h0, emitted, pos, a, drafter)
    return drafter.drafts(), new_carry[:K - 1]


def draft_tree(model: MultiTokenModel, cache: KVCache, q: Tensor, h1: Tensor,
               drafter: Drafter) -> None:
    """The drafter's tree from h_1[q] [B, D] (q [B]: the draft positions) when no exact run
    goes with them (prefill, or a switch of tree): each depth's query columns run alone (a
    step runs them beside the heads' exact runs), writing to their scratch slots only."""
    drafter.children(0, h1[:, None])
    K, B = drafter.depth, h1.shape[0]
    kv = int(q.max()) + K + 2 + drafter.n_groups
    h = h1[:, None]
    for k in range(2, K + 1):
        hq, tok, g = drafter.query(k - 1, h)
        h = run_draft_head(model, k, cache, hq, tok, q[:, None].expand(B, g.shape[0]),
                           q[:, None] + K + 2 + g[None], kv)
        drafter.children(k - 1, h)


def prefill_draft_heads(model: MultiTokenModel, cache: KVCache, h0: Tensor, idx: Tensor,
                        last: Tensor, first: Tensor, depth: int) -> list[Tensor]:
    """Draft heads 1..depth over right-padded prompts idx [B, T] (head 1's outputs there h0
    [B, T, D]; last tokens at last [B]; the first new tokens first [B]), writing their entries
    to slots 0..T-1 of `cache`: exact for positions <= last + 1 - k (beyond: garbage, rewritten
    before anything attends to it). Returns the carry: head k's output at last + 1 - k,
    k = 1..depth (its first entry is h_1[last], the first drafts' root query)."""
    B, T = idx.shape
    rows = torch.arange(B, device=idx.device)
    seq = torch.cat([idx, torch.zeros_like(idx[:, :1])], 1)  # [B, T+1]: prompt, root
    seq[rows, last + 1] = first
    pos = torch.arange(T, device=idx.device).expand(B, T)
    h = h0
    carry: list[Tensor] = []
    for k in range(1, depth + 1):
        h = run_draft_head(model, k, cache, h, model.future_tokens(seq, k)[:, :T], pos, pos, T)
        carry.append(h[rows, (last + 1 - k).clamp(min=0)])
    return carry


def conditioned_drafts(model: MultiTokenModel, engine: Engine, cache: KVCache, h0: Tensor,
                       idx: Tensor, pos: Tensor, sampling: Sampling,
                       generator: torch.Generator | None, tree: Tree) -> Drafts:
    """The draft-head work of a step with `tree` (a chain: `Tree.chain(k)`; k = its depth)
    that accepted every draft of its top-1 path, after a forward over idx [B, m] at positions
    pos [B, m] (head 1's outputs h0 [B, m, D]); for timing (`calibrate.time_forwards`). The
    exact runs take k + 1 columns (the last ones repeated when m < k + 1). `cache`: a draft
    cache with room past pos + 2k + 2 + the tree's sibling groups."""
    B, m = idx.shape
    k = tree.depth
    levels = Levels(tree, idx.device)
    cols = torch.arange(k + 1, device=idx.device).clamp(max=m - 1)
    carry = [h0.new_zeros(B, h0.shape[-1]) for _ in range(k - 1)]
    full = torch.full((B,), k, device=idx.device)
    return refresh_and_draft(model, engine, cache, levels, carry, h0[:, cols], idx[:, cols],
                             pos[:, 0], full, sampling, generator)[0]


def path_outputs(tree: Tree, h0: Tensor, acc: Tensor) -> Tensor:
    """Head 1's outputs at a step's nodes h0 [B, N+1, D] -> along the accepted path (acc [B]:
    the deepest accepted node), in position order [B, K+1, D] (what `refresh` reads)."""
    if tree.is_chain:
        return h0
    path_nodes = tree.tensors(h0.device)["path_nodes"][acc]  # [B, K]
    path = torch.cat([torch.zeros_like(acc)[:, None], path_nodes], 1)
    return h0.gather(1, path[..., None].expand(-1, -1, h0.shape[-1]))


class ConditionedDecoder:
    """generate()'s driver for chain and tree speculation with token-conditioned heads: the
    same start / select / step as `speculate.SpeculativeDecoder` (see the module docstring)."""

    def __init__(self, model: MultiTokenModel, tree: Tree, sampling: Sampling,
                 generator: torch.Generator | None) -> None:
        if not model.conditioned:
            raise MultitokenError("ConditionedDecoder needs token_conditioned heads")
        if not 1 <= tree.depth <= model.n_future - 1:
            raise MultitokenError(f"{tree.depth} drafts deep needs {tree.depth + 1} heads; the "
                                  f"model has {model.n_future}")
        if tree.max_rank > model.cfg.vocab_size:
            raise MultitokenError(f"tree uses rank {tree.max_rank - 1}, but the vocabulary has "
                                  f"only {model.cfg.vocab_size} tokens")
        self.tree = tree
        self._init(model, tree.depth, tree.size, sampling, generator)
        self.levels = Levels(tree, self.engine.device)

    def _init(self, model: MultiTokenModel, depth: int, size: int, sampling: Sampling,
              generator: torch.Generator | None) -> None:
        """What every token-conditioned decoder keeps (`dynamic.DynamicDecoder` too)."""
        self.model, self.k = model, depth
        self.engine = Engine(model, 1)
        self.sampling, self.generator = sampling, generator
        self.width, self.depth = size + 1, depth

    def new_drafter(self, root: Tensor) -> Drafter:
        """The drafter of one step's tree from the roots [B]."""
        return TreeDrafter(self.engine, self.levels, root, [(None, self.sampling, self.generator)])

    # -- the decoder interface ----------------------------------------------------------------
    def start(self, cache: KVCache, idx: Tensor, last: Tensor) -> Tensor:
        """Prefill right-padded prompts idx [B, T] (last tokens at last [B]); returns the first
        new token [B] and keeps the first drafts."""
        B = idx.shape[0]
        fwd = prefill(self.engine, cache, idx)
        rows = torch.arange(B, device=idx.device)
        self.tok = pick(self.engine.logits(fwd.h0[rows, last]), self.sampling, self.generator)
        drafter = self.new_drafter(self.tok)
        # Room for a step's unused columns and query columns past its query (`step`).
        self.cache = self.model.new_draft_cache(B, cache.max_len + self.k + 2 + drafter.n_groups)
        self.q = last  # the position every draft is made at
        carry = prefill_draft_heads(self.model, self.cache, fwd.h0, idx, last, self.tok, self.k)
        self.carry = carry[:self.k - 1]  # head k's output at its last exact position, k < K
        draft_tree(self.model, self.cache, self.q, carry[0], drafter)
        self.drafts = drafter.drafts()
        return self.tok

    def select(self, rows: Tensor) -> None:
        self.tok, self.drafts, self.q = self.tok[rows], self.drafts.select(rows), self.q[rows]
        self.carry = [c[rows] for c in self.carry]
        self.cache.select_rows(rows)

    def step(self, cache: KVCache, pos: Tensor, kv_len: int) -> StepOut:
        """One step from the roots at positions pos [B] (see the module docstring): verify the
        drafts, then bring the draft heads up to the new frontier and draft the next tree."""
        out, nxt, h0 = self.verify(cache, pos, kv_len)
        drafter = self.new_drafter(nxt)
        carry = refresh(self.model, self.cache, self.carry, h0, out.tokens, pos, out.n, drafter)
        self.carry, self.drafts, self.tok = carry[:self.k - 1], drafter.drafts(), nxt
        self.q = pos + out.n
        return out

    def verify(self, cache: KVCache, pos: Tensor, kv_len: int) -> tuple[StepOut, Tensor, Tensor]:
        """Feed and verify the tree, move the accepted path's keys/values into place: (what
        the step appends, the next root [B], head 1's outputs along the path [B, K+1, D])."""
        out, nxt, fwd = verify_step(self.engine, cache, self.tree, self.tok, self.drafts, pos,
                                    kv_len, self.sampling, self.generator)
        acc = out.node
        assert acc is not None
        h0 = path_outputs(self.tree, fwd.h0, acc)
        compact_path(cache, self.tree, pos, acc)
        return out, nxt, h0
