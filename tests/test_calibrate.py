"""Calibration (acceptance counts, forward costs, the choice) and the decode benchmark."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers_decode import (  # noqa: F401 - one_thread is an autouse fixture
    make_checkpoint,
    one_thread,
    pattern_tokens,
    trained_model,
)
from multitoken.calibrate import (
    calibrate,
    load_calibration,
    path_probs,
    prompts_from,
    simulate_tokens_per_forward,
    time_forwards,
)
from multitoken.tree import Tree, default_tree


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
    model = trained_model()
    t = time_forwards(model, [(1, 1), (4, 4), (8, 4)], reps=2, context=16)
    assert set(t) == {(1, 1), (4, 4), (8, 4)} and all(v > 0 for v in t.values())


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
    from multitoken.calibrate import main as cal_main
    from multitoken.generate import main as gen_main

    ck = make_checkpoint(tmp_path)
    assert load_calibration(ck) is None
    assert cal_main(["--checkpoint", str(ck), "--prompts", "2", "--prompt-len", "16",
                     "--gen-len", "16", "--max-nodes", "6", "--reps", "2"]) == 0
    cal = load_calibration(ck)
    assert cal is not None and (ck / "calibration.json").is_file()
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
    assert res["exact"] is True and res["batch_size"] == 2 and res["greedy_tok_s"] > 0
    assert set(res["modes"]) == {"chain-1", "chain-2", "chain-3", "tree"}
    assert set(res["modes"]["tree"]) == {"tokens_per_forward", "speedup", "tok_s"}
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
    from multitoken.errors import MultitokenError

    ck = make_checkpoint(tmp_path)
    with pytest.raises(MultitokenError):
        bench_main(["--checkpoint", str(ck), *bad])
