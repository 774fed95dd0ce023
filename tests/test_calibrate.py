"""Calibration (acceptance counts, forward costs, the choice) and the decode benchmark."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch

from helpers_decode import (  # noqa: F401 - one_thread is an autouse fixture
    make_checkpoint,
    one_thread,
    pattern_tokens,
    trained_model,
)
from multitoken.decoding import calibrate as calibrate_module
from multitoken.decoding.calibrate import (
    calibrate,
    load_calibration,
    path_probs,
    prompts_from,
    save_calibration,
    simulate_tokens_per_forward,
    time_forwards,
    typical_time,
)
from multitoken.decoding.tree import Tree, default_tree
from multitoken.errors import MultitokenError


def test_path_probs_counts_rank_prefixes():
    R = 4
    ranks = np.array([[0, 0, 0], [0, 1, 0], [1, 0, R], [R, 0, 0]])
    p = path_probs(ranks, R)
    assert p[(0,)] == 0.5 and p[(1,)] == 0.25
    assert p[(0, 0)] == 0.25 and p[(0, 1)] == 0.25 and p[(1, 0)] == 0.25
    assert p[(0, 0, 0)] == 0.25 and (1, 0, R) not in p
    assert sum(v for k, v in p.items() if len(k) == 1) == 0.75  # one position had no top-R


def test_simulated_tokens_per_forward_replays_decoding():
    R = 8
    # one sequence of 8 positions; the chain of 3 accepts 2, then 0, then 3 drafts
    seq = [[0, 0, 5], [0, 0, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0], [R, R, R], [R, R, R], [R, R, R]]
    ranks = np.array([seq])
    chain3 = [(0,), (0, 0), (0, 0, 0)]
    assert simulate_tokens_per_forward(ranks, chain3) == pytest.approx(8 / 3)
    # a tree that also holds (1,), (1, 0) accepts 2 drafts at position 3, which shifts the
    # later steps: 3 + 3 + 1 + 1 tokens in 4 steps (replaying is path dependent)
    tree = chain3 + [(1,), (1, 0)]
    assert simulate_tokens_per_forward(ranks, tree) == pytest.approx(2.0)
    assert simulate_tokens_per_forward(ranks, [(0,)]) == pytest.approx(8 / 5)


def test_prompts_from_held_out_tokens():
    toks = np.arange(1000)
    ps = prompts_from(toks, 4, 10)
    assert [p[0] for p in ps] == [0, 329, 659, 989] and all(len(p) == 10 for p in ps)


def test_time_forwards_positive():
    # Every figure is one of the measured durations or between two of them (see
    # typical_time), so it is positive however loaded the machine is.
    model = trained_model()
    for reps in (1, 2, 3):
        t = time_forwards(model, [(1, 1), (4, 4), (8, 4)], reps=reps, context=16)
        assert set(t) == {(1, 1), (4, 4), (8, 4)} and all(v > 0 for v in t.values())
    with pytest.raises(MultitokenError, match="reps"):
        time_forwards(model, [(1, 1)], reps=0)


def test_time_forwards_with_adversarial_durations(monkeypatch):
    """Two repetitions measured as 1 ms then 6 ms (a loaded machine): the figure must lie
    between them (the exclusive lower quartile made it -0.25 ms)."""
    # measured round-robin: rep 1 of shapes (1, 1) and (2, 2), then rep 2 of both
    durations = iter([0.001, 0.002, 0.006, 0.002])
    now = [0.0]
    started = [False]

    def perf_counter() -> float:
        if started[0]:
            now[0] += next(durations)
        started[0] = not started[0]
        return now[0]

    model = trained_model()
    monkeypatch.setattr(calibrate_module, "time", types.SimpleNamespace(perf_counter=perf_counter))
    t = time_forwards(model, [(1, 1), (2, 2)], reps=2, context=8)
    assert 0.001 <= t[(1, 1)] <= 0.006 and t[(2, 2)] == pytest.approx(0.002)


@pytest.mark.parametrize("samples", [
    [0.001, 0.006],  # the exclusive lower quartile: (5 * 0.001 - 0.006) / 4 < 0
    [0.001, 1.0],
    [0.002, 0.001, 0.5],
    [1e-4, 1e-4, 1e-4, 3.0, 9.0],
    [0.003],
    [0.004] * 7,
])
def test_typical_time_stays_within_the_samples(samples):
    t = typical_time(samples)
    assert min(samples) <= t <= max(samples)


def test_typical_time_is_the_lower_quartile():
    assert typical_time([1.0, 2.0, 3.0, 4.0, 5.0]) == 2.0
    assert typical_time([0.001, 0.006]) == pytest.approx(0.00225)
    assert typical_time([5.0, 1.0, 100.0, 2.0, 3.0]) == 2.0  # a slow outlier barely moves it
    with pytest.raises(ValueError):
        typical_time([])


def test_calibrate_on_a_trained_model():
    model = trained_model()
    cal = calibrate(model, pattern_tokens(3000, seed=3), n_prompts=4, prompt_len=16, gen_len=40,
                    max_nodes=12, reps=2, batch_sizes=(1, 2))
    assert 1 <= cal["best_k"] <= 3 and cal["best_mode"] in ("chain", "tree")
    tree = Tree(cal["tree"])
    assert 1 <= tree.size <= 12 and tree.depth <= 3
    acc = cal["acceptance"]["chain"]
    assert len(acc) == 3 and acc[0] > 0.5  # the heads learned the pattern
    e = cal["expected_tokens_per_forward"]["chain"]
    assert 1.0 < e["1"] <= e["2"] <= e["3"] <= 4.0
    assert set(cal["by_batch_size"]) == {"1", "2"} and "plain_ms" in cal["forward_cost"]["2"]
    json.dumps(cal)  # storable


def test_cli_calibrate_then_generate_and_bench(tmp_path, capsys):
    from multitoken.bench.decode import main as bench_main
    from multitoken.commands.calibrate import main as cal_main
    from multitoken.commands.generate import main as gen_main

    ck = make_checkpoint(tmp_path)
    assert load_calibration(ck) is None
    assert cal_main(["--checkpoint", str(ck), "--prompts", "2", "--prompt-len", "16",
                     "--gen-len", "16", "--max-nodes", "6", "--reps", "2"]) == 0
    cal = load_calibration(ck)
    assert cal is not None and (ck / "calibration.json").is_file()
    assert cal["dtype"] == "float32"  # what it was measured in
    capsys.readouterr()
    assert gen_main(["--checkpoint", str(ck), "--prompt", "def ", "--max-new-tokens", "8",
                     "--no-stop"]) == 0
    shown = {"off": "[plain", "chain": "[chain", "tree": "[tree"}[cal["best_mode"]]
    assert shown in capsys.readouterr().out  # --speculative auto follows the calibration
    png = tmp_path / "bench.png"
    assert bench_main(["--checkpoint", str(ck), "--prompts", "3", "--prompt-len", "16",
                       "--new-tokens", "10", "--batch-size", "2", "--reps", "2",
                       "--out-png", str(png)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])
    assert res["exact"] is True and res["batch_size"] == 2 and res["dtype"] == "float32"
    [run] = res["runs"]
    assert run["plain_tok_s"] > 0
    assert set(run["modes"]) == {"plain", "chain-1", "chain-2", "chain-3", "tree"}
    assert {"tokens_per_forward", "speedup", "tok_s", "distinct_8"} <= set(run["modes"]["tree"])
    assert res["forward_cost"]["1"] == 1.0 and "4" in res["forward_cost"]
    assert png.stat().st_size > 1000
    # --tree-size: the first nodes of the calibrated growth order instead of the best tree
    assert bench_main(["--checkpoint", str(ck), "--prompts", "1", "--prompt-len", "16",
                       "--new-tokens", "6", "--heads", "1", "--reps", "1",
                       "--tree-size", "5"]) == 0
    out = capsys.readouterr().out
    grown = Tree(cal["tree_order"][:5] or default_tree(3, size=5))
    assert f"tree: {grown.size} nodes" in out and json.loads(out.splitlines()[-1])["exact"]


def test_damaged_calibration_is_ignored(tmp_path, capsys):
    ck = make_checkpoint(tmp_path)
    (ck / "calibration.json").write_text("{not json")
    assert load_calibration(ck) is None
    assert "ignoring" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--heads", "5"], ["--batch-size", "0"], ["--tree-size", "0"]])
def test_bench_bad_options(tmp_path, bad):
    from multitoken.bench.decode import main as bench_main

    ck = make_checkpoint(tmp_path)
    with pytest.raises(MultitokenError):
        bench_main(["--checkpoint", str(ck), *bad])


def test_a_calibration_is_used_only_in_the_dtype_it_was_measured_in(tmp_path, capsys):
    from multitoken.commands.generate import main as gen_main

    ck = make_checkpoint(tmp_path)
    cal = {"version": 1, "best_mode": "off", "best_k": 1, "tree": [[0]], "by_batch_size": {}}
    save_calibration(ck, cal)  # a file from before the "dtype" field: measured in float32
    assert load_calibration(ck) == cal == load_calibration(ck, torch.float32)
    assert load_calibration(ck, torch.bfloat16) is None
    assert "measured in float32, decoding in bfloat16" in capsys.readouterr().err
    save_calibration(ck, {**cal, "dtype": "bfloat16"})
    assert load_calibration(ck, torch.bfloat16) == {**cal, "dtype": "bfloat16"}
    assert load_calibration(ck) is None
    capsys.readouterr()
    # generate: the calibrated mode (plain) in the calibration's dtype, else the default (chain)
    argv = ["--checkpoint", str(ck), "--prompt", "def ", "--max-new-tokens", "4", "--no-stop"]
    assert gen_main([*argv, "--dtype", "bfloat16"]) == 0
    out, err = capsys.readouterr()
    assert "[plain" in out and err == ""
    assert gen_main([*argv, "--dtype", "float32"]) == 0
    out, err = capsys.readouterr()
    assert "[chain" in out and "warning: ignoring" in err and "decoding in float32" in err
