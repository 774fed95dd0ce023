"""Checkpoints: round trip, atomic replacement, clear errors for corrupt or mismatched files."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import pytest
import torch

from conftest import tiny_model
from multitoken.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from multitoken.errors import CheckpointError
from multitoken.tokenizer import ByteTokenizer


def saved(tmp_path, **kw):
    m = tiny_model(vocab_size=260, **kw)
    save_checkpoint(tmp_path / "ck", m, ByteTokenizer(), step=3)
    return m, tmp_path / "ck"


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip(tmp_path, tie):
    m, ck = saved(tmp_path, tie_embeddings=tie)
    m2, tok = load_checkpoint(ck)
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    assert tok.vocab_size == 260
    if tie:
        assert m2.output.weight.data_ptr() == m2.tok_embeddings.weight.data_ptr()


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    m, ck = saved(tmp_path)
    before = (ck / "model.safetensors").read_bytes()
    import multitoken.checkpoint as C

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(C, "save_file", boom)
    with pytest.raises(OSError):
        save_checkpoint(ck, m, ByteTokenizer(), step=4)
    assert (ck / "model.safetensors").read_bytes() == before
    load_checkpoint(ck)


def test_interrupted_rename_is_recovered(tmp_path):
    _, ck = saved(tmp_path)
    shutil.move(ck, ck.with_name("ck.old"))  # crash between the two renames
    assert find_checkpoint(ck).name == "ck.old"
    load_checkpoint(ck)


def test_truncated_weights(tmp_path):
    _, ck = saved(tmp_path)
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(ck)


def test_config_weights_mismatch(tmp_path):
    _, ck = saved(tmp_path)
    meta = json.loads((ck / "config.json").read_text())
    meta["model"]["dim"] = 64
    (ck / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not match the config"):
        load_checkpoint(ck)


def test_tokenizer_mismatch(tmp_path):
    _, ck = saved(tmp_path)
    meta = json.loads((ck / "config.json").read_text())
    meta["model"]["vocab_size"] = 300
    (ck / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="tokenizer has 260 tokens"):
        load_checkpoint(ck)


def test_missing_and_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path / "empty")


def test_any_number_of_crashes_never_loses_every_checkpoint(tmp_path, monkeypatch):
    """Inject a crash at each point of the save protocol, many times in a row: after every
    crash a complete checkpoint loads, and it is the last committed one or the one being
    written, never an older one."""
    import random

    import multitoken.checkpoint as C

    class Crash(Exception):
        pass

    m = tiny_model(vocab_size=260)
    ck = tmp_path / "ck"

    def save(step: int) -> None:
        with torch.no_grad():
            m.tok_embeddings.weight.fill_(float(step))
        save_checkpoint(ck, m, ByteTokenizer(), step=step)

    def loaded_step() -> int:
        m2, _ = load_checkpoint(ck)
        step = json.loads((find_checkpoint(ck) / "config.json").read_text())["step"]
        assert torch.all(m2.tok_embeddings.weight == float(step))
        return step

    # every crash point the protocol reports, found by one clean save
    points: list[str] = []
    monkeypatch.setattr(C, "_crash_point", points.append)
    save(0)
    save(1)
    assert {"tmp-complete", "final-moved", "committed", "renamed-to-trash"} <= set(points)
    committed, rng = 1, random.Random(0)
    for step in range(2, 160):
        k = rng.randrange(len(points) + 1)  # crash at the k-th crash point (or not at all)
        calls = iter(range(10**6))

        def point(name: str, k: int = k, calls: Iterator[int] = calls) -> None:
            if next(calls) == k:
                raise Crash(name)

        monkeypatch.setattr(C, "_crash_point", point)
        try:
            save(step)
            committed = step
        except Crash:
            pass
        monkeypatch.setattr(C, "_crash_point", lambda name: None)
        got = loaded_step()
        assert got in (committed, step)
        committed = got
    save(999)
    assert loaded_step() == 999
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
