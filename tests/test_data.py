"""Corpus discovery, the by-file split, the token cache, and batch sampling."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from multitoken.config import DataConfig
from multitoken.data import (
    BatchSampler,
    CorpusSplit,
    prepare_data,
    resolve_files,
    split_corpus,
    stdlib_files,
    tokenize_files,
    val_batches,
)
from multitoken.errors import ConfigError, DataError
from multitoken.tokenizer import ByteTokenizer


def make_corpus(root: Path, n: int = 20) -> list[Path]:
    files = []
    for i in range(n):
        f = root / f"pkg{i % 3}" / f"file{i:02d}.txt"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(f"document {i}: " + "naïve text " * (i + 1), encoding="utf-8")
        files.append(f)
    return files


def cfg_for(root: Path, **kw: object) -> DataConfig:
    return DataConfig(paths=[str(root)], cache_dir=str(root.parent / "cache"), **kw)  # type: ignore[arg-type]


# --- files -----------------------------------------------------------------------------------


def test_stdlib_files() -> None:
    files = stdlib_files()
    assert len(files) > 100
    assert files == sorted(files) == stdlib_files()  # sorted, deterministic
    assert all(f.suffix == ".py" for f in files)
    bad = {"test", "tests", "idle_test", "site-packages"}
    assert not any(bad.intersection(f.parts) for f in files)


def test_resolve_files(tmp_path: Path) -> None:
    files = make_corpus(tmp_path / "c", 5)
    (tmp_path / "c" / ".git").mkdir()
    (tmp_path / "c" / ".git" / "HEAD").write_text("ref")
    got = resolve_files([str(tmp_path / "c")])
    assert sorted(got) == sorted(files)
    assert resolve_files([str(tmp_path / "c")]) == got
    assert resolve_files([str(files[0])]) == [files[0]]
    glob_hits = resolve_files([str(tmp_path / "c" / "pkg0" / "*.txt")])
    assert glob_hits and all(f.parent.name == "pkg0" for f in glob_hits)
    # Overlapping inputs count a file once.
    assert len(resolve_files([str(files[0]), str(tmp_path / "c")])) == 5


def test_resolve_files_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or directory: .*missing"):
        resolve_files([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no files found"):
        resolve_files([str(tmp_path / "empty")])
    with pytest.raises(DataError, match="no files match"):
        resolve_files([str(tmp_path / "*.nothing")])


# --- split -----------------------------------------------------------------------------------


def test_split_deterministic_disjoint(tmp_path: Path) -> None:
    make_corpus(tmp_path / "c", 20)
    cfg = cfg_for(tmp_path / "c", val_fraction=0.2, seed=3)
    a, b = split_corpus(cfg), split_corpus(cfg)
    assert a == b
    assert a.val and a.train and a.skipped == 0
    assert not set(a.train) & set(a.val)
    assert len(a.train) + len(a.val) == 20
    # A different seed gives a different split (with overwhelming probability for 20 files).
    other = split_corpus(cfg_for(tmp_path / "c", val_fraction=0.2, seed=4))
    assert other.val != a.val


def test_split_stable_when_files_added(tmp_path: Path) -> None:
    make_corpus(tmp_path / "c", 20)
    before = split_corpus(cfg_for(tmp_path / "c", val_fraction=0.3))
    (tmp_path / "c" / "new.txt").write_text("a new document")
    after = split_corpus(cfg_for(tmp_path / "c", val_fraction=0.3))
    assert set(before.val) <= set(after.val)
    assert set(before.train) <= set(after.train)


def test_split_skips_non_utf8(tmp_path: Path) -> None:
    make_corpus(tmp_path / "c", 6)
    bad = tmp_path / "c" / "binary.bin"
    bad.write_bytes(b"\xff\xfe\x00garbage\xc3")
    split = split_corpus(cfg_for(tmp_path / "c"))
    assert split.skipped == 1
    assert bad not in split.train + split.val
    assert len(split.train) + len(split.val) == 6


def test_split_max_files_and_small_corpora(tmp_path: Path) -> None:
    make_corpus(tmp_path / "c", 20)
    small = split_corpus(cfg_for(tmp_path / "c", max_files=4, val_fraction=0.25))
    assert len(small.train) + len(small.val) == 4 and small.val and small.train
    assert not small.note
    make_corpus(tmp_path / "two", 2)
    two = split_corpus(cfg_for(tmp_path / "two", val_fraction=0.5))
    assert len(two.train) == 1 and len(two.val) == 1
    with pytest.raises(DataError, match="no such file"):
        split_corpus(cfg_for(tmp_path / "nowhere"))


def test_one_file_is_split_by_position(tmp_path: Path) -> None:
    """nanoGPT's single input.txt is a normal corpus: one file, too few to split by file, is
    split by position, its last val_fraction being validation, and the split says so."""
    n_files = 1
    lines = [f"line {i}: naïve text {'x' * (i % 37)}\n" for i in range(400)]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "input.txt").write_text("".join(lines), encoding="utf-8")
    cfg = cfg_for(tmp_path / "c", val_fraction=0.1)
    split = split_corpus(cfg)
    assert "too few to split by file" in split.note and "its last 10%" in split.note
    sources = sorted((tmp_path / "c").iterdir())
    assert len(split.train) == len(split.val) == n_files
    for src, tr, va in zip(sources, split.train, split.val):
        text, a, b = (f.read_text(encoding="utf-8") for f in (src, tr, va))
        assert a + b == text and a.endswith("\n")  # nothing lost or repeated, cut at a line
        assert 0.05 < len(b) / len(text) < 0.15
    again = split_corpus(cfg)  # cached: the same files, not rewritten
    assert again.train == split.train and [p.stat().st_mtime_ns for p in again.val] == \
        [p.stat().st_mtime_ns for p in split.val]
    bundle = prepare_data(cfg)
    assert len(bundle.val) > 0 and len(bundle.train) > 5 * len(bundle.val)


def test_split_stdlib_subset(tmp_path: Path) -> None:
    split = split_corpus(DataConfig(max_files=12, cache_dir=str(tmp_path)))
    assert len(split.train) + len(split.val) == 12
    assert all(f.suffix == ".py" for f in split.train + split.val)


# --- tokenize --------------------------------------------------------------------------------


def test_tokenize_files_eos_and_cache(tmp_path: Path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("hé")
    b.write_text("yo")
    tok = ByteTokenizer()
    cache = tmp_path / "cache"
    arr = tokenize_files([a, b], tok, cache)
    expected = list("hé".encode()) + [tok.eos_id] + list(b"yo") + [tok.eos_id]
    assert arr.dtype == np.uint16 and arr.tolist() == expected
    assert isinstance(arr, np.memmap) and not arr.flags.writeable
    (cached,) = (cache / "tokens").glob("*.bin")
    mtime = cached.stat().st_mtime_ns
    again = tokenize_files([a, b], tok, cache)
    assert np.array_equal(again, arr)
    assert cached.stat().st_mtime_ns == mtime
    assert not list((cache / "tokens").glob(".*"))  # no temp files left behind
    # Changed content -> new key -> new cache entry with the new tokens.
    b.write_text("changed!")
    changed = tokenize_files([a, b], tok, cache)
    assert changed.tolist()[-9:] == list(b"changed!") + [tok.eos_id]
    assert len(list((cache / "tokens").glob("*.bin"))) == 2


def test_tokenize_files_skips_and_empty(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("ok")
    bad.write_bytes(b"\xff\xff")
    tok = ByteTokenizer()
    assert tokenize_files([bad, good], tok, tmp_path / "c").tolist() == [111, 107, tok.eos_id]
    with pytest.raises(DataError, match="no tokens"):
        tokenize_files([bad], tok, tmp_path / "c")
    assert not list((tmp_path / "c" / "tokens").glob(".*"))


def test_prepare_data(tmp_path: Path) -> None:
    make_corpus(tmp_path / "c", 10)
    bundle = prepare_data(cfg_for(tmp_path / "c"))
    assert isinstance(bundle.split, CorpusSplit)
    assert isinstance(bundle.tokenizer, ByteTokenizer)
    eos = bundle.tokenizer.eos_id
    assert int((bundle.train == eos).sum()) == len(bundle.split.train)
    assert int((bundle.val == eos).sum()) == len(bundle.split.val)


# --- batches ---------------------------------------------------------------------------------


@pytest.fixture
def tokens() -> np.ndarray:
    return np.arange(1000, dtype=np.uint16)


def test_sampler_shift_and_determinism(tokens: np.ndarray) -> None:
    s1 = BatchSampler(tokens, seq_len=16, batch_size=4, seed=7)
    s2 = BatchSampler(tokens, seq_len=16, batch_size=4, seed=7)
    x, y = s1.next()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y, x + 1)  # tokens are arange: the label is the next token
    x2, _ = s2.next()
    assert torch.equal(x, x2)
    assert not torch.equal(s1.next()[0], x)  # successive calls differ


def test_sampler_resume(tokens: np.ndarray) -> None:
    ref = BatchSampler(tokens, 8, 3, seed=1)
    batches = [ref.next()[0] for _ in range(5)]
    s = BatchSampler(tokens, 8, 3, seed=1)
    s.next()
    s.next()
    state = s.state_dict()
    assert state == {"calls": 2}
    resumed = BatchSampler(tokens, 8, 3, seed=1)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.next()[0], b) for b in batches[2:])
    with pytest.raises(ConfigError):
        resumed.load_state_dict({"calls": -1})


def test_sampler_rank_shards(tokens: np.ndarray) -> None:
    full = BatchSampler(tokens, 8, 4, seed=5)
    ranks = [BatchSampler(tokens, 8, 4, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        fx, fy = full.next()
        parts = [s.next() for s in ranks]
        assert all(p[0].shape == (2, 8) for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), fx)
        assert torch.equal(torch.cat([p[1] for p in parts]), fy)


def test_sampler_errors(tokens: np.ndarray) -> None:
    with pytest.raises(ConfigError, match="divisible"):
        BatchSampler(tokens, 8, 3, seed=0, rank=0, world_size=2)
    with pytest.raises(DataError, match="10 tokens"):
        BatchSampler(tokens[:10], seq_len=9, batch_size=1, seed=0)
    BatchSampler(tokens[:11], seq_len=9, batch_size=1, seed=0).next()  # the smallest that fits


def test_val_batches(tokens: np.ndarray) -> None:
    a = val_batches(tokens, seq_len=15, batch_size=4, n_batches=3)
    b = val_batches(tokens, seq_len=15, batch_size=4, n_batches=3)
    assert len(a) == 3
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    starts = sorted(int(x[i, 0]) for x, _ in a for i in range(x.shape[0]))
    assert all(s2 - s1 >= 16 for s1, s2 in zip(starts, starts[1:]))  # windows of 16 never overlap
    assert starts[-1] + 16 == len(tokens)  # spread to the end of the split
    assert all(torch.equal(y, x + 1) for x, y in a)


def test_val_batches_small(tokens: np.ndarray) -> None:
    # 100 tokens hold 6 windows of 16: one full batch of 4, the remainder dropped.
    few = val_batches(tokens[:100], seq_len=15, batch_size=4, n_batches=10)
    assert [x.shape[0] for x, _ in few] == [4]
    tiny = val_batches(tokens[:40], seq_len=15, batch_size=4, n_batches=10)
    assert [x.shape[0] for x, _ in tiny] == [2]
    with pytest.raises(DataError, match="fewer than one window"):
        val_batches(tokens[:15], seq_len=15, batch_size=4, n_batches=1)


def test_prepare_data_cache_reuse_is_fast(tmp_path: Path) -> None:
    make_corpus(tmp_path / "c", 8)
    cfg = cfg_for(tmp_path / "c")
    first = prepare_data(cfg)
    files = sorted((tmp_path / "cache" / "tokens").glob("*.bin"))
    mtimes = [os.stat(f).st_mtime_ns for f in files]
    second = prepare_data(cfg)
    assert np.array_equal(first.train, second.train)
    assert [os.stat(f).st_mtime_ns for f in files] == mtimes
