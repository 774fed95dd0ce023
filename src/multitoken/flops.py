"""Training compute in FLOPs, for comparisons at equal compute (`experiment pretrained`)
and the weights a layer multiplies every token by (`bench train-speed`).

Counted per token, matrix multiplications only (norms, rotary, softmax, the optimizer and the
embedding lookup are left out: a few percent at the shapes trained here):

- forward of a transformer layer: 2 x its weights (q, k, v, o and the three SwiGLU matrices)
  plus attention, 4 x n_heads x head_dim x c for c keys attended (QK^T and AV); a training
  window of T tokens attends to (T + 1) / 2 keys on average;
- forward of an unembedding (one per head that is scored): 2 x dim x vocab;
- backward of a part that trains: 2 x its forward (gradients for activations and weights); of a
  frozen part that gradients pass through (the shared unembedding under a trained draft
  head): 1 x its forward; of a frozen part below everything that trains (the trunk and head 1
  when only the draft heads train): nothing.

A fully trained model thus costs 3 x forward per token, the familiar 6 N (2 N_forward +
4 N_trainable) plus attention; training heads 2..n alone costs the forward of the whole model
plus the backward of those heads.

Plain decoding (head 1) costs one forward of the trunk, head 1 and one unembedding per token,
attending to the prompt and the tokens decoded so far.
"""

from __future__ import annotations

from typing import Literal

from multitoken.config import DistillConfig, ModelConfig, RunConfig
from multitoken.errors import ConfigError

Trainable = Literal["all", "draft_heads"]


def layer_params(cfg: ModelConfig) -> int:
    """Matrix weights of one transformer layer: attention (q, k, v, o) and the SwiGLU FFN."""
    q = cfg.n_heads * cfg.head_dim
    kv = cfg.kv_heads * cfg.head_dim
    return cfg.dim * (2 * q + 2 * kv) + 3 * cfg.dim * cfg.hidden_dim


def layer_forward(cfg: ModelConfig, context: float) -> float:
    """FLOPs of one layer's forward for one token attending to `context` keys."""
    return 2.0 * layer_params(cfg) + 4.0 * cfg.n_heads * cfg.head_dim * context


def unembed_forward(cfg: ModelConfig) -> float:
    return 2.0 * cfg.dim * cfg.vocab_size


def _check(cfg: ModelConfig) -> None:
    if not cfg.layer_heads:
        raise ConfigError("FLOP counts are implemented for transformer-layer heads only")


def train_token_flops(cfg: ModelConfig, seq_len: int, trainable: Trainable = "all") -> float:
    """Training FLOPs per token on windows of `seq_len` tokens (see the module docstring)."""
    _check(cfg)
    layer = layer_forward(cfg, (seq_len + 1) / 2)
    unembed = unembed_forward(cfg)
    forward = cfg.n_trunk_layers * layer + cfg.n_future * (layer + unembed)
    if trainable == "all":
        return 3.0 * forward
    return forward + (cfg.n_future - 1) * (2.0 * layer + unembed)


def train_flops(cfg: RunConfig) -> float:
    """Training FLOPs of a whole run: steps x batch x seq_len tokens (validation excluded)."""
    t = cfg.train
    return t.steps * t.batch_size * t.seq_len * train_token_flops(cfg.model, t.seq_len,
                                                                  t.trainable)


def decode_flops(cfg: ModelConfig, sequences: int, prompt_len: int, new_tokens: int) -> float:
    """Plain decoding (head 1 only): every prompt token's forward (the prefill), then one
    forward per new token, each attending to all tokens before it."""
    _check(cfg)

    def plain(context: float) -> float:
        return (cfg.n_trunk_layers + 1) * layer_forward(cfg, context) + unembed_forward(cfg)

    prefill = prompt_len * plain((prompt_len + 1) / 2)
    decode = new_tokens * plain(prompt_len + (new_tokens + 1) / 2)
    return sequences * (prefill + decode)


def distill_flops(cfg: ModelConfig, d: DistillConfig) -> dict[str, float]:
    """`multitoken distill`'s training compute: decoding the training continuations
    (`sequences` of them) and `steps` steps of `batch_size` sequences, each a forward of the
    whole model and a backward of the draft heads. The held-out continuations it decodes to
    measure agreement are evaluation, not counted (as validation is not, in training)."""
    if d.new_tokens is None:
        raise ConfigError("distill.new_tokens must be set to count FLOPs")
    length = d.prompt_len + d.new_tokens
    step = d.batch_size * length * train_token_flops(cfg, length, "draft_heads")
    generation = decode_flops(cfg, d.sequences, d.prompt_len, d.new_tokens)
    return {"generation": generation, "per_step": step, "total": generation + d.steps * step}


def steps_within(flops: float, per_step: float, what: str) -> int:
    """The most whole steps of `per_step` FLOPs that `flops` pays for (at least one)."""
    steps = int(flops // per_step)
    if steps < 1:
        raise ConfigError(f"the compute left for {what} ({flops:.3g} FLOPs) does not pay for one "
                          f"step ({per_step:.3g} FLOPs)")
    return steps


__all__ = ["decode_flops", "distill_flops", "layer_forward", "layer_params", "steps_within",
           "train_flops", "train_token_flops", "unembed_forward"]
