"""multitoken: multi-token prediction training and exact self-speculative decoding."""

from multitoken.config import ModelConfig, RunConfig
from multitoken.errors import MultitokenError
from multitoken.model import MultiTokenModel

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


def __getattr__(name: str):  # lazy: keep `import multitoken` light and free of import cycles
    if name in ("load_checkpoint", "save_checkpoint"):
        from multitoken import checkpoint

        return getattr(checkpoint, name)
    if name == "generate":
        from multitoken.generate import generate

        return generate
    raise AttributeError(f"module 'multitoken' has no attribute {name!r}")
