"""CLI surface: help, eval on a trained checkpoint, unknown commands."""

from __future__ import annotations

import json

import pytest

from helpers_corpus import make_corpus, tiny_overrides
from multitoken.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    corpus = make_corpus(root / "corpus")
    out = root / "run"
    assert main(["train", "--out", str(out), "--no-progress", "--no-sample",
                 *tiny_overrides(corpus, root / "cache", steps=4)]) == 0
    return out


def test_help(capsys):
    assert main(["--help"]) == 0
    assert "train" in capsys.readouterr().out
    assert main(["bench", "--help"]) == 0


def test_unknown_command_and_bench(capsys):
    assert main(["fly"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert main(["bench", "nope"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err


def test_eval_per_head(run_dir, capsys):
    assert main(["eval", "--checkpoint", str(run_dir), "--batches", "2", "--batch-size", "2"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    res = json.loads(last)
    assert len(res["head_loss"]) == 2 and all(0 <= a <= 1 for a in res["head_acc"])


def test_eval_on_given_files(run_dir, tmp_path, capsys):
    f = tmp_path / "x.py"
    f.write_text("def f(x):\n    return x + 1\n" * 40)
    assert main(["eval", "--checkpoint", str(run_dir), "--files", str(f), "--batches", "1",
                 "--batch-size", "1", "--seq-len", "32"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["head_acc"]


def test_eval_bad_checkpoint(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "none")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
