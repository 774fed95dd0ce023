"""The training program end to end: runs, resumes exactly after kill -9, refuses bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_corpus import make_corpus, tiny_overrides
from multitoken.checkpoint import load_checkpoint
from multitoken.cli import main


def train_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "multitoken", *args], capture_output=True,
                          text=True, env=e, timeout=300)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def test_train_writes_run_dir_and_resumes_after_kill(tmp_path, corpus):
    base = tiny_overrides(corpus, tmp_path / "cache", steps=8)
    # uninterrupted reference run
    assert main(["train", "--out", str(tmp_path / "a"), "--no-progress", "--no-sample", *base]) == 0
    a = tmp_path / "a"
    for f in ("checkpoint/model.safetensors", "checkpoint/config.json", "checkpoint/tokenizer",
              "metrics.jsonl", "loss.png", "config.yaml"):
        assert (a / f).exists(), f
    model, tok = load_checkpoint(a)
    assert model.cfg.n_future == 2 and tok.vocab_size == model.cfg.vocab_size
    # same run, killed with SIGKILL right after step 5 (last checkpoint: step 4), then resumed
    b = tmp_path / "b"
    r = cli(["train", "--out", str(b), "--no-progress", "--no-sample", *base],
            env={"MULTITOKEN_TEST_KILL_AT_STEP": "5"})
    assert r.returncode == -9, r.stderr[-2000:]
    assert max(train_losses(b)) == 5
    r = cli(["train", "--out", str(b), "--resume", "--no-progress", "--no-sample", *base])
    assert r.returncode == 0, r.stderr[-2000:]
    la, lb = train_losses(a), train_losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, 9))
    assert la == lb  # bit-identical loss curve on CPU, one process


def test_existing_run_is_not_overwritten(tmp_path, corpus, capsys):
    base = tiny_overrides(corpus, tmp_path / "cache", steps=2)
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--no-progress", "--no-sample", *base]) == 0
    before = (out / "checkpoint" / "model.safetensors").read_bytes()
    assert main(["train", "--out", str(out), "--no-progress", "--no-sample", *base]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "checkpoint" / "model.safetensors").read_bytes() == before
    # resuming with a different model shape is refused, and the checkpoint is untouched
    assert main(["train", "--out", str(out), "--resume", "--no-progress", "--no-sample", *base,
                 "--model.dim=64"]) == 2
    assert "model config differs" in capsys.readouterr().err
    assert (out / "checkpoint" / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("extra, msg", [
    (["--data.paths=['/nonexistent/corpus']"], "no such file"),
    (["--model.n_future=0"], "n_future must be >= 1"),
    (["--model.dim=33"], "divisible"),
    (["--model.widht=3"], "widht"),
    (["--bogus"], "unrecognised argument"),
])
def test_bad_input_one_line_error(tmp_path, corpus, capsys, extra, msg):
    base = tiny_overrides(corpus, tmp_path / "cache", steps=2)
    code = main(["train", "--out", str(tmp_path / "r"), "--no-progress", "--no-sample", *base,
                 *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert msg in err and err.startswith("error:") and len(err.splitlines()) == 1
    assert not (tmp_path / "r" / "checkpoint").exists()


def test_empty_corpus_dir(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(["train", "--out", str(tmp_path / "r"), "--no-progress",
                 f"--data.paths=['{tmp_path / 'empty'}']"])
    assert code == 2 and "error:" in capsys.readouterr().err


def test_cli_error_has_no_traceback(tmp_path):
    r = cli(["train", "--model.n_future=0"])
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.strip().startswith("error:")


def test_without_out_a_new_run_dir_under_runs(tmp_path, corpus, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = tiny_overrides(corpus, tmp_path / "cache", steps=2)
    assert main(["train", "--no-progress", "--no-sample", *base]) == 0
    assert main(["train", "--no-progress", "--no-sample", *base]) == 0  # never reuses a run dir
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all((r / "checkpoint" / "config.json").is_file() for r in runs)
