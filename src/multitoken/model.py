"""The multi-token prediction model: a Llama-style trunk, n heads, one shared norm + unembedding.

    idx [B, T] -> tok_embeddings -> trunk layers -> z [B, T, D]
    z -> head_i (one transformer layer, or a linear map; parallel or chained) -> h_i [B, T, D]
    (token_conditioned: h_{i-1}, emb(x_{t+i-1}) -> norm each, concat, 2D -> D, layer -> h_i)
    h_i -> shared RMSNorm -> shared unembedding -> logits_i [B, T, V]   (head i predicts x_{t+i})

Weight names follow Meta's Llama checkpoints (`tok_embeddings`, `layers.N.attention.wq`, ...,
`norm`, `output`) so the mapping to Meta's MTP release and to Hugging Face Llama is a renaming
(see docs/weights.md). Rotary embeddings use the Hugging Face "rotate half" convention.

Options of pretrained families (`ModelConfig`): q/k/v biases (Qwen2), an RMSNorm over each
head's q and k before rotary (Qwen3), a head width other than dim / n_heads, and Llama 3.1's
rotary frequency scaling. With the defaults the layers hold and compute exactly what they did
before the options existed (no bias, no norm module, the same rotary table).

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


def llama3_inv_freq(inv_freq: Tensor, factor: float, low_freq_factor: float,
                    high_freq_factor: float, original_max_len: int) -> Tensor:
    """Llama 3.1's rotary rescaling of inv_freq [hd/2]: wavelengths longer than
    original_max_len / low_freq_factor are stretched by `factor`, those shorter than
    original_max_len / high_freq_factor kept, the ones between interpolated (the definition in
    Meta's Llama 3.1 reference code and transformers' `rope_type: llama3`)."""
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = original_max_len / low_freq_factor
    high_wavelen = original_max_len / high_freq_factor
    smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    return torch.where((wavelen >= high_wavelen) & (wavelen <= low_wavelen), smoothed, out)


def _inv_freq(head_dim: int, theta: float) -> Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def _tables(inv_freq: Tensor, max_len: int) -> tuple[Tensor, Tensor]:
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin tables [max_len, head_dim // 2] for rotary position embeddings."""
    return _tables(_inv_freq(head_dim, theta), max_len)


