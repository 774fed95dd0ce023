from __future__ import annotations

import torch

from multitoken.config import ModelConfig
from multitoken.model import MultiTokenModel

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_configure(config) -> None:
    # Registered here, not in pyproject.toml: the CUDA checks of tests/test_cuda.py, selected by
    # scripts/gpu_check.sh with `-m cuda` (their CPU cases run in the normal suite too).
    config.addinivalue_line("markers", "cuda: the CUDA path's checks (tests/test_cuda.py); "
                                       "CUDA cases skip without a GPU")


def tiny_model(seed: int = 0, **overrides) -> MultiTokenModel:
    kw = dict(vocab_size=37, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, n_future=3,
              max_seq_len=64)
    kw.update(overrides)
    torch.manual_seed(seed)
    return MultiTokenModel(ModelConfig(**kw))
