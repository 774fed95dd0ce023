"""Sampling primitives and the exact acceptance rules of speculative decoding.

Everything here works on tensors (logits, probabilities, draft tokens) and knows nothing of
models, caches or trees; plain and speculative decoding share it. (Also here: the settings'
syntax of the commands' `--sampling`, `parse_sampling_list`.)

Conventions: `temperature=0` is greedy (argmax of head 1). Otherwise logits are divided by the
temperature, then top-k, then top-p (smallest set of tokens whose mass reaches top_p) are
applied; speculative sampling is exact for exactly that processed distribution p.

Acceptance rules decide, at a node of a draft tree, which of its children (draft tokens for the
position after the node, tried in order) is accepted. A chain is the tree whose nodes have one
child each, so the same rules serve chains.

- Greedy (`greedy_accepts`): drafts are the draft heads' top-ranked tokens; a child is accepted
  iff it equals head 1's argmax at its parent. Siblings are distinct tokens, so at most one
  child matches, and the output is plain greedy decoding of head 1, token for token.
- Sampling (`draw_distinct`, `accept_drafts`): recursive rejection sampling with draws without
  replacement (Jeon et al. 2024, "Recursive Speculative Decoding"), which for one child per node
  is the speculative sampling of Leviathan et al. 2023 / Chen et al. 2023. A node's k children
  are k distinct tokens drawn in order, without replacement, from the draft distribution q of
  their depth (the draft head's processed distribution: same temperature, top-k and top-p as
  p): child i is a draw from q_i = q with children 1..i-1 removed, renormalised. At a node whose
  head-1 distribution is p, with r_1 = p: child i (token x) is accepted with probability
  min(1, r_i(x) / q_i(x)); if rejected, r_{i+1} = norm(max(0, r_i - q_i)) and the next child is
  tried; if every child is rejected (or the node is a leaf), the next token is drawn from the
  last r. One child: acceptance sum_x min(p(x), q(x)), residual norm(max(0, p - q)).

Why it is exact. Lemma: if x ~ q and x is accepted with probability min(1, r(x)/q(x)), then
P(accept, x) = min(r(x), q(x)) and P(reject) = 1 - sum min(r, q) = sum max(0, r - q), so
"x if accepted, else a draw from norm(max(0, r - q))" is distributed as r. At a node, child i's
token is, given everything drawn and decided before it (its earlier siblings' tokens, their
rejections, the path to the node), a draw from the known q_i; so by the lemma and induction from
the last child backwards, "accept child i, else continue with r_{i+1}" yields a token
distributed as r_i, and the node's outcome as r_1 = p: the token after the node is an exact
sample from p given the path. Once child c is accepted, the walk goes on at c with c's own
children, drawn independently of everything that led to c, against p at c (head 1 conditioned
on the path through c): by induction over depth, the tokens a step emits are distributed as
plain sampling from head 1. Nothing requires q to be good, only known: a node's children at
depth d come from the draft head's distribution at the last accepted position (the same for
every node at depth d), while p is head 1's at the node itself.

Duplicates. A rejected x has r_i(x) < q_i(x), so r_{i+1}(x) = 0: a later sibling with the same
token could never be accepted. Drawing without replacement spends no row of the tree on one.
I.i.d. draws (SpecInfer's multi-step speculative sampling, each sibling against q itself) are
exact too but repeat likely tokens, and each repeat costs a tree row and its subtree for
nothing; fed i.i.d. draws, `accept_drafts` skips a repeat of a rejected sibling (q_i has no
mass left on it) and stays exact (tests/test_tree.py checks both). When q has mass on fewer
tokens than a node has children, the children past its support are draws of probability 0:
never accepted, they change nothing.

Checked in tests/test_speculative.py and tests/test_tree.py: chi-square against enumeration
(chain, tree, batch > 1, top-k, top-p), the acceptance rate of one draft against
sum(min(p, q)) and of several against an exact enumeration, and that the statistic rejects
wrong variants (resampling from p instead of the residual; accepting w.p. p(x) but drawing from
norm(max(0, p - q)), or the reverse; siblings against a residual not updated between them;
distinct draws scored as i.i.d. ones). Treating sampled drafts wholly as one-hot proposals
(accept w.p. p(x), else draw from p without x) is exact as well, whatever picked x, but accepts
sum p(x) q(x) instead of sum min(p(x), q(x)); the acceptance test tells them apart.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from multitoken.errors import ConfigError, MultitokenError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def label(self) -> str:
        """`greedy`, or e.g. `T=0.8 top-p=0.95` (also the key of a setting in calibration.json)."""
        if self.greedy:
            return "greedy"
        parts = [f"T={self.temperature:g}"]
        if self.top_p is not None:
            parts.append(f"top-p={self.top_p:g}")
        if self.top_k is not None:
            parts.append(f"top-k={self.top_k}")
        return " ".join(parts)

    def validate(self) -> None:
        if not self.temperature >= 0.0:
            raise MultitokenError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise MultitokenError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise MultitokenError(f"top_p must be in (0, 1], got {self.top_p}")


# ---------------------------------------------------------------------------------------------
# Settings given on the command line (`bench decode --sampling`, `calibrate --sampling`).


def checked_sampling(temperature: float, top_p: float | None, top_k: int | None) -> Sampling:
    """A checked setting: `Sampling.validate`'s rules, plus a finite temperature, and top-p /
    top-k only with a temperature > 0 (greedy ignores them, so asking for both is a mistake).
    Raises ConfigError."""
    if not math.isfinite(temperature):
        raise ConfigError(f"temperature must be a finite number >= 0, got {temperature}")
    s = Sampling(float(temperature), top_k, top_p)
    try:
        s.validate()
    except MultitokenError as e:
        raise ConfigError(str(e)) from None
    if s.greedy and (top_p is not None or top_k is not None):
        raise ConfigError("top-p and top-k apply to sampling: give a temperature > 0 with them")
    return s


def parse_sampling_list(text: str) -> list[Sampling]:
    """Comma-separated settings, each `greedy` (= 0) or TEMPERATURE[:TOP_P[:TOP_K]] with an
    empty field for "off", e.g. `greedy,0.8:0.95,1.0::50`. Raises ConfigError."""
    settings = []
    for item in (t.strip() for t in text.split(",")):
        if item in ("greedy", "0"):
            settings.append(checked_sampling(0.0, None, None))
            continue
        fields = item.split(":")
        try:
            if not item or len(fields) > 3:
                raise ValueError
            t = float(fields[0])
            p = float(fields[1]) if len(fields) > 1 and fields[1] else None
            k = int(fields[2]) if len(fields) > 2 and fields[2] else None
            settings.append(checked_sampling(t, p, k))
        except ConfigError as e:  # well formed, bad value
            raise ConfigError(f"setting {item!r}: {e}") from None
        except ValueError:
            raise ConfigError(
                f"expected comma-separated settings, each `greedy` or "
                f"TEMPERATURE[:TOP_P[:TOP_K]] (e.g. greedy,0.8:0.95,1.0), got {item!r}"
            ) from None
    return settings


def sampling_list(text: str) -> list[Sampling]:
    """argparse type of --sampling: `parse_sampling_list`, its errors as argparse's (which keeps
    the message, and the parsers of `multitoken.cliargs` turn into one `error:` line)."""
    try:
        return parse_sampling_list(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def process_logits(logits: Tensor, s: Sampling) -> Tensor:
    """Logits [..., V] -> the probabilities we sample from (temperature, top-k, top-p)."""
    logits = logits.float() / s.temperature
    V = logits.shape[-1]
    if s.top_k is not None and s.top_k < V:
        kth = torch.topk(logits, s.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p is not None and s.top_p < 1.0:
        probs = nucleus(probs, s.top_p)
    return probs


def nucleus(probs: Tensor, top_p: float) -> Tensor:
    """Top-p: probs [..., V] restricted to the smallest set of most likely tokens whose mass
    reaches top_p, renormalised. A token is kept while the mass strictly before it (in order
    of decreasing probability) is < top_p, so the most likely token always is.

    The set is looked for among the k most likely tokens, k growing (32, 256, ...) until their
    mass reaches top_p in every row, which rules out every token past them; past a quarter of
    the vocabulary, the whole of it is sorted. `torch.topk` with a small k is far cheaper than
    `torch.sort` over the whole vocabulary (on the CPU builds measured, sorting 32 rows of
    32,000 took 0.1 s, topk with k=16 1.6 ms).
    """
    V = probs.shape[-1]
    k = 32
    while True:
        if k > V // 4:
            top, idx = probs.sort(dim=-1, descending=True)  # [..., V]
            cum = torch.cumsum(top, dim=-1)
            break
        top, idx = probs.topk(k, dim=-1)  # [..., k], decreasing
        cum = torch.cumsum(top, dim=-1)
        if bool((cum[..., -1] >= top_p).all()):
            break
        k *= 8
    keep = (cum - top) < top_p
    out = torch.zeros_like(probs).scatter_(-1, idx, top * keep)
    return out / out.sum(-1, keepdim=True)


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


def draw_distinct(q: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    """k tokens per row of q [..., V] (rows normalised or not), drawn one after another without
    replacement -> [..., k], in draw order.

    The exponential race (Gumbel-top-k): with E_x ~ Exp(1) i.i.d., the token maximising
    q(x) / E_x is a draw from q, and the order of the keys q(x) / E_x is that of successive
    draws without replacement (the second is a draw from q without the first, renormalised, and
    so on). A row with fewer than k tokens of positive probability ends with tokens of
    probability 0 (key 0), which `accept_drafts` never accepts.
    """
    u = torch.rand(q.shape, generator=generator, device=q.device, dtype=q.dtype)
    e = torch.log1p(-u).neg_().clamp_min_(torch.finfo(q.dtype).tiny)  # Exp(1), never 0
    keys = q / e
    if k == 1:
        return keys.argmax(-1, keepdim=True)
    return keys.topk(k, dim=-1).indices


def residual(r: Tensor, q: Tensor) -> Tensor:
    """norm(max(0, r - q)) over the last axis [..., V]: what the next token is drawn from once a
    draft drawn from q was rejected against the target r. Rows where nothing is left (r <= q
    everywhere, i.e. r = q up to rounding, where a rejection cannot happen in exact arithmetic)
    keep r."""
    res = (r - q).clamp_min_(0.0)
    mass = res.sum(-1, keepdim=True)
    return torch.where(mass > 0, res / mass.clamp_min(torch.finfo(r.dtype).tiny), r)


def accept_drafts(probs: Tensor, q: Tensor, child_tok: Tensor, valid: Tensor,
                  generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Recursive rejection sampling (the module docstring has the rule and why it is exact), at
    M nodes at once.

    probs [B, M, V]: head 1's processed distribution p at each node; q [B, M, V]: the draft
    distribution the node's children were drawn from (both normalised); child_tok [B, M, C]: the
    children's tokens, drawn without replacement in this order (`draw_distinct`); valid [M, C]
    (or [B, M, C]): which children exist. Returns (choice [B, M]: the index of the accepted
    child, C when none was; stop [B, M, V]: where none was, the distribution of the next token,
    normalised: the last residual, p itself at a node without children).

    Each node draws its own uniforms, so the decisions of different nodes are independent:
    following them from the root samples exactly as trying the nodes one by one along the walk
    would.
    """
    B, M, C = child_tok.shape
    valid = valid.expand(B, M, C)
    u = torch.rand(B, M, C, generator=generator, device=probs.device)
    choice = torch.full((B, M), C, dtype=torch.long, device=probs.device)
    # r_i; q_i times its mass: q without the earlier siblings' tokens; that mass (q's is 1)
    r, left, mass = probs, q, None
    for i in range(C):
        x = child_tok[..., i:i + 1]  # [B, M, 1]
        qx = left.gather(-1, x).squeeze(-1)  # q_i(x) * mass  [B, M]
        rx = r.gather(-1, x).squeeze(-1)
        # tried: the child exists, no earlier sibling was accepted, and it was drawn with
        # positive probability (not past q's support)
        tried = valid[..., i] & (qx > 0)
        if i:
            tried &= choice == C
        take = tried & (u[..., i] * qx < (rx if mass is None else rx * mass))  # u < r_i / q_i
        choice = torch.where(take, i, choice)
        rejected = (tried & ~take)[..., None]  # [B, M, 1]
        qi = left if mass is None else left / mass.clamp_min(1e-30)[..., None]
        r = torch.where(rejected, residual(r, qi), r)
        if i + 1 < C:
            left = torch.where(rejected, left.scatter(-1, x, 0.0), left)
            mass = left.sum(-1)
    return choice, r
