"""The multi-token prediction model: a Llama-style trunk, n heads, one shared norm + unembedding.

    idx [B, T] -> tok_embeddings -> trunk layers -> z [B, T, D]
    z -> head_i (one transformer layer, or a linear map; parallel or chained) -> h_i [B, T, D]
    h_i -> shared RMSNorm -> shared unembedding -> logits_i [B, T, V]   (head i predicts x_{t+i})

Weight names follow Meta's Llama checkpoints (`tok_embeddings`, `layers.N.attention.wq`, ...,
`norm`, `output`) so the mapping to Meta's MTP release and to Hugging Face Llama is a renaming
(see docs/weights.md). Rotary embeddings use the Hugging Face "rotate half" convention.

Decoding uses a preallocated KV cache written by *slot* (`KVCache`): every forward may take
per-sequence rotary positions `pos` [B, T], cache slots `slots` [B, T] and a boolean attention
mask [B, T, S]. For plain and chain decoding slots == positions and the mask is causal in
positions, so a rejected draft needs no rollback: the next step overwrites its slots. Tree
decoding writes nodes to consecutive slots with depth-based positions and a tree mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multitoken.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 for stability under bf16 autocast, as Llama does.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin tables [max_len, head_dim // 2] for rotary position embeddings."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, T, H, hd] by per-position angles; cos/sin are [B or 1, T, hd/2]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)  # [B, T, 1, hd/2]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).type_as(x)


class KVCache:
    """Preallocated keys/values for every attention layer (trunk layers, then head layers).

    k, v: [n_layers, B, S, n_kv_heads, head_dim]. Entries are written by slot index, so the
    cache never moves data except when tree decoding compacts an accepted path.
    """

    def __init__(self, n_layers: int, batch_size: int, max_len: int, n_kv_heads: int,
                 head_dim: int, *, device: torch.device | str, dtype: torch.dtype) -> None:
        shape = (n_layers, batch_size, max_len, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self._rows = torch.arange(batch_size, device=device).unsqueeze(1)  # [B, 1]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> None:
        """Store k, v [B, T, Hkv, hd] at slots [B, T]."""
        self.k[layer][self._rows, slots] = k.to(self.k.dtype)
        self.v[layer][self._rows, slots] = v.to(self.v.dtype)

    def read(self, layer: int, kv_len: int) -> tuple[Tensor, Tensor]:
        return self.k[layer, :, :kv_len], self.v[layer, :, :kv_len]

    def copy_slots(self, src: Tensor, dst: Tensor) -> None:
        """For every layer, move entries src [B, m] -> dst [B, m] (tree path compaction)."""
        for cache in (self.k, self.v):
            cache[:, self._rows, dst] = cache[:, self._rows, src]

    def select_rows(self, rows: Tensor) -> None:
        """Keep only batch rows `rows` [B'] (decoding drops finished sequences); copies."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]
        self._rows = self._rows[: rows.shape[0]]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ctx: DecodeContext | None,
                layer: int) -> Tensor:
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.hd), cos, sin)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv, self.hd), cos, sin)
        v = self.wv(x).view(B, T, self.n_kv, self.hd)
        gqa = self.n_kv != self.n_heads
        if ctx is None:  # training / full forward: plain causal attention over this sequence
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                enable_gqa=gqa)
        else:
            ctx.cache.write(layer, ctx.slots, k, v)
            kc, vc = ctx.cache.read(layer, ctx.kv_len)  # [B, S, Hkv, hd]
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2), kc.transpose(1, 2).to(q.dtype), vc.transpose(1, 2).to(q.dtype),
                attn_mask=ctx.mask, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)  # down
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # up

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm transformer layer, Llama layout."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ctx: DecodeContext | None = None,
                layer: int = 0) -> Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, ctx, layer)
        return x + self.feed_forward(self.ffn_norm(x))


class DecodeContext:
    """What one cached forward needs besides the tokens: where to write, what to attend to."""

    def __init__(self, cache: KVCache, slots: Tensor, mask: Tensor, kv_len: int) -> None:
        self.cache = cache
        self.slots = slots  # [B, T] cache slot of each input token
        self.mask = mask  # [B, 1, T, kv_len] bool, True = may attend
        self.kv_len = kv_len


class MultiTokenModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_trunk_layers))
        # One independent module per head (never `[Block(cfg)] * n`, which shares weights).
        if cfg.layer_heads:
            self.heads = nn.ModuleList(Block(cfg) for _ in range(cfg.n_future))
        else:
            self.heads = nn.ModuleList(nn.Linear(cfg.dim, cfg.dim, bias=False)
                                       for _ in range(cfg.n_future))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    # -- construction ---------------------------------------------------------------------
    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        # Residual output projections scaled down with depth (GPT-2), so the residual stream's
        # variance does not grow with the number of layers.
        resid_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, 0.0, resid_std)
            else:
                nn.init.normal_(p, 0.0, std)
        if not self.cfg.layer_heads:  # linear heads start as the identity map
            for h in self.heads:
                nn.init.eye_(h.weight)
        self.rope_cos, self.rope_sin = (t.to(self.rope_cos.device) for t in rope_tables(
            self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta))

    @property
    def n_future(self) -> int:
        return self.cfg.n_future

    @property
    def n_cache_layers(self) -> int:
        return len(self.layers) + (len(self.heads) if self.cfg.layer_heads else 0)

    def new_cache(self, batch_size: int, max_len: int | None = None, *,
                  dtype: torch.dtype | None = None) -> KVCache:
        p = self.tok_embeddings.weight
        return KVCache(self.n_cache_layers, batch_size, max_len or self.cfg.max_seq_len,
                       self.cfg.kv_heads, self.cfg.head_dim, device=p.device,
                       dtype=dtype or p.dtype)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_embeddings.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.output.weight.numel()
        return n

    # -- pieces used by the losses and by decoding ------------------------------------------
    def rope(self, T: int, pos: Tensor | None) -> tuple[Tensor, Tensor]:
        if pos is None:
            return self.rope_cos[None, :T], self.rope_sin[None, :T]
        return self.rope_cos[pos], self.rope_sin[pos]  # [B, T, hd/2]

    def head_parent(self, i: int) -> int | None:
        """Which head's output head i reads (None = the trunk output z)."""
        if self.cfg.head_type == "causal" and i > 0:
            return i - 1
        if self.cfg.head_type == "anticausal" and i < self.cfg.n_future - 1:
            return i + 1
        return None

    def head_order(self) -> list[int]:
        """Heads in an order where every head comes after its parent."""
        n = self.cfg.n_future
        return list(range(n - 1, -1, -1)) if self.cfg.head_type == "anticausal" else list(range(n))

    def trunk(self, idx: Tensor, cos: Tensor, sin: Tensor,
              ctx: DecodeContext | None = None) -> Tensor:
        """idx [B, T] -> z [B, T, D]."""
        x = self.tok_embeddings(idx)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, ctx, i)
        return x

    def head(self, i: int, x: Tensor, cos: Tensor, sin: Tensor,
             ctx: DecodeContext | None = None) -> Tensor:
        """Head i's layer on its input x [B, T, D] -> un-normalised h_i [B, T, D]."""
        if self.cfg.layer_heads:
            return self.heads[i](x, cos, sin, ctx, len(self.layers) + i)
        return self.heads[i](x)

    def unembed(self, h: Tensor) -> Tensor:
        """Shared final norm + unembedding: h [..., D] -> logits [..., V]."""
        return self.output(self.norm(h))

    def hidden(self, idx: Tensor, heads: Sequence[int] | None = None, *,
               pos: Tensor | None = None, ctx: DecodeContext | None = None) -> dict[int, Tensor]:
        """Run the trunk and the requested heads (plus the heads they read from).

        Returns {head index: h_i [B, T, D]} before the shared norm. With `ctx`, every layer that
        runs writes its keys/values to the cache.
        """
        T = idx.shape[1]
        cos, sin = self.rope(T, pos)
        z = self.trunk(idx, cos, sin, ctx)
        return self.run_heads(z, range(self.cfg.n_future) if heads is None else heads, cos, sin,
                              ctx)

    def run_heads(self, z: Tensor, heads: Sequence[int], cos: Tensor, sin: Tensor,
                  ctx: DecodeContext | None = None) -> dict[int, Tensor]:
        """The requested heads on trunk output z [B, T, D], parents first -> {i: h_i}."""
        wanted = set(heads)
        needed = set()
        for i in wanted:  # close over parents
            j: int | None = i
            while j is not None and j not in needed:
                needed.add(j)
                j = self.head_parent(j)
        out: dict[int, Tensor] = {}
        for i in self.head_order():
            if i in needed:
                parent = self.head_parent(i)
                out[i] = self.head(i, z if parent is None else out[parent], cos, sin, ctx)
        return {i: out[i] for i in sorted(wanted)}

    def forward(self, idx: Tensor, heads: Sequence[int] | None = None) -> Tensor:
        """Full (uncached) forward: idx [B, T] -> logits [n_heads_requested, B, T, V]."""
        hs = self.hidden(idx, heads)
        return torch.stack([self.unembed(h) for h in hs.values()])


def causal_context(cache: KVCache, pos: Tensor, kv_len: int | None = None) -> DecodeContext:
    """Decode context for plain/chain decoding: slot = position, attend to positions <= own.

    pos [B, T] holds each token's absolute position; keys at slots beyond a query's position
    hold stale data from rejected drafts or padding and are masked out.
    """
    if kv_len is None:
        kv_len = int(pos.max().item()) + 1
    keys = torch.arange(kv_len, device=pos.device)
    mask = (keys[None, None, :] <= pos[:, :, None]).unsqueeze(1)  # [B, 1, T, S]
    return DecodeContext(cache, pos, mask, kv_len)
