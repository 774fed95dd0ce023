"""A chain is a tree: chain speculation and tree speculation over `Tree.chain(k)` agree exactly.

Same tokens, acceptance, tokens per forward and forwards, for parallel (transformer), causal and
linear heads, k = 1..3 drafts, greedy and sampling (the same generator seed gives the same
draws, so the sampled tokens agree too). This was checked against the separate chain decoder
before the two paths were merged; it now checks that speculative="chain" is that tree.
"""

from __future__ import annotations

import pytest
import torch

from helpers_decode import one_thread, trained_model  # noqa: F401 - one_thread is autouse
from multitoken.decoding.generate import generate
from multitoken.decoding.tree import Tree
from test_generate import PROMPTS


def _run(model, prompt, mode, k, seed=None, **kw):
    tree = Tree.chain(k).paths if mode == "tree" else None
    g = None if seed is None else torch.Generator().manual_seed(seed)
    res = generate(model, prompt, 30, speculative=mode, num_drafts=k, tree=tree, generator=g,
                   **kw)
    s = res.stats
    return res.tokens, s.acceptance, s.tokens_per_forward, s.forwards, s.num_drafts


def test_chain_tree_structure():
    for k in (1, 2, 3):
        t = Tree.chain(k)
        assert t.paths == [(0,) * d for d in range(1, k + 1)] and t.is_chain
        assert (t.size, t.depth, t.max_rank) == (k, k, 1)
        x = t.tensors(torch.device("cpu"))
        assert x["parent"].tolist() == [0, *range(k)]
        assert x["in_place"].all()  # a chain never needs its keys/values moved
    assert not Tree([(0,), (1,)]).is_chain and not Tree([(0, 1)]).is_chain


@pytest.mark.parametrize("head_type", ["transformer", "causal", "linear"])
def test_chain_and_chain_tree_agree(head_type):
    model = trained_model(head_type)
    for k in (1, 2, 3):
        chain = _run(model, PROMPTS, "chain", k)
        assert chain == _run(model, PROMPTS, "tree", k)
        assert chain[2] > 1.2  # drafts are accepted: the comparison covers both outcomes
        for prompt in PROMPTS:
            for temperature, top_k in ((1.0, None), (1.5, 4)):
                kw = dict(temperature=temperature, top_k=top_k, seed=7)
                assert _run(model, prompt, "chain", k, **kw) == _run(model, prompt, "tree", k, **kw)
