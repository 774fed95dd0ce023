"""The decode forward: the model's layers, laid out for small decode steps.

Every decoding mode runs the same two-phase forward over T input tokens per sequence:

1. `Engine.forward(idx, pos, ctx)`: the trunk and head 1 (code index 0) over all T tokens ->
   h0 [B, T, D], which verifies drafts (or picks the next token). The draft heads 2..P also
   write their keys/values at all T positions: a later step attends to the positions accepted
   now.
2. `Engine.draft_hidden(fwd, sel)`: the draft heads' outputs at ONE position per sequence
   (`sel`, the last accepted input position) -> [P-1, B, D]. Plain decoding never calls it.

(P = `n_predict`, the prediction heads an engine computes; attention heads are `n_attn_heads`.)

Why not just `model.hidden`: a decode step multiplies a few rows by every weight matrix, so its
cost is streaming the weights and per-op overhead, not FLOPs. So:
- the weights are copied into the layout the small matmuls run fastest in ([in, out], q/k/v and
  gate/up concatenated: 4 matmuls per layer instead of 7; see `_Mat`);
- the paper's parallel transformer heads run as ONE stacked layer (`torch.bmm` over a head
  axis), and because head i's keys/values depend only on the trunk output, the draft heads'
  attention output and FFN run at one position only (phase 2), not at all T.
Plain decoding runs the very same code with P=1, so the baseline is exactly as optimised as the
speculative modes. Chained (causal, anticausal) and linear heads use the model's own head
modules on top of the same trunk. Token-conditioned heads: the engine runs the trunk and head 1
(P=1); their draft heads need the tokens they follow and run in `decoding.conditioned`.

Weights: an Engine uses the transformer layers' weights as they are when it is built, however
they were changed before (`p.data.copy_`, `load_state_dict`, an optimizer step, `.to()`), and
reads the embeddings, the shared norm and the unembedding from the model; `generate()` builds
one per call. Laying the layers out costs several times more than reading them (the [in, out]
copies are transposes), so the layouts are kept per model and reused only while every layer
weight is bit for bit equal to its values in them (`_layouts`): being copies of the weights,
the layouts are themselves the reference, and no other copy is kept. Nothing cheaper than
reading the weights sees every change: `p.data.copy_` (how EMA and weight averaging write)
changes neither a tensor's storage nor its version counter. An Engine keeps the layouts it was
built with, so it must not outlive a change of the weights. Memory: each layer weight once (the
trunk's and head 1's layouts are shared by every n_predict; each (n_predict, draft dtype) has
its stack of draft heads), but for those a `_Mat` keeps in both layouts: the trunk's and head
1's w2 from the first forward over several tokens, the draft stacks' o/w13/w2 once phase 2
runs more than one row (batch > 1).

Numerics are the model's (fp32 RMSNorm statistics, the same rotary tables); results differ from
`model.hidden` only by matmul rounding.

Every `ModelConfig` option is laid out here too: q/k/v biases are one bias of the fused q/k/v
product, q/k norms per-layer gains applied per head before rotary, a head width other than
dim / n_heads only changes the shapes, and rotary scaling lives in the model's tables. Each
costs an op only in the models that have it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multitoken.config import ModelConfig
from multitoken.model import DecodeContext, KVCache, MultiTokenModel, apply_rope, causal_context


@dataclass
class Forward:
    """What phase 1 leaves for phase 2."""

    h0: Tensor  # [B, T, D] head 1's output (before the shared norm)
    ctx: DecodeContext
    z: Tensor | None = None  # [B, T, D] trunk output (stacked heads)
    draft_q: Tensor | None = None  # [P-1, B, T, n_attn_heads, hd] draft heads' rotated queries
    draft_h: Tensor | None = None  # [P-1, B, T, D] draft heads' outputs (other head types)


def _stack(layers: list[list[Tensor]], dtype: torch.dtype) -> Tensor:
    """Copy H layers' weights, each the parts [out_i, in] concatenated along `out`, into one
    contiguous [H, out, in] tensor of `dtype`."""
    first = layers[0][0]
    out = torch.empty((len(layers), sum(w.shape[0] for w in layers[0]), first.shape[1]),
                      dtype=dtype, device=first.device)
    for h, parts in enumerate(layers):
        start = 0
        for w in parts:
            out[h, start:start + w.shape[0]].copy_(w.detach())
            start += w.shape[0]
    return out


def _transposed(w: Tensor) -> Tensor:
    """[H, a, b] -> a contiguous [H, b, a], one 2D copy per layer: copy_ transposes a 2D view
    with a blocked kernel, which a 3D `transpose(1, 2).contiguous()` misses (measured, 1
    thread: 7 ms against 74 ms for a bf16 [6144, 2048] weight, 37 against 122 ms for 4 fp32
    [2048, 2048]); the first decode after loading or changing a large model lays them all out."""
    H, a, b = w.shape
    out = torch.empty((H, b, a), dtype=w.dtype, device=w.device)
    for h in range(H):
        out[h].copy_(w[h].T)
    return out


_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Weights of at least this many elements are transposed with copy_'s blocked kernel before
# comparing (see _Bitwise.equal); below it, the strided comparison is as fast or faster.
_TRANSPOSE_MIN = 1 << 18


def _bits(x: Tensor) -> Tensor:
    """x's bits as integers (so that equality is bitwise: -0.0 != 0.0, NaN == NaN)."""
    return x.view(_INTS[x.element_size()]) if x.element_size() in _INTS else x


