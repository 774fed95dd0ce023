"""calibrate's verification: the choice follows decoding measured for real, not the model."""

from __future__ import annotations

import json

import pytest

from helpers_decode import (  # noqa: F401 - one_thread is an autouse fixture
    make_checkpoint,
    one_thread,
    pattern_tokens,
    trained_model,
)
from multitoken.cli import main as cli_main
from multitoken.decoding import calibrate as calibrate_module
from multitoken.decoding.calibrate import calibrate, load_calibration
from multitoken.decoding.sampling import Sampling
from multitoken.decoding.tree import Tree
from multitoken.decoding.verify_choice import (
    Candidate,
    Verification,
    candidates,
    fastest,
    verification_prompts,
)
from multitoken.errors import MultitokenError

S = Sampling(0.8, top_p=0.95)


def fixed_forwards(model, shapes, **_):
    """Forward costs that do not depend on the machine: the model's choice is reproducible."""
    return {(m, h): 1e-3 * (1.0 + 0.04 * m + 0.02 * h) for m, h in shapes}


def paced_timer(seconds_per_token: dict[str, float], calls: list | None = None):
    """A DecodeTimer reporting a chosen speed per candidate ("plain", "chain-2", "tree", ...:
    a name without a size stands for every candidate of that kind); default 1.0."""
    def timer(sampling, cand, batch, new_tokens, seed):
        name = "plain" if cand is None else cand.name
        if calls is not None:
            calls.append((sampling.label, name, len(batch), new_tokens, seed))
        pace = seconds_per_token.get(name, seconds_per_token.get(name.split("-")[0], 1.0))
        return new_tokens * len(batch), pace * new_tokens * len(batch)
    return timer


def run_calibrate(monkeypatch, **kw):
    monkeypatch.setattr(calibrate_module, "time_forwards", fixed_forwards)
    return calibrate(trained_model(), pattern_tokens(3000, seed=3), n_prompts=4, prompt_len=16,
                     gen_len=40, max_nodes=12, reps=1, **kw)


def choice_of(part: dict) -> dict:
    return {B: {k: c[k] for k in ("best_mode", "best_k", "tree")}
            for B, c in part["by_batch_size"].items()}


def test_no_verification_keeps_the_models_choice(monkeypatch):
    def never(*_):
        raise AssertionError("verify_prompts=0 must not decode")
    plain = run_calibrate(monkeypatch, batch_sizes=(1, 2), sampling=[S])
    off = run_calibrate(monkeypatch, batch_sizes=(1, 2), sampling=[S], verify_prompts=0,
                        decode_timer=never)
    assert choice_of(off) == choice_of(plain)
    assert choice_of(off["sampling"][S.label]) == choice_of(plain["sampling"][S.label])
    assert off["chosen_by"] == "model" and "verified" not in off["by_batch_size"]["1"]
    # verified: the model's choice is the one recorded under model_choice
    on = run_calibrate(monkeypatch, batch_sizes=(1, 2), sampling=[S], verify_prompts=2,
                       decode_timer=paced_timer({"chain-1": 0.5}))
    for part, ref in ((on, off), (on["sampling"][S.label], off["sampling"][S.label])):
        assert {B: c["model_choice"] for B, c in part["by_batch_size"].items()} == choice_of(ref)


def test_the_choice_follows_the_measured_order(monkeypatch):
    # chain-1 measured fastest (2x plain) whatever the model expects
    cal = run_calibrate(monkeypatch, sampling=[S], verify_prompts=2,
                        decode_timer=paced_timer({"chain-1": 0.5, "chain": 0.8, "tree": 0.9}))
    for part in (cal, cal["sampling"][S.label]):
        c = part["by_batch_size"]["1"]
        assert (part["best_mode"], part["best_k"], part["tree"]) == ("chain", 1, [[0]])
        assert part["chosen_by"] == c["chosen_by"] == "measured"
        v = c["verified"]
        assert v["chosen"] == "chain-1" and v["reason"] == "highest measured tokens/s"
        assert set(v["candidates"]) >= {"chain-1", "chain-2", "chain-3"}
        for name, x in v["candidates"].items():
            assert x["predicted_speedup"] == pytest.approx(
                c["expected_speedup"]["chain" if name.startswith("chain") else "tree"][
                    name.split("-")[1]])
        assert v["candidates"]["chain-1"]["measured_speedup"] == pytest.approx(2.0)
        assert v["candidates"]["chain-3"]["measured_speedup"] == pytest.approx(1.25)
    json.dumps(cal)
    # a tree measured fastest: tree mode with that tree; best_k is still the fastest chain
    cal = run_calibrate(monkeypatch, verify_prompts=1,
                        decode_timer=paced_timer({"tree": 0.4, "chain-2": 0.6, "chain": 0.7}))
    v = cal["by_batch_size"]["1"]["verified"]
    trees = [n for n in v["candidates"] if n.startswith("tree")]
    assert trees, "the model's tree is a candidate unless it is a chain"
    smallest = min(trees, key=lambda n: v["candidates"][n]["nodes"])
    assert v["chosen"] == smallest  # equally fast trees: the smallest
    assert cal["best_mode"] == "tree" and cal["best_k"] == 2
    assert cal["tree"] == v["candidates"][smallest]["tree"]
    # plain faster than every candidate: off
    cal = run_calibrate(monkeypatch, verify_prompts=1, decode_timer=paced_timer({"plain": 0.5}))
    assert cal["best_mode"] == "off" and "plain" in cal["by_batch_size"]["1"]["verified"]["reason"]


