"""Chain speculation with token-conditioned draft heads (DeepSeek-V3-style MTP modules).

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
"""

from __future__ import annotations

import torch
from torch import Tensor

from multitoken.decoding.engine import Engine, prefill
from multitoken.decoding.sampling import Sampling, pick, process_logits, sample
from multitoken.decoding.speculate import Drafts, StepOut, verify_step
from multitoken.decoding.tree import Tree
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


def draft_from(engine: Engine, h: Tensor, sampling: Sampling,
               generator: torch.Generator | None) -> tuple[Tensor, Tensor | None]:
    """A draft from a draft head's output h [B, D] -> (token [B], its q [B, V] or None):
    the argmax when greedy, else a draw from the processed distribution q."""
    logits = engine.draft_logits(h[None])[0]  # [B, V]
    if sampling.greedy:
        return logits.argmax(-1), None
    q = process_logits(logits, sampling)
    return sample(q, generator), q


def stack_drafts(toks: list[Tensor], qs: list[Tensor | None], sampling: Sampling) -> Drafts:
    return Drafts(torch.stack(toks, 1),
                  None if sampling.greedy else torch.stack(qs, 1))  # type: ignore[arg-type]


def refresh_and_draft(model: MultiTokenModel, engine: Engine, cache: KVCache,
                      carry: list[Tensor], h0: Tensor, emitted: Tensor, pos: Tensor, a: Tensor,
                      sampling: Sampling,
                      generator: torch.Generator | None) -> tuple[Drafts, list[Tensor]]:
    """The end of a step (module docstring): bring every draft head's cache entries up to the
    new frontier and draft the next chain.

    h0 [B, K+1, D]: head 1's outputs at the step's chain positions pos + 0..K (pos [B]: the old
    root's); emitted [B, K+1]: the tokens the step emitted there (a [B] accepted drafts, then
    the bonus, then unused columns); carry: head k's output at its last exact position before
    this step, k = 1..K-1. Returns (the next drafts, the next carry)."""
    K = h0.shape[1] - 1
    B = pos.shape[0]
    rows = torch.arange(B, device=pos.device)
    col = torch.arange(K + 1, device=pos.device)  # exact-run columns i = 0..K
    q = pos + a  # the new draft position (the new root is at q + 1)
    valid = col[None] <= a[:, None]  # [B, K+1]
    garbage = q[:, None] + 1 + col[None]  # slots past q for unused columns
    kv = int((q + K + 1).max()) + 1
    # head 1: positions p..p+a, h_0 there (chain node i sits at position p+i)
    p1 = pos[:, None] + col[None]
    h = run_draft_head(model, 1, cache, h0, emitted, p1, torch.where(valid, p1, garbage), kv)
    h_query = h[rows, a]  # h_1[q]
    tok, qk = draft_from(engine, h_query, sampling, generator)
    toks, qs = [tok], [qk]
    new_carry = [h_query]
    for k in range(2, K + 1):
        pk = pos[:, None] + col[None] - k + 1  # exact positions p-k+1.. (< 0: none there)
        ok = valid & (pk >= 0)
        hin = torch.cat([carry[k - 2][:, None], h[:, :K], h_query[:, None]], 1)
        tin = torch.cat([emitted, tok[:, None]], 1)
        pin = torch.cat([pk.clamp(min=0), q[:, None]], 1)
        sin = torch.cat([torch.where(ok, pk, garbage), q[:, None]], 1)
        out_k = run_draft_head(model, k, cache, hin, tin, pin, sin, kv)
        h, h_query = out_k[:, :K + 1], out_k[:, K + 1]
        if k < K:
            new_carry.append(h[rows, a])
        tok, qk = draft_from(engine, h_query, sampling, generator)
        toks.append(tok)
        qs.append(qk)
    return stack_drafts(toks, qs, sampling), new_carry[:K - 1]


def conditioned_drafts(model: MultiTokenModel, engine: Engine, cache: KVCache, h0: Tensor,
                       idx: Tensor, pos: Tensor, k: int, sampling: Sampling,
                       generator: torch.Generator | None) -> Drafts:
    """The draft-head work of a chain-k step that accepted every draft, after a forward over
    idx [B, m] at positions pos [B, m] (head 1's outputs h0 [B, m, D]); for timing
    (`calibrate.time_forwards`). A chain step has m = k + 1; for other m the k + 1 columns
    repeat the last ones. `cache`: a draft cache with room past pos + 2k + 2."""
    B, m = idx.shape
    cols = torch.arange(k + 1, device=idx.device).clamp(max=m - 1)
    carry = [h0.new_zeros(B, h0.shape[-1]) for _ in range(k - 1)]
    full = torch.full((B,), k, device=idx.device)
    return refresh_and_draft(model, engine, cache, carry, h0[:, cols], idx[:, cols],
                             pos[:, 0], full, sampling, generator)[0]


