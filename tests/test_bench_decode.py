"""`bench decode`: the distinct-n-gram ratio, the JSON's fields, sampling settings, baselines."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers_decode import (  # noqa: F401 - one_thread is an autouse fixture
    make_checkpoint,
    one_thread,
    random_model,
)
from multitoken.bench import decode as bench_decode
from multitoken.bench import hf_baselines
from multitoken.bench.common import distinct_ngram_ratio
from multitoken.checkpoint import load_checkpoint, save_checkpoint
from multitoken.cli import main
from multitoken.config import DataConfig, from_dict
from multitoken.data import split_corpus
from multitoken.decoding.calibrate import validation_tokens
from multitoken.decoding.generate import generate
from multitoken.tokenizer import ByteTokenizer

TINY = ["--prompts", "2", "--prompt-len", "16", "--new-tokens", "14", "--reps", "1"]


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("bench_decode"))


def _bench(capsys, *argv: str) -> tuple[dict, str]:
    assert bench_decode.main([*argv]) == 0
    out = capsys.readouterr().out
    return json.loads(out.strip().splitlines()[-1]), out


# ---------------------------------------------------------------------------------------------
# The ratio itself.


def test_distinct_ratio_of_distinct_tokens_is_one():
    assert distinct_ngram_ratio([list(range(20))]) == 1.0
    # n-grams are compared within a sequence only: two equal sequences are no repetition
    assert distinct_ngram_ratio([list(range(10)), list(range(10))]) == 1.0


def test_distinct_ratio_of_a_loop():
    loop = [4, 9, 2] * 10  # period 3, 30 tokens: 23 8-grams, 3 different ones
    assert distinct_ngram_ratio([loop]) == pytest.approx(3 / 23)
    assert distinct_ngram_ratio([[7] * 20]) == pytest.approx(1 / 13)
    # pooled as a ratio of sums: (13 + 3) distinct of (13 + 23)
    assert distinct_ngram_ratio([list(range(20)), loop]) == pytest.approx(16 / 36)
    assert distinct_ngram_ratio([[1, 1, 2]], n=1) == pytest.approx(2 / 3)
    assert distinct_ngram_ratio([np.array(loop)]) == pytest.approx(3 / 23)  # any int sequence


def test_distinct_ratio_of_short_sequences():
    assert distinct_ngram_ratio([[1, 2, 3, 4, 5, 6, 7]]) is None  # no 8-gram: undefined
    assert distinct_ngram_ratio([]) is None
    assert distinct_ngram_ratio([list(range(8))]) == 1.0  # exactly one 8-gram
    # a short sequence adds nothing to either sum
    assert distinct_ngram_ratio([[5] * 7, [3] * 9]) == pytest.approx(1 / 2)
    with pytest.raises(ValueError):
        distinct_ngram_ratio([[1, 2]], n=0)


def test_prompts_are_followed_by_their_real_continuations():
    toks = np.arange(1000)
    prompts, conts = bench_decode.prompts_and_continuations(toks, 3, 10, 5)
    assert len(prompts) == len(conts) == 3
    for p, c in zip(prompts, conts):
        assert len(p) == 10 and c == list(range(p[-1] + 1, p[-1] + 6))
    with pytest.raises(bench_decode.MultitokenError, match="too few"):
        bench_decode.prompts_and_continuations(np.arange(15), 1, 10, 5)


# ---------------------------------------------------------------------------------------------
# The benchmark's output.


def test_json_carries_distinct_8_for_every_mode_and_the_reference(ck, capsys):
    res, out = _bench(capsys, "--checkpoint", str(ck), *TINY, "--heads", "1,3")
    assert res["exact"] is True and res["transformers"] is None and res["dtype"] == "float32"
    assert (res["prompts"], res["prompt_len"], res["new_tokens"]) == (2, 16, 14)
    [run] = res["runs"]
    assert run["label"] == "greedy" and run["exact"] is True
    assert run["exact_check"] == "token-for-token" and "baselines" not in run
    assert set(run["modes"]) == {"plain", "chain-1", "chain-3", "tree"}
    # recompute both figures independently: the same prompts, decoded and read again here
    model, tok = load_checkpoint(ck)
    prompts, conts = bench_decode.prompts_and_continuations(validation_tokens(ck, tok), 2, 16, 14)
    assert res["reference"]["distinct_8"] == pytest.approx(distinct_ngram_ratio(conts))
    plain = generate(model, prompts, 14).tokens
    for name, r in run["modes"].items():
        assert r["distinct_8"] == pytest.approx(distinct_ngram_ratio(plain)), name  # exact
        assert r["exact"] is (None if name == "plain" else True)
        assert {"heads", "tokens_per_forward", "tok_s", "speedup", "forwards"} <= set(r)
    assert run["modes"]["plain"]["speedup"] == 1.0
    assert "distinct-8" in out and "real continuations" in out


def test_json_carries_the_model_dtype(ck, capsys):
    res, _ = _bench(capsys, "--checkpoint", str(ck), *TINY, "--heads", "1", "--no-tree",
                    "--dtype", "bfloat16")
    assert res["dtype"] == "bfloat16" and res["exact"] is True


def test_acceptance_is_pooled_over_prompts_and_step_cost_explains_speedup(ck, capsys):
    res, out = _bench(capsys, "--checkpoint", str(ck), *TINY, "--heads", "3", "--no-tree")
    modes = res["runs"][0]["modes"]
    model, tok = load_checkpoint(ck)
    prompts, _ = bench_decode.prompts_and_continuations(validation_tokens(ck, tok), 2, 16, 14)
    # greedy is deterministic: redo each prompt (batch 1) and pool the counts by hand
    tried, took = [0, 0, 0], [0, 0, 0]
    for p in prompts:
        st = generate(model, [p], 14, speculative="chain", num_drafts=3).stats
        for d, (t, a) in enumerate(zip(st.draft_attempts, st.draft_accepted)):
            tried[d] += t
            took[d] += a
        assert [a / t for a, t in zip(st.draft_accepted, st.draft_attempts)] == st.acceptance
    want = [a / t for a, t in zip(took, tried) if t]
    assert modes["chain-3"]["acceptance"] == pytest.approx(want)
    assert modes["plain"]["acceptance"] == [] and modes["plain"]["step_cost"] == 1.0
    c = modes["chain-3"]
    assert c["step_cost"] > 0
    # speedup = (tokens / s) / plain's = tokens/forward / step cost, up to the prefill and the
    # first token (which no decode forward appends), both a large share of 14 new tokens
    assert c["speedup"] == pytest.approx(c["tokens_per_forward"] / c["step_cost"], rel=0.35)
    assert "acceptance by depth" in out and "step cost" in out


def test_count_lists_add_elementwise():
    assert bench_decode._add([], [3, 1]) == [3, 1]
    assert bench_decode._add([1, 2, 3], [1]) == [2, 2, 3]


def test_sampling_options_reach_generate(ck, capsys, monkeypatch):
    calls = []

    def spy(model, prompts, n, **kw):
        calls.append(kw)
        return generate(model, prompts, n, **kw)

    monkeypatch.setattr(bench_decode, "generate", spy)
    res, out = _bench(capsys, "--checkpoint", str(ck), *TINY, "--heads", "1", "--no-tree",
                      "--temperature", "1.0", "--top-k", "5", "--top-p", "0.9", "--seed", "3")
    [run] = res["runs"]
    assert run["sampling"] == {"temperature": 1.0, "top_p": 0.9, "top_k": 5, "seed": 3,
                               "greedy": False}
    assert run["exact"] is None and "chi-square" in run["exact_check"]
    assert res["exact"] is None  # no token-for-token comparison was made
    assert all(r["distinct_8"] is not None for r in run["modes"].values())
    assert {(c["temperature"], c["top_k"], c["top_p"]) for c in calls} == {(1.0, 5, 0.9)}
    assert all(c["generator"] is not None for c in calls)
    assert {c["generator"].initial_seed() for c in calls} == {3, 4}  # seed + batch index
    assert "chi-square (tests) *" in out
    assert "* sampling: outputs are not compared token by token" in out


def test_several_settings_in_one_invocation(ck, capsys):
    res, out = _bench(capsys, "--checkpoint", str(ck), *TINY, "--heads", "2", "--no-tree",
                      "--sampling", "greedy,0.8:0.95,1.0::7")
    assert [r["label"] for r in res["runs"]] == ["greedy", "T=0.8 top-p=0.95", "T=1 top-k=7"]
    assert [r["exact"] for r in res["runs"]] == [True, None, None] and res["exact"] is True
    assert res["runs"][2]["sampling"]["top_k"] == 7
    assert res["runs"][1]["sampling"]["top_p"] == 0.95
    for run in res["runs"]:
        assert set(run["modes"]) == {"plain", "chain-2"}
        assert run["modes"]["plain"]["speedup"] == 1.0  # each run against its own plain
    assert out.count("chi-square (tests) *") == 2


def test_sampling_list_parses_settings():
    got = bench_decode.sampling_list("greedy, 0.7:0.9:40,1.5::3,0.5:")
    assert [(s.sampling.temperature, s.sampling.top_p, s.sampling.top_k) for s in got] == [
        (0.0, None, None), (0.7, 0.9, 40), (1.5, None, 3), (0.5, None, None)]


# ---------------------------------------------------------------------------------------------
# Baselines.


def test_baselines_match_our_plain_greedy(ck, capsys, tmp_path):
    pytest.importorskip("transformers")
    png = tmp_path / "b.png"
    res, out = _bench(capsys, "--checkpoint", str(ck), *TINY, "--heads", "1", "--no-tree",
                      "--batch-size", "2", "--baselines", "--prompt-lookup-tokens", "3",
                      "--sampling", "greedy,1.0", "--out-png", str(png))
    greedy, sampled = res["runs"]
    hf = greedy["baselines"]
    assert set(hf) == {"hf-greedy", "hf-prompt-lookup"} and "baselines" not in sampled
    assert hf["hf-greedy"]["exact"] is True  # token for token our plain greedy
    assert hf["hf-greedy"]["tokens_per_forward"] == 1.0 and hf["hf-greedy"]["batch_size"] == 2
    assert hf["hf-greedy"]["forwards"] == 14  # 14 tokens for the single batch of 2
    lookup = hf["hf-prompt-lookup"]
    assert lookup["batch_size"] == 1 and lookup["prompt_lookup_num_tokens"] == 3
    assert lookup["tokens_per_forward"] >= 1.0 and lookup["exact"] in (True, False)
    assert all(v["distinct_8"] is not None and v["tok_s"] > 0 for v in hf.values())
    assert isinstance(res["transformers"], str)
    assert "hf-prompt-lookup (batch 1)" in out and "refuses batches" in out
    assert png.stat().st_size > 1000


def _argv(ck, *extra: str) -> list[str]:
    return ["bench", "decode", "--checkpoint", str(ck), *TINY, "--no-tree", *extra]


def _one_error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_baselines_without_transformers_is_one_error_line(ck, capsys, monkeypatch):
    monkeypatch.setattr(hf_baselines, "transformers", None)
    assert "pip install 'multitoken[hf]'" in _one_error_line(capsys, _argv(ck, "--baselines"))


def test_baselines_refuse_a_model_without_a_transformer_head_1(tmp_path, capsys):
    pytest.importorskip("transformers")
    model = random_model("linear", vocab_size=260, max_seq_len=128, n_layers=3)
    ck = make_checkpoint(tmp_path)  # corpus and run config; the weights are replaced
    save_checkpoint(tmp_path / "linear", model, ByteTokenizer(),
                    run_config=json.loads((ck / "config.json").read_text())["run"], step=1)
    line = _one_error_line(capsys, _argv(tmp_path / "linear", "--baselines"))
    assert "--baselines" in line and "linear heads" in line


def test_baselines_need_a_greedy_setting(ck, capsys):
    line = _one_error_line(capsys, _argv(ck, "--baselines", "--sampling", "0.8:0.95"))
    assert "greedy" in line


def test_prompts_from_unseen_files_and_training_files_refused(ck, capsys, tmp_path):
    unseen = tmp_path / "unseen"
    unseen.mkdir()
    (unseen / "a.py").write_text("".join(f"def f{i}(x):\n    return x * {i} + 1\n"
                                         for i in range(40)))
    res, out = _bench(capsys, "--checkpoint", str(ck), *TINY, "--no-tree", "--prompt-files",
                      str(unseen))
    assert res["prompt_source"] == f"unseen text ({unseen})"
    assert f"from unseen text ({unseen})" in out
    # a file the run trained on is refused, with one error line
    run = json.loads((ck / "config.json").read_text())["run"]
    trained = split_corpus(from_dict(DataConfig, run["data"])).train[0]
    line = _one_error_line(capsys, _argv(ck, "--prompt-files", str(trained)))
    assert "training split" in line


def test_token_conditioned_model_runs_chains_and_trees(tmp_path, capsys):
    ck = make_checkpoint(tmp_path)
    model = random_model("token_conditioned", vocab_size=260, max_seq_len=128)
    save_checkpoint(tmp_path / "tc", model, ByteTokenizer(),
                    run_config=json.loads((ck / "config.json").read_text())["run"], step=1)
    res, _ = _bench(capsys, "--checkpoint", str(tmp_path / "tc"), *TINY,
                    "--sampling", "greedy,0.8:0.95", "--dynamic", "2x1")
    for run in res["runs"]:
        assert set(run["modes"]) == {"plain", "chain-1", "chain-2", "chain-3", "tree",
                                     "dynamic-2x1"}
        assert run["tree"]["size"] > run["tree"]["depth"]  # the default tree branches
    assert res["exact"] is True  # greedy chains, tree and dynamic tree token for token
    assert "7" in res["forward_cost"]  # the dynamic tree's width: 2 + 2 + 2 nodes + the root
    argv = ["generate", "--prompt", "def f(", "--max-new-tokens", "12", "--speculative",
            "dynamic", "--dynamic", "2x1"]
    assert main([*argv, "--checkpoint", str(tmp_path / "tc")]) == 0
    assert "[dynamic tree 2x1, 6 nodes, depth 3]" in capsys.readouterr().out
    assert main([*argv, "--checkpoint", str(ck)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "token_conditioned" in err[0]
    line = _one_error_line(capsys, _argv(ck, "--dynamic", "2x1"))  # parallel heads: refused
    assert "token_conditioned" in line
