"""Model structure and the KV-cache path against the full forward."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_model
from multitoken.checkpoint import load_checkpoint, save_checkpoint
from multitoken.config import ModelConfig, load_run_config
from multitoken.decoding.generate import generate
from multitoken.errors import ConfigError
from multitoken.model import DecodeContext, MultiTokenModel, causal_context
from multitoken.tokenizer import ByteTokenizer

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


# -- options of pretrained families (ModelConfig: qkv_bias, qk_norm, head_dim_override,
# rope_scaling) ------------------------------------------------------------------------------

OPTIONS = {
    "qkv_bias": dict(qkv_bias=True),
    "qk_norm+head_dim": dict(qk_norm=True, head_dim_override=12),
    "llama3": dict(rope_scaling="llama3", rope_theta=5e5, rope_original_max_len=16),
    "all": dict(qkv_bias=True, qk_norm=True, head_dim_override=6, rope_scaling="llama3",
                rope_original_max_len=16),
}


def _options_model(head_type: str, n_future: int = 3, **kw) -> MultiTokenModel:
    """tiny_model with `kw`, and every bias and norm gain random (init makes them 0 and 1)."""
    m = tiny_model(head_type=head_type, n_future=n_future, **kw).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.5 + (0 if name.endswith("bias") else 1))
    return m


@pytest.mark.parametrize("opts", list(OPTIONS))
@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_options_kv_cache_equals_full_forward(head_type, opts):
    torch.manual_seed(1)
    m = _options_model(head_type, **OPTIONS[opts])
    x = torch.randint(0, 37, (2, 20))
    full = m(x)
    cache = m.new_cache(2, 32)
    chunks, t = [], 0
    for size in (7, 1, 4, 8):
        pos = torch.arange(t, t + size).expand(2, -1)
        hs = m.hidden(x[:, t:t + size], pos=pos, ctx=causal_context(cache, pos))
        chunks.append(torch.stack([m.unembed(h) for h in hs.values()]))
        t += size
    torch.testing.assert_close(torch.cat(chunks, 2), full, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("opts", list(OPTIONS))
@pytest.mark.parametrize("head_type", ["transformer", "causal"])
def test_options_decoding_engine_equals_full_forward(head_type, opts):
    """The engine lays out biases and q/k norms itself: greedy decoding, plain and speculative,
    gives the tokens of the full forward re-run for every token."""
    m = _options_model(head_type, n_future=4, n_layers=5, **OPTIONS[opts])
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 0, 1]]
    want = []
    for p in prompts:
        seq = list(p)
        with torch.no_grad():
            for _ in range(12):
                seq.append(int(m(torch.tensor([seq]), heads=[0])[0, 0, -1].argmax()))
        want.append(seq[len(p):])
    for mode in ("off", "chain", "tree"):
        assert generate(m, prompts, 12, speculative=mode).tokens == want, mode


def test_options_add_exactly_their_weights():
    base = {n for n, _ in tiny_model().named_parameters()}
    assert not any(n.endswith(("bias", "q_norm.weight", "k_norm.weight")) for n in base)
    m = tiny_model(qkv_bias=True, qk_norm=True, head_dim_override=12)
    names = dict(m.named_parameters())
    added = set(names) - base
    per_layer = {"attention.wq.bias", "attention.wk.bias", "attention.wv.bias",
                 "attention.q_norm.weight", "attention.k_norm.weight"}
    assert added == {f"{blk}.{w}" for blk in ("layers.0", "heads.0", "heads.1", "heads.2")
                     for w in per_layer}
    assert names["layers.0.attention.wq.weight"].shape == (4 * 12, 32)
    assert names["layers.0.attention.wk.bias"].shape == (2 * 12,)
    assert names["layers.0.attention.wo.weight"].shape == (32, 4 * 12)
    assert torch.equal(names["heads.0.attention.wv.bias"], torch.zeros(24))  # init: no bias
    assert torch.equal(names["heads.0.attention.q_norm.weight"], torch.ones(12))


def test_llama3_rope_changes_only_the_long_wavelengths():
    plain = tiny_model(rope_theta=5e5, n_heads=2, n_kv_heads=1)
    scaled = tiny_model(rope_theta=5e5, n_heads=2, n_kv_heads=1, rope_scaling="llama3",
                        rope_factor=8.0, rope_low_freq_factor=0.5, rope_high_freq_factor=4.0,
                        rope_original_max_len=32)
    # hd 16, theta 5e5: wavelengths 6.3 (< 32/4: kept), 32 (between: interpolated), 167.. (>
    # 32/0.5: divided by 8)
    angle_p = torch.atan2(plain.rope_sin[1], plain.rope_cos[1])  # position 1: the frequencies
    angle_s = torch.atan2(scaled.rope_sin[1], scaled.rope_cos[1])
    assert angle_s[0] == angle_p[0]
    assert angle_p[1] / 8 < angle_s[1] < angle_p[1]
    torch.testing.assert_close(angle_s[2:], angle_p[2:] / 8)


def test_option_config_is_validated_and_yaml_loadable():
    cfg = load_run_config(None, ["model.qkv_bias=true", "model.qk_norm=yes",
                                 "model.head_dim_override=16", "model.rope_scaling=llama3",
                                 "model.rope_factor=32", "model.rope_original_max_len=8192",
                                 "model.dim=64", "model.n_heads=6"]).model
    assert (cfg.qkv_bias, cfg.qk_norm, cfg.head_dim, cfg.rope_scaling, cfg.rope_factor) == \
        (True, True, 16, "llama3", 32.0)
    for bad, why in [(dict(rope_scaling="yarn"), "rope_scaling must be one of"),
                     (dict(head_dim_override=7), "must be even"),
                     (dict(head_dim_override=0), "head_dim_override must be >= 2"),
                     (dict(dim=30, n_heads=4), "divisible by n_heads"),
                     (dict(rope_scaling="llama3", rope_factor=0.5), "rope_factor must be >= 1"),
                     (dict(rope_scaling="llama3", rope_low_freq_factor=4.0),
                      "rope_low_freq_factor < rope_high_freq_factor"),
                     (dict(rope_theta=0.0), "rope_theta must be > 0")]:
        with pytest.raises(ConfigError, match=why):
            ModelConfig(**bad)
    with pytest.raises(ConfigError, match="expected true/false"):
        load_run_config(None, ["model.qk_norm=maybe"])


def test_checkpoint_from_before_the_options_loads_unchanged(tmp_path):
    """A checkpoint's config.json written before the option fields existed has none of them:
    it loads with the defaults, i.e. the model it was."""
    m = tiny_model(vocab_size=260).eval()
    save_checkpoint(tmp_path / "ck", m, ByteTokenizer())
    path = tmp_path / "ck" / "config.json"
    meta = json.loads(path.read_text())
    for k in ("head_dim_override", "qkv_bias", "qk_norm", "rope_scaling", "rope_factor",
              "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len"):
        del meta["model"][k]
    path.write_text(json.dumps(meta))
    back, _ = load_checkpoint(tmp_path / "ck")
    x = torch.randint(0, 260, (1, 12))
    with torch.no_grad():
        assert torch.equal(back(x), m(x))
