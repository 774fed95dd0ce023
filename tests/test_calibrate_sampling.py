"""Sampling-aware calibration: the accepted-node record, P(reached) against known distributions,
sibling-closed trees, per-setting calibration used by generate and bench decode."""

from __future__ import annotations

import json

import pytest
import torch

from helpers_decode import (  # noqa: F401 - one_thread is an autouse fixture
    make_checkpoint,
    one_thread,
    pattern_tokens,
    random_model,
    trained_model,
)
from multitoken.bench import decode as bench_decode
from multitoken.cli import main as cli_main
from multitoken.commands import generate as generate_command
from multitoken.decoding.calibrate import (
    calibrate,
    load_calibration,
    save_calibration,
    setting_calibration,
)
from multitoken.decoding.engine import Engine
from multitoken.decoding.generate import generate
from multitoken.decoding.reach import ReachCounter, measure_reach, measurement_tree
from multitoken.decoding.sampling import Sampling, process_logits, residual
from multitoken.decoding.speculate import SpeculativeDecoder
from multitoken.decoding.tree import Tree, grow_tree


def sibling_closed(paths) -> bool:
    """Closed under parents and under earlier siblings."""
    s = {tuple(p) for p in paths}
    return all((len(p) == 1 or p[:-1] in s) and (p[-1] == 0 or p[:-1] + (p[-1] - 1,) in s)
               for p in s)


# ---------------------------------------------------------------------------------------------
# The accepted-node record.


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(1.0), Sampling(0.8, top_p=0.9)])
def test_accepted_node_agrees_with_the_emitted_tokens(sampling):
    model = trained_model()
    tree = Tree(measurement_tree(3))
    t = tree.tensors(torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    dec = SpeculativeDecoder(model, tree, sampling, gen)
    prompts = pattern_tokens(3 * 12, seed=5).view(3, 12)
    cache = dec.engine.new_cache(3, 12 + 20 * (tree.size + 1))
    pos = torch.full((3,), 12)
    seen = set()
    with torch.inference_mode():
        dec.start(cache, prompts, pos - 1)
        for _ in range(20):
            drafts = dec.drafts.tokens.clone()  # [B, N]: node j's token at column j - 1
            out = dec.step(cache, pos, int(pos.max()) + tree.size + 1)
            assert out.node is not None
            for b in range(3):
                j = int(out.node[b])
                depth = int(t["depth"][j])
                assert int(out.n[b]) == depth
                path = t["path_nodes"][j][:depth]  # the nodes of j's path, by depth
                assert out.tokens[b, :depth].tolist() == drafts[b, path - 1].tolist()
                assert [tree.paths[int(i) - 1] for i in path] == [
                    tree.paths[j - 1][:d] for d in range(1, depth + 1)]
                seen.add(tree.paths[j - 1] if j else ())
            pos = pos + out.n + 1
    assert any(len(p) >= 2 for p in seen)  # not vacuous: deep nodes were accepted
    if not sampling.greedy:
        assert any(p and max(p) > 0 for p in seen)  # and later draws


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(0.8, top_p=0.95)])
def test_reach_counts_agree_with_the_acceptance_stats(sampling):
    """On a chain, steps reaching depth d = drafts at depth d accepted, as generate counts."""
    model = trained_model()
    tree = Tree.chain(3)
    counter = ReachCounter(tree)
    prompts = pattern_tokens(4 * 10, seed=2).view(4, 10).tolist()
    res = generate(model, prompts, 40, temperature=sampling.temperature, top_p=sampling.top_p,
                   speculative="chain", num_drafts=3, generator=torch.Generator().manual_seed(1),
                   on_step=counter)
    st = res.stats
    assert counter.steps == st.sequence_forwards
    reach = counter.reach()
    for d, acc in enumerate(st.draft_accepted):
        assert reach[(0,) * (d + 1)] * counter.steps == pytest.approx(acc)
    assert reach[(0,)] > 0.3


