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

One contract for all three (`mtp_loss`): with `backward=True` the method runs its own backward
(sequential and chunked must, to free memory between heads), accumulating gradients into the
parameters' `.grad`; with `backward=False` it only runs the forward, without a graph
(evaluation). Either way it returns per-head SUMS and COUNTS (`LossOutput`), detached and on the
batch's device, never means: batches, micro-steps and ranks combine by adding them, and the
label-weighted mean is taken once, where it is reported (`head_means`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from multitoken.errors import ConfigError
from multitoken.model import MultiTokenModel

IGNORE_INDEX = -100
METHODS = ("naive", "sequential", "chunked")


@dataclass
class LossOutput:
    """Per-head statistics of one batch: detached [n_future] tensors on the batch's device."""

    # float64: head i's mean CE over its valid labels (the float32 value its backward used)
    # times its label count, i.e. the sum of its CE rounded as the trained loss is. Summing these
    # and dividing by the summed counts gives the label-weighted mean of the batches' means.
    loss_sum: Tensor
    correct: Tensor  # int64: correct top-1 predictions
    count: Tensor  # int64: valid labels

    def stats(self) -> Tensor:
        """[3, n] float64: loss_sum, correct, count; the form that is accumulated and reduced."""
        return torch.stack([self.loss_sum, self.correct.double(), self.count.double()])


def head_means(stats: Tensor) -> dict[str, list[float]]:
    """Per-head mean loss and top-1 accuracy from summed stats [3, n] (`LossOutput.stats`)."""
    count = stats[2].clamp(min=1)
    return {"head_loss": (stats[0] / count).tolist(), "head_acc": (stats[1] / count).tolist()}


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


def mtp_loss(model: MultiTokenModel, idx: Tensor, targets: Tensor, *, backward: bool,
             method: str = "sequential", weights: list[float] | None = None,
             loss_scale: float = 1.0, autocast: Callable[[], object] | None = None,
             after_forward: Callable[[], object] | None = None) -> LossOutput:
    """Multi-token loss of `model` on inputs idx [B, T] with next-token labels targets [B, T].

    backward=True: accumulates into `.grad` the gradient of
        loss_scale * sum_i w_i * (CE sum of head i / its label count in this batch)
    (each method runs its own backward). backward=False: forward only, under no_grad.
    `loss_scale` (e.g. 1/grad_accum) multiplies what is backpropagated, not what is returned.
    `autocast` is a context-manager factory wrapped around every forward (bf16 on CUDA).
    `after_forward` is called between the forward and the backward of a method that builds the
    whole forward graph before one backward (naive); the others never hold it all at once and
    never call it. The training-memory benchmark measures the graph there.
    """
    if method not in METHODS:
        raise ConfigError(f"loss.method must be naive, sequential or chunked, got {method!r}")
    n = model.cfg.n_future
    w = weights if weights is not None else [1.0] * n
    labels = [shift_targets(targets, i) for i in range(n)]
    counts = [lab.ne(IGNORE_INDEX).sum() for lab in labels]
    ctx = autocast or contextlib.nullcontext
    if not backward:
        with torch.no_grad():
            return _all_heads(model, idx, labels, counts, method == "chunked", ctx)[0]
    if method == "naive":
        out, means = _all_heads(model, idx, labels, counts, False, ctx)
        if after_forward is not None:
            after_forward()
        total = sum(wi * mi for wi, mi in zip(w, means))
        (total * loss_scale).backward()
        return out
    return _sequential(model, idx, labels, counts, w, loss_scale, method == "chunked", ctx)


def _output(means: list[Tensor], correct: list[Tensor], counts: list[Tensor]) -> LossOutput:
    count = torch.stack(counts)
    return LossOutput(loss_sum=torch.stack([m.detach() for m in means]).double() * count,
                      correct=torch.stack(correct).long(), count=count)


def _all_heads(model: MultiTokenModel, idx: Tensor, labels: list[Tensor], counts: list[Tensor],
               chunked: bool, ctx: Callable[[], object]) -> tuple[LossOutput, list[Tensor]]:
    """Every head's forward and loss (no backward); also returns the per-head means, with their
    graph when grad is enabled (naive's one backward goes through them)."""
    with ctx():
        hs = model.hidden(idx)
        means, correct = [], []
        for i in range(model.cfg.n_future):
            s, c = _ce_sum(model, hs[i], labels[i], chunked)
            means.append(s / counts[i].clamp(min=1))
            correct.append(c)
    return _output(means, correct, counts), means


def _sequential(model: MultiTokenModel, idx: Tensor, labels: list[Tensor], counts: list[Tensor],
                w: list[float], scale: float, chunked: bool, ctx: Callable[[], object]) -> LossOutput:
    """Figure 2 of the paper, generalised to chained (causal / anticausal / token-conditioned)
    heads.

    Parallel heads: forward + backward one head at a time; only one head's logits ever exist.
    Chained heads: the chain runs forward once without a graph (keeping each head's output,
    [B, T, D]), then heads are processed from the end of the chain backwards, each one's layer
    recomputed from its input's leaf with a graph, so only one head's layer activations and
    logits exist at a time (one extra head-layer forward per head buys it) and each head's
    input gradient is complete before it is passed on to its parent. Token-conditioned heads'
    token embeddings are part of their head's own forward, so each head's backward also adds
    its share of the embedding's gradient.
    """
    n = model.cfg.n_future
    T = idx.shape[1]
    with ctx():
        cos, sin = model.rope(T, None)
        z = model.trunk(idx, cos, sin)
    # Gradients of all heads accumulate at z_leaf. Frozen parameters (heads-only training,
    # train.trainable=draft_heads) leave parts of the graph without gradients: each backward
    # below runs only where something upstream of it trains.
    z_leaf = z.detach().requires_grad_(z.requires_grad)
    means: list[Tensor] = [torch.zeros(())] * n
    correct: list[Tensor] = [torch.zeros((), dtype=torch.long)] * n

    def head_loss(i: int, h_leaf: Tensor) -> Tensor:
        with ctx():
            s, c = _ce_sum(model, h_leaf, labels[i], chunked)
        mean = s / counts[i].clamp(min=1)
        means[i], correct[i] = mean.detach(), c
        return mean * (w[i] * scale)

    chained = any(model.head_parent(i) is not None for i in range(n))
    if not chained:
        for i in range(n):
            with ctx():
                h = model.head(i, z_leaf, cos, sin)
            h_leaf = h.detach().requires_grad_(h.requires_grad)
            loss = head_loss(i, h_leaf)
            if loss.requires_grad:
                loss.backward()  # frees this head's logits and their gradient
            if h.requires_grad:
                h.backward(h_leaf.grad)  # through the head layer into z_leaf.grad
    else:
        order = model.head_order()
        leaves: dict[int, Tensor] = {}
        with torch.no_grad():  # the chain's outputs only: no head's graph is kept
            for i in order:
                parent = model.head_parent(i)
                with ctx():
                    h = model.head(i, z_leaf if parent is None else leaves[parent], cos, sin,
                                   idx=idx)
                # its gradient is needed when anything upstream of it trains
                upstream = z.requires_grad if parent is None else leaves[parent].requires_grad
                leaves[i] = h.requires_grad_(upstream or any(
                    p.requires_grad for p in model.heads[i].parameters()))
        for i in reversed(order):  # children before parents
            parent = model.head_parent(i)
            with ctx():  # this head's graph, recomputed from its input's leaf
                out = model.head(i, z_leaf if parent is None else leaves[parent], cos, sin,
                                 idx=idx)
            loss = head_loss(i, leaves[i])
            if loss.requires_grad:
                loss.backward()  # adds to leaves[i].grad (children already did)
            if out.requires_grad and leaves[i].grad is not None:
                out.backward(leaves[i].grad)  # into the parent's leaf (or z_leaf)
    if z.requires_grad and z_leaf.grad is not None:
        z.backward(z_leaf.grad)  # one backward through the trunk
    return _output(means, correct, counts)


def evaluate_stats(model: MultiTokenModel, batches: Iterable[tuple[Tensor, Tensor]],
                   device: torch.device, autocast: Callable[[], object] | None = None) -> Tensor:
    """Summed stats [3, n] (`LossOutput.stats`) of `model` over validation batches, in eval
    mode, without gradients, whatever loss.method trains it: the full-logits cross-entropy
    (naive's forward; without a graph only one head's logits exist at a time)."""
    was_training = model.training
    model.eval()
    total = torch.zeros(3, model.cfg.n_future, dtype=torch.float64, device=device)
    for x, y in batches:
        total += mtp_loss(model, x.to(device), y.to(device), backward=False, method="naive",
                          autocast=autocast).stats()
    model.train(was_training)
    return total
