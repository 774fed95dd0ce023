"""Command-line parsing shared by the subcommands: bad input becomes one `error:` line, exit 2.

Plain argparse reports a usage error itself: it prints the usage and `prog: error: ...` to
stderr and exits with status 2. `ArgumentParser` here raises `ConfigError` instead, so the one
handler in `multitoken.cli.main` prints it like every other bad input: a single
`error: ...` line (no usage block, no traceback), exit status 2.

This module imports neither torch nor anything that does: `multitoken.cli` imports it, and
`multitoken --help` / `--version` must stay fast.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Literal, NoReturn

from multitoken.errors import ConfigError

if TYPE_CHECKING:
    import torch

# --dtype of the commands that decode or score with a checkpoint; "auto" first (the default).
DTYPES = ("auto", "float32", "bfloat16", "float16")


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose usage errors raise ConfigError (see the module docstring).

    `--help` still prints the help and exits 0.
    """

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see `{self.prog} --help`)")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def positive_int_list(text: str) -> list[int]:
    """argparse type: comma-separated integers >= 1, e.g. `1,8`."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    """The decoding commands' --threads (generate, calibrate, bench decode)."""
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch CPU threads (default 1: decode steps are many small ops; a "
                   "second thread mostly adds synchronisation)")


def add_device_argument(p: argparse.ArgumentParser, default: str = "cpu") -> None:
    """--device, checked later by `multitoken.devices.resolve_device` (which needs torch)."""
    p.add_argument("--device", default=default,
                   help=f"cpu, cuda, cuda:N, mps or auto (a GPU when there is one; default "
                   f"{default})")


def add_dtype_argument(p: argparse.ArgumentParser) -> None:
    """--dtype of the commands that decode or score with a checkpoint (generate, calibrate,
    eval, eval-code, bench decode); `load_dtype` turns its value into `load_checkpoint`'s.
    Training and distill keep fp32 master weights and have no such option."""
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="dtype the model is loaded and run in; auto (default): the dtype its "
                   "weights are stored in (fp32 for models trained here, bf16 for a release "
                   "converted with `convert --dtype auto`)")


def load_dtype(name: str) -> torch.dtype | Literal["auto"]:
    """A --dtype value (one of DTYPES) as `checkpoint.load_checkpoint` takes it."""
    if name == "auto":
        return "auto"
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose one of: {', '.join(DTYPES)}")
    import torch  # here, not at the top: this module must not import torch (module docstring)

    dtype: torch.dtype = getattr(torch, name)
    return dtype
