"""The multi-token prediction loss and the paper's memory-efficient way to compute it.

    L = sum_i w_i * mean_t CE(logits_i[t], x_{t+i})          (i = 1..n, w_i = 1 in the paper)

`targets` [B, T] are the usual next-token labels (targets[t] = x_{t+1}); head i's label at t is
targets[t + i - 1]. Labels past the end of the sequence are `IGNORE_INDEX`, never wrapped
around, and each head's mean is over its own count of valid labels.

Three methods, equal in value and gradients:
- naive:      all heads' [B, T, V] logits alive at once, one backward. O(nV) memory.
- sequential: the paper's figure 2. Trunk forward once; for each head: forward, loss, backward,
              accumulating d loss / d z at a detached copy of the trunk output z; free the
              head's logits; finally one backward through the trunk. O(V) memory.
- chunked:    sequential, and each head's norm + unembedding + cross-entropy goes through
              torch's chunked `F.linear_cross_entropy`, so no full [B*T, V] logits ever exist.

`sequential` and `chunked` run backward themselves (they must, to free memory between heads):
they return detached losses, with gradients already accumulated in the parameters' `.grad`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from multitoken.errors import ConfigError
from multitoken.model import MultiTokenModel

IGNORE_INDEX = -100


@dataclass
class LossOutput:
    loss: Tensor  # weighted sum over heads (scalar); has a graph only for method "naive"
    head_losses: list[Tensor]  # unweighted mean CE per head (detached)
    head_correct: list[Tensor]  # number of correct top-1 predictions per head (detached)
    head_counts: list[Tensor]  # number of valid labels per head


def head_weights(spec: str | list[float], n: int) -> list[float]:
    """'uniform' | 'geometric:<r>' | explicit list -> n weights."""
    if isinstance(spec, list):
        if len(spec) != n:
            raise ConfigError(f"loss.weights has {len(spec)} entries but the model has {n} heads")
        if any(w < 0 for w in spec):
            raise ConfigError("loss.weights must be non-negative")
        return [float(w) for w in spec]
    if spec == "uniform":
        return [1.0] * n
    if spec.startswith("geometric:"):
        try:
            r = float(spec.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"loss.weights: bad ratio in {spec!r}") from None
        if r <= 0:
            raise ConfigError(f"loss.weights: geometric ratio must be > 0, got {r}")
        return [r**i for i in range(n)]
    raise ConfigError(f"loss.weights must be 'uniform', 'geometric:<r>' or a list, got {spec!r}")


def shift_targets(targets: Tensor, i: int) -> Tensor:
    """Labels of head i (0-based, predicting x_{t+i+1}): targets shifted left by i, masked."""
    if i == 0:
        return targets
    out = torch.full_like(targets, IGNORE_INDEX)
    if i < targets.shape[1]:
        out[:, : targets.shape[1] - i] = targets[:, i:]
    return out


class _SumCrossEntropy(torch.autograd.Function):
    """Sum of CE over valid rows of logits [N, V], and the count of correct top-1 predictions.

    Equal to F.cross_entropy(reduction="sum", ignore_index=IGNORE_INDEX) in value and gradient,
    but cheaper where it matters for multi-token training, which pays this n times per step:
    the backward turns the saved log-probabilities into the gradient IN PLACE
    (softmax - onehot, scaled), instead of nll_loss's zero-filled [N, V] gradient followed by
    log_softmax's backward. That drops two passes over [N, V] (about a third less time in the
    loss) and two [N, V] buffers from the backward, so a step's peak falls from three
    logits-sized tensors (log-probs + two gradients) to two (logits + log-probs, in the forward).
    A second backward through the same graph (retain_graph) fails loudly: autograd sees the
    saved tensor was modified in place.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, logits: Tensor,
                labels: Tensor) -> tuple[Tensor, Tensor]:
        logp = torch.log_softmax(logits, dim=-1)
        valid = labels != IGNORE_INDEX
        safe = labels.masked_fill(~valid, 0).unsqueeze(-1)  # [N, 1], ignored rows point at 0
        loss = -logp.gather(-1, safe).squeeze(-1).masked_fill(~valid, 0.0).sum()
        correct = ((logits.argmax(-1) == labels) & valid).sum()
        ctx.mark_non_differentiable(correct)
        ctx.save_for_backward(logp, safe, valid)
        return loss, correct

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor,
                 _grad_correct: Tensor) -> tuple[Tensor, None]:
        logp, safe, valid = ctx.saved_tensors
        grad = logp.exp_()  # softmax, in the log-probs' own buffer (nothing else reads it)
        grad.scatter_add_(-1, safe, torch.full(safe.shape, -1.0, dtype=grad.dtype,
                                               device=grad.device))
        grad.mul_((valid.to(grad.dtype) * grad_loss).unsqueeze(-1))  # ignored rows -> 0
        return grad, None


