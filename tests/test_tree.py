"""Tree speculation: tree structure, greedy == plain greedy, exact sampling, KV compaction."""

from __future__ import annotations

import pytest
import torch

import multitoken.decoding.sampling as sampling
import multitoken.decoding.speculate as spec
from helpers_decode import HEAD_TYPES, one_thread, random_model, trained_model  # noqa: F401
from multitoken.decoding.generate import generate
from multitoken.decoding.sampling import Sampling, residual
from multitoken.decoding.tree import Tree, default_tree, grow_tree, tree_context
from multitoken.errors import MultitokenError
from multitoken.model import KVCache
from test_generate import PROMPTS, chi_square_pvalue, exact_joint, sample_many

WIDE = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (2, 0), (0, 0, 0), (0, 1, 0), (1, 0, 0)]


def test_tree_structure():
    t = Tree([(1, 0), (0, 0, 1)])  # prefixes are added, order is depth-first
    assert t.paths == [(0,), (0, 0), (0, 0, 1), (1,), (1, 0)]
    assert (t.size, t.depth, t.max_rank) == (5, 3, 2)
    x = t.tensors(torch.device("cpu"))
    assert x["parent"].tolist() == [0, 0, 1, 2, 0, 4]
    assert x["depth"].tolist() == [0, 1, 2, 3, 1, 2]
    assert x["children"].tolist() == [[1, 4], [2, -1], [3, -1], [-1, -1], [5, -1], [-1, -1]]
    assert x["anc"][5].tolist() == [True, False, False, False, True, True]
    assert x["path_nodes"][5].tolist() == [4, 5, 3]  # depth 3 padded with its own slot
    assert x["in_place"].tolist() == [True, True, True, True, False, False]
    assert Tree(WIDE, max_depth=1).paths == [(0,), (1,), (2,)]
    with pytest.raises(MultitokenError):
        Tree([()])
    with pytest.raises(MultitokenError):
        Tree([(0, -1)])


@pytest.mark.parametrize("paths", [WIDE, [(0,)], [(0, 0, 0)], [(1, 0), (0, 0, 1)]])
def test_tree_mask(paths):
    """Each node sees the slots before the root and its own path (a chain: slots <= its own,
    which tree_context builds as the causal mask)."""
    tree = Tree(paths)
    nodes = [(), *tree.paths]
    base, kv_len = torch.tensor([3, 7]), 7 + len(nodes) + 2
    ctx = tree_context(KVCache(1, 2, 32, 1, 2, device="cpu", dtype=torch.float32), base, tree,
                       kv_len)
    assert ctx.mask.shape == (2, 1, len(nodes), kv_len)
    for b, root in enumerate(base.tolist()):
        assert ctx.slots[b].tolist() == list(range(root, root + len(nodes)))
        for j, node in enumerate(nodes):
            seen = [s for s in range(kv_len) if ctx.mask[b, 0, j, s]]
            path = [root + nodes.index(node[:d]) for d in range(len(node) + 1)]
            assert seen == list(range(root)) + sorted(path), (b, node)


def test_grow_tree_is_greedy_and_prefix_closed():
    probs = {(0,): 0.8, (1,): 0.1, (0, 0): 0.6, (0, 1): 0.15, (0, 0, 0): 0.5, (1, 0): 0.09}
    order = grow_tree(lambda p: probs.get(p, 0.0), 10, 3, 2)
    assert order == [(0,), (0, 0), (0, 0, 0), (0, 1), (1,), (1, 0)]
    for i in range(1, len(order) + 1):
        Tree(order[:i])  # every prefix of the growth order is a valid tree
    assert len(default_tree(3)) == 10 and Tree(default_tree(2)).depth == 2


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_tree_greedy_equals_plain_random_model(head_type):
    model = random_model(head_type)
    plain = generate(model, PROMPTS, 25).tokens
    for tree in (None, WIDE, [(0,), (0, 1), (0, 0)]):
        assert generate(model, PROMPTS, 25, speculative="tree", tree=tree).tokens == plain
    assert generate(model, PROMPTS[1], 25, speculative="tree", tree=WIDE).tokens == [plain[1]]