def model_rope_tables(cfg: ModelConfig) -> tuple[Tensor, Tensor]:
    """The rotary tables of a model with config `cfg` (its rope scaling included),
    [max_seq_len, head_dim // 2] each."""
    inv_freq = _inv_freq(cfg.head_dim, cfg.rope_theta)
    if cfg.rope_scaling == "llama3":
        inv_freq = llama3_inv_freq(inv_freq, cfg.rope_factor, cfg.rope_low_freq_factor,
                                   cfg.rope_high_freq_factor, cfg.rope_original_max_len)
    return _tables(inv_freq, cfg.max_seq_len)


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
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        # Qwen3: one RMSNorm over the head dimension, shared by all heads, on q and on k.
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ctx: DecodeContext | None,
                layer: int, attn_mask: Tensor | None = None) -> Tensor:
        """attn_mask [T, T] (bool, True = may attend) replaces the causal mask of an uncached
        forward (token-conditioned heads 3.. see a gap); cached forwards take ctx.mask."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.hd)
        k = self.wk(x).view(B, T, self.n_kv, self.hd)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = self.wv(x).view(B, T, self.n_kv, self.hd)
        gqa = self.n_kv != self.n_heads
        if ctx is None:  # training / full forward: causal attention over this sequence
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                attn_mask=attn_mask, is_causal=attn_mask is None, enable_gqa=gqa)
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
                layer: int = 0, attn_mask: Tensor | None = None) -> Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, ctx, layer, attn_mask)
        return x + self.feed_forward(self.ffn_norm(x))


class TokenConditionedHead(nn.Module):
    """Head k >= 2 of `token_conditioned` models (DeepSeek-V3's MTP module, section 2.2):

        h_k[t] = Block(eh_proj([hnorm(h_{k-1}[t]); enorm(emb(x_{t+k-1}))]))     [B, T, D]

    h_{k-1} is the previous head's output (before the shared norm), emb the model's shared
    token embedding. Names follow DeepSeek-V3's checkpoints (hnorm, enorm, eh_proj).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.block = Block(cfg)

    def forward(self, h: Tensor, e: Tensor, cos: Tensor, sin: Tensor,
                ctx: DecodeContext | None = None, layer: int = 0,
                attn_mask: Tensor | None = None) -> Tensor:
        """h, e [B, T, D] -> [B, T, D]."""
        x = self.eh_proj(torch.cat([self.hnorm(h), self.enorm(e)], dim=-1))
        return self.block(x, cos, sin, ctx, layer, attn_mask)


def conditioned_visible(i: int, query_pos: Tensor, key_pos: Tensor,
                        query_slot: Tensor | None = None) -> Tensor:
    """Which keys token-conditioned head i (0-based) may attend to: its own entry and entries
    at positions <= t - i + 1 (bool [..., Tq, Tk]). query_pos [..., Tq], key_pos [Tk] (cache
    slots hold their position's entry); query_slot [..., Tq]: where each query's own entry is
    (default: at its position).

    Why the gap: head i's entry at position u reads token x_{u+i}. When decoding at position q
    the tokens known for sure end at x_{q+1} (the token just produced), so only entries u <=
    q + 1 - i can hold real tokens; the ones between would be drafts. Training sees exactly
    what decoding can give. Heads 0..2 see every earlier position (plain causal attention).
    """
    own = key_pos == (query_pos if query_slot is None else query_slot)[..., :, None]
    return own | (key_pos <= query_pos[..., :, None] - i + 1)


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
        self.heads: nn.ModuleList
        if cfg.head_type == "token_conditioned":
            self.heads = nn.ModuleList([Block(cfg), *(TokenConditionedHead(cfg)
                                                      for _ in range(cfg.n_future - 1))])
        elif cfg.layer_heads:
            self.heads = nn.ModuleList(Block(cfg) for _ in range(cfg.n_future))
        else:
            self.heads = nn.ModuleList(nn.Linear(cfg.dim, cfg.dim, bias=False)
                                       for _ in range(cfg.n_future))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = model_rope_tables(cfg)
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
            if name.endswith(".bias"):  # q/k/v biases (qkv_bias)
                nn.init.zeros_(p)
            elif p.dim() == 1:  # norm gains
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, 0.0, resid_std)
            else:
                nn.init.normal_(p, 0.0, std)
        if not self.cfg.layer_heads:  # linear heads start as the identity map
            for h in self.heads:
                nn.init.eye_(h.weight)
        self.reset_buffers()

    def reset_buffers(self, device: torch.device | str | None = None,
                      dtype: torch.dtype | None = None) -> None:
        """Recompute the buffers __init__ computes (the rotary tables, never in a state dict)
        on `device` (default: where they are) in `dtype` (default fp32): a model built on the
        meta device gets real ones this way."""
        device = self.rope_cos.device if device is None else device
        self.rope_cos, self.rope_sin = (t.to(device=device, dtype=dtype)
                                        for t in model_rope_tables(self.cfg))

    @property
    def n_future(self) -> int:
        return self.cfg.n_future

    @property
    def conditioned(self) -> bool:
        """Token-conditioned heads: head i >= 1 also reads the embedding of token t+i."""
        return self.cfg.head_type == "token_conditioned"

    @property
    def n_cache_layers(self) -> int:
        # Token-conditioned draft heads keep their keys/values with the drafter
        # (decoding/conditioned.py): the model's cache holds the trunk and head 1.
        if self.conditioned:
            return len(self.layers) + 1
        return len(self.layers) + (len(self.heads) if self.cfg.layer_heads else 0)

    def new_cache(self, batch_size: int, max_len: int | None = None, *,
                  dtype: torch.dtype | None = None) -> KVCache:
        p = self.tok_embeddings.weight
        return KVCache(self.n_cache_layers, batch_size, max_len or self.cfg.max_seq_len,
                       self.cfg.kv_heads, self.cfg.head_dim, device=p.device,
                       dtype=dtype or p.dtype)

    def new_draft_cache(self, batch_size: int, max_len: int, *,
                        dtype: torch.dtype | None = None) -> KVCache:
        """Token-conditioned draft heads' own cache: one layer per draft head (head k at k-1)."""
        p = self.tok_embeddings.weight
        return KVCache(self.cfg.n_future - 1, batch_size, max_len, self.cfg.kv_heads,
                       self.cfg.head_dim, device=p.device, dtype=dtype or p.dtype)

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
        if self.cfg.head_type in ("causal", "token_conditioned") and i > 0:
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
             ctx: DecodeContext | None = None, idx: Tensor | None = None) -> Tensor:
        """Head i's layer on its input x [B, T, D] -> un-normalised h_i [B, T, D].

        Token-conditioned heads i >= 1 also need the input tokens idx [B, T] (uncached only:
        decoding runs them in `decoding.conditioned`), from which they read x_{t+i}."""
        if self.conditioned and i > 0:
            if idx is None or ctx is not None:
                raise ValueError("token-conditioned heads 2.. run uncached here and need the "
                                 "input tokens idx; decoding runs them in decoding.conditioned")
            return self.heads[i](x, self.tok_embeddings(self.future_tokens(idx, i)), cos, sin,
                                 None, 0, self.conditioned_mask(i, idx.shape[1], idx.device))
        if self.cfg.layer_heads:
            return self.heads[i](x, cos, sin, ctx, len(self.layers) + i)
        return self.heads[i](x)

    @staticmethod
    def future_tokens(idx: Tensor, i: int) -> Tensor:
        """x_{t+i} for every position t of idx [B, T]: idx shifted left by i, 0 past the end.
        Where t+i >= T head i's label x_{t+i+1} is past the end too, so those positions are
        never scored, and no earlier position attends to them."""
        return F.pad(idx[:, i:], (0, min(i, idx.shape[1])))

    @staticmethod
    def conditioned_mask(i: int, T: int, device: torch.device) -> Tensor | None:
        """Token-conditioned head i's mask over T positions [T, T] (None = plain causal)."""
        if i <= 2:
            return None
        pos = torch.arange(T, device=device)
        return conditioned_visible(i, pos, pos)

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
                              ctx, idx)

    def run_heads(self, z: Tensor, heads: Sequence[int], cos: Tensor, sin: Tensor,
                  ctx: DecodeContext | None = None,
                  idx: Tensor | None = None) -> dict[int, Tensor]:
        """The requested heads on trunk output z [B, T, D], parents first -> {i: h_i}.
        idx [B, T]: the input tokens (token-conditioned heads read them)."""
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
                out[i] = self.head(i, z if parent is None else out[parent], cos, sin, ctx, idx)
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
