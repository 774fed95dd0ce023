"""Row-based batched decoding for the server: one KV-cache row per running sequence, rows that
join and leave between steps, and per-row sampling settings.

`generate()` decodes a fixed batch with one `Sampling` and one generator. A server batch is
different: requests arrive and leave at any step, and every request has its own temperature,
top-p, top-k and seed. `RowDecoder` holds what `PlainDecoder` / `SpeculativeDecoder` hold
(the root token and the drafts per sequence) in preallocated per-row buffers, and runs the
same arithmetic:

- the forward of a step runs once over the whole running batch (rows 0..n-1 of the cache, the
  "dense prefix"), exactly as `speculate.verify_step` feeds it;
- verification and drafting (`speculate.verify`, `speculate.propose`, `sampling.pick`) run per
  *group* of rows that share settings and a random stream: all greedy rows together (greedy
  uses no randomness), the unseeded sampled rows of one setting together (on the server's
  shared generator), and each seeded row alone on its own generator. So a seeded request draws
  exactly the numbers it would draw alone, whatever else is in the batch, and a request served
  alone makes the very calls `generate()` makes, in the same order (same tokens: tested).

Sampling stays exact per row: `verify` applies min(1, p/q) with the residual to each group with
that group's own p and q (see `decoding/sampling.py`).

Trees: `trees[0]` is the base tree, the others per-setting ones; each step runs the one the
scheduler names, and rows whose drafts were made for another tree draft again first (from the
draft heads' outputs kept per row; see the scheduler's docstring).

Token-conditioned heads (`model.conditioned`): the draft heads run in `decoding.conditioned`,
each step ending with their batched calls over every row (`conditioned.refresh`) and drafting
per group between them (`TreeDrafter`'s parts); their own cache, carry vectors and draft
position are kept per row beside the rows' KV cache (`ConditionedRows`).

Rows: the running sequences occupy rows 0..n-1. A finishing row is replaced by the last one
(`move`: one row of cache copied, not the whole batch), a newcomer takes row n. Prefill of
newcomers runs on a view of their rows only, so it never touches running rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from multitoken.decoding.conditioned import (
    Levels,
    Part,
    TreeDrafter,
    draft_tree,
    path_outputs,
    prefill_draft_heads,
    refresh,
)
from multitoken.decoding.engine import Engine
from multitoken.decoding.generate import decode_one
from multitoken.decoding.sampling import Sampling, pick
from multitoken.decoding.speculate import Drafts, propose, verify
from multitoken.decoding.tree import Tree, compact_path, tree_context
from multitoken.model import KVCache, MultiTokenModel, causal_context


def cache_rows(cache: KVCache, start: int, stop: int) -> KVCache:
    """A KVCache over rows start..stop-1 of `cache`, sharing its storage (writes go through).
    The engine indexes a cache's rows from 0, so a sub-batch needs such a view."""
    view = KVCache.__new__(KVCache)
    view.k, view.v = cache.k[:, start:stop], cache.v[:, start:stop]
    view.max_len = cache.max_len
    view._rows = cache._rows[: stop - start]
    return view


@dataclass
class Group:
    """Rows that verify and draft together: the same settings and the same random stream."""

    rows: list[int]  # indices into the batch being processed
    sampling: Sampling
    generator: torch.Generator | None


def _index(rows: list[int], n: int, device: torch.device) -> Tensor | None:
    """None when the group is the whole batch in order (no gather: the same tensors as solo)."""
    if rows == list(range(n)):
        return None
    return torch.tensor(rows, device=device)


def _take(x: Tensor, idx: Tensor | None, dim: int = 0) -> Tensor:
    return x if idx is None else x.index_select(dim, idx)


def _parts(groups: list[Group], n: int, device: torch.device) -> list[Part]:
    return [(_index(g.rows, n, device), g.sampling, g.generator) for g in groups]


