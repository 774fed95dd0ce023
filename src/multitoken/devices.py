"""`--device` values -> a torch.device this machine has, or one clear ConfigError.

torch accepts `torch.device("cuda")` on a CPU-only build and fails later, deep inside the first
allocation (an AssertionError), and rejects an unknown name with a RuntimeError listing every
backend; the commands check the device up front instead, before loading or writing anything.
"""

from __future__ import annotations

import torch

from multitoken.errors import ConfigError

DEVICE_TYPES = ("cpu", "cuda", "mps")


def resolve_device(spec: str, flag: str = "--device") -> torch.device:
    """'cpu', 'cuda', 'cuda:N', 'mps' or 'auto' (CUDA when available, else CPU)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in DEVICE_TYPES:
        raise ConfigError(f"{flag}: unknown device {spec!r} (use cpu, cuda, cuda:N, mps or auto)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{flag} {spec}: CUDA is not available (this torch build or "
                              "machine has no usable GPU)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{flag} {spec}: there are {torch.cuda.device_count()} CUDA "
                              "device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{flag} {spec}: MPS is not available on this machine")
    return dev