class _Bitwise:
    """One check's comparisons of the current weights with views of their layouts (`_layouts`),
    with the scratch buffer of its transposed comparisons."""

    def __init__(self) -> None:
        self.scratch: Tensor | None = None

    def equal(self, stored: Tensor, w: Tensor) -> bool:
        """Whether `stored` (a view of a layout) holds what copying weight `w` into it gives,
        bit for bit: w's own bits where the dtypes agree (every layout but the ones below), else
        w converted as the copy converted it (copy_ and .to() share the conversion): draft heads
        laid out in another draft_dtype, or layers in another dtype than the embeddings. Such a
        layout holds w only to its dtype's precision, so a change of w below it is not seen, and
        need not be: laying w out again would give the same bits. A dtype without an integer
        view of its size compares as numbers, where NaN != NaN: a needless rebuild, no error."""
        if stored.shape != w.shape or stored.device != w.device:
            return False
        a, b = _bits(stored), _bits(w.detach() if w.dtype == stored.dtype else w.to(stored.dtype))
        if (b.numel() >= _TRANSPOSE_MIN and a.dim() == 2 and a.stride(0) == 1
                and a.stride(1) >= a.shape[0] > 1 and b.is_contiguous() and a.is_cpu):
            # `stored` is a column block of an [in, out] layout. Elementwise against w's rows it
            # reads one of the two strided: 11x the time of a contiguous comparison at 4096 x
            # 4096 on CPU; transposing w first with copy_'s blocked kernel, 2.2-2.9x.
            n = b.numel()
            if self.scratch is None or self.scratch.numel() < n or self.scratch.dtype != b.dtype:
                self.scratch = torch.empty(n, dtype=b.dtype, device=b.device)
            t = self.scratch[:n].view(b.shape[1], b.shape[0])
            t.copy_(b.T)
            return torch.equal(t, a.T)
        return torch.equal(a, b)

    def rows(self, stored: Tensor, parts: list[Tensor]) -> bool:
        """Whether `stored` is `parts` concatenated along dim 0, each part as `equal` compares."""
        if stored.shape[0] != sum(p.shape[0] for p in parts):
            return False
        start = 0
        for p in parts:
            if not self.equal(stored[start:start + p.shape[0]], p):
                return False
            start += p.shape[0]
        return True