def test_tree_greedy_with_real_acceptance_and_compaction(monkeypatch):
    model = trained_model()
    plain = generate(model, PROMPTS, 40).tokens
    res = generate(model, PROMPTS, 40, speculative="tree", tree=WIDE)
    assert res.tokens == plain
    assert res.stats.tokens_per_forward > 2.0 and res.stats.num_drafts == 3
    # Swap ranks 0 and 1 of every draft head, so the accepted path usually leaves the top-1
    # chain and its keys/values must be moved into place: still exact (drafts are proposals).
    moved = []
    orig_copy, orig_top = KVCache.copy_slots, spec.top_candidates
    monkeypatch.setattr(KVCache, "copy_slots",
                        lambda self, s, d: (moved.append(1), orig_copy(self, s, d)))
    monkeypatch.setattr(spec, "top_candidates",
                        lambda logits, r: orig_top(logits, r)[..., [1, 0, *range(2, r)]])
    res = generate(model, PROMPTS, 40, speculative="tree", tree=WIDE)
    assert res.tokens == plain and len(moved) > 5 and res.stats.tokens_per_forward > 1.5


def test_num_drafts_caps_tree_depth_and_depth_is_checked():
    model = random_model()
    res = generate(model, PROMPTS, 10, speculative="tree", tree=WIDE, num_drafts=1)
    assert res.stats.num_drafts == 1 and res.stats.tree_size == 3
    assert res.tokens == generate(model, PROMPTS, 10).tokens
    small = random_model(n_future=2, n_layers=3)
    res = generate(small, PROMPTS, 10, speculative="tree", tree=WIDE)  # depth capped to 1
    assert res.stats.num_drafts == 1
    with pytest.raises(MultitokenError, match="ranks"):
        generate(model, PROMPTS, 4, speculative="tree", tree=[(0, -1)])


# ---------------------------------------------------------------------------------------------
# Sampling exactness: sibling drafts drawn without replacement, recursive rejection sampling.

PROMPT = [3, 5, 7, 9]
SAMPLING_TREE = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0)]


@pytest.mark.parametrize("s", [Sampling(1.5), Sampling(2.0, top_k=4), Sampling(1.2, top_p=0.9)],
                         ids=["temp", "top_k", "top_p"])
def test_tree_sampling_matches_exact_distribution(s):
    model = trained_model()
    expected = exact_joint(model, PROMPT, 3, s)
    samples, stats = sample_many(model, PROMPT, 3, s, mode="tree", tree=SAMPLING_TREE)
    p, df = chi_square_pvalue(samples, expected)
    assert p > 1e-3, (p, df)
    assert 0.3 < stats.acceptance[0] < 0.99


def test_sampled_siblings_are_distinct_draws():
    tree = Tree(SAMPLING_TREE)
    logits = torch.randn(tree.depth, 500, 16)  # [D, B, V]
    g = torch.Generator().manual_seed(0)
    drafts = spec.propose(logits, tree, Sampling(1.0), g)
    assert drafts.tokens.shape == (500, tree.size) and drafts.q.shape == (500, 3, 16)
    t = tree.tensors(torch.device("cpu"))
    # the groups: root (3 children), (0,) (2 children), (1,) (1 child)
    assert t["group_node"].tolist() == [0, 1, 4] and t["group_depth"].tolist() == [0, 1, 1]
    kids = drafts.tokens[:, [0, 3, 5]]  # the root's children (0,), (1,), (2,)
    assert (kids[:, 0] != kids[:, 1]).all() and (kids[:, 1] != kids[:, 2]).all()
    assert (kids[:, 0] != kids[:, 2]).all()
    # the root's first child is a draw from head 2's distribution: it is not always the argmax
    assert (kids[:, 0] != logits[0].argmax(-1)).any()
    # greedy: the ranks, as before
    greedy = spec.propose(logits, tree, Sampling(0.0), g)
    top = logits.topk(3, dim=-1).indices  # [D, B, 3]
    assert greedy.q is None
    assert greedy.tokens[:, [0, 1, 2, 3, 4, 5]].tolist() == torch.stack(
        [top[0, :, 0], top[1, :, 0], top[1, :, 1], top[0, :, 1], top[1, :, 0], top[0, :, 2]],
        dim=1).tolist()


