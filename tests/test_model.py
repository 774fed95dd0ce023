"""Model structure and the KV-cache path against the full forward."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from multitoken.model import DecodeContext, causal_context

HEAD_TYPES = ["transformer", "linear", "causal", "anticausal"]


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_shapes_and_parameter_matching(head_type):
    m = tiny_model(head_type=head_type)
    logits = m(torch.randint(0, 37, (2, 10)))
    assert logits.shape == (3, 2, 10, 37)
    if head_type == "linear":
        assert len(m.layers) == 4
    else:  # 4 layers in all: 1 trunk + 3 heads
        assert len(m.layers) == 1 and len(m.heads) == 3


def test_heads_are_independent_modules():
    m = tiny_model()
    ptrs = {h.attention.wq.weight.data_ptr() for h in m.heads}
    assert len(ptrs) == len(m.heads)


def test_n_future_1_is_a_plain_causal_lm():
    m = tiny_model(n_future=1)
    x = torch.randint(0, 37, (1, 12))
    full = m(x)[0]
    # causality: changing a later token does not change earlier logits
    x2 = x.clone()
    x2[0, 8] = (x2[0, 8] + 1) % 37
    assert torch.allclose(m(x2)[0][:, :8], full[:, :8], atol=1e-6)


def test_tied_embeddings_share_storage():
    m = tiny_model(tie_embeddings=True)
    assert m.output.weight.data_ptr() == m.tok_embeddings.weight.data_ptr()


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_kv_cache_equals_full_forward_all_heads(head_type):
    torch.manual_seed(1)
    m = tiny_model(head_type=head_type).eval()
    x = torch.randint(0, 37, (2, 20))
    full = m(x)  # [n, B, T, V]
    cache = m.new_cache(2, 32)
    chunks, t = [], 0
    for size in (7, 1, 1, 4, 3, 4):  # prefill, single tokens, multi-token (draft) steps
        pos = torch.arange(t, t + size).expand(2, -1)
        hs = m.hidden(x[:, t:t + size], pos=pos, ctx=causal_context(cache, pos))
        chunks.append(torch.stack([m.unembed(h) for h in hs.values()]))
        t += size
    torch.testing.assert_close(torch.cat(chunks, 2), full, atol=2e-5, rtol=1e-4)


def test_stale_slots_are_masked():
    """Writing garbage drafts past the position, then overwriting, leaves no trace."""
    torch.manual_seed(2)
    m = tiny_model().eval()
    x = torch.randint(0, 37, (1, 12))
    full = m(x)
    cache = m.new_cache(1, 32)
    pos = torch.arange(8)[None]
    m.hidden(x[:, :8], pos=pos, ctx=causal_context(cache, pos))
    junk_pos = torch.arange(8, 12)[None]
    m.hidden(torch.randint(0, 37, (1, 4)), pos=junk_pos, ctx=causal_context(cache, junk_pos))
    hs = m.hidden(x[:, 8:], pos=junk_pos, ctx=causal_context(cache, junk_pos))
    out = torch.stack([m.unembed(h) for h in hs.values()])
    torch.testing.assert_close(out, full[:, :, 8:], atol=2e-5, rtol=1e-4)


def test_different_positions_per_sequence():
    torch.manual_seed(3)
    m = tiny_model().eval()
    a, b = torch.randint(0, 37, (1, 9)), torch.randint(0, 37, (1, 6))
    cache = m.new_cache(2, 16)
    # right-padded prefill of two prompts of different lengths
    x = torch.zeros(2, 9, dtype=torch.long)
    x[0], x[1, :6] = a[0], b[0]
    pos = torch.arange(9).expand(2, -1)
    hs = m.hidden(x, pos=pos, ctx=causal_context(cache, pos))
    torch.testing.assert_close(m.unembed(hs[0][1, :6]), m(b)[0, 0], atol=2e-5, rtol=1e-4)
    # then one token each at different positions
    nxt = torch.tensor([[3], [5]])
    pos = torch.tensor([[9], [6]])
    hs = m.hidden(nxt, pos=pos, ctx=causal_context(cache, pos))
    ref_b = m(torch.cat([b, torch.tensor([[5]])], 1))[0, 0, -1]
    ref_a = m(torch.cat([a, torch.tensor([[3]])], 1))[0, 0, -1]
    torch.testing.assert_close(m.unembed(hs[0][:, 0]), torch.stack([ref_a, ref_b]), atol=2e-5,
                               rtol=1e-4)


def test_tree_mask_and_slot_compaction():
    """Two sibling branches written to separate slots with a tree mask; compaction of one
    branch gives the same cache as decoding that branch alone."""
    torch.manual_seed(4)
    m = tiny_model(n_future=1, n_layers=2).eval()
    x = torch.randint(0, 37, (1, 6))
    cache = m.new_cache(1, 16)
    pos = torch.arange(6)[None]
    m.hidden(x, pos=pos, ctx=causal_context(cache, pos))
    # tree: node0 = token 4 at depth 1 (slot 6), node1 = token 9 at depth 1 (slot 7),
    # node2 = child of node1, token 2 at depth 2 (slot 8)
    toks = torch.tensor([[4, 9, 2]])
    tpos = torch.tensor([[6, 6, 7]])
    slots = torch.tensor([[6, 7, 8]])
    mask = torch.zeros(1, 1, 3, 9, dtype=torch.bool)
    mask[..., :6] = True
    mask[0, 0, 0, 6] = mask[0, 0, 1, 7] = True
    mask[0, 0, 2, 7] = mask[0, 0, 2, 8] = True
    hs = m.hidden(toks, pos=tpos, ctx=DecodeContext(cache, slots, mask, 9))
    path = torch.cat([x, torch.tensor([[9, 2]])], 1)
    ref = m(path)[0, 0]
    torch.testing.assert_close(m.unembed(hs[0][0, 1:]), ref[6:8], atol=2e-5, rtol=1e-4)
    cache.copy_slots(torch.tensor([[7, 8]]), torch.tensor([[6, 7]]))
    pos = torch.tensor([[8]])
    hs = m.hidden(torch.tensor([[11]]), pos=pos, ctx=causal_context(cache, pos))
    ref = m(torch.cat([path, torch.tensor([[11]])], 1))[0, 0, -1]
    torch.testing.assert_close(m.unembed(hs[0][0, 0]), ref, atol=2e-5, rtol=1e-4)
