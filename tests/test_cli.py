"""CLI surface: help, version, eval on a trained checkpoint, and the bad-input contract.

The contract: every subcommand turns bad input -- a malformed value of any of its options --
into exactly one `error: ...` line on stderr and exit status 2, never a traceback. The table
below runs each subcommand in-process with a bad value of each option; every case must fail
before any real work starts (the other options are tiny anyway, so a missed check stays cheap).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers_corpus import make_corpus, tiny_overrides
from helpers_decode import make_checkpoint
from multitoken import cli, cliargs
from multitoken.bench import decode as bench_decode
from multitoken.bench import train_memory, train_speed
from multitoken.cli import eval_parser, main
from multitoken.commands.calibrate import build_parser as calibrate_parser
from multitoken.commands.generate import build_parser as generate_parser
from multitoken.distill import build_parser as distill_parser


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


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == "multitoken 0.1.0\n"


def test_help_and_version_do_not_import_torch():
    code = ("import sys, io, contextlib\n"
            "import multitoken.cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    multitoken.cli.main(['--help']); multitoken.cli.main(['--version'])\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


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


PARSERS = {
    "eval": eval_parser,
    "generate": generate_parser,
    "calibrate": calibrate_parser,
    "distill": distill_parser,
    "bench decode": bench_decode.build_parser,
    "bench train-memory": train_memory.build_parser,
    "bench train-speed": train_speed.build_parser,
}


@pytest.mark.parametrize("name", list(PARSERS))
def test_every_option_has_help_and_errors_are_config_errors(name):
    parser = PARSERS[name]()
    assert isinstance(parser, cliargs.ArgumentParser)
    for action in parser._actions:
        assert action.help, f"{name} {action.option_strings} has no help text"


# ---------------------------------------------------------------------------------------------
# Bad input: one `error:` line, exit 2, for a bad value of every option of every subcommand.

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")

# Placeholders: {ck} a valid checkpoint, {missing} a path that does not exist, {file} a plain
# file, {full} a non-empty directory, {badyaml} a file that is not valid YAML, {tmp} a fresh
# directory for outputs.
GEN = ["generate", "--checkpoint", "{ck}", "--prompt", "x", "--max-new-tokens", "2"]
CAL = ["calibrate", "--checkpoint", "{ck}", "--prompts", "1", "--prompt-len", "8",
       "--gen-len", "8", "--max-nodes", "2", "--reps", "1"]
DIS = ["distill", "--checkpoint", "{ck}", "--out", "{tmp}/distilled", "--sequences", "2",
       "--prompt-len", "8", "--new-tokens", "8", "--steps", "1", "--eval-sequences", "1",
       "--batch-size", "1", "--no-progress"]
EVAL = ["eval", "--checkpoint", "{ck}", "--seq-len", "16", "--batches", "1", "--batch-size", "1"]
DEC = ["bench", "decode", "--checkpoint", "{ck}", "--prompts", "1", "--prompt-len", "8",
       "--new-tokens", "4", "--reps", "1", "--no-tree"]
MEM = ["bench", "train-memory", "--vocab", "64", "--dim", "32", "--n-heads", "4", "--layers",
       "4", "--tokens", "64", "--seq-len", "32", "--grad-tokens", "64", "--threads", "1",
       "--variants", "ntp"]
SPEED = ["bench", "train-speed", "--vocab", "64", "--dim", "32", "--n-heads", "4", "--layers",
         "4", "--seq-len", "16", "--batch", "1", "--warmup", "0", "--steps", "1", "--threads",
         "1"]
TRAIN = ["train", "--out", "{tmp}/run", "--no-progress", "--no-sample", "--data.paths={corpus}",
         "--data.cache_dir={tmp}/cache", "--model.dim=32", "--model.n_layers=3",
         "--model.n_heads=2", "--model.n_future=2", "--model.max_seq_len=32",
         "--train.seq_len=32", "--train.steps=1", "--train.batch_size=1"]

BAD_DEVICES = [["--device", "bogus"], ["--device", "cuda:99"],
               pytest.param(["--device", "cuda"], marks=NO_CUDA)]


def _cases(base: list[str], bads: list) -> list:
    """(base argv, bad options) pairs; a bad entry may be a pytest.param carrying marks."""
    out = []
    for bad in bads:
        marks = ()
        if hasattr(bad, "marks"):
            bad, marks = bad.values[0], bad.marks
        command = [w for w in base[:2] if not w.startswith("-")]
        out.append(pytest.param(base, bad, marks=marks, id=" ".join([*command, *bad])))
    return out


CASES = [
    *_cases(TRAIN, [
        ["--config", "{missing}"], ["--config", "{badyaml}"], ["--data.paths=[oops"],
        ["--model.dim=abc"], ["--train.steps=-1"], ["--model.head_type=mlp"],
        ["--model.n_future", "0"], ["--train.device=bogus"], ["--bogus"], ["--model.dim"],
        ["--config"],
    ]),
    *_cases(["train", "--no-progress"], [["--resume"]]),
    *_cases(EVAL, [
        ["--checkpoint", "{missing}"], ["--checkpoint", "{file}"], ["--files", "{missing}"],
        ["--seq-len", "abc"], ["--seq-len", "0"], ["--seq-len", "100000"],
        ["--batch-size", "-1"], ["--batches", "0"], ["--bogus"], *BAD_DEVICES,
    ]),
    *_cases(GEN, [
        ["--checkpoint", "{missing}"], ["--prompt-file", "{file}"],  # together with --prompt
        ["--max-new-tokens", "abc"], ["--max-new-tokens", "-1"],
        ["--temperature", "abc"], ["--temperature", "-1"], ["--temperature", "nan"],
        ["--top-k", "0"], ["--top-p", "0"], ["--top-p", "2"], ["--speculative", "bogus"],
        ["--num-drafts", "0"], ["--num-drafts", "9"], ["--seed", "abc"],
        ["--threads", "-1"], ["--threads", "0"], ["--threads", "abc"], ["--no-stop=1"],
        *BAD_DEVICES,
    ]),
    *_cases(["generate", "--checkpoint", "{ck}", "--max-new-tokens", "2"], [
        ["--prompt-file", "{missing}"], ["--prompt-file", "{binary}"],
    ]),
    *_cases(CAL, [
        ["--checkpoint", "{missing}"], ["--prompts", "0"], ["--prompt-len", "-1"],
        ["--gen-len", "0"], ["--max-rank", "0"], ["--max-nodes", "abc"],
        ["--batch-sizes", "x"], ["--batch-sizes", "0"], ["--batch-sizes", "1,"],
        ["--reps", "0"], ["--threads", "-1"], *BAD_DEVICES,
    ]),
    *_cases(DIS, [
        ["--checkpoint", "{missing}"], ["--out", "{file}"], ["--out", "{full}"],
        ["--out", "{ck}"], ["--config", "{missing}"], ["--config", "{badyaml}"],
        ["--no-progress=1"], ["--sequences", "0"], ["--prompt-len", "abc"],
        ["--prompt-len", "100000"], ["--new-tokens", "-1"], ["--gen-batch", "0"],
        ["--eval-sequences", "0"], ["--steps", "0"], ["--batch-size", "0"], ["--lr", "0"],
        ["--lr", "abc"], ["--lr", "nan"], ["--min-lr-ratio", "2"], ["--warmup-steps", "-1"],
        ["--weight-decay", "-1"], ["--grad-clip", "0"], ["--target", "bogus"],
        ["--seed", "abc"], ["--threads", "0"], ["--temperature", "-1"],
        ["--temperature", "nan"], ["--temperature", "inf"], ["--temperature", "abc"],
        ["--temperature", "0.8", "--top-p", "0"], ["--temperature", "0.8", "--top-p", "1.5"],
        ["--temperature", "0.8", "--top-k", "0"], ["--temperature", "0.8", "--top-k", "x"],
        ["--top-p", "0.9"], ["--top-k", "5"], *BAD_DEVICES,
    ]),
    *_cases(["convert"], [
        ["--meta", "{missing}", "--tokenizer", "{missing}", "--out", "{tmp}/o"],
        ["--hf", "{missing}", "--out", "{tmp}/o"],
        ["--hf", "{file}", "--out", "{tmp}/o"],
        ["--checkpoint", "{missing}", "--to-hf", "{tmp}/o"],
        ["--checkpoint", "{ck}", "--to-hf", "{full}"],
        ["--checkpoint", "{ck}"],  # no --to-hf
        ["--hf", "{missing}"],  # no --out
        ["--meta", "{full}", "--out", "{tmp}/o"],  # no --tokenizer
        ["--checkpoint", "{ck}", "--to-hf", "{file}"],
        ["--hf", "{missing}", "--out", "{tmp}/o", "--max-seq-len", "abc"],
        [],  # no source
    ]),
    *_cases(["eval-code", "--samples-file", "{file}"], [
        ["--samples", "0"], ["--samples", "abc"], ["--timeout", "-1"], ["--workers", "0"],
        ["--benchmark", "mbpp"], ["--problems", "0"], ["--temperature", "x"],
    ]),
    *_cases(["eval-code"], [
        ["--samples-file", "{missing}"], ["--samples-file", "{badyaml}"],
        ["--checkpoint", "{missing}", "--problems", "1"],
        ["--checkpoint", "{ck}", "--speculative", "bogus"],
        ["--checkpoint", "{ck}", "--device", "bogus"],
        [],  # no source
    ]),
    *_cases(DEC, [
        ["--checkpoint", "{missing}"], ["--prompts", "0"], ["--prompt-len", "abc"],
        ["--new-tokens", "0"], ["--batch-size", "0"], ["--heads", "x"], ["--heads", "9"],
        ["--heads", "0"], ["--tree-size", "0"], ["--threads", "-1"], ["--reps", "0"],
        ["--temperature", "abc"], ["--temperature", "-1"], ["--temperature", "nan"],
        ["--temperature", "inf"], ["--top-p", "0"], ["--top-p", "2"], ["--top-k", "0"],
        ["--top-p", "0.9"], ["--temperature", "0", "--top-k", "5"],  # filters need sampling
        ["--seed", "abc"], ["--sampling", ""], ["--sampling", "x"], ["--sampling", "greedy,"],
        ["--sampling", "0.8:2"], ["--sampling", "1.0::0"], ["--sampling", "-1"],
        ["--sampling", "1:0.9:5:3"], ["--sampling", "0:0.9"],
        ["--sampling", "greedy", "--temperature", "1"],  # one way or the other
        ["--baselines", "--sampling", "1.0"],  # baselines are greedy
        ["--prompt-lookup-tokens", "0"], ["--baselines=1"],
        *BAD_DEVICES,
    ]),
    *_cases(MEM, [
        ["--vocab", "abc"], ["--vocab", "1"], ["--dim", "0"], ["--dim", "30"], ["--layers", "0"],
        ["--n-heads", "0"], ["--tokens", "0"], ["--tokens", "100"], ["--seq-len", "1"],
        ["--n-future", "0"], ["--n-future", "9"], ["--variants", "bogus"], ["--variants", ","],
        ["--grad-tokens", "-1"], ["--grad-tokens", "33"], ["--threads", "0"],
        ["--seed", "abc"], ["--worker", "bogus"], ["--layers", "2"], *BAD_DEVICES,
    ]),
    *_cases(SPEED, [
        ["--vocab", "0"], ["--dim", "abc"], ["--layers", "0"], ["--n-heads", "0"],
        ["--n-heads", "3"], ["--seq-len", "1"], ["--batch", "0"], ["--n-future", "0"],
        ["--n-future", "9"], ["--method", "bogus"], ["--ntp-method", "bogus"],
        ["--warmup", "-1"], ["--steps", "0"], ["--threads", "0"], ["--seed", "abc"],
        ["--check=1"], *BAD_DEVICES,
    ]),
]


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_options")
    ck = make_checkpoint(root)
    corpus = make_corpus(root / "train_corpus", n_files=4, lines=10)
    (root / "file.txt").write_text("not a directory\n")
    (root / "full").mkdir()
    (root / "full" / "x").write_text("x")
    (root / "bad.yaml").write_text("model: [1, 2\n")
    (root / "binary").write_bytes(b"\xff\xfe\x00 not utf-8 \xc3")
    return {"ck": ck, "missing": root / "missing", "file": root / "file.txt",
            "full": root / "full", "badyaml": root / "bad.yaml", "binary": root / "binary",
            "corpus": corpus}


@pytest.mark.parametrize("base, bad", CASES)
def test_bad_option_is_one_error_line_and_exit_2(base, bad, paths, tmp_path, capsys):
    names = {k: str(v) for k, v in paths.items()}
    argv = [a.format(tmp=tmp_path, **names) for a in [*base, *bad]]
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own exit, after printing its usage block
        rc = e.code
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, err)
    assert "Traceback" not in err + out
    assert not (tmp_path / "distilled").exists()  # a failed command leaves no output folder


def test_train_bad_override_names_it(capsys, tmp_path):
    assert main(["train", "--out", str(tmp_path / "r"), "--data.paths=[oops"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: override data.paths=[oops is not a valid YAML list")


def test_argparse_errors_say_what_and_where(capsys, paths):
    assert main(["generate", "--checkpoint", str(paths["ck"]), "--prompt", "x",
                 "--threads", "-1"]) == 2
    assert capsys.readouterr().err == ("error: argument --threads: expected an integer >= 1, "
                                       "got '-1' (see `multitoken generate --help`)\n")
    assert main(["generate", "--checkpoint", str(paths["ck"]), "--prompt", "x",
                 "--device", "cuda:99"]) == 2
    assert "--device cuda:99" in capsys.readouterr().err


class _Exited(Exception):
    pass


@pytest.mark.parametrize(("world", "rc", "exits"), [("2", 0, True), ("2", 3, False),
                                                    ("1", 0, False), (None, 0, False)])
def test_torchrun_child_leaves_with_os_exit_only_after_success(monkeypatch, world, rc, exits):
    """A torchrun child (WORLD_SIZE > 1) whose run succeeded skips interpreter shutdown
    (os._exit(0)); a failed run, or a single process, returns its status normally."""
    calls: list[int] = []

    def fake_exit(code: int) -> None:
        calls.append(code)
        raise _Exited

    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)
    if exits:
        with pytest.raises(_Exited):
            cli.leave_torchrun_child(rc)
        assert calls == [0]
    else:
        assert cli.leave_torchrun_child(rc) == rc
        assert calls == []
