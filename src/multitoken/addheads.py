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

Parameter matching (`ModelConfig.n_layers` counts the head layers too) would move trunk layers
into the new heads; here the trunk must stay as trained, so the result's `n_layers` grows by
one per added head instead.
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from multitoken.errors import ConfigError
from multitoken.model import MultiTokenModel


def add_heads(model: MultiTokenModel, n_future: int) -> MultiTokenModel:
    """A copy of `model` with `n_future` heads (see the module docstring)."""
    src = model.cfg
    if n_future < 1:
        raise ConfigError(f"--n-future must be >= 1, got {n_future}")
    if src.head_type != "transformer":
        raise ConfigError(f"add-heads needs transformer heads (one layer each, the paper's); "
                          f"this model has {src.head_type} heads")
    cfg = dataclasses.replace(src, n_future=n_future,
                              n_layers=src.n_trunk_layers + n_future)
    device = model.tok_embeddings.weight.device
    with torch.device(device):
        out = MultiTokenModel(cfg).to(model.tok_embeddings.weight.dtype)
    sd = model.state_dict()
    new = out.state_dict()
    for name in new:
        if name.startswith("heads."):
            i, rest = name[len("heads."):].split(".", 1)
            source = name if int(i) < src.n_future else f"heads.0.{rest}"
            new[name] = sd[source].clone()
        else:
            new[name] = sd[name].clone()
    out.load_state_dict(new)
    out.train(model.training)
    return out


def run_config_with(run: dict, cfg_model: dict) -> dict:
    """The source's run config (a nested dict) with its model section replaced."""
    out = copy.deepcopy(run) if run else {}
    out["model"] = dict(cfg_model)
    return out


__all__ = ["add_heads", "run_config_with"]
