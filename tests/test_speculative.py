"""Chain speculation (the tree path over `Tree.chain(k)`): greedy output identical to plain
greedy; sampling with sampled drafts exact (chi-square, which also rejects wrong rules); the
acceptance rule's rates against sum(min(p, q)) and an exact enumeration; the engine's forward
against the model's."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import multitoken.decoding.sampling as sampling
import multitoken.decoding.speculate as spec
from helpers_decode import HEAD_TYPES, one_thread, random_model, trained_model  # noqa: F401
from multitoken.decoding.engine import Engine
from multitoken.decoding.generate import generate
from multitoken.decoding.sampling import Sampling, accept_drafts, draw_distinct, residual
from multitoken.model import causal_context
from test_generate import PROMPTS, chi_square_pvalue, exact_joint, sample_many


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_chain_greedy_equals_plain_random_model(head_type):
    model = random_model(head_type)
    plain = generate(model, PROMPTS, 25).tokens
    for k in (1, 2, 3):
        assert generate(model, PROMPTS, 25, speculative="chain", num_drafts=k).tokens == plain
        for p, ref in zip(PROMPTS, plain):  # batch 1
            assert generate(model, p, 25, speculative="chain", num_drafts=k).tokens == [ref]


@pytest.mark.parametrize("head_type", ["transformer", "causal"])
def test_chain_greedy_equals_plain_with_real_acceptance(head_type):
    model = trained_model(head_type)
    plain = generate(model, PROMPTS, 40).tokens
    for k in (1, 2, 3):
        res = generate(model, PROMPTS, 40, speculative="chain", num_drafts=k)
        assert res.tokens == plain
        s = res.stats
        # drafts are accepted often, yet not always: both paths of every step are exercised
        assert 1.5 < s.tokens_per_forward <= k + 1 and len(s.acceptance) == k
        assert s.forwards < 3 * 40 / (k + 1) and min(s.acceptance) > 0.3
    res = generate(model, PROMPTS, 40, speculative="chain", num_drafts=3)
    assert res.stats.tokens_per_forward < 4.0  # some rejection happened


def test_chain_at_the_end_of_the_context():
    # drafts run past max_seq_len on the last steps; they can't be accepted and mustn't crash
    model = trained_model()  # max_seq_len 64
    prompt = [1, 2, 3] * 10
    plain = generate(model, prompt, 34).tokens
    assert generate(model, prompt, 34, speculative="chain").tokens == plain


def test_stop_and_finished_sequences_in_a_batch():
    model = trained_model()
    free = generate(model, PROMPTS, 30).tokens
    stop = free[1][6]
    ref = generate(model, PROMPTS, 30, stop=stop)
    res = generate(model, PROMPTS, 30, stop=stop, speculative="chain")
    assert res.tokens == ref.tokens and res.finish_reasons == ref.finish_reasons
    assert "stop" in res.finish_reasons


def test_stats_count_tokens_per_forward():
    model = trained_model()
    res = generate(model, PROMPTS[0], 31, speculative="chain")
    s = res.stats
    # the prefill yields the first token; every other token came from a decode forward
    assert s.new_tokens == 31 and s.tokens_per_forward == pytest.approx(30 / s.forwards)


# ---------------------------------------------------------------------------------------------
# Sampling exactness: drafts sampled from the draft heads' q, accepted with min(1, p/q).

PROMPT = [3, 5, 7, 9]
SETTINGS = [Sampling(1.5), Sampling(2.0, top_k=4), Sampling(1.2, top_p=0.9)]


@pytest.mark.parametrize("s", SETTINGS, ids=["temp", "top_k", "top_p"])
def test_chain_sampling_matches_exact_distribution(s):
    model = trained_model()
    expected = exact_joint(model, PROMPT, 3, s)
    samples, stats = sample_many(model, PROMPT, 3, s, mode="chain", num_drafts=2)  # batch 4000
    p, df = chi_square_pvalue(samples, expected)
    assert p > 1e-3, (p, df)
    assert 0.2 < stats.acceptance[0] < 0.95  # both acceptance and rejection happen often


def _accept_p_of_x(probs, q, child_tok, valid, generator):
    """Wrong: q ignored in the acceptance (a sampled draft accepted w.p. p(x), as if it were
    one-hot), yet the residual norm(max(0, p - q)) of the sampled-draft rule."""
    one_hot = F.one_hot(child_tok[..., 0], q.shape[-1]).to(q.dtype)
    choice, _ = accept_drafts(probs, one_hot, child_tok, valid, generator)
    return choice, residual(probs, q)


def _one_hot_residual(probs, q, child_tok, valid, generator):
    """Wrong: accepted w.p. min(1, p/q) (right), but on rejection p with x removed (the one-hot
    proposal's residual) instead of norm(max(0, p - q))."""
    choice, _ = accept_drafts(probs, q, child_tok, valid, generator)
    one_hot = F.one_hot(child_tok[..., 0], q.shape[-1]).to(q.dtype)
    return choice, residual(probs, one_hot)


@pytest.mark.parametrize("where, name, wrong", [
    # accepted with min(1, p/q), but on rejection resampled from p instead of the residual
    (sampling, "residual", lambda r, q: r),
    (spec, "accept_drafts", _accept_p_of_x),
    (spec, "accept_drafts", _one_hot_residual),
], ids=["resample_from_p", "accept_p_of_x", "one_hot_residual"])
@pytest.mark.parametrize("s", SETTINGS[:2], ids=["temp", "top_k"])
def test_the_statistic_catches_wrong_acceptance_rules(monkeypatch, where, name, wrong, s):
    model = trained_model()
    expected = exact_joint(model, PROMPT, 3, s)
    monkeypatch.setattr(where, name, wrong)
    samples, _ = sample_many(model, PROMPT, 3, s, mode="chain", num_drafts=2)
    p, _ = chi_square_pvalue(samples, expected)
    assert p < 1e-6


def _one_hot_rule(probs, q, child_tok, valid, generator):
    """The former rule: the draft scored as a one-hot proposal (accepted w.p. p(x), else p
    without x), whatever distribution it was drawn from."""
    one_hot = F.one_hot(child_tok[..., 0], q.shape[-1]).to(q.dtype)
    return accept_drafts(probs, one_hot, child_tok, valid, generator)


def test_one_hot_scoring_of_sampled_drafts_is_exact_but_accepts_less(monkeypatch):
    model = trained_model()
    s = SETTINGS[0]
    expected = exact_joint(model, PROMPT, 3, s)
    _, right = sample_many(model, PROMPT, 3, s, mode="chain", num_drafts=2)
    monkeypatch.setattr(spec, "accept_drafts", _one_hot_rule)
    samples, one_hot = sample_many(model, PROMPT, 3, s, mode="chain", num_drafts=2)
    p, df = chi_square_pvalue(samples, expected)
    assert p > 1e-3, (p, df)
    assert one_hot.acceptance[0] < right.acceptance[0] - 0.1


# Hand-made target p and draft q: sum(min(p, q)) = 0.5, sum(p q) = 0.18.
P = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
Q = torch.tensor([0.1, 0.4, 0.2, 0.0, 0.3])


def _run_rule(p, q, k, n, seed=0):
    """n independent nodes with target p and k children drawn without replacement from q ->
    (accepted child or k [n], the token emitted after the node [n])."""
    g = torch.Generator().manual_seed(seed)
    probs, qs = p.expand(n, 1, -1), q.expand(n, 1, -1)
    kids = draw_distinct(qs, k, g)  # [n, 1, k]
    choice, stop = accept_drafts(probs, qs, kids, torch.ones(1, k, dtype=torch.bool), g)
    drawn = torch.multinomial(stop[:, 0], 1, generator=g)[:, 0]
    picked = kids[:, 0].gather(1, choice.clamp(max=k - 1))[:, 0]
    return choice[:, 0], torch.where(choice[:, 0] < k, picked, drawn)


def _tolerance(a, n):
    return 5 * math.sqrt(a * (1 - a) / n)  # 5 standard errors of a rate estimated from n


def test_one_draft_is_accepted_with_probability_sum_min_p_q():
    n = 100_000
    choice, out = _run_rule(P, Q, 1, n)
    a = float(torch.minimum(P, Q).sum())  # 0.5
    assert abs((choice == 0).float().mean().item() - a) < _tolerance(a, n)
    # the wasteful one-hot rule (exact too, see the docstring) would accept sum(p q) = 0.18
    assert abs(float((P * Q).sum()) - a) > 20 * _tolerance(a, n)
    # and what comes out is p
    pv, _ = chi_square_pvalue([(int(x),) for x in out], {(x,): float(P[x]) for x in range(4)})
    assert pv > 1e-3


def _exact_acceptance(p: list[float], q: list[float], k: int) -> float:
    """P(one of k children drawn without replacement from q is accepted), by enumerating the
    draws and the recursive rule in float64 (an independent reimplementation)."""
    if k == 0 or sum(q) == 0:
        return 0.0
    m, out = sum(q), 0.0
    for x, qx in enumerate(q):
        if qx == 0:
            continue
        qi = [v / m for v in q]
        a = min(1.0, p[x] / qi[x])
        out += qi[x] * a
        if a < 1.0:
            res = [max(0.0, pv - qv) for pv, qv in zip(p, qi)]
            r = [v / sum(res) for v in res]
            rest = [0.0 if y == x else v for y, v in enumerate(q)]
            out += qi[x] * (1 - a) * _exact_acceptance(r, rest, k - 1)
    return out


def test_exact_acceptance_reference():
    # one child: sum(min(p, q)); more children accept more; once the 4 tokens q can draw are
    # all children, everything but p's mass outside q's support (token 3: 0.1) is accepted
    a = [_exact_acceptance(P.tolist(), Q.tolist(), k) for k in range(1, 6)]
    assert a[0] == pytest.approx(0.5) and a[3] == a[4] == pytest.approx(0.9)
    assert a[0] < a[1] - 0.05 and a[1] < a[2] - 0.05 and a[2] < a[3] - 0.05


@pytest.mark.parametrize("k", [2, 3, 5])
def test_siblings_acceptance_and_output(k):
    # k = 5 > the 4 tokens q can draw: the fifth child has probability 0 and is never accepted
    n = 60_000
    choice, out = _run_rule(P, Q, k, n, seed=k)
    a = _exact_acceptance(P.tolist(), Q.tolist(), k)
    assert abs((choice < k).float().mean().item() - a) < _tolerance(a, n)
    assert not (choice == 4).any()
    pv, _ = chi_square_pvalue([(int(x),) for x in out], {(x,): float(P[x]) for x in range(4)})
    assert pv > 1e-3


def test_draws_are_distinct_and_in_draw_order():
    g = torch.Generator().manual_seed(0)
    n = 60_000
    kids = draw_distinct(Q.expand(n, -1), 3, g)  # [n, 3]
    assert (kids[:, 0] != kids[:, 1]).all() and (kids[:, 1] != kids[:, 2]).all()
    assert (kids[:, 0] != kids[:, 2]).all()
    # the first draw is a draw from q; the second, given the first, from q without it
    pv, _ = chi_square_pvalue([(int(x),) for x in kids[:, 0]],
                              {(x,): float(Q[x]) for x in range(5) if Q[x] > 0})
    assert pv > 1e-3
    first1 = kids[:, 0] == 1
    rest = Q.clone()
    rest[1] = 0
    pv, _ = chi_square_pvalue([(int(x),) for x in kids[first1, 1]],
                              {(x,): float(rest[x] / rest.sum()) for x in range(5) if rest[x] > 0})
    assert pv > 1e-3
    # only four tokens have mass: the fifth draw is the one of probability 0
    assert (Q[draw_distinct(Q.expand(100, -1), 5, g)[:, 4]] == 0).all()


def _nucleus_by_sorting(probs, top_p):
    """Top-p by sorting the whole vocabulary: keep a token while the mass before it < top_p."""
    sp, order = torch.sort(probs, dim=-1, descending=True)
    drop = (torch.cumsum(sp, dim=-1) - sp) >= top_p
    out = probs.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), 0.0)
    return out / out.sum(-1, keepdim=True)


