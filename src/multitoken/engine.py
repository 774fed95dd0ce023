"""The decoding engine's forward: the model's layers, laid out for small decode steps.

Every decoding mode runs the same two-phase forward over T input tokens per sequence:

1. `Engine.forward(idx, pos, ctx)`: the trunk and head 1 (code index 0) over all T tokens ->
   h0 [B, T, D], which verifies drafts (or picks the next token). The draft heads 2..H also
   write their keys/values at all T positions: a later step attends to the positions accepted
   now.
2. `Engine.drafts(fwd, sel)`: the draft heads' outputs at ONE position per sequence (`sel`,
   the last accepted input position) -> [H-1, B, D]. Plain decoding never calls it.

Why not just `model.hidden`: a decode step multiplies a few rows by every weight matrix, and on
a CPU that is bound by how fast weights stream in and by per-op overhead, not by FLOPs. So:
- weights are copied once into the layout the small matmuls run fastest in ([in, out], q/k/v
  and gate/up concatenated: 4 matmuls per layer instead of 7);
- the paper's parallel transformer heads run as ONE stacked layer (`torch.bmm` over a head
  axis), and because head i's keys/values depend only on the trunk output, the draft heads'
  attention output and FFN run at one position only (phase 2), not at all T.
Plain decoding runs the very same code with H=1, so the baseline is exactly as optimised as the
speculative modes. Chained (causal, anticausal) and linear heads use the model's own head
modules on top of the same trunk.

Numerics are the model's (fp32 RMSNorm statistics, same rotary tables); results differ from
`model.hidden` only by matmul rounding. The copies (about twice the weights' memory, more for
draft heads, which keep two layouts) are cached per model and rebuilt when a parameter changes
in place (e.g. an optimizer step).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multitoken.model import DecodeContext, KVCache, MultiTokenModel, apply_rope


@dataclass
class Forward:
    """What phase 1 leaves for phase 2."""

    h0: Tensor  # [B, T, D] head 1's output (before the shared norm)
    ctx: DecodeContext
    z: Tensor | None = None  # [B, T, D] trunk output (stacked heads)
    q: Tensor | None = None  # [H-1, B, T, nh, hd] draft heads' rotated queries (stacked heads)
    hs: Tensor | None = None  # [H-1, B, T, D] draft heads' outputs (other head types)


class _Mat:
    """One projection of a stack of H layers, stored in the layouts its products run fastest in.

    Measured on the 2-core AMD EPYC we target (MKL, one thread, weights streaming from memory):
    with one row (batch 1, one position), torch.mm with W as [in, out] is fastest, except when
    the output is narrower than the input (FFN down-projection) or H > 1, where
    bmm(W [H, out, in], x^T) wins (2-3x for the stacked draft heads); with several rows,
    [in, out] wins by as much. (oneDNN's prepacked linear and bf16 were no faster end to end.)
    """

    def __init__(self, ws: list[Tensor], dtype: torch.dtype, one_row: str) -> None:
        w = torch.stack([x.detach() for x in ws]).to(dtype)  # [H, out, in]
        self.H, self.dtype = w.shape[0], dtype
        self.io = w.transpose(1, 2).contiguous()
        self.oi = w.contiguous() if one_row == "oi" else None

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
        # q/k/v and gate/up concatenated: 4 matmuls per layer instead of 7
        self.qkv = _Mat([torch.cat([b.attention.wq.weight, b.attention.wk.weight,
                                    b.attention.wv.weight]) for b in blocks], dtype, "io")
        self.o = _Mat([b.attention.wo.weight for b in blocks], dtype, one)
        self.w13 = _Mat([torch.cat([b.feed_forward.w1.weight, b.feed_forward.w3.weight])
                         for b in blocks], dtype, one)
        self.w2 = _Mat([b.feed_forward.w2.weight for b in blocks], dtype, "oi")


class Layers:
    """The model's transformer layers in the engine's layout (see the module docstring)."""

    def __init__(self, model: MultiTokenModel, draft_dtype: torch.dtype) -> None:
        cfg = model.cfg
        dtype = model.tok_embeddings.weight.dtype
        self.eps, self.nh, self.nkv, self.hd = cfg.norm_eps, cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.trunk = [_Weights([b], dtype) for b in model.layers]
        self.head0 = _Weights([model.heads[0]], dtype) if cfg.head_type == "transformer" else None
        self._heads, self._draft_dtype = model.heads, draft_dtype
        self._drafts: dict[int, _Weights] = {}

    def drafts(self, n_heads: int) -> _Weights | None:
        """Draft heads 1..n_heads-1 stacked (built on first use)."""
        if n_heads < 2:
            return None
        if n_heads not in self._drafts:
            with torch.no_grad():
                self._drafts[n_heads] = _Weights(list(self._heads[1:n_heads]), self._draft_dtype)
        return self._drafts[n_heads]

    def norm(self, x: Tensor, g: Tensor) -> Tensor:
        # Same arithmetic as model.RMSNorm (fp32 statistics), with per-layer gains.
        return (F.rms_norm(x.float(), (x.shape[-1],), None, self.eps) * g.float()).type_as(x)

    def qkv(self, x: Tensor, w: _Weights, cos: Tensor, sin: Tensor, ctx: DecodeContext,
            layer: int, B: int) -> Tensor:
        """Project x [1, B*T, D], rotate, store k/v of layers layer.. in the cache; return q
        [H, B, T, nh, hd]."""
        H, BT = w.g_attn.shape[0], x.shape[1]
        T = BT // B
        nh, nkv, hd = self.nh, self.nkv, self.hd
        q, k, v = w.qkv(self.norm(x, w.g_attn)).split([nh * hd, nkv * hd, nkv * hd], -1)
        q = apply_rope(q.reshape(H, BT, nh, hd), cos, sin).view(H, B, T, nh, hd)
        k = apply_rope(k.reshape(H, BT, nkv, hd), cos, sin).view(H, B, T, nkv, hd)
        cache: KVCache = ctx.cache
        rows = cache._rows[:B]
        cache.k[layer:layer + H, rows, ctx.slots] = k.to(cache.k.dtype)
        cache.v[layer:layer + H, rows, ctx.slots] = v.view(H, B, T, nkv, hd).to(cache.v.dtype)
        return q

    def attend_ffn(self, q: Tensor, x: Tensor, ctx: DecodeContext, w: _Weights, layer: int,
                   mask: Tensor) -> Tensor:
        """Attention of q [H, B, T, nh, hd] over cache layers layer..layer+H-1, then output
        projection and FFN on the residual x [1 or H, B*T, D] -> [H, B*T, D]."""
        H, B, T = q.shape[:3]
        S = ctx.kv_len
        # [H, B, S, Hkv, hd] -> [H*B, Hkv, S, hd]: views, no copy
        kc = ctx.cache.k[layer:layer + H, :, :S].flatten(0, 1).transpose(1, 2)
        vc = ctx.cache.v[layer:layer + H, :, :S].flatten(0, 1).transpose(1, 2)
        if H > 1:
            mask = mask.expand(H, *mask.shape).flatten(0, 1)
        y = F.scaled_dot_product_attention(
            q.flatten(0, 1).transpose(1, 2), kc.to(q.dtype), vc.to(q.dtype), attn_mask=mask,
            enable_gqa=self.nh != self.nkv)  # [H*B, nh, T, hd]
        y = y.view(H, B, self.nh, T, self.hd).permute(0, 1, 3, 2, 4).reshape(H, B * T, -1)
        x = x + w.o(y)
        gate, up = w.w13(self.norm(x, w.g_ffn)).chunk(2, dim=-1)
        return x + w.w2(F.silu(gate) * up)

    def layer(self, x: Tensor, w: _Weights, cos: Tensor, sin: Tensor, ctx: DecodeContext,
              layer: int, B: int) -> Tensor:
        """One full layer (H=1): x [1, B*T, D] -> [1, B*T, D]."""
        q = self.qkv(x, w, cos, sin, ctx, layer, B)
        return self.attend_ffn(q, x, ctx, w, layer, ctx.mask)


# Engine layouts per model; rebuilt when a parameter changes (data pointer or version counter).
_LAYOUTS: weakref.WeakKeyDictionary[MultiTokenModel, dict] = weakref.WeakKeyDictionary()


def _layers(model: MultiTokenModel, draft_dtype: torch.dtype) -> Layers:
    key = tuple((p.data_ptr(), p._version) for p in model.parameters())
    per_model = _LAYOUTS.setdefault(model, {})
    hit = per_model.get(draft_dtype)
    if hit is None or hit[0] != key:
        with torch.no_grad():
            hit = (key, Layers(model, draft_dtype))
        per_model[draft_dtype] = hit
    return hit[1]


class Engine:
    """Cached forwards of `model` computing heads 0..n_heads-1 (code indices).

    draft_dtype: dtype of the draft heads' matmuls (parallel transformer heads only; default:
    the model's). A draft is only a proposal that head 1 verifies, so it can never change the
    output. (bf16 drafts measured no faster than fp32 on the 2-core AMD EPYC we target.)
    """

    def __init__(self, model: MultiTokenModel, n_heads: int,
                 draft_dtype: torch.dtype | None = None) -> None:
        if not 1 <= n_heads <= model.n_future:
            raise ValueError(f"n_heads must be in 1..{model.n_future}, got {n_heads}")
        self.model = model
        self.cfg = model.cfg
        self.n_heads = n_heads
        p = model.tok_embeddings.weight
        self.device, self.dtype = p.device, p.dtype
        self.draft_dtype = draft_dtype or p.dtype
        self.layers = _layers(model, self.draft_dtype)
        self.stacked = model.cfg.head_type == "transformer"
        self.n_trunk = len(model.layers)
        self.draft_out = model.output.weight
        if self.draft_dtype != p.dtype:
            self.draft_out = self.draft_out.detach().to(self.draft_dtype)

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
        q_draft = None
        drafts = L.drafts(self.n_heads)
        if drafts is not None:  # draft heads: keys/values at every position, queries kept
            q_draft = L.qkv(x, drafts, c, s, ctx, n + 1, B)
        h0 = L.layer(x, L.head0, c, s, ctx, n, B)
        return Forward(h0=h0.view(B, T, -1), ctx=ctx, z=x.view(B, T, -1), q=q_draft)

    def _other_heads(self, z: Tensor, cos: Tensor, sin: Tensor, ctx: DecodeContext) -> Forward:
        """Linear and chained heads: the model's own head modules, parents first."""
        out = self.model.run_heads(z, range(self.n_heads), cos, sin, ctx)
        hs = torch.stack([out[i] for i in range(1, self.n_heads)]) if self.n_heads > 1 else None
        return Forward(h0=out[0], ctx=ctx, hs=hs)

    def drafts(self, fwd: Forward, sel: Tensor) -> Tensor:
        """Phase 2: draft heads' hidden states at input position sel [B] -> [H-1, B, D]."""
        rows = torch.arange(sel.shape[0], device=sel.device)
        if not self.stacked:
            assert fwd.hs is not None
            return fwd.hs[:, rows, sel]
        assert fwd.z is not None and fwd.q is not None
        B, _, D = fwd.z.shape
        q = fwd.q[:, rows, sel].unsqueeze(2)  # [H-1, B, 1, nh, hd]
        mask = fwd.ctx.mask[rows, :, sel].unsqueeze(2)  # [B, 1, 1, S]: that position's row
        x = fwd.z[rows, sel].reshape(1, B, D)
        w = self.layers.drafts(self.n_heads)
        assert w is not None
        return self.layers.attend_ffn(q, x, fwd.ctx, w, self.n_trunk + 1, mask)

    def logits(self, h: Tensor) -> Tensor:
        """Shared norm + unembedding, in fp32 so sampling and argmax see full precision."""
        return self.model.unembed(h).float()

    def draft_logits(self, h: Tensor) -> Tensor:
        """Logits of the draft heads' states h [H-1, B, D] (unembedding in the draft dtype)."""
        w = self.draft_out
        return F.linear(self.model.norm(h).to(w.dtype), w).float()
