"""`multitoken experiment`: the four sweeps end to end, bad input, continuing a stopped sweep,
and the shared metrics on hand-made cases.

The end-to-end runs use the hidden `--scale test` (one or two tiny configurations, a few
steps): the same code path as `--quick` and the full sweep, with smaller numbers.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import string
from pathlib import Path
from typing import Any

import pytest

from multitoken import cliargs
from multitoken.cli import main
from multitoken.config import DataConfig
from multitoken.data import prepare_data
from multitoken.errors import MultitokenError
from multitoken.experiments import (
    exp_byte_heads,
    exp_induction,
    exp_ntp_vs_mtp,
    exp_polynomial,
    runner,
)
from multitoken.experiments.common import (
    bits_per_byte,
    distinct_ngram_ratio,
    paired_diff,
    seed_stats,
    validation_windows,
)
from multitoken.experiments.exp_induction import InductionExperiment
from multitoken.experiments.exp_ntp_vs_mtp import NtpVsMtpExperiment
from multitoken.tokenizer import ByteTokenizer


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(["experiment", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def check_outputs(name: str, out: Path, stdout: str) -> dict[str, Any]:
    """The files and the last stdout line every sweep promises; returns that line."""
    last = json.loads(stdout.strip().splitlines()[-1])
    saved = json.loads((out / "results.json").read_text())
    assert last == {"experiment": name, "results": saved["results"]}
    assert saved["experiment"] == name and saved["seeds"] == [0]
    assert (out / "results.md").read_text().count("|") > 10
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert last["results"]
    for row in last["results"]:
        assert {"n_future", "params", "seed"} <= set(row)
        assert row["params"] > 0 and row["seed"] == 0
    return last


def run_experiment(name: str, out: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """Run NAME at test scale into `out`; the last stdout line, checked."""
    rc, stdout, stderr = run_cli([name, "--scale", "test", "--no-progress", "--out", str(out)],
                                 capsys)
    assert rc == 0, stderr
    return check_outputs(name, out, stdout)


@pytest.fixture(scope="module")
def induction_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One induction sweep at test scale: (its --out, its stdout)."""
    out = tmp_path_factory.mktemp("induction") / "out"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["experiment", "induction", "--scale", "test", "--no-progress", "--out",
                     str(out)]) == 0
    return out, buf.getvalue()


def test_induction_end_to_end(induction_sweep: tuple[Path, str]) -> None:
    out, stdout = induction_sweep
    last = check_outputs("induction", out, stdout)
    scale = exp_induction.SCALES["test"]
    expected = {(d, layers, n) for d, layers, _ in scale.sizes for n in scale.n_futures}
    rows = last["results"]
    assert {(r["dim"], r["n_layers"], r["n_future"]) for r in rows} == expected
    assert len(rows) == len(expected)
    for r in rows:
        assert 0.0 <= r["induction_accuracy"] <= 1.0
        assert r["heldout_positions"] > 0 and r["val_loss"] > 0
    # Parameter matching: n=1 and n=2 of one size have the same number of parameters.
    assert len({r["params"] for r in rows}) == len(scale.sizes)