class ConditionedDecoder:
    """generate()'s driver for chain speculation with token-conditioned heads: the same
    start / select / step as `speculate.SpeculativeDecoder` (see the module docstring)."""

    def __init__(self, model: MultiTokenModel, k: int, sampling: Sampling,
                 generator: torch.Generator | None) -> None:
        if not model.conditioned:
            raise MultitokenError("ConditionedDecoder needs token_conditioned heads")
        if not 1 <= k <= model.n_future - 1:
            raise MultitokenError(f"a chain of {k} drafts needs {k + 1} heads; the model has "
                                  f"{model.n_future}")
        self.model, self.k = model, k
        self.engine = Engine(model, 1)
        self.tree = Tree.chain(k)
        self.sampling, self.generator = sampling, generator
        self.width, self.depth = k + 1, k

    # -- drafting at prefill --------------------------------------------------------------------
    def _chain(self, h1: Tensor) -> Drafts:
        """Drafts 1..K from h_1[q] [B, D], each draft head's query run alone at q (prefill;
        a step runs them with the heads' exact runs)."""
        tok, q = draft_from(self.engine, h1, self.sampling, self.generator)
        toks, qs = [tok], [q]
        h = h1
        for k in range(2, self.k + 1):
            h = self._query(k, h, tok)
            tok, q = draft_from(self.engine, h, self.sampling, self.generator)
            toks.append(tok)
            qs.append(q)
        return stack_drafts(toks, qs, self.sampling)

    def _query(self, k: int, h: Tensor, tok: Tensor) -> Tensor:
        """Head k's query at q alone (prefill): h_{k-1}[q] [B, D], draft k-1 [B] -> h_k[q]."""
        q = self.q[:, None]
        return run_draft_head(self.model, k, self.cache, h[:, None], tok[:, None], q, q,
                              int(self.q.max()) + 1)[:, 0]

    # -- the decoder interface ----------------------------------------------------------------
    def start(self, cache: KVCache, idx: Tensor, last: Tensor) -> Tensor:
        """Prefill right-padded prompts idx [B, T] (last tokens at last [B]); returns the first
        new token [B] and keeps the first drafts."""
        model, (B, T) = self.model, idx.shape
        fwd = prefill(self.engine, cache, idx)
        rows = torch.arange(B, device=idx.device)
        self.tok = pick(self.engine.logits(fwd.h0[rows, last]), self.sampling, self.generator)
        # Room for a step's unused columns past its query (`step`).
        self.cache = model.new_draft_cache(B, cache.max_len + self.k + 2)
        seq = torch.cat([idx, torch.zeros_like(idx[:, :1])], 1)  # [B, T+1]: prompt, root
        seq[rows, last + 1] = self.tok
        pos = torch.arange(T, device=idx.device).expand(B, T)
        self.q = last  # the position every draft is made at
        h = fwd.h0
        self.carry: list[Tensor] = []  # head k's output at its last exact position, k = 1..K-1
        h1 = fwd.h0[:, 0]
        for k in range(1, self.k + 1):
            # Exact entries for positions <= last + 1 - k (beyond: garbage, rewritten before
            # anything attends to it; the query below writes slot q after this).
            h = run_draft_head(model, k, self.cache, h, model.future_tokens(seq, k)[:, :T],
                               pos, pos, T)
            if k == 1:
                h1 = h[rows, last]
            if k < self.k:
                self.carry.append(h[rows, (last + 1 - k).clamp(min=0)])
        self.drafts = self._chain(h1)
        return self.tok

    def select(self, rows: Tensor) -> None:
        self.tok, self.drafts, self.q = self.tok[rows], self.drafts.select(rows), self.q[rows]
        self.carry = [c[rows] for c in self.carry]
        self.cache.select_rows(rows)

    def step(self, cache: KVCache, pos: Tensor, kv_len: int) -> StepOut:
        """One step from the root at positions pos [B] (see the module docstring)."""
        out, self.tok, fwd = verify_step(self.engine, cache, self.tree, self.tok, self.drafts,
                                         pos, kv_len, self.sampling, self.generator)
        self.drafts, self.carry = refresh_and_draft(
            self.model, self.engine, self.cache, self.carry, fwd.h0, out.tokens, pos, out.n,
            self.sampling, self.generator)
        self.q = pos + out.n
        return out
