"""Token-conditioned heads (DeepSeek-V3-style MTP modules): the model reads the tokens each
head follows and no later ones; the memory-efficient losses equal naive with the attention gap
of heads 4.. in play; decoding's draft-head cache equals a full recomputation at every step;
chains are exact (greedy token-identical, sampling chi-square) with batch > 1."""

from __future__ import annotations

import pytest
import torch

from helpers_decode import one_thread, random_model, trained_model  # noqa: F401
from multitoken.config import ModelConfig
from multitoken.decoding.conditioned import ConditionedDecoder
from multitoken.decoding.generate import generate
from multitoken.decoding.sampling import Sampling, process_logits
from multitoken.decoding.tree import Tree
from multitoken.loss import IGNORE_INDEX, mtp_loss
from multitoken.model import MultiTokenModel, TokenConditionedHead
from test_generate import PROMPTS, chi_square_pvalue, exact_joint, sample_many

TC = "token_conditioned"


def tc_model(n_future: int = 5, seed: int = 0, **kw) -> MultiTokenModel:
    cfg = dict(vocab_size=37, dim=32, n_layers=n_future + 1, n_heads=4, n_kv_heads=2,
               n_future=n_future, max_seq_len=64, head_type=TC)
    cfg.update(kw)
    torch.manual_seed(seed)
    return MultiTokenModel(ModelConfig(**cfg)).eval()


def sharp_tc_model() -> MultiTokenModel:
    """A random model whose distributions are not near-uniform (scaled unembedding), so that
    sampled drafts are rejected at every depth now and then."""
    model = tc_model(n_future=5)
    with torch.no_grad():
        model.output.weight.mul_(4.0)
    return model


def test_structure_and_parameter_count():
    m = tc_model(n_future=4)
    assert not isinstance(m.heads[0], TokenConditionedHead)
    assert all(isinstance(h, TokenConditionedHead) for h in m.heads[1:])
    assert len(m.layers) == 1  # parameter matching: each head takes one of n_layers
    D = m.cfg.dim
    plain = MultiTokenModel(ModelConfig(**{**m.cfg.__dict__, "head_type": "transformer"}))
    # each of heads 2..4: a 2D x D projection and two norms beyond its layer
    assert m.num_params() - plain.num_params() == 3 * (2 * D * D + 2 * D)


def test_head_i_reads_tokens_up_to_t_plus_i_only():
    """h_i[t] depends on x_{<= t+i}: the token it is conditioned on and its past; nothing
    later (what decoding can give it)."""
    m = tc_model()
    idx = torch.randint(0, 37, (1, 16))
    with torch.no_grad():
        ref = m(idx)  # [n, 1, T, V]
        for t in (3, 7):
            for i in range(m.n_future):
                if t + i + 1 >= 16:
                    continue
                other = idx.clone()
                other[0, t + i + 1:] = (other[0, t + i + 1:] + 1) % 37
                got = m(other, heads=[i])[0]
                torch.testing.assert_close(got[0, t], ref[i, 0, t], rtol=0, atol=1e-6)
                if t + i < 16:  # ... and it does read x_{t+i}
                    moved = idx.clone()
                    moved[0, t + i] = (moved[0, t + i] + 1) % 37
                    assert not torch.allclose(m(moved, heads=[i])[0][0, t], ref[i, 0, t])


@pytest.mark.parametrize("method", ["sequential", "chunked"])
def test_memory_efficient_gradients_equal_naive_with_the_gap(method):
    m = tc_model(n_future=5).train()  # heads 4 and 5 attend with a gap
    x, y = torch.randint(0, 37, (3, 20)), torch.randint(0, 37, (3, 20))
    y[1, -6:] = IGNORE_INDEX
    w = [1.0, 0.8, 0.6, 0.4, 0.2]

    def run(meth):
        m.zero_grad(set_to_none=True)
        out = mtp_loss(m, x, y, method=meth, backward=True, weights=w)
        return out, torch.cat([p.grad.flatten() for p in m.parameters()])

    ref, g_ref = run("naive")
    out, g = run(method)
    torch.testing.assert_close(out.loss_sum, ref.loss_sum, rtol=1e-5, atol=0)
    assert ((g - g_ref).abs().max() / g_ref.abs().max()) <= 1e-5
    assert m.heads[4].eh_proj.weight.grad.abs().sum() > 0
    assert m.tok_embeddings.weight.grad is not None


