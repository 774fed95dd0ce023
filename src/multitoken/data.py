"""Corpus -> train/val token streams -> batches.

The default corpus is the Python standard library shipped with the interpreter, so a run works
offline with no download. Text is split BY FILE into train and validation (a file never
contributes to both), tokenized once into a memory-mapped cache, and sampled as random windows.

A corpus of one file (nanoGPT's `input.txt`), too few to split by file, is split by position
instead: its last `val_fraction` (cut at a line break) is validation. The two parts are written once to the cache as ordinary files, so
tokenizer training and the token cache treat them like any other corpus files.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from multitoken.config import DataConfig
from multitoken.errors import ConfigError, DataError
from multitoken.tokenizer import Tokenizer, make_tokenizer

log = logging.getLogger(__name__)

_STDLIB_EXCLUDE = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages"})
_SKIP_DIRS = frozenset({"__pycache__"})  # bytecode only: never text
_GLOB_CHARS = frozenset("*?[")
_TOKENS_CACHE_VERSION = 1
_ENCODE_CHUNK_CHARS = 8 << 20  # bound memory: encode ~8M characters per encode_batch call


# ---------------------------------------------------------------------------------------------
# Finding files. Each file carries a "key": its path relative to the root it was found under
# (the stdlib root, the folder named by the user, a glob's fixed prefix). The split hashes the
# key, so it does not depend on the working directory or on how the root was spelled.


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_keyed() -> list[tuple[Path, str]]:
    root = _stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune while walking: site-packages alone can hold far more files than the stdlib.
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_EXCLUDE and d not in _SKIP_DIRS]
        for name in filenames:
            p = Path(dirpath) / name
            if name.endswith(".py") and p.is_file():
                out.append((p, p.relative_to(root).as_posix()))
    out.sort(key=lambda pk: pk[0])
    return out


def stdlib_files() -> list[Path]:
    """Every *.py of the standard library outside test directories and site-packages, sorted."""
    return [p for p, _ in _stdlib_keyed()]


def _walk(root: Path) -> list[tuple[Path, str]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Hidden dirs (.git, .venv, ...) are tooling, not corpus; prune them from the walk.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _SKIP_DIRS)
        for name in filenames:
            p = Path(dirpath) / name
            if p.is_file():
                out.append((p, p.relative_to(root).as_posix()))
    out.sort(key=lambda pk: pk[1])
    return out


def _glob_root(pattern: str) -> Path:
    """The longest leading part of `pattern` without glob characters: keys are relative to it."""
    fixed = []
    for part in Path(pattern).parts:
        if _GLOB_CHARS.intersection(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _resolve_keyed(paths: list[str]) -> list[tuple[Path, str]]:
    found: list[tuple[Path, str]] = []
    for spec in paths:
        p = Path(spec).expanduser()
        if p.is_file():
            found.append((p, p.name))
        elif p.is_dir():
            found.extend(_walk(p))
        elif _GLOB_CHARS.intersection(spec):
            root = _glob_root(str(p))
            matches = sorted(glob.glob(str(p), recursive=True))
            if not matches:
                raise DataError(f"no files match {spec!r}")
            for m in matches:
                mp = Path(m)
                if mp.is_dir():
                    found.extend((f, os.path.relpath(f, root)) for f, _ in _walk(mp))
                elif mp.is_file():
                    found.append((mp, os.path.relpath(mp, root)))
        else:
            raise DataError(f"no such file or directory: {spec}")
    # The same file reached twice (overlapping inputs) must count once: first occurrence wins.
    seen: set[str] = set()
    unique = []
    for p, key in found:
        real = os.path.realpath(p)
        if real not in seen:
            seen.add(real)
            unique.append((p, Path(key).as_posix()))
    if not unique:
        raise DataError(f"no files found in {', '.join(paths) if paths else '(no paths given)'}")
    return unique


def resolve_files(paths: list[str]) -> list[Path]:
    """Files, folders (recursive, hidden dirs skipped) and globs -> files, in a fixed order."""
    return [p for p, _ in _resolve_keyed(paths)]


# ---------------------------------------------------------------------------------------------
# Splitting.


@dataclass
class CorpusSplit:
    train: list[Path]
    val: list[Path]
    skipped: int  # files that are not valid UTF-8 or unreadable: counted, left out
    note: str = ""  # how the split was made, when it is not the usual split by file


def _unit_hash(*parts: object) -> float:
    """A uniform number in [0, 1) determined by `parts`: stable across runs and machines."""
    digest = hashlib.sha256("\x00".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _is_utf8(path: Path) -> bool:
    try:
        path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return True


def split_corpus(cfg: DataConfig) -> CorpusSplit:
    """Pick the corpus files and split them by file into train and validation.

    Every decision hashes the file's key with `cfg.seed`, never its position in a list, so
    adding files to a corpus never moves existing files between train and validation (and a
    file in a `max_files` subset stays there when the cap grows).
    """
    keyed = _stdlib_keyed() if not cfg.paths else _resolve_keyed(cfg.paths)
    if not keyed:
        raise DataError("the corpus is empty")
    if cfg.max_files is not None and cfg.max_files < 1:
        raise ConfigError(f"data.max_files must be >= 1 or None, got {cfg.max_files}")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {cfg.val_fraction}")
    # Seeded shuffle: order by a per-file hash, so a small max_files sees files from all over
    # the corpus instead of the alphabetically first package.
    order = sorted(keyed, key=lambda pk: (_unit_hash("select", cfg.seed, pk[1]), pk[1], str(pk[0])))
    limit = cfg.max_files if cfg.max_files is not None else len(order)
    chosen: list[tuple[Path, str]] = []
    skipped = 0
    for p, key in order:
        if len(chosen) >= limit:
            break
        # Checked here, not only at tokenization, so that max_files counts usable files and the
        # tokenizer is trained on exactly the files that will be tokenized.
        if _is_utf8(p):
            chosen.append((p, key))
        else:
            skipped += 1
    if skipped:
        log.warning("skipped %d file(s) that are not valid UTF-8 or unreadable", skipped)
    if not chosen:
        raise DataError(f"the corpus has no readable UTF-8 files ({skipped} skipped)")
    if len(chosen) < 2:
        return _split_by_position(chosen, cfg, skipped)
    scored = sorted(((_unit_hash("split", cfg.seed, k), k, p) for p, k in chosen),
                    key=lambda t: (t[0], t[1], str(t[2])))
    n_val = sum(1 for u, _, _ in scored if u < cfg.val_fraction)
    n_val = min(max(n_val, 1), len(scored) - 1)  # both sides non-empty: the smallest hashes go to val
    val = sorted((p for _, _, p in scored[:n_val]), key=str)
    train = sorted((p for _, _, p in scored[n_val:]), key=str)
    return CorpusSplit(train=train, val=val, skipped=skipped)


def _split_by_position(chosen: list[tuple[Path, str]], cfg: DataConfig, skipped: int) -> CorpusSplit:
    """Train = the first 1 - val_fraction of each file, validation = the rest, each part cut at a
    line break when there is one near the cut. The parts are cached as files keyed by the
    sources' contents, so they are written once and stay valid while the sources do."""
    texts = [(p, key, p.read_bytes().decode("utf-8")) for p, key in chosen]
    digest = hashlib.sha256(json.dumps([cfg.val_fraction, *[(k, t) for _, k, t in texts]])
                            .encode("utf-8")).hexdigest()[:20]
    root = Path(cfg.cache_dir) / "splits" / digest
    train, val = root / "train", root / "val"
    if not (root / "done").is_file():
        tmp = Path(tempfile.mkdtemp(dir=_mkdirs(root.parent), prefix=f".{digest}."))
        for sub in ("train", "val"):
            (tmp / sub).mkdir()
        for i, (_, _, text) in enumerate(texts):
            cut = int(len(text) * (1 - cfg.val_fraction))
            nl = text.rfind("\n", 0, cut)
            cut = nl + 1 if nl > 0 and cut - nl < max(1, len(text) // 10) else cut
            if not 0 < cut < len(text):
                raise DataError(f"{chosen[i][0]} is too short to split into train and validation")
            (tmp / "train" / f"{i:05d}.txt").write_text(text[:cut], encoding="utf-8")
            (tmp / "val" / f"{i:05d}.txt").write_text(text[cut:], encoding="utf-8")
        (tmp / "done").write_text("")
        try:
            os.replace(tmp, root)
        except OSError:  # another process made it first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    note = (f"data: {len(chosen)} file is too few to split by file; validation is its last "
            f"{cfg.val_fraction:.0%}")
    log.info(note)
    return CorpusSplit(train=sorted(train.iterdir()), val=sorted(val.iterdir()), skipped=skipped,
                       note=note)


