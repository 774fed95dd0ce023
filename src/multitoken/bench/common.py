"""Small helpers shared by the benchmarks: timing, peak memory, tables, the final JSON line.

Peak memory on CPU: `tracemalloc` does not see PyTorch's allocations, so we read the kernel's
resident-set high-water mark (VmHWM in /proc/self/status) and reset it by writing "5" to
/proc/self/clear_refs. Where /proc is missing (macOS) we fall back to `ru_maxrss`, which cannot be
reset: the figure then includes earlier peaks of the process, which is why the memory benchmark
runs every variant in a fresh process. On CUDA we use the caching allocator's own counters.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch

MIB = 1024 * 1024

# glibc raises its mmap threshold dynamically (up to 32 MiB) after large blocks are freed, after
# which freed memory can stay in the heap and keep counting as resident. A fixed threshold keeps
# every large tensor in its own mmap, returned to the kernel on free, so RSS follows what is live.
# Only read at process start-up, hence set in the environment of the worker processes we spawn.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 20)}


def _status_kib(field: str) -> int | None:
    """A `kB` field of /proc/self/status (e.g. VmRSS, VmHWM), or None without /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _ru_maxrss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / MIB if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


class PeakMemory:
    """Peak memory of a region above what was held when it started, in MiB.

        meter = PeakMemory(device); meter.start(); ...work...; meter.peak_mib()

    CPU: peak RSS (VmHWM, reset at `start`) minus RSS at `start`. CUDA: peak allocated minus
    allocated at `start` (the allocator's cache is not counted).
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.baseline_mib = 0.0
        self.method = ""

    def current_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / MIB
        rss = _status_kib("VmRSS")
        return rss / 1024 if rss is not None else _ru_maxrss_mib()

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "cuda max_memory_allocated"
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
                self.method = "VmHWM (reset via clear_refs)"
            except OSError:
                self.method = "ru_maxrss (not resettable)"
        self.baseline_mib = self.current_mib()

    def peak_mib(self) -> float:
        """Peak since `start`, above the baseline."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / MIB
        else:
            hwm = _status_kib("VmHWM")
            peak = hwm / 1024 if hwm is not None else _ru_maxrss_mib()
        return max(0.0, peak - self.baseline_mib)


def sync(device: torch.device | str) -> None:
    """Wait for queued device work so wall-clock timings are real."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Wall-clock seconds of a `with` block, synchronising the device on both ends."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> Timer:
        sync(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self._t0


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def set_threads(n: int | None) -> None:
    """Pin torch's CPU intra-op threads (None = torch's default)."""
    if n is not None and n > 0:
        torch.set_num_threads(n)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain left/right aligned text table (numbers right-aligned; None shows as "-")."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows)
               for i in range(len(headers))]

    def line(vals: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(vals, widths, numeric)).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}" if abs(x) < 1e-2 and x != 0 else f"{x:,.1f}" if abs(x) >= 100 else f"{x:.3f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def distinct_ngram_ratio(sequences: Iterable[Sequence[int]], n: int = 8) -> float | None:
    """How little token sequences repeat themselves: distinct n-grams / all n-grams, pooled.

    The n-grams of a sequence of L token ids are its L - n + 1 windows of n consecutive ids.
    Each sequence adds its number of n-grams to the denominator and its number of *different*
    n-grams to the numerator; the ratio is the quotient of the two sums (a ratio of sums, so a
    sequence weighs by its length). n-grams are compared within a sequence only: two prompts
    continued alike (a common idiom) are not repetition, a sequence that loops is.

    1.0: no n-gram occurs twice in any sequence. A loop of period p (p <= L - n + 1) has p
    distinct n-grams, so p / (L - n + 1); constant output of length L >> n tends to 0.
    A sequence shorter than n adds nothing; with no sequence of n ids or more the ratio is
    undefined and the result is None. Token ids, not text: the same figure for any tokenizer
    of the same ids.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    distinct = total = 0
    for seq in sequences:
        ids = tuple(int(t) for t in seq)
        grams = len(ids) - n + 1
        if grams <= 0:
            continue
        total += grams
        distinct += len({ids[i:i + n] for i in range(grams)})
    return distinct / total if total else None


def print_json(obj: dict[str, Any]) -> None:
    """The benchmark's last line of output: one JSON object, for machines to read."""
    print(json.dumps(obj), flush=True)


def last_json_line(text: str) -> dict[str, Any]:
    """Parse the last non-empty line of a worker's stdout as a JSON object."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        raise ValueError("no output")
    obj = json.loads(lines[-1])
    if not isinstance(obj, dict):
        raise ValueError(f"last line is not a JSON object: {lines[-1]!r}")
    return obj


def worker_env() -> dict[str, str]:
    """Environment for a measuring subprocess: ours plus the fixed malloc thresholds."""
    env = dict(os.environ)
    for k, v in MALLOC_ENV.items():
        env.setdefault(k, v)
    return env