@pytest.mark.parametrize("method", ["sequential", "chunked"])
def test_gradient_accumulation_equals_one_batch(method):
    """Two micro-batches with loss_scale 1/2 (what train.grad_accum=2 runs) accumulate the
    gradient of the naive loss over both at once (equal label counts per half)."""
    m = tc_model(n_future=4).train()
    x, y = torch.randint(0, 37, (4, 20)), torch.randint(0, 37, (4, 20))
    m.zero_grad(set_to_none=True)
    mtp_loss(m, x, y, method="naive", backward=True)
    g_ref = torch.cat([p.grad.flatten() for p in m.parameters()])
    m.zero_grad(set_to_none=True)
    for half in (slice(0, 2), slice(2, 4)):
        mtp_loss(m, x[half], y[half], method=method, backward=True, loss_scale=0.5)
    g = torch.cat([p.grad.flatten() for p in m.parameters()])
    assert ((g - g_ref).abs().max() / g_ref.abs().max()) <= 1e-5


def test_model_refuses_cached_draft_heads():
    m = tc_model(n_future=3)
    with pytest.raises(ValueError, match="decoding.conditioned"):
        m.head(1, torch.zeros(1, 2, 32), *m.rope(2, None))


# ---------------------------------------------------------------------------------------------
# Decoding: the drafter's cache against a full recomputation.


def _drive(model: MultiTokenModel, prompts: list[list[int]], tree: Tree, s: Sampling,
           steps: int):
    """Run ConditionedDecoder by hand (no row ever finishes) and, after the prefill and after
    every step, compare each row's drafts with the full uncached forward: for every tree node v
    with children (depth d), head d+2's distribution at the draft position q over (accepted
    tokens, root, v's path) must be v's q (sampling), or v's child of rank r its r-th token
    (greedy). Returns the numbers of drafts accepted."""
    g = torch.Generator().manual_seed(0)
    dec = ConditionedDecoder(model, tree, s, g)
    t = tree.tensors(torch.device("cpu"))
    B, T, k = len(prompts), max(map(len, prompts)), tree.depth
    seqs = [list(p) for p in prompts]
    accepted = []
    with torch.inference_mode():
        idx = torch.tensor([p + [0] * (T - len(p)) for p in prompts])
        cache = dec.engine.new_cache(B, T + steps * (k + 1) + tree.size + 2)
        last = torch.tensor([len(p) - 1 for p in prompts])
        for b, tok in enumerate(dec.start(cache, idx, last).tolist()):
            seqs[b].append(tok)
        for step in range(steps + 1):
            for b in range(B):
                q = len(seqs[b]) - 2  # the root is the last token, at q + 1
                assert int(dec.q[b]) == q
                nodes = [None, *dec.drafts.tokens[b].tolist()]  # node 0: the root
                for grp, v in enumerate(t["group_node"].tolist()):
                    path = [nodes[j] for j in t["path_nodes"][v, :t["depth"][v]].tolist()]
                    logits = model(torch.tensor([seqs[b] + path]))[len(path) + 1, 0, q]
                    if s.greedy:
                        for c in t["group_children"][grp].tolist():
                            if c < 0:
                                continue
                            r = tree.paths[c - 1][-1]
                            top = logits.topk(r + 2)
                            if top.values[r] - top.values[r + 1] > 1e-4 and (
                                    r == 0 or top.values[r - 1] - top.values[r] > 1e-4):
                                assert nodes[c] == int(top.indices[r]), (step, b, c)
                    else:
                        want = process_logits(logits[None].float(), s)[0]
                        torch.testing.assert_close(dec.drafts.q[b, grp], want, rtol=0,
                                                   atol=2e-5)
            if step == steps:
                break
            pos = torch.tensor([len(sq) - 1 for sq in seqs])
            out = dec.step(cache, pos, int(pos.max()) + tree.size + 1)
            for b in range(B):
                n = int(out.n[b])
                accepted.append(n)
                seqs[b].extend(out.tokens[b, :n + 1].tolist())
    return accepted


@pytest.mark.parametrize("s", [Sampling(0.0), Sampling(1.0)], ids=["greedy", "sampled"])
def test_draft_cache_equals_full_recomputation(s):
    model = trained_model(TC, n_future=5) if s.greedy else sharp_tc_model()
    # ragged prompts, one shorter than the chain (heads with no exact entry yet)
    accepted = _drive(model, [[1, 2, 3, 4, 5, 6], [7, 8], [3]], Tree.chain(4), s, steps=8)
    assert len(set(accepted)) >= 3  # rows accept different numbers of drafts