def _ce_sum(model: MultiTokenModel, h: Tensor, labels: Tensor,
            chunked: bool) -> tuple[Tensor, Tensor]:
    """Sum of CE over valid labels, and the number of correct top-1 predictions.

    h [B, T, D] (pre-norm head output), labels [B, T].
    """
    if not chunked:
        logits = model.unembed(h).float()  # no-op in fp32; bf16 autocast logits -> fp32 softmax
        loss, correct = _SumCrossEntropy.apply(logits.flatten(0, 1), labels.flatten())
        return loss, correct
    hn = model.norm(h).flatten(0, 1)  # [N, D]
    flat = labels.flatten()
    loss = F.linear_cross_entropy(hn, model.output.weight, flat, reduction="sum",
                                  ignore_index=IGNORE_INDEX,
                                  options=torch.nn.LinearCrossEntropyOptions())
    with torch.no_grad():  # accuracy, chunk by chunk, so no [N, V] tensor exists here either
        correct = torch.zeros((), dtype=torch.long, device=h.device)
        step = max(1, (1 << 22) // model.cfg.vocab_size)
        for s in range(0, hn.shape[0], step):
            pred = F.linear(hn[s:s + step], model.output.weight).argmax(-1)
            lab = flat[s:s + step]
            correct += ((pred == lab) & (lab != IGNORE_INDEX)).sum()
    return loss, correct


def mtp_loss(model: MultiTokenModel, idx: Tensor, targets: Tensor, *, method: str = "sequential",
             weights: list[float] | None = None, loss_scale: float = 1.0,
             autocast: Callable[[], object] | None = None) -> LossOutput:
    """Multi-token loss of `model` on inputs idx [B, T] with next-token labels targets [B, T].

    `loss_scale` multiplies what is backpropagated (e.g. 1/grad_accum) but not what is returned.
    `autocast` is a context-manager factory wrapped around every forward (bf16 on CUDA).
    """
    n = model.cfg.n_future
    w = weights if weights is not None else [1.0] * n
    labels = [shift_targets(targets, i) for i in range(n)]
    counts = [lab.ne(IGNORE_INDEX).sum() for lab in labels]
    ctx = autocast or contextlib.nullcontext
    if method == "naive":
        with ctx():
            hs = model.hidden(idx)
            losses, correct = [], []
            for i in range(n):
                s, c = _ce_sum(model, hs[i], labels[i], chunked=False)
                losses.append(s / counts[i].clamp(min=1))
                correct.append(c)
        total = sum(wi * li for wi, li in zip(w, losses))
        return LossOutput(total, [x.detach() for x in losses], correct, counts)
    if method not in ("sequential", "chunked"):
        raise ConfigError(f"loss.method must be naive, sequential or chunked, got {method!r}")
    return _sequential(model, idx, labels, counts, w, loss_scale, method == "chunked", ctx)


def _sequential(model: MultiTokenModel, idx: Tensor, labels: list[Tensor], counts: list[Tensor],
                w: list[float], scale: float, chunked: bool, ctx: Callable[[], object]) -> LossOutput:
    """Figure 2 of the paper, generalised to chained (causal / anticausal) heads.

    Parallel heads: forward + backward one head at a time; only one head's logits ever exist.
    Chained heads: head layers run forward with detached links (their activations are one layer
    each, O(T*D)), then heads are processed from the end of the chain backwards so each head's
    input gradient is complete before it is passed on to its parent.
    """
    n = model.cfg.n_future
    T = idx.shape[1]
    with ctx():
        cos, sin = model.rope(T, None)
        z = model.trunk(idx, cos, sin)
    z_leaf = z.detach().requires_grad_(True)  # gradients of all heads accumulate here
    losses: list[Tensor] = [torch.zeros(())] * n
    correct: list[Tensor] = [torch.zeros((), dtype=torch.long)] * n

    def head_loss(i: int, h_leaf: Tensor) -> Tensor:
        with ctx():
            s, c = _ce_sum(model, h_leaf, labels[i], chunked)
        mean = s / counts[i].clamp(min=1)
        losses[i], correct[i] = mean.detach(), c
        return mean * (w[i] * scale)

    chained = any(model.head_parent(i) is not None for i in range(n))
    if not chained:
        for i in range(n):
            with ctx():
                h = model.head(i, z_leaf, cos, sin)
            h_leaf = h.detach().requires_grad_(True)
            head_loss(i, h_leaf).backward()  # frees this head's logits and their gradient
            h.backward(h_leaf.grad)  # through the head layer into z_leaf.grad
    else:
        order = model.head_order()
        outs: dict[int, Tensor] = {}
        leaves: dict[int, Tensor] = {}
        for i in order:
            parent = model.head_parent(i)
            inp = z_leaf if parent is None else leaves[parent]
            with ctx():
                outs[i] = model.head(i, inp, cos, sin)
            leaves[i] = outs[i].detach().requires_grad_(True)
        for i in reversed(order):  # children before parents
            head_loss(i, leaves[i]).backward()  # adds to leaves[i].grad (children already did)
            outs[i].backward(leaves[i].grad)
    z.backward(z_leaf.grad)  # one backward through the trunk
    total = sum(wi * li for wi, li in zip(w, losses))
    return LossOutput(total, losses, correct, counts)


@torch.no_grad()
def evaluate_batch(model: MultiTokenModel, idx: Tensor, targets: Tensor,
                   autocast: Callable[[], object] | None = None) -> LossOutput:
    """Per-head loss and accuracy without gradients (validation)."""
    return mtp_loss(model, idx, targets, method="naive", autocast=autocast)
