"""The MTP loss: sums against hand-computed ones, and equal gradients for all three methods.

Every method runs its own backward when asked (backward=True) and returns per-head sums and
counts; the gradient is that of sum_i w_i * mean_i, each head's mean over its own valid labels.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from multitoken.config import LossConfig
from multitoken.errors import ConfigError
from multitoken.loss import (
    IGNORE_INDEX,
    METHODS,
    evaluate_stats,
    head_means,
    mtp_loss,
    shift_targets,
)

HEAD_TYPES = ["transformer", "linear", "causal", "anticausal", "token_conditioned"]


def grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def run(model, x, y, method, **kw):
    model.zero_grad(set_to_none=True)
    out = mtp_loss(model, x, y, method=method, backward=True, **kw)
    return out, grads(model)


def weighted(out, w) -> float:
    """sum_i w_i * (loss sum of head i / its label count): the loss that is backpropagated."""
    return sum(wi * float(s) / int(c) for wi, s, c in zip(w, out.loss_sum, out.count))


def hand_terms(m, x, y) -> list[list[torch.Tensor]]:
    """Per head, the CE of every valid label, written out position by position."""
    with torch.no_grad():
        logits = m(x)  # [n, B, T, V]
    B, T = y.shape
    out = []
    for i in range(m.cfg.n_future):
        terms = []
        for b in range(B):
            for t in range(T):
                j = t + i  # head i (0-based) at position t predicts seq[t + i + 1] = y[t + i]
                if j < T and y[b, j] != IGNORE_INDEX:
                    terms.append(-F.log_softmax(logits[i, b, t], -1)[y[b, j]])
        out.append(terms)
    return out


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_sums_equal_hand_computed_sums_with_padding(method, backward):
    torch.manual_seed(0)
    m = tiny_model(n_future=3)
    seq = torch.randint(0, 37, (2, 11))
    x, y = seq[:, :-1], seq[:, 1:].clone()
    y[1, 6:] = IGNORE_INDEX  # second sequence is padded after 6 labels
    w = [1.0, 0.5, 0.25]
    out = mtp_loss(m, x, y, method=method, weights=w, backward=backward)
    expected = 0.0
    for i, terms in enumerate(hand_terms(m, x, y)):
        assert int(out.count[i]) == len(terms)
        assert math.isclose(float(out.loss_sum[i]), float(torch.stack(terms).sum()),
                            rel_tol=1e-5)
        expected += w[i] * torch.stack(terms).mean()
    assert math.isclose(weighted(out, w), float(expected), rel_tol=1e-5)
    assert out.loss_sum.dtype == torch.float64 and not out.loss_sum.requires_grad
    stats = out.stats()
    assert stats.shape == (3, 3) and stats[2].tolist() == [float(c) for c in out.count]
    # backward=False leaves no gradient; backward=True leaves one in every parameter
    assert all((p.grad is not None) == backward for p in m.parameters())


@pytest.mark.parametrize("method", METHODS)
def test_gradient_is_weighted_sum_of_per_head_means(method):
    """The backpropagated loss is loss_scale * sum_i w_i * mean_i, each head's mean over its own
    count of valid labels (heads further ahead have fewer), computed by hand with autograd."""
    torch.manual_seed(0)
    m = tiny_model(n_future=3)
    x, y = torch.randint(0, 37, (2, 12)), torch.randint(0, 37, (2, 12))
    y[0, 4:] = IGNORE_INDEX
    w, scale = [1.0, 0.6, 0.2], 0.25
    m.zero_grad(set_to_none=True)
    logits = m(x)  # [n, B, T, V]
    ref = sum(w[i] * F.cross_entropy(logits[i].flatten(0, 1), shift_targets(y, i).flatten(),
                                     ignore_index=IGNORE_INDEX) for i in range(3))
    (ref * scale).backward()
    g_ref = grads(m)
    _, g = run(m, x, y, method, weights=w, loss_scale=scale)
    assert (g - g_ref).abs().max() / g_ref.abs().max() <= 1e-5


def test_targets_never_wrap():
    y = torch.arange(6).expand(2, -1)
    s = shift_targets(y, 2)
    assert s[0].tolist() == [2, 3, 4, 5, IGNORE_INDEX, IGNORE_INDEX]
    assert (shift_targets(y, 9) == IGNORE_INDEX).all()


@pytest.mark.parametrize("head_type", HEAD_TYPES)
@pytest.mark.parametrize("method", ["sequential", "chunked"])
def test_memory_efficient_gradients_equal_naive(head_type, method):
    torch.manual_seed(0)
    m = tiny_model(head_type=head_type, n_future=3)
    x = torch.randint(0, 37, (3, 24))
    y = torch.randint(0, 37, (3, 24))
    y[0, -5:] = IGNORE_INDEX
    w = [1.0, 0.7, 0.3]
    ref, g_ref = run(m, x, y, "naive", weights=w)
    out, g = run(m, x, y, method, weights=w)
    torch.testing.assert_close(out.loss_sum, ref.loss_sum, rtol=1e-5, atol=0)
    assert math.isclose(weighted(out, w), weighted(ref, w), rel_tol=1e-5)
    rel = (g - g_ref).abs().max() / g_ref.abs().max()
    assert rel <= 1e-5, rel
    assert out.correct.tolist() == ref.correct.tolist()
    assert out.count.tolist() == ref.count.tolist()


def test_every_head_gets_gradient():
    m = tiny_model(n_future=3)
    x = torch.randint(0, 37, (2, 16))
    run(m, x, torch.randint(0, 37, (2, 16)), "sequential")
    for i, h in enumerate(m.heads):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in h.parameters()), i


def test_loss_scale_scales_gradients_only():
    torch.manual_seed(0)
    m = tiny_model()
    x, y = torch.randint(0, 37, (2, 16)), torch.randint(0, 37, (2, 16))
    for method in METHODS:
        a, ga = run(m, x, y, method)
        b, gb = run(m, x, y, method, loss_scale=0.25)
        assert torch.equal(a.loss_sum, b.loss_sum)
        torch.testing.assert_close(gb, ga * 0.25, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("method", METHODS)
def test_after_forward_is_called_once_by_naive_only(method):
    m = tiny_model(n_future=2)
    x, y = torch.randint(0, 37, (2, 16)), torch.randint(0, 37, (2, 16))
    calls = []
    mtp_loss(m, x, y, method=method, backward=True, after_forward=lambda: calls.append(1))
    assert len(calls) == (1 if method == "naive" else 0)


def test_evaluate_stats_sums_batches_and_head_means_weight_by_labels():
    torch.manual_seed(0)
    m = tiny_model(n_future=2)
    batches = [(torch.randint(0, 37, (2, 16)), torch.randint(0, 37, (2, 16))) for _ in range(3)]
    batches[1][1][:, 5:] = IGNORE_INDEX  # a batch with few labels weighs less
    stats = evaluate_stats(m, batches, torch.device("cpu"))
    outs = [mtp_loss(m, x, y, method="naive", backward=False) for x, y in batches]
    torch.testing.assert_close(stats, sum(o.stats() for o in outs), rtol=0, atol=0)
    means = head_means(stats)
    for i in range(2):
        count = sum(int(o.count[i]) for o in outs)
        assert means["head_loss"][i] == sum(float(o.loss_sum[i]) for o in outs) / count
        assert means["head_acc"][i] == sum(int(o.correct[i]) for o in outs) / count
    assert m.training and all(p.grad is None for p in m.parameters())


def test_unknown_method_is_a_config_error():
    m = tiny_model(n_future=1)
    x = torch.randint(0, 37, (1, 8))
    with pytest.raises(ConfigError, match="loss.method"):
        mtp_loss(m, x, x, method="fast", backward=True)


def test_head_weights():
    assert LossConfig(weights="uniform").head_weights(3) == [1.0, 1.0, 1.0]
    assert LossConfig(weights="geometric:0.5").head_weights(3) == [1.0, 0.5, 0.25]
    assert LossConfig(weights=[1, 2]).head_weights(2) == [1.0, 2.0]
