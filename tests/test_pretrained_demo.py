"""`multitoken experiment pretrained --quick`: issue 12's demonstration end to end (n=1 model ->
Hugging Face export -> convert back -> add-heads -> heads trained three ways -> measured), its
compute budget, Ctrl-C and continuing a stopped run, and bad input.

One quick run (tiny models, about 15 s) is shared by the tests of this module; it is first
stopped by Ctrl-C during its first training stage and then continued to the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from multitoken import cliargs, flops, generate
from multitoken.checkpoint import load_checkpoint, read_config, save_checkpoint
from multitoken.cli import main
from multitoken.config import ModelConfig, RunConfig, TrainConfig
from multitoken.experiments import pretrained, pretrained_plan
from multitoken.experiments.pretrained_report import SETTINGS as DECODE_SETTINGS
from multitoken.model import MultiTokenModel
from multitoken.tokenizer import ByteTokenizer

STAGES = ["pretrain", "export", "convert", "add-heads", "heads", "distill", "finetune",
          "measure-base", "measure-heads", "measure-distill", "measure-finetune",
          "measure-reference"]
VARIANTS = ["base", "heads", "distill", "finetune", "reference"]
SETTINGS = [s.label for s in DECODE_SETTINGS]  # T=0.8 / top-p 0.95, T=1, greedy


def run_cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["experiment", "pretrained", *args])
    return rc, out.getvalue(), err.getvalue()


def tiny_reference(path: Path, n_future: int = 4) -> RunConfig:
    """A random byte-level model of the quick scale's n=4 shape, saved with a run config."""
    cfg = ModelConfig(vocab_size=260, dim=32, n_layers=2 + n_future, n_heads=2,
                      n_future=n_future, max_seq_len=64)
    run = RunConfig(model=cfg, train=TrainConfig(steps=10, batch_size=4, seq_len=64))
    torch.manual_seed(0)
    save_checkpoint(path, MultiTokenModel(cfg).eval(), ByteTokenizer(),
                    run_config=dataclasses.asdict(run), step=10)
    return run


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("pretrained")
    ref_run = tiny_reference(root / "ref")
    out = root / "out"
    args = ["--quick", "--no-progress", "--out", str(out), "--reference", str(root / "ref")]
    stopped = []
    with pytest.MonkeyPatch.context() as mp:
        # Ctrl-C after step 2 of the pretraining; run again, Ctrl-C after step 2 of the next
        # training stage (the pretraining continues from step 2, so it never sees step 2 again)
        mp.setenv("MULTITOKEN_TEST_SIGNAL", "2:SIGINT")
        for run in ("n1", "heads"):
            rc, stdout, err = run_cli(args)
            stopped.append({"rc": rc, "err": err, "step": read_config(out / run).get("step"),
                            "stages": sorted(p.stem for p in (out / "stages").iterdir()),
                            "results": (out / "results.json").exists()})
    rc, stdout, err = run_cli(args)
    assert rc == 0, err
    return {"out": out, "stdout": stdout, "stopped": stopped, "ref_run": ref_run,
            "summary": json.loads((out / "results.json").read_text())}


def rows(demo: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["variant"]: r for r in demo["summary"]["results"]}


def test_ctrl_c_saves_the_training_stage_and_the_same_command_continues(demo):
    first, second = demo["stopped"]
    for s in (first, second):
        assert s["rc"] == 130 and "run the same command again" in s["err"]
        assert s["step"] == 2 and not s["results"]
    assert first["stages"] == []
    assert second["stages"] == ["add-heads", "convert", "export", "pretrain"]
    # each continued from step 2, not started over: the trainer logs the first step it runs
    # (1, then 3 after resuming at 2), and metrics.jsonl holds each logged step once
    for run, last in (("n1", 150), ("heads", demo["summary"]["budget"]["stages"][1]["steps"])):
        metrics = (demo["out"] / run / "metrics.jsonl").read_text().splitlines()
        steps = [x["step"] for x in map(json.loads, metrics) if x["kind"] == "train"]
        assert steps[:2] == [1, 3] and steps == sorted(set(steps)) and steps[-1] == last, run