def test_plain_steps_have_no_node():
    counter = ReachCounter(Tree.chain(1))
    with pytest.raises(Exception, match="speculative"):
        generate(trained_model(), [1, 2, 3], 4, on_step=counter)


# ---------------------------------------------------------------------------------------------
# P(reached) against distributions known in closed form.


@pytest.mark.parametrize("sampling", [Sampling(1.0), Sampling(0.9, top_k=8)])
def test_reach_matches_known_distributions(monkeypatch, sampling):
    """Head 1's logits are L1 and every draft head's L2 at every position, so p and q are
    known: P(first child of the root reached) = sum min(p, q) = a, P((0, 0)) = a^2 (the same p
    and q one level down), and P(second child) by enumerating the first draw."""
    V = 37
    g = torch.Generator().manual_seed(3)
    L1 = torch.randn(V, generator=g) * 2
    L2 = L1 + torch.randn(V, generator=g) * 1.2
    monkeypatch.setattr(Engine, "logits", lambda self, h: L1.expand(*h.shape[:-1], V).clone())
    monkeypatch.setattr(Engine, "draft_logits",
                        lambda self, h: L2.expand(*h.shape[:-1], V).clone())
    p, q = process_logits(L1, sampling).double(), process_logits(L2, sampling).double()
    a = float(torch.minimum(p, q).sum())
    r2 = residual(p, q)
    second = 0.0
    for x1 in range(V):
        if q[x1] == 0:
            continue
        q1 = q.clone()
        q1[x1] = 0
        if q1.sum() == 0:
            continue
        q1 /= q1.sum()
        reject = 1 - min(1.0, float(p[x1] / q[x1]))
        second += float(q[x1]) * reject * float(torch.minimum(r2, q1).sum())
    model = random_model(max_seq_len=256)
    tree = Tree(measurement_tree(3))
    prompts = [[1, 2, 3, 4]] * 32
    reach, steps = measure_reach(model, prompts, 240, sampling, tree,
                                 torch.Generator().manual_seed(0))
    assert steps > 2000
    assert 0.3 < a < 0.9 and second > 0.02  # a case that tells things apart
    # p and q are the same at every step, so steps are independent: a share of `steps`
    # Bernoulli draws, within 4.5 standard errors
    for node, want in [((0,), a), ((0, 0), a * a), ((1,), second)]:
        tol = 4.5 * (want * (1 - want) / steps) ** 0.5
        assert reach[node] == pytest.approx(want, abs=tol), node
    assert reach[(0,)] >= reach[(0, 0)] >= reach[(0, 0, 0)]  # a node is reached through its parent


# ---------------------------------------------------------------------------------------------
# The trees chosen.


def test_grow_tree_keeps_earlier_siblings_first():
    # later siblings likelier than earlier ones: the tree must still hold the earlier ones
    def prob(p):
        out = 1.0
        for r in p:
            out *= [0.1, 0.3, 0.5][r]
        return out

    grown = grow_tree(prob, 20, 3, 3)
    for i in range(1, len(grown) + 1):
        assert sibling_closed(grown[:i]), grown[:i]
    assert grown[:3] == [(0,), (1,), (2,)]  # (2,) only after (0,) and (1,)


def test_measurement_tree_shape():
    assert len(measurement_tree(3)) == 4 + 12 + 24
    assert len(measurement_tree(1)) == 4 and len(measurement_tree(2)) == 16
    big = measurement_tree(6)
    assert len(big) <= 64 and max(len(p) for p in big) == 6 and sibling_closed(big)