@pytest.mark.parametrize("V, scale, head", [
    (260, 4.0, 0),  # peaked: a few tokens
    (260, 0.5, 0),  # flat: more than 32 candidates, a quarter of V -> the whole row is sorted
    (3000, 0.1, 100),  # 100 likely tokens: more than 32 candidates, fewer than 256
    (3000, 1.0, 0),  # large and flat
    (20, 0.1, 0),  # fewer tokens than 32
], ids=["peaked", "flat", "hundred", "large_flat", "tiny_vocab"])
@pytest.mark.parametrize("top_p", [0.5, 0.95, 0.999999])
def test_nucleus_is_top_p_by_sorting(V, scale, head, top_p):
    g = torch.Generator().manual_seed(V)
    logits = torch.randn(3, 5, V, generator=g) * scale
    logits[..., head:] -= 10.0 if head else 0.0  # the first `head` tokens hold ~all the mass
    probs = torch.softmax(logits, dim=-1)
    got, want = sampling.nucleus(probs, top_p), _nucleus_by_sorting(probs, top_p)
    assert torch.equal(got > 0, want > 0)
    assert torch.allclose(got, want, atol=1e-7, rtol=0)
    kept = (got > 0).sum(-1)
    assert kept.min() >= 1
    if head and top_p == 0.5:
        assert kept.min() > 32 and kept.max() < 100


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_engine_forward_matches_model_hidden(head_type):
    model = random_model(head_type)
    idx = torch.tensor([[1, 5, 9, 2, 7, 3], [4, 4, 8, 1, 0, 6]])
    with torch.no_grad():
        ref = model.hidden(idx)  # full causal forward, all heads
    eng = Engine(model, 4)
    cache = model.new_cache(2, 16)
    pos = torch.arange(6).expand(2, 6)
    with torch.inference_mode():
        fwd = eng.forward(idx, pos, causal_context(cache, pos, 6))
        assert torch.allclose(fwd.h0, ref[0], atol=1e-5)
        sel = torch.tensor([5, 3])
        draft_hidden = eng.draft_hidden(fwd, sel)
        for i in range(1, 4):
            assert torch.allclose(draft_hidden[i - 1], ref[i][torch.arange(2), sel], atol=1e-5)


def test_low_precision_drafts_keep_the_output_exact(monkeypatch):
    # drafts are proposals: computing them in bf16 may change acceptance, never the output
    import functools

    model = trained_model()
    plain = generate(model, PROMPTS, 30).tokens
    monkeypatch.setattr(spec, "Engine", functools.partial(Engine, draft_dtype=torch.bfloat16))
    res = generate(model, PROMPTS, 30, speculative="chain")
    assert res.tokens == plain and res.stats.tokens_per_forward > 2.0
