"""Sampling primitives and the exact acceptance rules of speculative decoding.

Everything here works on tensors (logits, probabilities, draft tokens) and knows nothing of
models, caches or trees; plain and speculative decoding share it.

Conventions: `temperature=0` is greedy (argmax of head 1). Otherwise logits are divided by the
temperature, then top-k, then top-p (smallest set of tokens whose mass reaches top_p) are
applied; speculative sampling is exact for exactly that processed distribution p.

Acceptance rules decide, at a node of a draft tree, which of its children (draft tokens for the
position after the node, distinct, tried in order) is accepted. A chain is the tree whose nodes
have one child each, so the same rules serve chains.

- Greedy (`greedy_accepts`): a child is accepted iff it equals head 1's argmax at its parent.
  Siblings are distinct tokens, so at most one child matches, and the output is plain greedy
  decoding of head 1, token for token.
- Sampling with one-hot proposals (`accept_one_hot`, `residual_one_hot`): drafts are the draft
  heads' top-ranked tokens, i.e. proposals q = e_x. The speculative-sampling rule min(1, p/q)
  then accepts x with probability p(x); on rejection the next token comes from the residual
  max(0, p - q) normalised = p with x removed, renormalised. With several children the rule is
  applied in turn (sequential rejection): child c_i is tried after c_1..c_{i-1} were rejected,
  against p with those removed and renormalised; if every child is rejected, the next token is
  drawn from p with all of them removed. Every emitted token is then distributed exactly as a
  plain sample from p. (Scoring a greedy draft as if it had been sampled from the draft head's
  softmax is the known wrong variant; tests/test_speculative.py checks that the chi-square
  statistic catches it and other wrong rules.)

The rules are node-wise (a decision per node, a residual at the node where the walk stops), so
a rule for drafts *sampled* from the draft heads' distributions q -- accept with min(1, p/q),
residual norm(max(0, p - q)), and a multi-draft rule for several children -- takes the same
place, with q as one more argument.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from multitoken.errors import MultitokenError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        if not self.temperature >= 0.0:
            raise MultitokenError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise MultitokenError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise MultitokenError(f"top_p must be in (0, 1], got {self.top_p}")


def process_logits(logits: Tensor, s: Sampling) -> Tensor:
    """Logits [..., V] -> the probabilities we sample from (temperature, top-k, top-p)."""
    logits = logits.float() / s.temperature
    V = logits.shape[-1]
    if s.top_k is not None and s.top_k < V:
        kth = torch.topk(logits, s.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p is not None and s.top_p < 1.0:
        sp, order = torch.sort(probs, dim=-1, descending=True)
        # Keep a token while the mass strictly before it is < top_p: the smallest prefix whose
        # mass reaches top_p (the most likely token is always kept).
        drop = (torch.cumsum(sp, dim=-1) - sp) >= s.top_p
        probs = probs.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One draw per row of probs [..., V] (rows need not be normalised)."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def pick(logits: Tensor, s: Sampling, generator: torch.Generator | None) -> Tensor:
    """The next token from logits [..., V]: argmax when greedy, else a sample."""
    if s.greedy:
        return logits.argmax(-1)
    return sample(process_logits(logits, s), generator)


# ---------------------------------------------------------------------------------------------
# Acceptance rules.


def greedy_accepts(drafts: Tensor, parent_argmax: Tensor) -> Tensor:
    """Greedy verification: draft tokens [B, N] against head 1's argmax at each draft's parent
    [B, N] -> accepted [B, N] (bool)."""
    return drafts == parent_argmax


def accept_one_hot(probs: Tensor, child_tok: Tensor, valid: Tensor,
                   generator: torch.Generator | None) -> Tensor:
    """Sequential rejection of one-hot proposals, at M nodes at once.

    probs [B, M, V]: head 1's processed distribution at each node; child_tok [B, M, C]: the
    node's children's tokens (distinct) in the order they are tried; valid [M, C] (or
    [B, M, C]): which children exist. Returns [B, M]: the index of the accepted child, or C
    when every child was rejected (or there is none).

    Trying child i after c_1..c_{i-1} were rejected and accepting it with probability
    p(c_i) / (1 - sum_{j<i} p(c_j)) accepts child i with probability p(c_i) in all, and none
    with probability 1 - sum_i p(c_i). One uniform u per node draws that same outcome: child i
    when u falls in [sum_{j<i} p(c_j), sum_{j<=i} p(c_j)), none when u >= sum_i p(c_i) (a child
    of probability 0 is never accepted). For one child: accepted iff u < p(c). Each node draws
    its own uniform, so the decisions of different nodes are independent: following them from
    the root samples exactly as trying the nodes one by one along the walk would.
    """
    cum = torch.cumsum(probs.gather(-1, child_tok) * valid, dim=-1)  # [B, M, C]
    u = torch.rand(*cum.shape[:-1], 1, generator=generator, device=probs.device)
    return torch.searchsorted(cum, u, right=True).squeeze(-1)


def residual_one_hot(probs: Tensor, rejected: Tensor, valid: Tensor) -> Tensor:
    """The distribution of the next token after one-hot proposals were rejected: probs [B, V]
    with the tokens rejected [B, C] (where valid [B, C]) removed, not renormalised. With no
    valid entry (a leaf, or every draft accepted) it is probs itself."""
    drop = torch.zeros_like(probs).scatter_add_(1, rejected, valid.to(probs.dtype)) > 0
    return probs.masked_fill(drop, 0.0)