def test_decoding_is_interleaved_with_the_same_seeds(monkeypatch):
    calls: list = []
    run_calibrate(monkeypatch, batch_sizes=(1, 2), sampling=[S], verify_prompts=3,
                  verify_tokens=20, seed=7, decode_timer=paced_timer({}, calls))
    for label in ("greedy", S.label):
        for B, n_batches in ((1, 3), (2, 2)):  # 3 prompts at batch 2: two full batches
            mine = [c for c in calls if c[0] == label and c[2] == B]
            names = {c[1] for c in mine}
            assert "plain" in names and {"chain-1", "chain-2", "chain-3"} <= names
            warm, timed = mine[:len(names)], mine[len(names):]
            assert {c[1] for c in warm} == names and all(c[3] == 16 for c in warm)
            assert len(timed) == n_batches * len(names) and all(c[3] == 20 for c in timed)
            for i in range(n_batches):  # each batch: every candidate once, one seed
                batch = timed[i * len(names):(i + 1) * len(names)]
                assert {c[1] for c in batch} == names and {c[4] for c in batch} == {7 + i}
            assert timed[0][1] != timed[len(names)][1]  # the order rotates


def test_candidates_and_ties():
    grown = [(0,), (1,), (0, 0), (2,), (0, 1), (0, 0, 0), (1, 0), (3,), (0, 2)]
    choice = {"expected_speedup": {
        "chain": {"1": 1.3, "2": 1.4, "3": 1.35},
        "tree": {str(s): v for s, v in zip(range(1, 10),
                                           [1.2, 1.3, 1.5, 1.6, 1.7, 1.8, 1.75, 1.7, 1.6])}}}
    names = [c.name for c in candidates(choice, grown, 3)]
    # the best tree (6 nodes), the best of <= 4 nodes, the best of >= 9 nodes
    assert names == ["chain-1", "chain-2", "chain-3", "tree-6", "tree-4", "tree-9"]
    assert [c.name for c in candidates(choice, grown, 3, extra_trees=0)][3:] == ["tree-6"]
    # tree-1 is (0,) = chain-1: not timed twice
    choice["expected_speedup"]["tree"] = {"1": 2.0}
    assert [c.name for c in candidates(choice, grown, 3)] == ["chain-1", "chain-2", "chain-3"]
    a = Candidate("chain-3", ((0,), (0, 0), (0, 0, 0)), 1.5)
    b = Candidate("tree-5", tuple(Tree(grown[:5]).paths), 1.6)
    assert fastest({"chain-3": 100.0, "tree-5": 101.5}, [a, b]) is a  # within 2%: smaller
    assert fastest({"chain-3": 100.0, "tree-5": 103.0}, [a, b]) is b


def test_a_dynamic_tree_that_decodes_fastest_is_chosen_with_the_best_static_beside_it():
    grown = [(0,), (1,), (0, 0), (2,), (0, 1), (0, 0, 0)]
    choice = {"expected_speedup": {"chain": {"1": 1.3, "2": 1.4, "3": 1.35},
                                   "tree": {"3": 1.5, "5": 1.4}},
              "best_k": 2, "tree": [[0], [1], [0, 0]], "best_mode": "tree"}
    cands = candidates(choice, grown, 3, dynamic=("2x1", "2x2"))
    assert [c.name for c in cands][-2:] == ["dynamic-2x1", "dynamic-2x2"]
    assert cands[-1].size == 10 and cands[-1].predicted is None
    ps = [[1, 2, 3]] * 2
    pace = {"plain": 1.0, "chain": 0.8, "tree-3": 0.7, "dynamic-2x2": 0.5}
    v = Verification(ps, 2, 8, paced_timer(pace), dynamic=("2x1", "2x2"))
    out = v.apply(choice, grown, 3, 1, S)
    assert (out["best_mode"], out["dynamic"], out["static_mode"]) == ("dynamic", "2x2", "tree")
    assert out["tree"] == [list(p) for p in Tree(grown[:3]).paths]  # the best static tree
    assert out["verified"]["chosen"] == "dynamic-2x2"
    assert out["verified"]["candidates"]["dynamic-2x2"]["dynamic"] == "2x2"
    # a static winner: no dynamic fields
    out = Verification(ps, 2, 8, paced_timer({**pace, "dynamic-2x2": 0.9}),
                       dynamic=("2x2",)).apply(choice, grown, 3, 1, S)
    assert out["best_mode"] == "tree" and "dynamic" not in out


