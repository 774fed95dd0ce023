"""Dynamic draft trees (EAGLE-2 style, `decoding/dynamic.py`) with token-conditioned heads:
greedy equals plain decoding token for token, sampling matches the exact distribution, the
drafter's cache and every row's tree equal a full recomputation after every step, the beam is
the best nodes by cumulative draft probability, and rows really get different trees."""

from __future__ import annotations

import pytest
import torch

from helpers_decode import one_thread, random_model, trained_model  # noqa: F401
from multitoken.decoding.dynamic import LATER_DRAW, DynamicDecoder, DynamicShape, RowTree
from multitoken.decoding.generate import generate
from multitoken.decoding.sampling import Sampling, process_logits
from multitoken.errors import MultitokenError
from multitoken.model import MultiTokenModel
from test_conditioned import TC, sharp_tc_model
from test_generate import PROMPTS, chi_square_pvalue, exact_joint, sample_many


def test_shape_layout():
    s = DynamicShape(3, top_k=3, beam=2)
    assert (s.n_groups, s.size) == (5, 15)
    assert list(s.nodes_at(1)) == [1, 2, 3]
    assert list(s.groups_at(1)) == [1, 2] and list(s.nodes_at(2)) == list(range(4, 10))
    t = s.tensors(torch.device("cpu"))
    assert t["depth"].tolist() == [0] + [1] * 3 + [2] * 6 + [3] * 6
    assert t["group_children"][2].tolist() == [7, 8, 9]
    assert DynamicShape.parse("2X1", 4) == DynamicShape(4, 2, 1)


@pytest.mark.parametrize("text", ["2", "axb", "2x3", "0x0"])
def test_bad_shapes(text):
    with pytest.raises(MultitokenError, match="dynamic tree"):
        DynamicShape.parse(text, 3)


def test_refused_without_token_conditioned_heads():
    with pytest.raises(MultitokenError, match="token_conditioned"):
        generate(random_model(), [1, 2, 3], 5, speculative="dynamic")
    with pytest.raises(MultitokenError, match="vocabulary"):
        generate(random_model(TC), [1, 2, 3], 5, speculative="dynamic", dynamic="40x1")


def test_greedy_equals_plain_batched_and_alone():
    for model in (random_model(TC), trained_model(TC), sharp_tc_model()):
        plain = generate(model, PROMPTS, 30).tokens
        for shape in ("2x2", "3x1", "3x3"):
            res = generate(model, PROMPTS, 30, speculative="dynamic", dynamic=shape)
            assert res.tokens == plain, shape
            assert res.stats.tree_size == DynamicShape.parse(shape, model.n_future - 1).size
        for p, ref in zip(PROMPTS, plain):
            assert generate(model, p, 30, speculative="dynamic", num_drafts=2).tokens == [ref]


def test_one_by_one_is_the_chain_even_when_sampling():
    """1x1 drafts and verifies what a chain does, consuming the same random numbers."""
    model = sharp_tc_model()
    for k in (1, 3):
        for s in (Sampling(0.0), Sampling(1.0), Sampling(0.9, top_p=0.8)):
            out = []
            for mode in (dict(speculative="chain"), dict(speculative="dynamic", dynamic="1x1")):
                g = torch.Generator().manual_seed(3)
                out.append(generate(model, PROMPTS, 24, temperature=s.temperature,
                                    top_p=s.top_p, num_drafts=k, generator=g, **mode).tokens)
            assert out[0] == out[1], (k, s)


def test_stops_and_the_end_of_the_context():
    model = trained_model(TC)
    free = generate(model, PROMPTS, 30).tokens
    stop = free[1][6]
    ref = generate(model, PROMPTS, 30, stop=stop)
    res = generate(model, PROMPTS, 30, stop=stop, speculative="dynamic")
    assert res.tokens == ref.tokens and res.finish_reasons == ref.finish_reasons
    prompt = [1, 2, 3] * 10  # max_seq_len 64: the trees run past the context on the last steps
    assert (generate(model, prompt, 34, speculative="dynamic", dynamic="3x3").tokens
            == generate(model, prompt, 34).tokens)


@pytest.mark.parametrize("s", [Sampling(1.5), Sampling(1.2, top_p=0.9)], ids=["temp", "top_p"])
@pytest.mark.parametrize("shape", ["2x2", "3x1"])
def test_sampling_matches_exact_distribution(s, shape):
    """Each node's children are drawn without replacement from the module run on that node's
    token and verified by recursive rejection sampling; which nodes get children depends on
    earlier draws only: plain sampling's distribution."""
    model = trained_model(TC)
    prompt = [3, 5, 7, 9]
    expected = exact_joint(model, prompt, 3, s)
    samples, stats = sample_many(model, prompt, 3, s, mode="dynamic", dynamic=shape)
    p, df = chi_square_pvalue(samples, expected)
    assert p > 1e-3, (p, df)
    assert stats.tokens_per_forward > 1.3