class _Mat:
    """One projection of a stack of H layers, stored in the layouts its products run fastest in.

    Two layouts: `io` = W as [H, in, out], for torch.mm (H = 1) and torch.bmm over several
    rows; `oi` = W as [H, out, in], for bmm(W, x^T) with ONE row, kept only where the caller
    asks for it (one_row="oi": the FFN down-projection, whose output is narrower than its input,
    and the stacked draft heads' phase-2 projections). Which layout wins for which shape is a
    property of the BLAS library; docs/decoding.md has the measurements behind this choice.
    With one_row="oi", `io` is derived from `oi` when first needed (a stacked draft head at
    batch 1 never needs it), so the copy is taken at construction either way.
    `layers` holds, per layer, the parts [out_i, in] concatenated along `out` (q/k/v, gate/up).
    """

    def __init__(self, layers: list[list[Tensor]], dtype: torch.dtype, one_row: str) -> None:
        w = _stack(layers, dtype)  # [H, out, in]
        self.H, self.dtype = len(layers), dtype
        self.oi = w if one_row == "oi" else None
        self._io = None if one_row == "oi" else _transposed(w)

    @property
    def io(self) -> Tensor:
        if self._io is None:
            assert self.oi is not None
            self._io = _transposed(self.oi)
        return self._io

    def matches(self, layers: list[list[Tensor]], cmp: _Bitwise) -> bool:
        """Whether laying `layers` (as in __init__) out now would give these layouts, bit for
        bit. `oi` where kept (contiguous, the weights' own orientation), else a view of `io`;
        a lazily derived `io` is a copy of `oi`, which nothing but __init__ writes."""
        if self.oi is not None:
            w = self.oi
        else:
            assert self._io is not None
            w = self._io.transpose(1, 2)  # [H, out, in]
        return len(layers) == self.H and all(cmp.rows(w[h], parts)
                                             for h, parts in enumerate(layers))

    def __call__(self, x: Tensor) -> Tensor:
        """x [H or 1, M, in] -> [H, M, out] in x's dtype."""
        H, (_, M, K) = self.H, x.shape
        xd = x if x.dtype == self.dtype else x.to(self.dtype)
        if M == 1 and self.oi is not None:
            # a column view with leading dimension K: MKL takes a slow path for strides (K, 1, 1)
            y = torch.bmm(self.oi, xd.expand(H, 1, K).transpose(1, 2)).reshape(H, 1, -1)
        elif H == 1:
            y = torch.mm(xd[0], self.io[0])[None]
        else:
            y = torch.bmm(xd.expand(H, M, K), self.io)
        return y if y.dtype == x.dtype else y.to(x.dtype)


class _Weights:
    """Transformer layers' weights stacked on a leading axis (one layer per entry)."""

    def __init__(self, blocks: list[nn.Module], dtype: torch.dtype) -> None:
        # See _Mat. Stacked draft heads see one row per sequence in phase 2 (o, w13, w2); their
        # q/k/v run over all the step's positions.
        one = "oi" if len(blocks) > 1 else "io"
        self.g_attn = torch.stack([b.attention_norm.weight.detach() for b in blocks])[:, None, :]
        self.g_ffn = torch.stack([b.ffn_norm.weight.detach() for b in blocks])[:, None, :]
        att = [b.attention for b in blocks]
        ffn = [b.feed_forward for b in blocks]
        # q/k/v and gate/up concatenated: 4 matmuls per layer instead of 7
        self.qkv = _Mat([[a.wq.weight, a.wk.weight, a.wv.weight] for a in att], dtype, "io")
        # Options (None when the model has none): the fused q/k/v bias [H, 1, out], and the
        # q/k norm gains [H, 1, 1, hd] (one per layer, shared by the layer's heads).
        self.qkv_bias = (torch.stack([torch.cat([a.wq.bias, a.wk.bias, a.wv.bias]).detach()
                                      for a in att])[:, None, :]
                         if att[0].wq.bias is not None else None)
        self.q_norm: Tensor | None = None
        self.k_norm: Tensor | None = None
        if att[0].q_norm is not None:
            self.q_norm = torch.stack([a.q_norm.weight.detach() for a in att])[:, None, None, :]
            self.k_norm = torch.stack([a.k_norm.weight.detach() for a in att])[:, None, None, :]
        self.o = _Mat([[a.wo.weight] for a in att], dtype, one)
        self.w13 = _Mat([[f.w1.weight, f.w3.weight] for f in ffn], dtype, one)
        self.w2 = _Mat([[f.w2.weight] for f in ffn], dtype, "oi")

    def matches(self, blocks: list[nn.Module], cmp: _Bitwise) -> bool:
        """Whether laying `blocks` out now would give these weights, bit for bit (see
        `_layouts`). Cheap checks first, and the first difference ends it."""
        att = [b.attention for b in blocks]
        ffn = [b.feed_forward for b in blocks]
        if (len(blocks) != self.g_attn.shape[0]
                or (self.qkv_bias is None) != (att[0].wq.bias is None)
                or (self.q_norm is None) != (att[0].q_norm is None)):
            return False
        for h, (b, a) in enumerate(zip(blocks, att)):
            if not (cmp.equal(self.g_attn[h, 0], b.attention_norm.weight)
                    and cmp.equal(self.g_ffn[h, 0], b.ffn_norm.weight)
                    and (self.qkv_bias is None
                         or cmp.rows(self.qkv_bias[h, 0], [a.wq.bias, a.wk.bias, a.wv.bias]))
                    and (self.q_norm is None or self.k_norm is None
                         or (cmp.equal(self.q_norm[h, 0, 0], a.q_norm.weight)
                             and cmp.equal(self.k_norm[h, 0, 0], a.k_norm.weight)))):
                return False
        return (self.qkv.matches([[a.wq.weight, a.wk.weight, a.wv.weight] for a in att], cmp)
                and self.o.matches([[a.wo.weight] for a in att], cmp)
                and self.w13.matches([[f.w1.weight, f.w3.weight] for f in ffn], cmp)
                and self.w2.matches([[f.w2.weight] for f in ffn], cmp))


