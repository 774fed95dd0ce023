"""One exception type for everything a user can get wrong.

The CLI catches `MultitokenError` and prints its message as a single line with a non-zero exit
code (no traceback unless `MULTITOKEN_DEBUG=1`). Library callers get an ordinary exception.
"""

from __future__ import annotations


class MultitokenError(Exception):
    """Bad input: a config value, a file, a checkpoint, a prompt. The message says which."""


class ConfigError(MultitokenError, ValueError):
    """An invalid or unknown configuration key or value."""


class CheckpointError(MultitokenError):
    """A missing, corrupt or mismatched checkpoint."""


class DataError(MultitokenError):
    """A missing, empty or unreadable corpus."""