def test_calibrate_per_setting():
    model = trained_model()
    s = Sampling(0.8, top_p=0.95)
    cal = calibrate(model, pattern_tokens(3000, seed=3), n_prompts=4, prompt_len=16,
                    gen_len=40, max_nodes=12, reps=1, batch_sizes=(1, 2),
                    sampling=[s, Sampling(), s])
    assert list(cal["sampling"]) == ["T=0.8 top-p=0.95"]  # greedy is the base; no duplicates
    part = cal["sampling"]["T=0.8 top-p=0.95"]
    assert part["best_mode"] in ("off", "chain", "tree") and 1 <= part["best_k"] <= 3
    assert set(part["by_batch_size"]) == {"1", "2"}
    for c in part["by_batch_size"].values():
        assert sibling_closed(c["tree"]) and Tree(c["tree"]).depth <= 3
    assert sibling_closed(part["tree_order"]) and len(part["tree_order"]) <= 12
    e = part["expected_tokens_per_forward"]
    reach = part["reach"]
    assert len(reach) == 40 and part["measured_on"]["steps"] > 0
    assert e["chain"]["3"] == pytest.approx(1 + reach["0"] + reach["0,0"] + reach["0,0,0"])
    assert e["tree"] == pytest.approx(1 + sum(reach[",".join(map(str, p))]
                                              for p in part["tree"]))
    assert 1.0 < e["chain"]["1"] <= e["chain"]["3"] <= 4.0
    json.dumps(cal)


# ---------------------------------------------------------------------------------------------
# Stored, loaded and used.

GREEDY_TREE = [[0], [0, 0], [0, 0, 0], [1]]
SAMPLED_TREE = [[0], [0, 0], [1], [2]]


def _calibration(with_sampling: bool = True) -> dict:
    cal = {"version": 1, "best_mode": "tree", "best_k": 3, "tree": GREEDY_TREE,
           "by_batch_size": {"1": {"best_k": 3, "tree": GREEDY_TREE, "best_mode": "tree"}},
           "tree_order": [[0], [0, 0], [1], [0, 0, 0]]}
    if with_sampling:
        part = {"best_mode": "tree", "best_k": 2, "tree": SAMPLED_TREE,
                "by_batch_size": {"1": {"best_k": 2, "tree": SAMPLED_TREE, "best_mode": "tree"}},
                "tree_order": [[0], [1], [0, 0], [2]]}
        cal["sampling"] = {"T=0.8 top-p=0.95": part,
                           "T=1": {**part, "best_mode": "chain", "best_k": 1}}
    return cal


def test_old_calibration_files_still_load(tmp_path):
    ck = make_checkpoint(tmp_path)
    save_calibration(ck, _calibration(with_sampling=False))
    cal = load_calibration(ck)
    assert cal is not None and cal["tree"] == GREEDY_TREE
    assert setting_calibration(cal, Sampling(0.8, top_p=0.95)) == (cal, "calibrated for greedy")
    assert setting_calibration(None, Sampling()) == (None, "default")


def test_setting_calibration_and_damaged_settings(tmp_path, capsys):
    ck = make_checkpoint(tmp_path)
    save_calibration(ck, _calibration())
    cal = load_calibration(ck)
    part, source = setting_calibration(cal, Sampling(0.8, top_p=0.95))
    assert part["tree"] == SAMPLED_TREE and source == "calibrated for T=0.8 top-p=0.95"
    assert setting_calibration(cal, Sampling(0.5))[0] is cal  # not calibrated: greedy's
    assert setting_calibration(cal, Sampling())[0] is cal
    bad = _calibration()
    bad["sampling"]["T=1"]["tree"] = [[-1]]
    save_calibration(ck, bad)
    assert load_calibration(ck) is None and "ignoring" in capsys.readouterr().err


@pytest.fixture
def calibrated(tmp_path):
    ck = make_checkpoint(tmp_path)
    save_calibration(ck, _calibration())
    return ck


def _capture(monkeypatch, module) -> list[dict]:
    calls: list[dict] = []
    real = module.generate

    def spy(*args, **kw):
        calls.append(kw)
        return real(*args, **kw)

    monkeypatch.setattr(module, "generate", spy)
    return calls


