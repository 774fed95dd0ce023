"""Chain speculation (the tree path over `Tree.chain(k)`): greedy output identical to plain
greedy; sampling exact (chi-square); the engine's forward against the model's."""

from __future__ import annotations

import pytest
import torch

import multitoken.decoding.speculate as spec
from helpers_decode import HEAD_TYPES, one_thread, random_model, trained_model  # noqa: F401
from multitoken.decoding.engine import Engine
from multitoken.decoding.generate import generate
from multitoken.decoding.sampling import Sampling, accept_one_hot, residual_one_hot
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
# Sampling exactness.

PROMPT = [3, 5, 7, 9]
SETTINGS = [Sampling(1.5), Sampling(2.0, top_k=4), Sampling(1.2, top_p=0.9)]


@pytest.mark.parametrize("s", SETTINGS, ids=["temp", "top_k", "top_p"])
def test_chain_sampling_matches_exact_distribution(s):
    model = trained_model()
    expected = exact_joint(model, PROMPT, 3, s)
    samples, stats = sample_many(model, PROMPT, 3, s, mode="chain", num_drafts=2)
    p, df = chi_square_pvalue(samples, expected)
    assert p > 1e-3, (p, df)
    assert 0.2 < stats.acceptance[0] < 0.95  # both acceptance and rejection happen often


def _always_accept(probs, child_tok, valid, generator):
    """Wrong: a greedy draft scored as if drawn from a proposal equal to p (min(1, p/q) = 1)."""
    return torch.where(valid[..., 0], 0, valid.shape[-1]).expand(probs.shape[:2])


def _residual_keeps_draft(probs, rejected, valid):
    """Wrong: accept w.p. p(x) (the right rule) but on rejection resample from p itself, x not
    removed."""
    return probs


@pytest.mark.parametrize("name, wrong", [("accept_one_hot", _always_accept),
                                         ("residual_one_hot", _residual_keeps_draft)])
def test_the_statistic_catches_wrong_acceptance_rules(monkeypatch, name, wrong):
    model = trained_model()
    s = SETTINGS[0]
    expected = exact_joint(model, PROMPT, 3, s)
    monkeypatch.setattr(spec, name, wrong)
    samples, _ = sample_many(model, PROMPT, 3, s, mode="chain", num_drafts=2)
    p, _ = chi_square_pvalue(samples, expected)
    assert p < 1e-6


def test_one_hot_rule_unit():
    # p(draft) = 1 -> always accepted; p(draft) = 0 -> never, and never resampled; a second
    # child holding all the mass left after the first one's rejection -> always accepted then
    probs = torch.tensor([[[0.0, 1.0, 0.0], [0.5, 0.0, 0.5], [0.0, 0.5, 0.5]]]).expand(2, 3, 3)
    child_tok = torch.tensor([[1, 0], [1, 0], [1, 2]]).expand(2, 3, 2)
    valid = torch.tensor([[True, False], [True, False], [True, True]])
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(40):
        choice = accept_one_hot(probs, child_tok, valid, g)
        assert choice[:, :2].tolist() == [[0, 2]] * 2  # 2 = none accepted
        seen.update(choice[:, 2].tolist())
        res = residual_one_hot(probs[:, 1], child_tok[:, 1], valid[1].expand(2, 2))
        assert res.tolist() == [[0.5, 0.0, 0.5]] * 2  # the rejected token 1 had p = 0 anyway
        nxt = torch.multinomial(res, 1, generator=g)
        assert set(nxt.flatten().tolist()) <= {0, 2}
    assert seen == {0, 1}
    # the residual removes exactly the rejected tokens (here the first child only)
    res = residual_one_hot(probs[:, 2], child_tok[:, 2], torch.tensor([[True, False]] * 2))
    assert res.tolist() == [[0.0, 0.0, 0.5]] * 2


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