class Layers:
    """Copies of the model's transformer layers in the engine's layout: every trunk layer, head
    1's layer (transformer heads) and draft heads 2..n_predict stacked (parallel transformer
    heads), plus the arithmetic that runs them."""

    def __init__(self, cfg: ModelConfig, trunk: list[_Weights], head0: _Weights | None,
                 draft_weights: _Weights | None) -> None:
        self.eps, self.hd = cfg.norm_eps, cfg.head_dim
        self.n_attn_heads, self.n_kv_heads = cfg.n_heads, cfg.kv_heads
        self.trunk, self.head0, self.draft_weights = trunk, head0, draft_weights

    def norm(self, x: Tensor, g: Tensor) -> Tensor:
        # Same arithmetic as model.RMSNorm (fp32 statistics), with per-layer gains.
        return (F.rms_norm(x.float(), (x.shape[-1],), None, self.eps) * g.float()).type_as(x)

    def qkv(self, x: Tensor, w: _Weights, cos: Tensor, sin: Tensor, ctx: DecodeContext,
            layer: int, B: int) -> Tensor:
        """Project x [1, B*T, D], rotate, store k/v of layers layer.. in the cache; return q
        [H, B, T, n_attn_heads, hd]."""
        H, BT = w.g_attn.shape[0], x.shape[1]
        T = BT // B
        nh, nkv, hd = self.n_attn_heads, self.n_kv_heads, self.hd
        y = w.qkv(self.norm(x, w.g_attn))  # [H, B*T, (nh + 2 nkv) hd]
        if w.qkv_bias is not None:
            y = y + w.qkv_bias
        q, k, v = y.split([nh * hd, nkv * hd, nkv * hd], -1)
        q, k = q.reshape(H, BT, nh, hd), k.reshape(H, BT, nkv, hd)
        if w.q_norm is not None and w.k_norm is not None:
            q, k = self.norm(q, w.q_norm), self.norm(k, w.k_norm)
        q = apply_rope(q, cos, sin).view(H, B, T, nh, hd)
        k = apply_rope(k, cos, sin).view(H, B, T, nkv, hd)
        cache: KVCache = ctx.cache
        rows = cache._rows[:B]
        cache.k[layer:layer + H, rows, ctx.slots] = k.to(cache.k.dtype)
        cache.v[layer:layer + H, rows, ctx.slots] = v.view(H, B, T, nkv, hd).to(cache.v.dtype)
        return q

    def attend_ffn(self, q: Tensor, x: Tensor, ctx: DecodeContext, w: _Weights, layer: int,
                   mask: Tensor) -> Tensor:
        """Attention of q [H, B, T, n_attn_heads, hd] over cache layers layer..layer+H-1, then
        output projection and FFN on the residual x [1 or H, B*T, D] -> [H, B*T, D]."""
        H, B, T = q.shape[:3]
        S = ctx.kv_len
        # [H, B, S, n_kv_heads, hd] -> [H*B, n_kv_heads, S, hd]: views, no copy
        kc = ctx.cache.k[layer:layer + H, :, :S].flatten(0, 1).transpose(1, 2)
        vc = ctx.cache.v[layer:layer + H, :, :S].flatten(0, 1).transpose(1, 2)
        if H > 1:
            mask = mask.expand(H, *mask.shape).flatten(0, 1)
        y = F.scaled_dot_product_attention(
            q.flatten(0, 1).transpose(1, 2), kc.to(q.dtype), vc.to(q.dtype), attn_mask=mask,
            enable_gqa=self.n_attn_heads != self.n_kv_heads)  # [H*B, n_attn_heads, T, hd]
        y = y.view(H, B, self.n_attn_heads, T, self.hd).permute(0, 1, 3, 2, 4).reshape(H, B * T, -1)
        x = x + w.o(y)
        gate, up = w.w13(self.norm(x, w.g_ffn)).chunk(2, dim=-1)
        return x + w.w2(F.silu(gate) * up)

    def layer(self, x: Tensor, w: _Weights, cos: Tensor, sin: Tensor, ctx: DecodeContext,
              layer: int, B: int) -> Tensor:
        """One full layer (H=1): x [1, B*T, D] -> [1, B*T, D]."""
        q = self.qkv(x, w, cos, sin, ctx, layer, B)
        return self.attend_ffn(q, x, ctx, w, layer, ctx.mask)


