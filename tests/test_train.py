"""The training program end to end: runs, resumes exactly after kill -9, refuses bad input."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers_corpus import make_corpus, tiny_overrides
from multitoken.checkpoint import load_checkpoint
from multitoken.cli import main
from multitoken.config import load_run_config
from multitoken.parallel import SingleProcess
from multitoken.train import train


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


@pytest.mark.parametrize("head_type", ["transformer", "token_conditioned"])
def test_train_writes_run_dir_and_resumes_after_kill(tmp_path, corpus, head_type):
    base = [*tiny_overrides(corpus, tmp_path / "cache", steps=8), f"--model.head_type={head_type}"]
    # uninterrupted reference run
    assert main(["train", "--out", str(tmp_path / "a"), "--no-progress", "--no-sample", *base]) == 0
    a = tmp_path / "a"
    for f in ("checkpoint/model.safetensors", "checkpoint/config.json", "checkpoint/tokenizer",
              "metrics.jsonl", "loss.png", "config.yaml"):
        assert (a / f).exists(), f
    model, tok = load_checkpoint(a)
    assert model.cfg.n_future == 2 and tok.vocab_size == model.cfg.vocab_size
    assert model.cfg.head_type == head_type
    # same run, killed with SIGKILL right after step 5 (last checkpoint: step 4), then resumed
    b = tmp_path / "b"
    r = cli(["train", "--out", str(b), "--no-progress", "--no-sample", *base],
            env={"MULTITOKEN_TEST_SIGNAL": "5:SIGKILL"})
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
    assert "--resume: model.dim=64 differs" in capsys.readouterr().err
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


def test_resume_continues_the_run_as_configured(tmp_path, corpus, capsys):
    """--resume reads the run's saved config: a recipe or flag may extend the schedule, but
    one that changes the model, data or tokenizer is an error naming the field."""
    base = tiny_overrides(corpus, tmp_path / "cache", steps=4)
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--no-progress", "--no-sample", *base]) == 0
    before = (out / "checkpoint" / "model.safetensors").read_bytes()
    capsys.readouterr()
    other = make_corpus(tmp_path / "other", n_files=4, seed=1)
    for extra, field in [([f"--data.paths=['{other}']"], "data.paths"),
                         (["--data.tokenizer=bpe"], "data.tokenizer"),
                         (["--config", "configs/demo.yaml"], "model."),
                         (["--train.seq_len=16"], "train.seq_len")]:
        assert main(["train", "--out", str(out), "--resume", "--no-progress", "--no-sample",
                     *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: --resume: {field}") and len(err.splitlines()) == 1, err
        assert (out / "checkpoint" / "model.safetensors").read_bytes() == before
    # no data flags at all: the run's own corpus, cache and shape; more steps allowed
    assert main(["train", "--out", str(out), "--resume", "--no-progress", "--no-sample",
                 "--train.steps=6"]) == 0
    printed = capsys.readouterr().out
    assert "resume: train.steps: 4 -> 6" in printed
    assert sorted(train_losses(out)) == list(range(1, 7))
    assert f"'{corpus}'" in (out / "config.yaml").read_text() or str(corpus) in \
        (out / "config.yaml").read_text()
    # fewer steps than done: nothing to train, and it says so
    assert main(["train", "--out", str(out), "--resume", "--no-progress", "--no-sample",
                 "--train.steps=2"]) == 0
    assert "already at step 6" in capsys.readouterr().out


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_interrupt_saves_a_checkpoint_and_resume_continues(tmp_path, corpus, sig, code):
    """Ctrl-C (or SIGTERM) before the first scheduled checkpoint saves one at the step it
    stopped, exits 130/143 naming it, and --resume continues the same loss curve."""
    base = [*tiny_overrides(corpus, tmp_path / "cache", steps=6), "--train.ckpt_every=100"]
    ref = tmp_path / "ref"
    assert main(["train", "--out", str(ref), "--no-progress", "--no-sample", *base]) == 0
    run = tmp_path / "run"
    r = cli(["train", "--out", str(run), "--no-sample", *base],
            env={"MULTITOKEN_TEST_SIGNAL": f"3:{sig}"})
    assert r.returncode == code, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"interrupted by {sig}: saved a checkpoint at step 3"), last
    assert json.loads((run / "checkpoint" / "config.json").read_text())["step"] == 3
    r = cli(["train", "--out", str(run), "--resume", "--no-progress", "--no-sample"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert train_losses(run) == train_losses(ref)


def test_a_folder_without_checkpoint_starts_again(tmp_path, corpus, capsys):
    base = [*tiny_overrides(corpus, tmp_path / "cache", steps=3), "--train.ckpt_every=100"]
    run = tmp_path / "run"
    r = cli(["train", "--out", str(run), "--no-progress", "--no-sample", *base],
            env={"MULTITOKEN_TEST_SIGNAL": "2:SIGKILL"})  # dies before any checkpoint
    assert r.returncode == -9 and (run / "metrics.jsonl").is_file()
    assert main(["train", "--out", str(run), "--resume", "--no-progress", "--no-sample"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--no-progress", "--no-sample", *base]) == 0
    assert sorted(train_losses(run)) == [1, 2, 3]  # a fresh run, not appended to the old one


def test_failed_commands_leave_no_new_folder(tmp_path, corpus, capsys):
    base = tiny_overrides(corpus, tmp_path / "cache", steps=2)
    (tmp_path / "empty").mkdir()
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / "x.bin").write_bytes(b"\xff\xfe\x00\xc3" * 50)
    cases = [["--resume"],
             [f"--data.paths=['{tmp_path / 'empty'}']"],
             [f"--data.paths=['{tmp_path / 'binary'}']"]]
    for i, extra in enumerate(cases):
        out = tmp_path / f"nope{i}"
        assert main(["train", "--out", str(out), "--no-progress", "--no-sample", *base,
                     *extra]) == 2
        assert capsys.readouterr().err.startswith("error:")
        assert not out.exists(), extra


def test_non_finite_loss_is_caught_at_the_next_log_or_checkpoint(tmp_path, corpus, monkeypatch):
    """Statistics reach the host only to log (every 4 steps here) and before a checkpoint
    (every 3): a loss that turns NaN at step 5 stops the run at step 6, before its checkpoint,
    with a message naming the steps since the last check; the step-3 checkpoint is kept."""
    micro_steps = itertools.count(1)
    forward_backward = SingleProcess.forward_backward

    def nan_from_step_5(self, *args, **kwargs):
        out = forward_backward(self, *args, **kwargs)
        if next(micro_steps) >= 5:
            out.loss_sum[1] = float("nan")
        return out

    monkeypatch.setattr(SingleProcess, "forward_backward", nan_from_step_5)
    base = [*tiny_overrides(corpus, tmp_path / "cache", steps=8), "--train.log_every=4",
            "--train.ckpt_every=3", "--train.eval_every=100"]
    cfg = load_run_config(None, [o[2:] for o in base])
    threads = torch.get_num_threads()
    try:
        with pytest.raises(RuntimeError, match=r"loss became nan at a step in 5\.\.6;"):
            train(cfg, tmp_path / "run", progress=False)
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text())["step"] == 3
    assert sorted(train_losses(tmp_path / "run")) == [1, 4]