def test_an_interrupted_sweep_continues_to_the_same_results(
        induction_sweep: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    args = ["induction", "--scale", "test", "--no-progress", "--out", str(tmp_path / "out")]
    monkeypatch.setenv("MULTITOKEN_TEST_SIGNAL", "2:SIGINT")  # Ctrl-C after step 2 of 4
    rc, _, err = run_cli(args, capsys)
    assert rc == 130 and "run the same command again" in err
    assert not (tmp_path / "out" / "results.json").exists()
    monkeypatch.delenv("MULTITOKEN_TEST_SIGNAL")
    rc, stdout, err = run_cli(args, capsys)
    assert rc == 0, err
    reference = json.loads(induction_sweep[1].strip().splitlines()[-1])["results"]
    assert json.loads(stdout.strip().splitlines()[-1])["results"] == reference


def test_a_stopped_sweep_continues_where_it_stopped(induction_sweep: tuple[Path, str],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = induction_sweep[0]
    before = json.loads((out / "results.json").read_text())["results"]
    # As if the sweep had stopped after its first configuration: the second was trained but
    # not evaluated, and nothing was summarised.
    runs = sorted((out / "runs").iterdir())
    first_record = (runs[0] / "result.json").read_text()
    (runs[1] / "result.json").unlink()
    (out / "results.json").unlink()
    args = ["induction", "--scale", "test", "--no-progress", "--out", str(out)]
    rc, stdout, stderr = run_cli(args, capsys)
    assert rc == 0, stderr
    after = json.loads(stdout.strip().splitlines()[-1])["results"]
    assert after == before  # the same numbers: the trained model was evaluated again
    assert (runs[0] / "result.json").read_text() == first_record  # not redone
    # The same folder with other settings is refused, and so is a finished sweep.
    (out / "results.json").unlink()
    rc, _, err = run_cli([*args, "--seeds", "2"], capsys)
    assert rc == 2 and "other settings" in err and err.count("\n") == 1
    assert run_cli(args, capsys)[0] == 0
    rc, _, err = run_cli(args, capsys)
    assert rc == 2 and "already holds results" in err and err.count("\n") == 1


def test_polynomial_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    last = run_experiment("polynomial", tmp_path / "out", capsys)
    rows = last["results"]
    assert sorted(r["n_future"] for r in rows) == list(exp_polynomial.SCALES["test"].n_futures)
    for r in rows:
        per_k = [r[f"accuracy_{k}"] for k in range(1, 11)]
        assert all(0.0 <= a <= 1.0 for a in per_k)
        assert r["accuracy_in_domain"] == pytest.approx(sum(per_k[:5]) / 5)
        assert r["accuracy_out_of_domain"] == pytest.approx(sum(per_k[5:]) / 5)
        assert r["test_per_difficulty"] == exp_polynomial.SCALES["test"].test_per_difficulty
    # Training data never holds a test expression.
    tests = exp_polynomial.PolynomialExperiment().test_sets(0, exp_polynomial.SCALES["test"])
    test_exprs = {s.expression for samples in tests.values() for s in samples}
    corpus = "".join(f.read_text() for f in (tmp_path / "out" / "data").glob("*/*.txt"))
    train_exprs = {line.split("=")[0] for line in corpus.splitlines()}
    assert train_exprs and not test_exprs & train_exprs


def test_ntp_vs_mtp_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    last = run_experiment("ntp-vs-mtp", tmp_path / "out", capsys)
    rows = {r["n_future"]: r for r in last["results"]}
    assert sorted(rows) == [1, 2, 4, 8]
    assert len({r["params"] for r in rows.values()}) == 1  # parameter matched
    for n, r in rows.items():
        # Bits per byte is the trainer's final head-1 validation loss in bits.
        metrics = (tmp_path / "out" / "runs" / f"n{n}-s0" / "metrics.jsonl").read_text()
        val = [json.loads(x) for x in metrics.splitlines() if '"val"' in x][-1]
        assert r["bits_per_byte"] == pytest.approx(val["head_loss"][0] / math.log(2))
        assert len(r["head_bits_per_byte"]) == n
        assert 0.0 < r["distinct_8"] <= 1.0 and 0.0 < r["distinct_8_heldout"] <= 1.0
        if n == 1:
            assert r["tokens_per_forward"] is None
        else:
            assert 1.0 <= r["tokens_per_forward"] <= n


def test_ntp_vs_mtp_sweeps_both_head_types_side_by_side_and_continues(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    args = ["ntp-vs-mtp", "--scale", "test", "--no-progress", "--out", str(out),
            "--head-types", "token_conditioned,transformer"]
    rc, stdout, err = run_cli(args, capsys)
    assert rc == 0, err
    last = check_outputs("ntp-vs-mtp", out, stdout)
    rows = {(r["head_type"], r["n_future"]): r for r in last["results"]}
    assert len(rows) == len(last["results"]) == 7  # n=1 once, n=2, 4, 8 for each type
    assert sorted(rows) == [("token_conditioned", n) for n in (2, 4, 8)] + [
        ("transformer", n) for n in (1, 2, 4, 8)]
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(
        ["n1-s0", *(f"{t}n{n}-s0" for t in ("", "token_conditioned-") for n in (2, 4, 8))])
    dim = exp_ntp_vs_mtp.SCALES["test"].dim
    for n in (2, 4, 8):
        r = rows["token_conditioned", n]
        # Each module k >= 2: a 2D x D projection and two norms beyond the parallel head.
        assert r["params"] - rows["transformer", n]["params"] == (n - 1) * (2 * dim * dim + 2 * dim)
        metrics = (out / "runs" / f"token_conditioned-n{n}-s0" / "metrics.jsonl").read_text()
        val = [json.loads(x) for x in metrics.splitlines() if '"val"' in x][-1]
        assert r["bits_per_byte"] == pytest.approx(val["head_loss"][0] / math.log(2))
        assert len(r["head_bits_per_byte"]) == n
        assert 1.0 <= r["tokens_per_forward"] <= n  # chain decoding of the modules
    saved = json.loads((out / "results.json").read_text())
    assert saved["command"].endswith(" --head-types transformer,token_conditioned")
    table = (out / "results.md").read_text()
    for cells in ["| - (n=1) | 1 | 8+1 |", "| transformer | 4 | 5+4 |",
                  "| token_conditioned | 4 | 5+4 |"]:
        assert cells in table
    # Stopped after training token_conditioned n=4, before evaluating it: continued, the same.
    (out / "runs" / "token_conditioned-n4-s0" / "result.json").unlink()
    (out / "results.json").unlink()
    kept = (out / "runs" / "token_conditioned-n8-s0" / "result.json").read_text()
    rc, stdout, err = run_cli(args, capsys)
    assert rc == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["results"] == last["results"]
    assert (out / "runs" / "token_conditioned-n8-s0" / "result.json").read_text() == kept
    # The default head types into the same folder: other settings, and the message says which.
    (out / "results.json").unlink()
    rc, _, err = run_cli(args[:-2], capsys)
    assert rc == 2 and "options --head-types transformer,token_conditioned" in err


def test_ntp_vs_mtp_default_head_types_keep_earlier_sweeps_jobs(tmp_path: Path) -> None:
    """Without --head-types (or with transformer alone) the jobs, names and plan options are
    those of sweeps run before head types could be chosen, so their folders still continue."""
    exp, scale = NtpVsMtpExperiment(), exp_ntp_vs_mtp.SCALES["test"]
    jobs = exp.jobs(scale, [0, 1], tmp_path)
    assert [j.key for j in jobs] == [f"n{n}-s{s}" for s in (0, 1) for n in (1, 2, 4, 8)]
    assert {j.cfg.model.head_type for j in jobs} == {"transformer"}
    assert exp.options(scale) == exp.options(exp.with_head_types(scale, "transformer")) == ""
    both = exp.with_head_types(scale, " token_conditioned,transformer")
    assert both.head_types == ("transformer", "token_conditioned")
    jobs = exp.jobs(both, [0], tmp_path)
    assert [(j.key, j.cfg.model.head_type, j.info["head_type"]) for j in jobs[:3]] == [
        ("n1-s0", "transformer", "transformer"), ("n2-s0", "transformer", "transformer"),
        ("token_conditioned-n2-s0", "token_conditioned", "token_conditioned")]
    only = exp.jobs(exp.with_head_types(scale, "token_conditioned"), [0], tmp_path)
    assert [j.key for j in only] == ["n1-s0"] + [f"token_conditioned-n{n}-s0" for n in (2, 4, 8)]


def test_ntp_vs_mtp_table_and_plot_put_head_types_side_by_side(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def row(n: int, seed: int, bpb: float, head_type: str | None, params: int = 100_000
            ) -> dict[str, Any]:
        r = {"n_future": n, "params": params, "seed": seed, "dim": 32, "n_layers": 9,
             "bits_per_byte": bpb, "tokens_per_forward": None if n == 1 else 1.5,
             "distinct_8": 0.5, "distinct_8_heldout": 0.9}
        return r if head_type is None else {**r, "head_type": head_type}

    # Rows of an earlier sweep have no head_type: theirs are the parallel heads.
    rows = [row(1, s, 2.0 + s, None) for s in (0, 1)] + [row(2, s, 2.5 + s, None) for s in (0, 1)]
    rows += [row(2, s, 2.25 + s, "token_conditioned", 120_000) for s in (0, 1)]
    table = NtpVsMtpExperiment().table(rows).splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:5]]
    assert [c[:4] for c in cells] == [["- (n=1)", "1", "8+1", "0.10M"],
                                      ["transformer", "2", "7+2", "0.10M"],
                                      ["token_conditioned", "2", "7+2", "0.12M"]]
    assert [c[5] for c in cells] == ["-", "0.500 ± 0.000", "0.250 ± 0.000"]  # paired with n=1
    drawn: list[dict[str, Any]] = []  # each panel's lines: label -> sorted points
    monkeypatch.setattr(exp_ntp_vs_mtp, "errorbar_series", lambda ax, groups, label: drawn.append(
        {label(k): sorted(v) for k, v in groups.items()}))
    NtpVsMtpExperiment().plot(rows, tmp_path / "plot.png")
    loss, speed = drawn
    assert loss == {"transformer heads": [(1, [2.0, 3.0]), (2, [2.5, 3.5])],
                    "token_conditioned heads": [(1, [2.0, 3.0]), (2, [2.25, 3.25])]}
    assert sorted(speed) == ["token_conditioned heads: greedy chain",
                             "transformer heads: greedy chain"]
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_byte_heads_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    last = run_experiment("byte-heads", tmp_path / "out", capsys)
    rows = last["results"]
    assert [r["heads"] for r in rows] == list(range(1, 9))
    assert all(r["n_future"] == 8 for r in rows)
    plain = rows[0]
    assert plain["tokens_per_forward"] == plain["speedup"] == 1.0
    for r in rows:
        assert r["exact"] is True  # greedy self-speculative decoding is lossless
        assert r["distinct_8"] == plain["distinct_8"]  # the same text, so the same ratio
        assert 1.0 <= r["tokens_per_forward"] <= r["heads"]
        assert r["speedup"] > 0


# ---------------------------------------------------------------------------------------------
# Bad input: one `error:` line, exit status 2.


@pytest.mark.parametrize("args, message", [
    (["no-such-experiment"], "unknown experiment 'no-such-experiment'"),
    (["induction", "--seeds", "0"], "--seeds"),
    (["induction", "--seeds=-2"], "--seeds"),
    (["induction", "--seeds", "two"], "--seeds"),
    (["induction", "--seeds", "1.5"], "--seeds"),
    (["induction", "--threads", "0"], "--threads"),
    (["induction", "--bogus"], "--bogus"),
    (["ntp-vs-mtp", "--head-types", "bogus"], "unknown head type 'bogus'"),
    (["ntp-vs-mtp", "--head-types", "transformer,transformer"], "named twice"),
    (["ntp-vs-mtp", "--head-types", ""], "--head-types"),
    (["induction", "--head-types", "token_conditioned"], "--head-types"),
    ([], "name"),
])
def test_bad_arguments_are_one_error_line(args: list[str], message: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_cli([*args, "--out", str(tmp_path / "out")], capsys)
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_every_option_has_help() -> None:
    parser = runner.build_parser()
    assert isinstance(parser, cliargs.ArgumentParser)  # usage errors are ConfigErrors
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help text"
    assert set(runner.EXPERIMENTS) == {"induction", "polynomial", "ntp-vs-mtp", "byte-heads"}


def test_an_out_dir_holding_other_files_is_refused(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc, _, err = run_cli(["polynomial", "--scale", "test", "--out", str(out)], capsys)
    assert rc == 2 and "not empty" in err and err.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    (tmp_path / "file").write_text("")
    rc, _, err = run_cli(["polynomial", "--scale", "test", "--out", str(tmp_path / "file")],
                         capsys)
    assert rc == 2 and "is a file" in err


# ---------------------------------------------------------------------------------------------
# Metrics and summaries on hand-made cases.


def test_validation_windows_are_prompts_and_what_follows_them(tmp_path: Path) -> None:
    rng = random.Random(0)  # random letters: every 11-byte window occurs once
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"f{i}.txt").write_text("".join(rng.choices(string.ascii_letters, k=300)))
    data = DataConfig(paths=[str(corpus)], tokenizer="bytes", val_fraction=0.2,
                      cache_dir=str(tmp_path / "cache"))
    val = prepare_data(data).val.tolist()
    prompts, following = validation_windows(data, ByteTokenizer(), 5, 8, 3)
    assert len(prompts) == len(following) == 5
    starts = []
    for p, f in zip(prompts, following):
        assert len(p) == 8 and len(f) == 3
        window = p + f
        starts.append(next(i for i in range(len(val)) if val[i:i + 11] == window))
    assert starts[0] == 0 and starts == sorted(set(starts))  # spread over the split, in order
    assert starts[-1] > len(val) // 2
    with pytest.raises(MultitokenError, match="fewer than one prompt"):
        validation_windows(data, ByteTokenizer(), 2, len(val), 1)


def test_bits_per_byte() -> None:
    assert bits_per_byte(math.log(2)) == pytest.approx(1.0)
    assert bits_per_byte(math.log(256)) == pytest.approx(8.0)  # uniform over the 256 bytes
    assert bits_per_byte(0.0) == 0.0


def test_distinct_ngram_ratio() -> None:
    assert distinct_ngram_ratio([list(range(10))], 8) == 1.0  # 3 eight-grams, all different
    assert distinct_ngram_ratio([[7] * 20], 8) == 1 / 13  # one distinct of 13
    assert distinct_ngram_ratio([[1, 2] * 6], 8) == 2 / 5  # a loop of period 2
    # Pooled over sequences: (1 + 3) distinct of (3 + 3).
    assert distinct_ngram_ratio([[0] * 10, list(range(10))], 8) == 4 / 6
    # Counted within each sequence: two identical varied texts are not repetition.
    assert distinct_ngram_ratio([list(range(9))] * 2, 8) == 1.0
    # Sequences shorter than n add nothing; n=1 is the share of distinct tokens.
    assert distinct_ngram_ratio([[1, 2, 3], list(range(8))], 8) == 1.0
    assert distinct_ngram_ratio([[1, 1, 2, 3]], 1) == 3 / 4
    with pytest.raises(MultitokenError, match="undefined"):
        distinct_ngram_ratio([[1, 2, 3]], 8)
    with pytest.raises(MultitokenError):
        distinct_ngram_ratio([[1, 2, 3]], 0)


def test_seed_statistics() -> None:
    s = seed_stats([0.5, 0.6, 0.7])
    assert (s.mean, s.n) == (pytest.approx(0.6), 3)
    assert s.std == pytest.approx(0.1)  # sample standard deviation
    assert s.fmt() == "0.600 ± 0.100"
    assert seed_stats([0.25]).fmt() == "0.250"  # one seed: no spread to show
    base = [{"seed": 0, "m": 1.0}, {"seed": 1, "m": 2.0}, {"seed": 2, "m": None}]
    other = [{"seed": 1, "m": 2.5}, {"seed": 0, "m": 0.5}, {"seed": 3, "m": 9.0}]
    assert paired_diff(base, other, "m") == [0.5, -0.5]  # same seed only


def test_induction_table_reports_mean_and_spread_over_seeds() -> None:
    rows = [{"n_future": n, "params": 40160, "seed": s, "dim": 32, "n_layers": 3,
             "induction_accuracy": acc, "val_loss": 3.0}
            for n, s, acc in [(1, 0, 0.1), (1, 1, 0.3), (2, 0, 0.4), (2, 1, 0.4)]]
    table = InductionExperiment().table(rows)
    line = next(x for x in table.splitlines() if x.startswith("| d32 L3"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1:5] == ["40K", "0.200 ± 0.141", "0.400 ± 0.000", "0.200 ± 0.141"]
    assert cells[-1] == "2"


def test_full_sweeps_have_three_seeds_and_the_quick_ones_one() -> None:
    for module in (exp_induction, exp_polynomial, exp_ntp_vs_mtp, exp_byte_heads):
        assert module.SCALES["full"].seeds >= 3
        assert module.SCALES["quick"].seeds == 1
    assert exp_polynomial.SCALES["full"].test_per_difficulty == 2000