# ---------------------------------------------------------------------------------------------
# Every row's tree against a full recomputation.


def _drive(model: MultiTokenModel, prompts: list[list[int]], shape: DynamicShape, s: Sampling,
           steps: int) -> tuple[list[int], set[tuple[int, ...]]]:
    """Run DynamicDecoder by hand and, after the prefill and every step, check each row's tree
    against the full uncached forward over (accepted tokens, root, the node's path): every
    expanded node's children come from head depth+2's distribution at q (sampling: its q;
    greedy: its top ranks), and the expanded nodes of each depth are that depth's `beam` best
    by cumulative draft probability (sampling: by draws that were not their parent's first,
    then that). Returns the drafts accepted and the trees seen (as the
    rows' group_node tuples)."""
    g = torch.Generator().manual_seed(0)
    dec = DynamicDecoder(model, shape, s, g)
    t = dec.t
    B, T, K = len(prompts), max(map(len, prompts)), shape.depth
    seqs = [list(p) for p in prompts]
    accepted, trees = [], set()
    with torch.inference_mode():
        idx = torch.tensor([p + [0] * (T - len(p)) for p in prompts])
        cache = dec.engine.new_cache(B, T + steps * (K + 1) + shape.size + 2)
        last = torch.tensor([len(p) - 1 for p in prompts])
        for b, tok in enumerate(dec.start(cache, idx, last).tolist()):
            seqs[b].append(tok)
        for step in range(steps + 1):
            rt = RowTree(shape, t, dec.drafts.group_node)
            for b in range(B):
                q = len(seqs[b]) - 2  # the root is the last token, at q + 1
                assert int(dec.q[b]) == q
                nodes = [None, *dec.drafts.tokens[b].tolist()]
                trees.add(tuple(dec.drafts.group_node[b].tolist()))
                score = {0: 0.0}
                for grp in range(shape.n_groups):
                    v = int(dec.drafts.group_node[b, grp])
                    d = int(t["depth"][v])
                    path = [nodes[j] for j in rt.path_nodes[b, v, :d].tolist()]
                    logits = model(torch.tensor([seqs[b] + path]))[d + 1, 0, q]
                    kids = t["group_children"][grp].tolist()
                    if s.greedy:
                        top = logits.topk(shape.top_k + 1)
                        gaps = top.values[:-1] - top.values[1:]
                        if bool((gaps > 1e-4).all()):
                            assert [nodes[c] for c in kids] == top.indices[:-1].tolist()
                        dist = logits.float().log_softmax(-1).exp()
                    else:
                        dist = process_logits(logits[None].float(), s)[0]
                        torch.testing.assert_close(dec.drafts.q[b, grp], dist, rtol=0,
                                                   atol=2e-5)
                    for i, c in enumerate(kids):  # sampling: draw order, then probability
                        later = 0.0 if s.greedy or i == 0 else LATER_DRAW
                        score[c] = score[v] + float(dist[nodes[c]].log()) - later
                for d in range(1, K):  # the beam: the best-scored nodes of depth d
                    chosen = dec.drafts.group_node[b, list(shape.groups_at(d))].tolist()
                    ranked = sorted(shape.nodes_at(d), key=lambda j: -score[j])
                    cut = score[ranked[shape.beam - 1]]
                    if shape.beam == len(ranked) or cut - score[ranked[shape.beam]] > 1e-4:
                        assert sorted(chosen) == sorted(ranked[:shape.beam]), (step, b, d)
            if step == steps:
                break
            pos = torch.tensor([len(sq) - 1 for sq in seqs])
            out = dec.step(cache, pos, int(pos.max()) + shape.size + 1)
            for b in range(B):
                n = int(out.n[b])
                accepted.append(n)
                seqs[b].extend(out.tokens[b, :n + 1].tolist())
    return accepted, trees


@pytest.mark.parametrize("s", [Sampling(0.0), Sampling(1.0)], ids=["greedy", "sampled"])
def test_trees_and_draft_cache_equal_full_recomputation(s):
    model = trained_model(TC, n_future=5) if s.greedy else sharp_tc_model()
    shape = DynamicShape(4, top_k=3, beam=2)
    # ragged prompts, one shorter than the tree is deep (heads with no exact entry yet)
    accepted, trees = _drive(model, [[1, 2, 3, 4, 5, 6], [7, 8], [3]], shape, s, steps=8)
    assert len(set(accepted)) >= 2
    assert len(trees) >= 3  # the rows' trees differ from row to row and step to step