TREE = Tree([(0, 0, 0), (0, 1), (1, 0), (1, 1, 0), (2,), (0, 0, 1)])


@pytest.mark.parametrize("s", [Sampling(0.0), Sampling(1.0)], ids=["greedy", "sampled"])
def test_tree_draft_cache_equals_full_recomputation(s):
    """Trees: each node's children come from the module run on that node's token (siblings'
    subtrees differ), the query columns' scratch slots disturb nothing, and the accepted path
    (not in place for some nodes) refreshes the exact entries as a chain does."""
    model = trained_model(TC, n_future=5) if s.greedy else sharp_tc_model()
    accepted = _drive(model, [[1, 2, 3, 4, 5, 6], [7, 8], [3]], TREE, s, steps=8)
    assert len(set(accepted)) >= 2


def test_chain_greedy_equals_plain():
    for model in (random_model(TC), trained_model(TC)):
        plain = generate(model, PROMPTS, 30).tokens
        for k in (1, 2, 3):
            res = generate(model, PROMPTS, 30, speculative="chain", num_drafts=k)
            assert res.tokens == plain
            for p, ref in zip(PROMPTS, plain):  # batch 1
                assert generate(model, p, 30, speculative="chain", num_drafts=k).tokens == [ref]
    s = res.stats
    assert 1.5 < s.tokens_per_forward < 4 and len(s.acceptance) == 3


def test_stops_and_the_end_of_the_context():
    model = trained_model(TC)
    free = generate(model, PROMPTS, 30).tokens
    stop = free[1][6]
    ref = generate(model, PROMPTS, 30, stop=stop)
    res = generate(model, PROMPTS, 30, stop=stop, speculative="chain")
    assert res.tokens == ref.tokens and res.finish_reasons == ref.finish_reasons
    prompt = [1, 2, 3] * 10  # max_seq_len 64: drafts run past the context on the last steps
    assert (generate(model, prompt, 34, speculative="chain").tokens
            == generate(model, prompt, 34).tokens)


@pytest.mark.parametrize("s", [Sampling(1.5), Sampling(1.2, top_p=0.9), Sampling(2.0, top_k=4)],
                         ids=["temp", "top_p", "top_k"])
def test_chain_sampling_matches_exact_distribution(s):
    model = trained_model(TC)
    prompt = [3, 5, 7, 9]
    expected = exact_joint(model, prompt, 3, s)
    samples, stats = sample_many(model, prompt, 3, s, mode="chain", num_drafts=2)
    p, df = chi_square_pvalue(samples, expected)
    assert p > 1e-3, (p, df)
    assert 0.2 < stats.acceptance[0] < 0.98


SMALL_TREE = [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]


def test_tree_greedy_equals_plain_batched_and_alone():
    for model in (random_model(TC), trained_model(TC)):
        plain = generate(model, PROMPTS, 30).tokens
        res = generate(model, PROMPTS, 30, speculative="tree", tree=SMALL_TREE)
        assert res.tokens == plain and res.stats.tree_size == 6
        for p, ref in zip(PROMPTS, plain):
            assert generate(model, p, 30, speculative="tree", tree=SMALL_TREE).tokens == [ref]
    # a chain-shaped tree is that chain (calibrate's verification names chains as trees)
    m = random_model(TC)
    as_tree = generate(m, [1, 2, 3], 12, speculative="tree", tree=[(0,), (0, 0)])
    chain = generate(m, [1, 2, 3], 12, speculative="chain", num_drafts=2)
    assert as_tree.tokens == chain.tokens and as_tree.stats.num_drafts == 2


@pytest.mark.parametrize("s", [Sampling(1.5), Sampling(1.2, top_p=0.9)], ids=["temp", "top_p"])
def test_tree_sampling_matches_exact_distribution(s):
    """Recursive rejection sampling over each node's own q (children drawn without replacement
    from the module run on that node's token): plain sampling's distribution."""
    model = trained_model(TC)
    prompt = [3, 5, 7, 9]
    expected = exact_joint(model, prompt, 3, s)
    samples, stats = sample_many(model, prompt, 3, s, mode="tree", tree=SMALL_TREE)
    p, df = chi_square_pvalue(samples, expected)
    assert p > 1e-3, (p, df)
    assert stats.tokens_per_forward > 1.3