class ConditionedRows:
    """Per-row state of token-conditioned draft heads (`decoding/conditioned.py`) over
    `max_rows` rows: their own KV cache (one layer per draft head), the carry (head k's output
    at its last exact position, k = 1..K; carry[0] = h_1[q], the root group's query) and the
    draft position q. K: the deepest tree's depth; every head it uses is kept exact at every
    step, whatever tree the step runs, so a switch of tree finds every head's cache complete."""

    def __init__(self, model: MultiTokenModel, engine: Engine, trees: list[Tree],
                 max_rows: int) -> None:
        self.model, self.engine = model, engine
        device = engine.device
        self.levels = [Levels(t, device) for t in trees]
        self.depth = max(t.depth for t in trees)
        groups = max(lv.n_groups for lv in self.levels)
        # A row's last step feeds its root at a position < max_seq_len and may accept K
        # drafts, so its next draft position q can reach max_seq_len + K - 2; past q the step
        # writes its unused and query columns (`refresh`): up to q + K + 2 + groups.
        self.cache = model.new_draft_cache(max_rows, model.cfg.max_seq_len + 2 * self.depth
                                           + groups)
        self.carry = torch.zeros(self.depth, max_rows, model.cfg.dim, dtype=engine.dtype,
                                 device=device)
        self.q = torch.zeros(max_rows, dtype=torch.long, device=device)
        # Chunked prefill: the chunks' tokens and head 1's outputs, per first row, until the
        # last chunk; then the draft heads run over the whole prompt (`prefill`).
        self.held: dict[int, tuple[list[Tensor], list[Tensor]]] = {}

    def move(self, src: int, dst: int) -> None:
        c = self.cache
        c.k[:, dst] = c.k[:, src]
        c.v[:, dst] = c.v[:, src]
        self.carry[:, dst] = self.carry[:, src]
        self.q[dst] = self.q[src]

    def hold(self, start: int, idx: Tensor, h0: Tensor, offset: int) -> None:
        """Keep a chunk of a long prompt (idx [1, T] at offset.., head 1's outputs h0)."""
        if offset == 0:
            self.held[start] = ([], [])
        toks, hs = self.held[start]
        toks.append(idx)
        hs.append(h0)

    def prefill(self, start: int, idx: Tensor, h0: Tensor, offset: int, last: Tensor,
                first: Tensor, parts: list[Part], ti: int) -> Drafts:
        """The draft heads over newcomers' prompts (rows start..start+m-1; the last piece of a
        chunked one at offset > 0), then their first drafts for trees[ti]."""
        if offset > 0:  # the held chunks before this one
            toks, hs = self.held.pop(start)
            idx, h0, last = torch.cat([*toks, idx], 1), torch.cat([*hs, h0], 1), last + offset
        m = idx.shape[0]
        for r in range(start, start + m):  # e.g. a cancelled long prompt's chunks
            self.held.pop(r, None)
        cache = cache_rows(self.cache, start, start + m)
        carry = prefill_draft_heads(self.model, cache, h0, idx, last, first, self.depth)
        self.carry[:, start:start + m] = torch.stack(carry)
        self.q[start:start + m] = last
        drafter = TreeDrafter(self.engine, self.levels[ti], first, parts)
        draft_tree(self.model, cache, last, carry[0], drafter)
        return drafter.drafts()

    def step(self, n: int, ti: int, h0: Tensor, emitted: Tensor, pos: Tensor, a: Tensor,
             parts: list[Part]) -> Drafts:
        """The end of a step of rows 0..n-1 (`conditioned.refresh`): h0 [n, K+1, D] along the
        accepted paths, emitted [n, K+1], pos [n] the old roots' positions, a [n] the drafts
        accepted. Returns the next drafts for trees[ti]."""
        rows = torch.arange(n, device=pos.device)
        drafter = TreeDrafter(self.engine, self.levels[ti], emitted[rows, a], parts)
        carry = refresh(self.model, cache_rows(self.cache, 0, n), list(self.carry[:, :n]), h0,
                        emitted, pos, a, drafter, self.depth)
        self.carry[:, :n] = torch.stack(carry)
        self.q[:n] = pos + a
        return drafter.drafts()

    def redraft(self, n: int, ti: int, root: Tensor, parts: list[Part]) -> Drafts:
        """Drafts for trees[ti] of rows 0..n-1 from their kept h_1[q]: only the rows in
        `parts` draw (the others' query columns write to their scratch slots only, which
        nothing else reads), so the caller keeps those rows' drafts only."""
        drafter = TreeDrafter(self.engine, self.levels[ti], root, parts)
        draft_tree(self.model, cache_rows(self.cache, 0, n), self.q[:n], self.carry[0, :n],
                   drafter)
        return drafter.drafts()


@dataclass
class StepResult:
    tokens: list[list[int]]  # per row: accepted drafts then the bonus token
    tried: list[int]  # per row: drafts verified (acceptance by depth)


