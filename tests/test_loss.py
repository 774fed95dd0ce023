"""The MTP loss: value against a hand-computed sum, and equal gradients for all three methods."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from multitoken.loss import IGNORE_INDEX, head_weights, mtp_loss, shift_targets

HEAD_TYPES = ["transformer", "linear", "causal", "anticausal"]


def grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def run(model, x, y, method, **kw):
    model.zero_grad(set_to_none=True)
    out = mtp_loss(model, x, y, method=method, **kw)
    if method == "naive":
        out.loss.backward()
    return out, grads(model)


def test_loss_equals_hand_computed_sum_with_padding():
    torch.manual_seed(0)
    m = tiny_model(n_future=3)
    seq = torch.randint(0, 37, (2, 11))
    x, y = seq[:, :-1], seq[:, 1:].clone()
    y[1, 6:] = IGNORE_INDEX  # second sequence is padded after 6 labels
    out = mtp_loss(m, x, y, method="naive", weights=[1.0, 0.5, 0.25])
    with torch.no_grad():
        logits = m(x)  # [3, B, T, V]
    expected = 0.0
    for i, w in enumerate([1.0, 0.5, 0.25]):
        terms = []
        for b in range(2):
            for t in range(10):
                j = t + i  # head i (0-based) at position t predicts seq[t + i + 1] = y[t + i]
                if j < 10 and y[b, j] != IGNORE_INDEX:
                    terms.append(-F.log_softmax(logits[i, b, t], -1)[y[b, j]])
        expected += w * torch.stack(terms).mean()
        assert out.head_counts[i] == len(terms)
        assert math.isclose(float(out.head_losses[i]), float(torch.stack(terms).mean()),
                            rel_tol=1e-5)
    assert math.isclose(out.loss.item(), float(expected), rel_tol=1e-5)


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
    assert math.isclose(out.loss.item(), ref.loss.item(), rel_tol=1e-5)
    rel = (g - g_ref).abs().max() / g_ref.abs().max()
    assert rel <= 1e-5, rel
    assert [int(c) for c in out.head_correct] == [int(c) for c in ref.head_correct]


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
    a, ga = run(m, x, y, "sequential")
    b, gb = run(m, x, y, "sequential", loss_scale=0.25)
    assert float(a.loss) == pytest.approx(float(b.loss))
    torch.testing.assert_close(gb, ga * 0.25, rtol=1e-5, atol=1e-8)


def test_head_weights():
    assert head_weights("uniform", 3) == [1.0, 1.0, 1.0]
    assert head_weights("geometric:0.5", 3) == [1.0, 0.5, 0.25]
    assert head_weights([1, 2], 2) == [1.0, 2.0]
