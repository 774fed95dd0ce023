"""Change how many future tokens a trained model predicts: add draft heads, or drop them.

    add_heads(model, n_future) -> a new MultiTokenModel

The trunk, head 1, the shared norm and the unembedding are copied unchanged, so plain decoding
(head 1 alone) of the result equals the source's bit for bit. Heads the source already has
keep their weights; each new head is a copy of head 1's transformer layer (the source model's
last layer), which makes a new head start out predicting what head 1 predicts, one token later
than it should: a far better start than random weights, which would send the trunk large
gradients when the heads are trained jointly.

With `n_future` below the source's, the extra heads are dropped: the paper's best
CodeContests recipe pre-trains with n=4 and fine-tunes with n'=1.

With `head_type="token_conditioned"` the new heads are DeepSeek-V3-style MTP modules
(`model.TokenConditionedHead`): each one's transformer layer is a copy of head 1's, its norms
start at one and its projection at [I | 0], so a new module starts as head 1's layer applied to
the previous head's normalised state; the half that reads the token embedding starts at zero
and is learnt (its gradient is not zero: it is the layer's input gradient times the embedding).
The source may have transformer heads (an n=1 model is the usual source) or token-conditioned
ones (whose modules are kept).

Parameter matching (`ModelConfig.n_layers` counts the head layers too) would move trunk layers
into the new heads; here the trunk must stay as trained, so the result's `n_layers` grows by
one per added head instead.
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from multitoken.config import ModelConfig
from multitoken.errors import ConfigError
from multitoken.model import MultiTokenModel

HEAD_TYPES = ("transformer", "token_conditioned")


def _source_name(name: str, src: ModelConfig, dst: ModelConfig) -> str | None:
    """The source weight a new model's weight `name` copies (None: a fresh module part)."""
    if not name.startswith("heads."):
        return name
    i_str, rest = name[len("heads."):].split(".", 1)
    i = int(i_str)
    if i < src.n_future and (i == 0 or src.head_type == dst.head_type):
        return name
    if dst.head_type == "token_conditioned" and i > 0:  # heads.i.block.X <- heads.0.X
        return f"heads.0.{rest[len('block.'):]}" if rest.startswith("block.") else None
    return f"heads.0.{rest}"


def add_heads(model: MultiTokenModel, n_future: int,
              head_type: str | None = None) -> MultiTokenModel:
    """A copy of `model` with `n_future` heads of `head_type` (default: the source's; see the
    module docstring)."""
    src = model.cfg
    head_type = head_type or src.head_type
    if n_future < 1:
        raise ConfigError(f"--n-future must be >= 1, got {n_future}")
    if src.head_type not in HEAD_TYPES:
        raise ConfigError(f"add-heads needs transformer heads (one layer each, the paper's) or "
                          f"token_conditioned ones; this model has {src.head_type} heads")
    if head_type not in HEAD_TYPES:
        raise ConfigError(f"--head-type must be one of {', '.join(HEAD_TYPES)}, got "
                          f"{head_type!r}")
    cfg = dataclasses.replace(src, n_future=n_future, head_type=head_type,
                              n_layers=src.n_trunk_layers + n_future)
    device = model.tok_embeddings.weight.device
    with torch.device(device):
        out = MultiTokenModel(cfg).to(model.tok_embeddings.weight.dtype)
    sd = model.state_dict()
    new = out.state_dict()
    for name in new:
        source = _source_name(name, src, cfg)
        if source is not None:
            new[name] = sd[source].clone()
        elif name.endswith("eh_proj.weight"):  # [D, 2D]: [I | 0] (module docstring)
            new[name] = torch.cat([torch.eye(cfg.dim), torch.zeros(cfg.dim, cfg.dim)], 1)
        else:  # hnorm, enorm
            new[name] = torch.ones_like(new[name])
    out.load_state_dict(new)
    out.train(model.training)
    return out


def run_config_with(run: dict, cfg_model: dict) -> dict:
    """The source's run config (a nested dict) with its model section replaced."""
    out = copy.deepcopy(run) if run else {}
    out["model"] = dict(cfg_model)
    return out


__all__ = ["add_heads", "run_config_with"]