class RowDecoder:
    """Per-row decoding state over a preallocated cache of `max_rows` rows (see the module
    docstring). tree=None: plain decoding (head 1 only)."""

    def __init__(self, model: MultiTokenModel, tree: Tree | None, max_rows: int,
                 extra: tuple[Tree, ...] = ()) -> None:
        # trees[0]: the base tree (the greedy calibration's); trees[1:]: per-setting ones a step
        # may run instead (the scheduler picks one per step). None: plain decoding only.
        self.model = model
        self.trees: list[Tree] = [] if tree is None else [tree, *extra]
        self.tree = tree
        deepest = max((t.depth for t in self.trees), default=0)
        # Every forward writes the keys/values of all the draft heads any tree needs, so a
        # switch of tree finds every head's cache complete. Token-conditioned draft heads run
        # outside the engine (`ConditionedRows`).
        self.engine = Engine(model, 1 if model.conditioned else deepest + 1)
        self.cond = (ConditionedRows(model, self.engine, self.trees, max_rows)
                     if model.conditioned and self.trees else None)
        self.width = max((t.size + 1 for t in self.trees), default=1)
        self.depth = deepest
        self.device = self.engine.device
        # A row feeds positions < max_seq_len, plus one step's width of speculative tokens.
        self.cache = self.engine.new_cache(max_rows, model.cfg.max_seq_len + self.width)
        self.max_rows = max_rows
        self.root = torch.zeros(max_rows, dtype=torch.long, device=self.device)
        n_nodes = max((t.size for t in self.trees), default=0)
        self.drafts = torch.zeros(max_rows, n_nodes, dtype=torch.long, device=self.device)
        # The draft distributions of sampled rows [max_rows, groups of the tree, V], made on
        # first use (a greedy-only server never holds them).
        self.q: Tensor | None = None
        self.n_groups = max((len(t.tensors(self.device)["group_node"]) for t in self.trees),
                            default=0)
        # With several trees: each row's draft heads' outputs at its last accepted position
        # [P-1, max_rows, D], to draft again for another tree, and the tree its drafts are for.
        self.hidden: Tensor | None = None
        self.made_for = [0] * max_rows

    # -- rows -----------------------------------------------------------------------------------
    def move(self, src: int, dst: int) -> None:
        """Row src's whole state (cache, root, drafts) into row dst."""
        c = self.cache
        c.k[:, dst] = c.k[:, src]
        c.v[:, dst] = c.v[:, src]
        self.root[dst] = self.root[src]
        self.drafts[dst] = self.drafts[src]
        self.made_for[dst] = self.made_for[src]
        if self.q is not None:
            self.q[dst] = self.q[src]
        if self.hidden is not None:
            self.hidden[:, dst] = self.hidden[:, src]
        if self.cond is not None:
            self.cond.move(src, dst)

    def _put(self, rows: Tensor, d: Drafts, ti: int) -> None:
        """Keep drafts d for trees[ti] of rows `rows` (of the whole cache)."""
        self.drafts[rows, :self.trees[ti].size] = d.tokens
        if d.q is not None:
            if self.q is None:
                self.q = torch.zeros(self.max_rows, self.n_groups, d.q.shape[-1],
                                     device=self.device)
            self.q[rows, :d.q.shape[1]] = d.q
        for r in rows.tolist():
            self.made_for[r] = ti

    def _store_drafts(self, start: int, groups: list[Group], hidden: Tensor, n: int,
                      ti: int) -> None:
        """Propose the next drafts for trees[ti] of rows start..start+n-1 from the draft heads'
        outputs hidden [P-1, n, D], group by group."""
        tree = self.trees[ti]
        if len(self.trees) > 1:
            if self.hidden is None:
                self.hidden = hidden.new_zeros(hidden.shape[0], self.max_rows, hidden.shape[-1])
            self.hidden[:, start:start + n] = hidden
        logits = self.engine.draft_logits(hidden[:tree.depth])
        for g in groups:
            idx = _index(g.rows, n, self.device)
            d = propose(_take(logits, idx, 1), tree, g.sampling, g.generator)
            self._put(torch.tensor(g.rows, device=self.device) + start, d, ti)

    def _redraft(self, n: int, groups: list[Group], ti: int) -> None:
        """Rows 0..n-1 whose drafts are for another tree than trees[ti] (the batch's mix of
        settings changed) draft again for it, from their stored draft-head outputs."""
        stale = [r for r in range(n) if self.made_for[r] != ti]
        if not stale:
            return
        if self.cond is not None:
            # the draft heads' query columns run over rows 0..n-1 (a cache view's rows start
            # at 0); only the stale rows draw
            keep = set(stale)
            parts: list[Part] = []
            for g in groups:
                rs = [r for r in g.rows if r in keep]
                if rs:
                    parts.append((torch.tensor(rs, device=self.device), g.sampling,
                                  g.generator))
            stale_idx = torch.tensor(stale, device=self.device)
            d = self.cond.redraft(n, ti, self.root[:n], parts)
            self._put(stale_idx, d.select(stale_idx), ti)
            return
        assert self.hidden is not None
        where = {r: i for i, r in enumerate(stale)}
        sub = [Group([where[r] for r in g.rows if r in where], g.sampling, g.generator)
               for g in groups]
        sub = [g for g in sub if g.rows]
        idx = torch.tensor(stale, device=self.device)
        hidden = self.hidden.index_select(1, idx)
        tree = self.trees[ti]
        logits = self.engine.draft_logits(hidden[:tree.depth])
        for g in sub:
            gi = _index(g.rows, len(stale), self.device)
            d = propose(_take(logits, gi, 1), tree, g.sampling, g.generator)
            self._put(idx[torch.tensor(g.rows, device=self.device)], d, ti)

    # -- prefill ----------------------------------------------------------------------------------
    def prefill(self, start: int, idx: Tensor, offset: int, last: Tensor | None,
                groups: list[Group], ti: int = 0) -> list[int] | None:
        """Feed idx [m, T] (right-padded prompts, or one chunk of one long prompt) at positions
        offset.. into rows start..start+m-1. last [m]: for the final piece, each prompt's last
        index in idx; then the first new token of every row is picked (and the first drafts
        proposed, for trees[ti]) and returned. None for a chunk that is not the last."""
        m, T = idx.shape
        cache = cache_rows(self.cache, start, start + m)
        # offset 0 is `engine.prefill` exactly (same positions, mask and kv_len)
        pos = (torch.arange(T, device=idx.device) + offset).expand(m, T)
        fwd = self.engine.forward(idx, pos, causal_context(cache, pos, offset + T))
        if last is None:
            if self.cond is not None:
                self.cond.hold(start, idx, fwd.h0, offset)
            return None
        h = fwd.h0[torch.arange(m, device=idx.device), last]
        logits = self.engine.logits(h)
        first = torch.empty(m, dtype=torch.long, device=self.device)
        for g in groups:
            gi = _index(g.rows, m, self.device)
            first[slice(None) if gi is None else gi] = pick(_take(logits, gi), g.sampling,
                                                            g.generator)
        self.root[start:start + m] = first
        if self.cond is not None:
            d = self.cond.prefill(start, idx, fwd.h0, offset, last, first,
                                  _parts(groups, m, self.device), ti)
            self._put(torch.arange(start, start + m, device=self.device), d, ti)
        elif self.trees:
            self._store_drafts(start, groups, self.engine.draft_hidden(fwd, last), m, ti)
        return first.tolist()

    # -- one step for rows 0..n-1 -------------------------------------------------------------
    def step(self, n: int, pos: list[int], groups: list[Group], ti: int = 0) -> StepResult:
        """One decode step of rows 0..n-1 whose roots sit at positions pos, with trees[ti]."""
        cache = cache_rows(self.cache, 0, n)
        base = torch.tensor(pos, device=self.device)
        # the step's own width, as generate() (wider trees of other steps change nothing here)
        kv_len = max(pos) + (self.trees[ti].size + 1 if self.trees else 1)
        root = self.root[:n]
        if not self.trees:
            logits = decode_one(self.engine, cache, root, base, kv_len)
            nxt = torch.empty(n, dtype=torch.long, device=self.device)
            for g in groups:
                gi = _index(g.rows, n, self.device)
                nxt[slice(None) if gi is None else gi] = pick(_take(logits, gi), g.sampling,
                                                              g.generator)
            self.root[:n] = nxt
            return StepResult([[t] for t in nxt.tolist()], [0] * n)
        self._redraft(n, groups, ti)
        tree = self.trees[ti]
        t = tree.tensors(self.device)
        G = len(t["group_node"])
        inp = torch.cat([root[:, None], self.drafts[:n, :tree.size]], dim=1)  # [n, N+1]
        fwd = self.engine.forward(inp, base[:, None] + t["depth"],
                                  tree_context(cache, base, tree, kv_len))
        logits = self.engine.logits(fwd.h0)  # [n, N+1, V]
        acc = torch.empty(n, dtype=torch.long, device=self.device)
        nxt = torch.empty(n, dtype=torch.long, device=self.device)
        for g in groups:
            gi = _index(g.rows, n, self.device)
            q = None
            if not g.sampling.greedy:
                assert self.q is not None
                q = _take(self.q[:n, :G], gi)
            a, x = verify(_take(logits, gi), _take(inp, gi), q, t, g.sampling, g.generator)
            where = slice(None) if gi is None else gi
            acc[where], nxt[where] = a, x
        emit = t["emit"][acc]  # [n, D+3]
        D = tree.depth
        tokens = torch.cat([inp, nxt[:, None]], dim=1).gather(1, emit[:, :D + 1])
        if self.cond is not None:
            d = self.cond.step(n, ti, path_outputs(tree, fwd.h0, acc), tokens, base,
                               emit[:, D + 1], _parts(groups, n, self.device))
            self._put(torch.arange(n, device=self.device), d, ti)
        else:  # before compaction: the draft heads attend through the tree mask
            self._store_drafts(0, groups, self.engine.draft_hidden(fwd, acc), n, ti)
        compact_path(cache, tree, base, acc)
        self.root[:n] = nxt
        n_acc = emit[:, D + 1].tolist()
        toks = tokens.tolist()
        return StepResult([toks[r][: n_acc[r] + 1] for r in range(n)], emit[:, D + 2].tolist())
