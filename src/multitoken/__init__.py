"""multitoken: multi-token prediction training and exact self-speculative decoding.

The public names are loaded on first use (PEP 562), so `import multitoken` and the command
line's `--help` / `--version` do not import torch. No submodule shares a public name (the
decoding code lives in `multitoken.decoding`), so `from multitoken import generate` is the
function whatever was imported before.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

__all__ = [
    "ModelConfig",
    "MultiTokenModel",
    "MultitokenError",
    "RunConfig",
    "generate",
    "load_checkpoint",
    "save_checkpoint",
]

# public name -> the submodule defining it (imported on first access)
_LAZY = {
    "ModelConfig": "multitoken.config",
    "RunConfig": "multitoken.config",
    "MultiTokenModel": "multitoken.model",
    "MultitokenError": "multitoken.errors",
    "generate": "multitoken.decoding.generate",
    "load_checkpoint": "multitoken.checkpoint",
    "save_checkpoint": "multitoken.checkpoint",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'multitoken' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