def test_every_stage_leaves_its_output(demo):
    out = demo["out"]
    assert sorted(p.stem for p in (out / "stages").iterdir()) == sorted(STAGES)
    hf = out / "n1-hf"
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (hf / name).is_file(), name
    assert not (hf / "mtp_heads.safetensors").exists()  # an n=1 model exports no extra heads
    assert json.loads((hf / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    # converted from the Hugging Face directory, not from the training run
    assert read_config(out / "converted")["converted_from"] == str(hf)
    init = read_config(out / "n4-init")
    assert init["source"] == str(out / "converted") and init["model"]["n_future"] == 4
    for run in ("n1", "heads", "finetune", "distill"):
        assert (out / run / "checkpoint" / "model.safetensors").is_file(), run
    assert read_config(out / "heads")["run"]["train"]["trainable"] == "draft_heads"
    assert read_config(out / "finetune")["run"]["train"]["trainable"] == "all"
    assert read_config(out / "distill")["distill"]["temperature"] == 0.8
    assert (out / "distill" / "distill.json").is_file()
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert "## Compute" in md and "## Decoding" in md and md.count("|") > 50
    assert demo["summary"]["hf_roundtrip_identical"] is True


def test_results_have_the_promised_fields(demo):
    summary = demo["summary"]
    last = json.loads(demo["stdout"].strip().splitlines()[-1])
    assert last == {"experiment": "pretrained", "results": summary["results"]}
    assert [r["variant"] for r in summary["results"]] == VARIANTS
    for r in summary["results"]:
        assert {"checkpoint", "n_future", "params", "head1_bits_per_byte", "head_bits_per_byte",
                "train_flops", "train_flops_ratio", "train_seconds", "plain_equals_base",
                "runs"} <= set(r)
        assert len(r["head_bits_per_byte"]) == r["n_future"]
        assert r["head1_bits_per_byte"] == r["head_bits_per_byte"][0] > 0
        assert list(r["runs"]) == SETTINGS
        for run in r["runs"].values():
            assert run["plain_tok_s"] > 0 and 0 < run["plain_distinct_8"] <= 1
            expected = [f"chain-{k}" for k in range(1, r["n_future"])]
            assert list(run["modes"]) == expected
            for m in run["modes"].values():
                assert 1.0 <= m["tokens_per_forward"] <= m["heads"] and m["speedup"] > 0
                # greedy speculation is exact; sampling is not compared draw by draw
                assert m["exact"] is (True if run["greedy"] else None)
            assert (run["best"] is None) == (r["n_future"] == 1)
    assert [(s.sampling.temperature, s.sampling.top_p) for s in DECODE_SETTINGS] == \
        [(0.8, 0.95), (1.0, None), (0.0, None)]
    assert [r["greedy"] for r in summary["results"][0]["runs"].values()] == [False, False, True]
    assert summary["decode"]["batch_size"] == 1 and summary["scale"] == "quick"
    assert "--reference" in summary["command"]


def test_equal_compute_budget(demo):
    b = demo["summary"]["budget"]
    assert b["total"] == pytest.approx(b["base"] + b["left"])
    stages = {s["stage"]: s for s in b["stages"]}
    assert stages["pretrain"]["flops"] == b["base"]
    by = rows(demo)
    for name in ("heads", "distill", "finetune"):
        s = stages[name]
        assert by[name]["train_flops"] == pytest.approx(b["base"] + s["flops"])
        # within the budget, and short of it by less than one more step
        gen = demo["summary"]["stages"][name].get("generation_flops", 0.0)
        per_step = (s["flops"] - gen) / s["steps"]
        assert 0 <= b["left"] - s["flops"] < per_step
    # the reference's compute comes from its own saved run config
    assert by["reference"]["train_flops"] == pytest.approx(flops.train_flops(demo["ref_run"]))
    # head-1 bits per byte of the base = its training run's last validation loss, in bits
    metrics = (demo["out"] / "n1" / "metrics.jsonl").read_text().splitlines()
    val = [json.loads(x) for x in metrics if '"val"' in x][-1]
    assert by["base"]["head1_bits_per_byte"] == pytest.approx(val["head_loss"][0] / math.log(2))


def test_heads_only_and_distilled_decode_as_the_base_model(demo):
    by = rows(demo)
    for name in ("heads", "distill"):
        assert by[name]["plain_equals_base"] == dict.fromkeys(SETTINGS, True), name
        assert by[name]["head1_bits_per_byte"] == by["base"]["head1_bits_per_byte"]
    assert by["base"]["plain_equals_base"] is None and by["reference"]["plain_equals_base"] is None
    # Independently of the pipeline's own check: weights and decoding, from the checkpoints.
    out = demo["out"]
    base, _ = load_checkpoint(out / "n1")
    prompt = [list(b"def add(a, b):\n    ")]
    want = generate(base, prompt, 24).tokens
    sampled = generate(base, prompt, 24, temperature=0.8, top_p=0.95,
                       generator=torch.Generator().manual_seed(3)).tokens
    ref = base.state_dict()
    for name in ("heads", "distill", "finetune"):
        model, _ = load_checkpoint(out / name)
        sd = model.state_dict()
        same = all(torch.equal(sd[k], v) for k, v in ref.items())
        assert same == (name != "finetune"), name  # trunk, head 1, norm, unembedding
        if name != "finetune":
            assert not torch.equal(sd["heads.1.attention.wq.weight"],
                                   sd["heads.0.attention.wq.weight"])  # the new heads trained
            assert generate(model, prompt, 24).tokens == want
            assert generate(model, prompt, 24, speculative="chain").tokens == want
            assert generate(model, prompt, 24, temperature=0.8, top_p=0.95,
                            generator=torch.Generator().manual_seed(3)).tokens == sampled


@pytest.mark.parametrize("case, message", [
    ("missing", "--reference"),
    ("empty", "is not a checkpoint"),
    ("n1", "needs draft heads"),
    ("bogus", "--bogus"),
    ("file-out", "is a file"),
])
def test_bad_input_is_one_error_line(case: str, message: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--quick", "--out", str(out)]
    if case == "missing":
        args += ["--reference", str(tmp_path / "no-such-dir")]
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        args += ["--reference", str(tmp_path / "empty")]
    elif case == "n1":
        tiny_reference(tmp_path / "n1", n_future=1)
        args += ["--reference", str(tmp_path / "n1")]
    elif case == "bogus":
        args += ["--bogus"]
    else:
        out.write_text("")
    rc, stdout, err = run_cli(args)
    assert rc == 2 and stdout == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert out.is_file() if case == "file-out" else not out.exists()


def test_every_option_has_help() -> None:
    parser = pretrained.build_parser()
    assert isinstance(parser, cliargs.ArgumentParser)
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help text"


def test_full_scale_split_matches_the_recipe_comments(tmp_path: Path) -> None:
    """configs/code-n1.yaml's comments state the budget split; the plan computes it."""
    plan = pretrained_plan.make_plan("full", tmp_path / "out", None)
    b = plan.budget
    assert b["base"] / b["total"] == pytest.approx(0.800, abs=5e-4)
    assert plan.heads.train.steps == 1302 and plan.finetune.train.steps == 600
    assert plan.distill.steps == 426 and plan.distill.temperature == 0.8
    assert plan.heads.train.trainable == "draft_heads" and plan.finetune.train.trainable == "all"
    # after add-heads the model has code-n4's shape: the same decoding cost per forward
    assert dataclasses.asdict(plan.heads.model) == dataclasses.asdict(plan.n4.model)
    assert not (tmp_path / "out").exists()  # planning writes nothing


def test_flop_counts_by_hand() -> None:
    cfg = ModelConfig(vocab_size=10, dim=8, n_layers=3, n_heads=2, n_future=2, ffn_hidden=16,
                      max_seq_len=16)
    layer = 8 * (2 * 8 + 2 * 8) + 3 * 8 * 16  # q, k, v, o + three FFN matrices
    assert flops.layer_params(cfg) == layer
    fwd_layer = 2 * layer + 4 * 2 * 4 * (7 + 1) / 2  # attention over (T + 1) / 2 keys, T = 7
    unembed = 2 * 8 * 10
    forward = 1 * fwd_layer + 2 * (fwd_layer + unembed)  # 1 trunk layer + 2 heads
    assert flops.train_token_flops(cfg, 7, "all") == pytest.approx(3 * forward)
    assert flops.train_token_flops(cfg, 7, "draft_heads") == pytest.approx(
        forward + 2 * fwd_layer + unembed)


def test_a_stopped_run_continues_without_redoing_finished_stages(demo):
    """Last in this module: it reruns the shared run's directory."""
    out = demo["out"]
    before = rows(demo)
    kept = {p: p.stat().st_mtime_ns for p in (
        out / "n1" / "checkpoint" / "model.safetensors", out / "heads" / "checkpoint" /
        "model.safetensors", out / "distill" / "distill.json", out / "stages" / "measure-base.json")}
    # As if it had stopped while measuring: two records and the summary missing.
    for name in ("results.json", "results.md", "results.png", "stages/measure-reference.json",
                 "stages/measure-finetune.json"):
        (out / name).unlink()
    args = ["--quick", "--no-progress", "--out", str(out), "--reference", str(out.parent / "ref")]
    rc, stdout, err = run_cli(args)
    assert rc == 0, err
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # not redone
    after = {r["variant"]: r for r in json.loads(stdout.strip().splitlines()[-1])["results"]}
    for name in ("base", "heads", "distill"):
        assert after[name] == before[name]  # the saved records, reused
    assert after["finetune"]["head_bits_per_byte"] == before["finetune"]["head_bits_per_byte"]
    # A finished run is refused; so is an unfinished one with other settings.
    rc, _, err = run_cli(args)
    assert rc == 2 and "already holds results" in err and err.count("\n") == 1
    (out / "results.json").unlink()
    rc, _, err = run_cli(args[:-2])
    assert rc == 2 and "other settings" in err and err.count("\n") == 1