def test_verification_prompts_and_batches():
    toks = list(range(1000))
    ps = verification_prompts(toks, 3, 10, n_acceptance=4)
    acceptance_starts = {0, 329, 659, 989}
    assert len(ps) == 3 and all(len(p) == 10 for p in ps)
    assert [p[0] for p in ps] == [164, 494, 825] and not {p[0] for p in ps} & acceptance_starts
    v = Verification(ps, 3, 8, paced_timer({}))
    assert [len(b) for b in v.batches(1)] == [1, 1, 1] and [len(b) for b in v.batches(3)] == [3]
    with pytest.raises(MultitokenError, match="needs 4 held-out prompts.*--verify-prompts"):
        v.batches(2)


def test_cli_writes_the_verification(tmp_path, capsys):
    ck = make_checkpoint(tmp_path)
    assert cli_main(["calibrate", "--checkpoint", str(ck), "--prompts", "2", "--prompt-len",
                     "16", "--gen-len", "16", "--max-nodes", "6", "--reps", "1",
                     "--sampling", "0.8:0.95", "--verify-prompts", "2",
                     "--verify-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "greedy, batch 1: measured (predicted) speedup" in out
    assert f"{S.label}, batch 1: measured (predicted) speedup" in out
    cal = load_calibration(ck)
    assert cal is not None
    for part in (cal, cal["sampling"][S.label]):
        c = part["by_batch_size"]["1"]
        assert part["chosen_by"] == c["chosen_by"] == "measured"
        v = c["verified"]
        assert v["prompts"] == 2 and v["new_tokens"] == 8 and v["plain_tok_s"] > 0
        assert v["chosen"] in v["candidates"]
        assert all(x["measured_speedup"] > 0 and x["predicted_speedup"] > 0
                   for x in v["candidates"].values())
        assert part["tree"] == v["candidates"][v["chosen"]]["tree"]
    assert cli_main(["calibrate", "--checkpoint", str(ck), "--verify-prompts", "-1"]) == 2
    assert cli_main(["calibrate", "--checkpoint", str(ck), "--dynamic", "2x1"]) == 2
    assert "token_conditioned" in capsys.readouterr().err


def test_token_conditioned_calibration_verifies_chains_and_trees_by_decoding():
    """Token-conditioned heads: calibrate times their real draft work, measures reach under
    sampling over the measurement tree (each node's children from the module run on it),
    verifies chains and trees by decoding and stores the fastest; nothing is monkeypatched."""
    model = trained_model("token_conditioned")
    cal = calibrate(model, pattern_tokens(3000, seed=3), n_prompts=4, prompt_len=16,
                    gen_len=40, max_nodes=12, reps=2, sampling=[S], verify_prompts=2,
                    verify_tokens=24, batch_sizes=(1, 2), dynamic=("2x1",))
    trees: set[str] = set()
    for part in (cal, cal["sampling"][S.label]):
        assert part["best_mode"] in ("chain", "tree", "dynamic", "off")
        for c in part["by_batch_size"].values():
            assert c["expected_speedup"]["tree"]
            names = set(c["verified"]["candidates"])
            assert {"chain-1", "chain-2", "chain-3", "dynamic-2x1"} <= names
            trees.update(n for n in names if n.startswith("tree-"))
            assert all(x["measured_speedup"] > 0 for x in c["verified"]["candidates"].values())
        assert set(part["forward_cost"]["1"]["chain_ms"]) == {"1", "2", "3"}
    assert trees, "some branching tree was decoded (a chain-shaped best tree is a chain)"
    assert len(cal["acceptance"]["chain"]) == 3 and cal["acceptance"]["chain"][0] > 0.5
    with pytest.raises(MultitokenError, match="token_conditioned"):
        calibrate(trained_model(), pattern_tokens(3000, seed=3), n_prompts=2, prompt_len=16,
                  gen_len=20, reps=1, verify_prompts=1, dynamic=("2x1",))
    reach = cal["sampling"][S.label]["reach"]
    assert 1 >= reach["0"] >= reach["0,0"] >= reach["0,0,0"] > 0 and reach["1"] > 0
