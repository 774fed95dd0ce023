from __future__ import annotations

import torch

from multitoken.config import ModelConfig
from multitoken.model import MultiTokenModel

torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_model(seed: int = 0, **overrides) -> MultiTokenModel:
    kw = dict(vocab_size=37, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, n_future=3,
              max_seq_len=64)
    kw.update(overrides)
    torch.manual_seed(seed)
    return MultiTokenModel(ModelConfig(**kw))