def _sibling_rule(update_residual: bool, remove_drawn: bool):
    """The recursive rule written out (as in sampling.accept_drafts), with switches that make
    it wrong. update_residual=False: every sibling is tried against p, and only the final draw
    uses norm(max(0, p - q)); remove_drawn=False: every sibling is scored against q itself, as
    i.i.d. draws would be (SpecInfer's rule), not against q with the earlier siblings removed."""

    def accept(probs, q, child_tok, valid, generator):
        B, M, C = child_tok.shape
        valid = valid.expand(B, M, C)
        choice = torch.full((B, M), C)
        r, left = probs, q
        rejected_any = torch.zeros(B, M, 1, dtype=torch.bool)
        for i in range(C):
            x = child_tok[..., i:i + 1]
            qi = left / left.sum(-1, keepdim=True)
            qx, rx = qi.gather(-1, x)[..., 0], r.gather(-1, x)[..., 0]
            tried = valid[..., i] & (choice == C) & (qx > 0)
            take = tried & (torch.rand(B, M, generator=generator) * qx < rx)
            choice = torch.where(take, i, choice)
            rejected = (tried & ~take)[..., None]
            rejected_any |= rejected
            if update_residual:
                r = torch.where(rejected, residual(r, qi), r)
            if remove_drawn:
                left = torch.where(rejected, left.scatter(-1, x, 0.0), left)
        if not update_residual:
            r = torch.where(rejected_any, residual(probs, q), probs)
        return choice, r

    return accept


def _iid_draws(q, k, generator):
    """Siblings drawn i.i.d. (with replacement) from q: duplicates happen."""
    flat = q.reshape(-1, q.shape[-1])
    return torch.multinomial(flat, k, replacement=True, generator=generator).view(
        *q.shape[:-1], k)


@pytest.mark.parametrize("patches", [
    # SpecInfer's multi-step speculative sampling: i.i.d. siblings, each against q
    {"accept_drafts": _sibling_rule(True, False), "draw_distinct": _iid_draws},
    # i.i.d. siblings under the rule for draws without replacement: a duplicate of a rejected
    # sibling has no mass left in q with the drawn tokens removed, so it is skipped
    {"draw_distinct": _iid_draws},
    # the rule as written out in this file
    {"accept_drafts": _sibling_rule(True, True)},
], ids=["specinfer_iid", "iid_draws_scored_as_distinct", "reference"])
def test_other_exact_sibling_rules_pass(monkeypatch, patches):
    model = trained_model()
    s = Sampling(2.0, top_k=4)
    expected = exact_joint(model, PROMPT, 3, s)
    duplicates = []

    def iid_draws(q, k, generator):  # records whether siblings repeated a token
        out = _iid_draws(q, k, generator)
        duplicates.append(bool((out[..., :1] == out[..., 1:]).any()))
        return out

    for name, fn in patches.items():
        monkeypatch.setattr(spec, name, iid_draws if fn is _iid_draws else fn)
    samples, _ = sample_many(model, PROMPT, 3, s, mode="tree", tree=SAMPLING_TREE)
    p, df = chi_square_pvalue(samples, expected)
    assert p > 1e-3, (p, df)
    assert any(duplicates) == ("draw_distinct" in patches)


@pytest.mark.parametrize("patches", [
    # i.i.d. siblings, each against p: the residual is not updated between siblings
    {"accept_drafts": _sibling_rule(False, False), "draw_distinct": _iid_draws},
    # the same with siblings drawn without replacement
    {"accept_drafts": _sibling_rule(False, True)},
    # siblings drawn without replacement but scored as i.i.d. draws
    {"accept_drafts": _sibling_rule(True, False)},
], ids=["iid_residual_not_updated", "distinct_residual_not_updated", "distinct_scored_as_iid"])
@pytest.mark.parametrize("s", [Sampling(2.0, top_k=4), Sampling(1.2, top_p=0.9)],
                         ids=["top_k", "top_p"])
def test_the_statistic_catches_wrong_sibling_rules(monkeypatch, patches, s):
    model = trained_model()
    expected = exact_joint(model, PROMPT, 3, s)
    for name, fn in patches.items():
        monkeypatch.setattr(spec, name, fn)
    samples, _ = sample_many(model, PROMPT, 3, s, mode="tree", tree=SAMPLING_TREE)
    p, _ = chi_square_pvalue(samples, expected)
    assert p < 1e-6


def test_the_statistic_catches_resampling_from_p(monkeypatch):
    model = trained_model()
    s = Sampling(1.5)
    expected = exact_joint(model, PROMPT, 3, s)
    monkeypatch.setattr(sampling, "residual", lambda r, q: r)
    samples, _ = sample_many(model, PROMPT, 3, s, mode="tree", tree=SAMPLING_TREE)
    p, _ = chi_square_pvalue(samples, expected)
    assert p < 1e-6
