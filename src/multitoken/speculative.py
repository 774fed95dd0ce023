"""Chain speculation (blockwise parallel decoding, Stern et al. 2018) with the model's own heads.

State between steps, per sequence: the last token produced (not yet fed; at position p) and k
drafts for positions p+1..p+k, proposed by heads 2..k+1 at position p-1. One step feeds the
k+1 tokens [last, drafts] at positions p..p+k (cache slots == positions):

    head 1 at p+j   verifies draft j+1 (and yields the token after the last accepted draft)
    heads 2..k+1 at the last accepted position propose the next k drafts

so verification and the next drafts come out of ONE forward. A rejected draft leaves its
keys/values behind in slots that the next step overwrites before anything attends to them.

Greedy: draft j is accepted while it equals head 1's argmax at the position before it; the
output is token for token plain greedy decoding of head 1.

Sampling (exact): drafts are argmaxes, i.e. one-hot proposals q = e_x. The speculative-sampling
rule min(1, p(x)/q(x)) then accepts x with probability p(x), where p is head 1's PROCESSED
distribution (temperature, top-k, top-p); on rejection the next token is drawn from the residual
max(0, p - q) normalised = p with x removed, renormalised. Every emitted token is then
distributed exactly as plain sampling from p. (Scoring a greedy draft as if it had been sampled
from the draft head's softmax is the known wrong variant; tests/test_speculative.py checks that
its statistic catches that and other wrong rules.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from multitoken.engine import Engine
from multitoken.generate import Sampling, StepOut, pick, prefill, process_logits
from multitoken.model import KVCache, MultiTokenModel, causal_context


def accept_chain(probs: Tensor, drafts: Tensor,
                 generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Exact acceptance of one-hot drafts.

    probs [B, k+1, V]: head 1's processed distribution at each fed position (position j
    predicts the token that draft j+1 proposes); drafts [B, k]. Returns (n [B] drafts accepted,
    next token [B]) where the next token is drawn from the residual at the first rejection, or
    from probs[:, k] when all k drafts were accepted.
    """
    B, k = drafts.shape
    p_draft = probs[:, :k].gather(-1, drafts[..., None]).squeeze(-1)  # [B, k]
    u = torch.rand(B, k, generator=generator, device=probs.device)
    n = (u < p_draft).cumprod(dim=1).sum(dim=1)  # accept draft j w.p. p(draft j)
    rows = torch.arange(B, device=probs.device)
    final = probs[rows, n]  # [B, V]: the distribution of the token after the accepted ones
    rejected = drafts.gather(1, n.clamp(max=k - 1)[:, None])  # [B, 1] the rejected draft
    final = final.scatter(1, rejected, torch.where(n[:, None] < k, 0.0, final.gather(1, rejected)))
    return n, torch.multinomial(final, 1, generator=generator).squeeze(1)


def verify_greedy_chain(logits: Tensor, drafts: Tensor) -> tuple[Tensor, Tensor]:
    """Greedy acceptance: logits [B, k+1, V], drafts [B, k] -> (n accepted [B], next [B])."""
    pred = logits.argmax(-1)  # [B, k+1]
    n = (pred[:, :-1] == drafts).cumprod(dim=1).sum(dim=1)
    return n, pred.gather(1, n[:, None]).squeeze(1)


def chain_step(engine: Engine, cache: KVCache, tok: Tensor, drafts: Tensor, pos: Tensor,
               kv_len: int, sampling: Sampling,
               generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
    """Verify drafts [B, k] after tok [B] (at positions pos [B]) and propose the next ones.

    Returns (n [B] drafts accepted, next token [B], next drafts [B, k]).
    """
    k = drafts.shape[1]
    inp = torch.cat([tok[:, None], drafts], dim=1)  # [B, k+1]
    p = pos[:, None] + torch.arange(k + 1, device=pos.device)
    fwd = engine.forward(inp, p, causal_context(cache, p, kv_len))
    logits = engine.logits(fwd.h0)  # [B, k+1, V]
    if sampling.greedy:
        n, nxt = verify_greedy_chain(logits, drafts)
    else:
        n, nxt = accept_chain(process_logits(logits, sampling), drafts, generator)
    # Draft heads only at the last accepted position: [k, B, D] -> [B, k]
    new_drafts = engine.draft_logits(engine.drafts(fwd, n)).argmax(-1).t()
    return n, nxt, new_drafts


class ChainDecoder:
    """generate()'s driver for chain speculation with k drafts per step."""

    def __init__(self, model: MultiTokenModel, k: int, sampling: Sampling,
                 generator: torch.Generator | None) -> None:
        self.engine = Engine(model, k + 1)
        self.k, self.width, self.depth = k, k + 1, k
        self.sampling, self.generator = sampling, generator

    def start(self, cache: KVCache, idx: Tensor, last: Tensor) -> Tensor:
        fwd = prefill(self.engine, cache, idx)
        h = fwd.h0[torch.arange(idx.shape[0], device=idx.device), last]
        self.tok = pick(self.engine.logits(h), self.sampling, self.generator)
        self.drafts = self.engine.draft_logits(self.engine.drafts(fwd, last)).argmax(-1).t()
        return self.tok

    def select(self, rows: Tensor) -> None:
        self.tok, self.drafts = self.tok[rows], self.drafts[rows]

    def step(self, cache: KVCache, pos: Tensor, kv_len: int) -> StepOut:
        drafts = self.drafts
        n, nxt, self.drafts = chain_step(self.engine, cache, self.tok, drafts, pos, kv_len,
                                         self.sampling, self.generator)
        self.tok = nxt
        # Appended: drafts[:n] then nxt, left-aligned in a [B, k+1] row.
        tokens = torch.cat([drafts, drafts[:, :1]], dim=1).scatter(1, n[:, None], nxt[:, None])
        tried = torch.clamp(n + 1, max=self.k)
        return StepOut(tokens, n, tried)