@pytest.mark.parametrize("argv, mode, tree, num_drafts", [
    (["--temperature", "0.8", "--top-p", "0.95", "--speculative", "tree"], "tree",
     SAMPLED_TREE, None),
    (["--temperature", "0.8", "--top-p", "0.95"], "tree", SAMPLED_TREE, None),  # auto
    (["--temperature", "1.0"], "chain", None, 1),  # auto: that setting's choice
    (["--temperature", "0.5", "--speculative", "tree"], "tree", GREEDY_TREE, None),
    (["--speculative", "tree"], "tree", GREEDY_TREE, None),
])
def test_generate_uses_the_settings_calibration(calibrated, monkeypatch, capsys, argv, mode,
                                                tree, num_drafts):
    calls = _capture(monkeypatch, generate_command)
    assert generate_command.main(["--checkpoint", str(calibrated), "--prompt", "def ",
                                  "--max-new-tokens", "6", "--no-stop", "--seed", "1",
                                  *argv]) == 0
    [kw] = calls
    assert kw["speculative"] == mode and kw["tree"] == tree
    assert kw["num_drafts"] == num_drafts
    out = capsys.readouterr().out
    if mode == "tree":
        source = "T=0.8 top-p=0.95" if tree == SAMPLED_TREE else "greedy"
        assert f"calibrated for {source}]" in out


def test_bench_runs_each_setting_with_its_tree(calibrated, monkeypatch, capsys):
    calls = _capture(monkeypatch, bench_decode)
    argv = ["--checkpoint", str(calibrated), "--prompts", "2", "--prompt-len", "16",
            "--new-tokens", "8", "--reps", "1", "--heads", "1",
            "--sampling", "greedy,0.8:0.95,0.5"]
    assert bench_decode.main(argv) == 0
    out = capsys.readouterr().out
    runs = json.loads(out.strip().splitlines()[-1])["runs"]
    want = [(GREEDY_TREE, "calibrated for greedy"),
            (SAMPLED_TREE, "calibrated for T=0.8 top-p=0.95"),
            (GREEDY_TREE, "calibrated for greedy")]
    for run, (tree, source) in zip(runs, want):
        assert run["tree"]["paths"] == sorted(tree) and run["tree"]["source"] == source
        assert run["modes"]["tree"]["heads"] == Tree(tree).depth + 1
        assert f"tree: {Tree(tree).size} nodes, depth {Tree(tree).depth} ({source})" in out
    passed = {(kw["temperature"], tuple(map(tuple, kw["tree"]))) for kw in calls
              if kw.get("speculative") == "tree"}
    assert passed == {(0.0, tuple(Tree(GREEDY_TREE).paths)),
                      (0.8, tuple(Tree(SAMPLED_TREE).paths)),
                      (0.5, tuple(Tree(GREEDY_TREE).paths))}
    # --tree-size: the first nodes of the setting's own growth order
    assert bench_decode.main([*argv[:-1], "0.8:0.95", "--tree-size", "3"]) == 0
    run = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"][0]
    assert run["tree"]["paths"] == [[0], [0, 0], [1]]
    assert run["tree"]["source"].startswith("first 3 of the growth order calibrated for T=0.8")
    # --no-tree: no tree in the JSON
    assert bench_decode.main([*argv, "--no-tree"]) == 0
    runs = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"]
    assert all(r["tree"] is None and "tree" not in r["modes"] for r in runs)


def test_cli_calibrate_with_sampling(tmp_path, capsys):
    ck = make_checkpoint(tmp_path)
    assert cli_main(["calibrate", "--checkpoint", str(ck), "--prompts", "2", "--prompt-len",
                     "16", "--gen-len", "16", "--max-nodes", "6", "--reps", "1",
                     "--sampling", "0.8:0.95"]) == 0
    out = capsys.readouterr().out
    assert "T=0.8 top-p=0.95, batch 1:" in out and "greedy, batch 1:" in out
    cal = load_calibration(ck)
    assert cal is not None and set(cal["sampling"]) == {"T=0.8 top-p=0.95"}


@pytest.mark.parametrize("bad", ["0.8:2", "hot", "0.8:0.9:0", "-1", "greedy:0.9"])
def test_bad_sampling_is_one_error_line(tmp_path, capsys, bad):
    ck = make_checkpoint(tmp_path)
    assert cli_main(["calibrate", "--checkpoint", str(ck), "--sampling", bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--sampling" in err[0], err
    assert load_calibration(ck) is None