@dataclass
class _Cache:
    """One model's layer weights in the engine's layout: each layer weight's values are in
    here once (the trunk and head 1, shared by every n_predict) or in a draft stack, and the
    layouts themselves are what the current weights are compared against (no other copy)."""

    dtype: torch.dtype  # the trunk's and head 1's layout dtype: the embeddings' when laid out
    trunk: list[_Weights]
    head0: _Weights | None  # transformer heads only
    layers: dict[tuple[int, torch.dtype], Layers] = field(default_factory=dict)


_CACHES: weakref.WeakKeyDictionary[MultiTokenModel, _Cache] = weakref.WeakKeyDictionary()


def _lays_out_head0(cfg: ModelConfig) -> bool:
    """Head 1 is a transformer layer on the trunk, laid out with it: parallel transformer
    heads, and token-conditioned ones (whose draft heads run in decoding.conditioned)."""
    return cfg.head_type in ("transformer", "token_conditioned")


def _current(cache: _Cache, model: MultiTokenModel, key: tuple[int, torch.dtype]) -> bool:
    """Whether every layout the Layers `key` uses is, bit for bit, what laying the model's
    current weights out would give (the trunk, head 1, the draft stack if already built)."""
    head0 = model.heads[0] if _lays_out_head0(model.cfg) else None
    entry = cache.layers.get(key)
    drafts = None if entry is None else entry.draft_weights
    cmp = _Bitwise()
    return (cache.dtype == model.tok_embeddings.weight.dtype
            and len(cache.trunk) == len(model.layers)
            and (cache.head0 is None) == (head0 is None)
            and all(w.matches([b], cmp) for w, b in zip(cache.trunk, model.layers))
            and (cache.head0 is None or cache.head0.matches([head0], cmp))
            and (drafts is None or drafts.matches(list(model.heads[1:key[0]]), cmp)))


def _layouts(model: MultiTokenModel, n_predict: int, draft_dtype: torch.dtype) -> Layers:
    """The layers of `model` in the engine's layout, built from its current weights: reused
    from an earlier call only if every layer weight they hold is bit for bit what they hold
    for it (`_current`); else every layout of the model is dropped and laid out anew."""
    key = (n_predict, draft_dtype)
    cache = _CACHES.get(model)
    if cache is None or not _current(cache, model, key):
        dtype = model.tok_embeddings.weight.dtype
        cache = _CACHES[model] = _Cache(
            dtype, [_Weights([b], dtype) for b in model.layers],
            _Weights([model.heads[0]], dtype) if _lays_out_head0(model.cfg) else None)
    if key not in cache.layers:
        drafts = (_Weights(list(model.heads[1:n_predict]), draft_dtype)
                  if model.cfg.head_type == "transformer" and n_predict > 1 else None)
        cache.layers[key] = Layers(model.cfg, cache.trunk, cache.head0, drafts)
    return cache.layers[key]


