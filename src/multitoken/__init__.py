"""multitoken: multi-token prediction training and exact self-speculative decoding.

The public names are loaded on first use (PEP 562), so `import multitoken` and the command
line's `--help` / `--version` do not import torch.

`multitoken.generate` is both a submodule (the decoding code) and the public function it
defines. Importing a submodule makes the import system bind it as an attribute of the package,
which would hide a lazy attribute of the same name, and then `from multitoken import generate`
would give the module or the function depending on what happened to be imported before. The
package's module class therefore defines `generate` as a property: it is always the function,
in any import order, and the import system's binding of the submodule is ignored. The module
itself stays importable as usual (`from multitoken.generate import generate, Sampling`,
`importlib.import_module("multitoken.generate")`); only `import multitoken.generate as m` (an
attribute lookup) gives the function.
"""

from __future__ import annotations

import importlib
import sys
import types
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


class _Package(types.ModuleType):
    """The package's module type: `generate` is always the function (see the docstring)."""

    @property
    def generate(self) -> Any:
        return importlib.import_module("multitoken.generate").generate

    @generate.setter
    def generate(self, value: Any) -> None:
        # The import system binds the submodule `multitoken.generate` here after importing it;
        # the name stays the function. The module is in sys.modules["multitoken.generate"].
        if not isinstance(value, types.ModuleType):
            raise AttributeError("multitoken.generate is the decoding function and read-only")


sys.modules[__name__].__class__ = _Package