def _mkdirs(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------------------------
# Tokenizing into a memory-mapped cache.


def _token_dtype(tokenizer: Tokenizer) -> np.dtype:
    return np.dtype(np.uint16) if tokenizer.vocab_size <= 65535 else np.dtype(np.uint32)


def _tokens_cache_path(files: list[Path], tokenizer: Tokenizer, cache_dir: str | Path) -> Path:
    entries = []
    for f in files:
        try:
            st = f.stat()
            entries.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
        except OSError:
            entries.append([os.path.abspath(f), -1, -1])  # unreadable: skipped below, still keyed
    dtype = _token_dtype(tokenizer)
    payload = {"v": _TOKENS_CACHE_VERSION, "files": entries, "tok": tokenizer.fingerprint(),
               "eos": tokenizer.eos_id, "dtype": dtype.name}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()[:20]
    return Path(cache_dir) / "tokens" / f"{tokenizer.name}-{key}.{dtype.name}.bin"


def _open_tokens(path: Path, dtype: np.dtype) -> np.ndarray | None:
    size = path.stat().st_size
    if size == 0 or size % dtype.itemsize:
        return None
    return np.memmap(path, dtype=dtype, mode="r")


def tokenize_files(files: list[Path], tokenizer: Tokenizer, cache_dir: str | Path) -> np.ndarray:
    """All files' tokens, each file followed by `tokenizer.eos_id`, as a read-only memmap.

    The result is cached under `cache_dir/tokens`, keyed by the files' paths, sizes and mtimes
    and the tokenizer's fingerprint; a later call with the same inputs maps the cache directly.
    """
    dtype = _token_dtype(tokenizer)
    path = _tokens_cache_path(files, tokenizer, cache_dir)
    if path.is_file():
        cached = _open_tokens(path, dtype)
        if cached is not None:
            return cached
    path.parent.mkdir(parents=True, exist_ok=True)
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    skipped = 0
    total = 0
    # Stream chunks into a temp file and rename at the end: a crash (or a concurrent rank doing
    # the same work) never leaves a truncated file under the final name.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; let other users of a shared cache read it
        with os.fdopen(fd, "wb") as out:
            pending: list[str] = []
            pending_chars = 0

            def flush() -> None:
                nonlocal total, pending_chars
                for ids in tokenizer.encode_arrays(pending):
                    out.write(ids.astype(dtype, copy=False).tobytes())
                    out.write(eos.tobytes())
                    total += len(ids) + 1
                pending.clear()
                pending_chars = 0

            for f in files:
                try:
                    text = f.read_bytes().decode("utf-8")
                except (OSError, UnicodeDecodeError):
                    skipped += 1
                    continue
                pending.append(text)
                pending_chars += len(text)
                if pending_chars >= _ENCODE_CHUNK_CHARS:
                    flush()
            flush()
            out.flush()
            os.fsync(out.fileno())
        if total == 0:
            raise DataError(
                f"no tokens: all {len(files)} file(s) were empty, unreadable or not valid UTF-8"
            )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if skipped:
        log.warning("tokenize: skipped %d file(s) that are not valid UTF-8 or unreadable", skipped)
    result = _open_tokens(path, dtype)
    assert result is not None  # just written with total > 0 tokens
    return result


# ---------------------------------------------------------------------------------------------
# Putting it together.


@dataclass
class DataBundle:
    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray
    split: CorpusSplit


def prepare_data(cfg: DataConfig, tokenizer: Tokenizer | None = None) -> DataBundle:
    """Split, build (or reuse the given) tokenizer from the train split, tokenize both splits."""
    split = split_corpus(cfg)
    tok = tokenizer or make_tokenizer(cfg.tokenizer, split.train, cfg.bpe_vocab_size, cfg.cache_dir)
    train = tokenize_files(split.train, tok, cfg.cache_dir)
    val = tokenize_files(split.val, tok, cfg.cache_dir)
    return DataBundle(tokenizer=tok, train=train, val=val, split=split)


# ---------------------------------------------------------------------------------------------
# Batches.


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    chunk = np.asarray(tokens[idx], dtype=np.int64)
    x = torch.from_numpy(np.ascontiguousarray(chunk[:, :-1]))
    y = torch.from_numpy(np.ascontiguousarray(chunk[:, 1:]))
    return x, y


class BatchSampler:
    """Random training windows, sharded across ranks without communication.

    Call k draws the GLOBAL batch's offsets from `default_rng([seed, k])` and this rank keeps
    rows [rank*b, (rank+1)*b). Every rank draws the same global batch, so the shards are
    disjoint, their union is exactly the single-process batch at any world size, and resuming
    needs only the call counter.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        if seq_len < 1 or batch_size < 1:
            raise ConfigError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"invalid rank {rank} for world_size {world_size}")
        if batch_size % world_size != 0:
            raise ConfigError(
                f"batch_size ({batch_size}) must be divisible by the number of processes ({world_size})"
            )
        if seed < 0:
            raise ConfigError(f"seed must be >= 0, got {seed}")
        if len(tokens) <= seq_len + 1:
            raise DataError(
                f"the token stream has {len(tokens)} tokens, but seq_len={seq_len} needs more "
                f"than {seq_len + 1}: use a shorter seq_len or a larger corpus"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.local_batch = batch_size // world_size
        self.calls = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.calls])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        self.calls += 1
        lo = self.rank * self.local_batch
        return _windows(self.tokens, starts[lo:lo + self.local_batch], self.seq_len)

    def state_dict(self) -> dict[str, int]:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, int]) -> None:
        calls = state.get("calls")
        if not isinstance(calls, int) or isinstance(calls, bool) or calls < 0:
            raise ConfigError(f"invalid sampler state {state!r}: expected {{'calls': int >= 0}}")
        self.calls = calls


def val_batches(tokens: np.ndarray, seq_len: int, batch_size: int,
                n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Evenly spaced, non-overlapping windows over the validation stream; no randomness.

    Windows are seq_len+1 tokens (inputs plus the last label) and never share a token. With
    fewer windows than `n_batches * batch_size`, only full batches are returned so every batch
    weighs the same in an average; if not even one full batch fits, one smaller batch is.
    """
    if seq_len < 1 or batch_size < 1 or n_batches < 1:
        raise ConfigError(
            f"seq_len, batch_size and n_batches must be >= 1, got {seq_len}, {batch_size}, {n_batches}"
        )
    span = seq_len + 1
    n = len(tokens)
    available = n // span
    if available == 0:
        raise DataError(
            f"the validation split has {n} tokens, fewer than one window of seq_len+1={span}: "
            "use a shorter seq_len, a larger data.val_fraction or a larger corpus"
        )
    wanted = n_batches * batch_size
    if available >= wanted:
        count = wanted
    elif available >= batch_size:
        count = (available // batch_size) * batch_size
    else:
        count = available
    # Spread over the whole stream (not just its start) so every validation file is represented.
    # Consecutive starts differ by >= floor((n - span) / (count - 1)) >= span: no overlap.
    starts = (np.arange(count, dtype=np.int64) * (n - span)) // max(count - 1, 1)
    rows = min(batch_size, count)
    return [_windows(tokens, starts[i:i + rows], seq_len) for i in range(0, count, rows)]


def prompts_from(tokens: np.ndarray | torch.Tensor, n: int, length: int,
                 margin: int = 0) -> list[list[int]]:
    """n prompts of `length` tokens, evenly spaced through `tokens` (e.g. the validation split),
    the first starting at `margin` and the last `margin` before the last possible start."""
    arr = np.asarray(tokens.cpu() if isinstance(tokens, torch.Tensor) else tokens).reshape(-1)
    if arr.size < length + 1:
        raise DataError(f"not enough held-out tokens ({arr.size}) for prompts of {length}")
    starts = np.linspace(margin, arr.size - length - 1 - margin, num=n).astype(np.int64)
    return [arr[s:s + length].astype(np.int64).tolist() for s in starts]