class Engine:
    """Cached forwards of `model` computing prediction heads 0..n_predict-1 (code indices), with
    the layers' weights as they are now (see the module docstring).

    draft_dtype: dtype of the draft heads' matmuls (parallel transformer heads only; default:
    the model's). A draft is only a proposal that head 1 verifies, so it can never change the
    output.
    """

    def __init__(self, model: MultiTokenModel, n_predict: int,
                 draft_dtype: torch.dtype | None = None) -> None:
        if not 1 <= n_predict <= model.n_future:
            raise ValueError(f"n_predict must be in 1..{model.n_future}, got {n_predict}")
        self.model = model
        self.cfg = model.cfg
        self.n_predict = n_predict
        p = model.tok_embeddings.weight
        self.device, self.dtype = p.device, p.dtype
        self.draft_dtype = draft_dtype or p.dtype
        with torch.no_grad():
            self.layers = _layouts(model, n_predict, self.draft_dtype)
            self.draft_unembed = model.output.weight.detach().to(self.draft_dtype)
        self.stacked = _lays_out_head0(model.cfg)
        if model.cfg.head_type == "token_conditioned" and n_predict > 1:
            raise ValueError("token-conditioned draft heads run in decoding.conditioned: build "
                             "the Engine with n_predict=1")
        self.n_trunk = len(model.layers)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return self.model.new_cache(batch_size, max_len)

    def forward(self, idx: Tensor, pos: Tensor, ctx: DecodeContext) -> Forward:
        """Phase 1 over idx [B, T] at rotary positions pos [B, T] (see module docstring)."""
        # Speculative tokens past the model's context get garbage positions: they can never be
        # accepted (generate() refuses outputs past the context), so clamp instead of failing.
        if ctx.kv_len > self.cfg.max_seq_len:
            pos = pos.clamp(max=self.cfg.max_seq_len - 1)
        B, T = idx.shape
        cos, sin = self.model.rope(T, pos)  # [B, T, hd/2]
        c, s = cos.reshape(1, B * T, -1), sin.reshape(1, B * T, -1)
        L = self.layers
        x = self.model.tok_embeddings(idx).reshape(1, B * T, -1)
        for i, w in enumerate(L.trunk):
            x = L.layer(x, w, c, s, ctx, i, B)
        if not self.stacked:
            return self._other_heads(x.view(B, T, -1), cos, sin, ctx)
        n = self.n_trunk
        draft_q = None
        if L.draft_weights is not None:  # draft heads: keys/values at every position, queries kept
            draft_q = L.qkv(x, L.draft_weights, c, s, ctx, n + 1, B)
        h0 = L.layer(x, L.head0, c, s, ctx, n, B)
        return Forward(h0=h0.view(B, T, -1), ctx=ctx, z=x.view(B, T, -1), draft_q=draft_q)

    def _other_heads(self, z: Tensor, cos: Tensor, sin: Tensor, ctx: DecodeContext) -> Forward:
        """Linear and chained heads: the model's own head modules, parents first."""
        out = self.model.run_heads(z, range(self.n_predict), cos, sin, ctx)
        draft_h = (torch.stack([out[i] for i in range(1, self.n_predict)])
                   if self.n_predict > 1 else None)
        return Forward(h0=out[0], ctx=ctx, draft_h=draft_h)

    def draft_hidden(self, fwd: Forward, sel: Tensor) -> Tensor:
        """Phase 2: the draft heads' hidden states at input position sel [B] -> [P-1, B, D]."""
        rows = torch.arange(sel.shape[0], device=sel.device)
        if not self.stacked:
            assert fwd.draft_h is not None
            return fwd.draft_h[:, rows, sel]
        assert fwd.z is not None and fwd.draft_q is not None
        B, _, D = fwd.z.shape
        q = fwd.draft_q[:, rows, sel].unsqueeze(2)  # [P-1, B, 1, n_attn_heads, hd]
        mask = fwd.ctx.mask[rows, :, sel].unsqueeze(2)  # [B, 1, 1, S]: that position's row
        x = fwd.z[rows, sel].reshape(1, B, D)
        w = self.layers.draft_weights
        assert w is not None
        return self.layers.attend_ffn(q, x, fwd.ctx, w, self.n_trunk + 1, mask)

    def logits(self, h: Tensor) -> Tensor:
        """Shared norm + unembedding, in fp32 so sampling and argmax see full precision."""
        return self.model.unembed(h).float()

    def draft_logits(self, h: Tensor) -> Tensor:
        """Logits of the draft heads' states h [P-1, B, D] (unembedding in the draft dtype)."""
        w = self.draft_unembed
        return F.linear(self.model.norm(h).to(w.dtype), w).float()


def prefill(engine: Engine, cache: KVCache, idx: Tensor) -> Forward:
    """Run right-padded prompts idx [B, T] through the engine, filling cache slots 0..T-1.

    Padding writes garbage past each prompt's end; those slots are rewritten before any query
    may attend to them (a query at position p sees slots <= p only).
    """
    B, T = idx.shape
    pos = torch.arange(T, device=idx.device).expand(B, T)
    return engine.forward(idx, pos, causal_context(cache, pos, T))
