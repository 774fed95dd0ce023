"""Self-distillation of the draft heads: the loss, what stays frozen, that acceptance rises,
and the command's errors."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch

from helpers_decode import (  # noqa: F401 - one_thread is an autouse fixture
    make_checkpoint,
    one_thread,
    pattern_tokens,
    random_model,
)
from multitoken.config import DistillConfig
from multitoken.decoding.generate import generate
from multitoken.distill import distill, distill_loss, draft_head_loss, main
from multitoken.errors import ConfigError, MultitokenError


def test_draft_head_loss_equals_hand_computed_sum():
    torch.manual_seed(0)
    B, T, V, start, off = 2, 7, 5, 2, 2
    student, teacher = torch.randn(B, T, V), torch.randn(B, T, V)
    soft = hard = 0.0
    n = 0
    for b in range(B):
        for t in range(start, T - off):  # head with offset 2 at t vs head 1 at t + 2
            p = torch.softmax(teacher[b, t + off], -1)
            logq = torch.log_softmax(student[b, t], -1)
            soft += float(-(p * logq).sum())
            hard += float(-logq[teacher[b, t + off].argmax()])
            n += 1
    assert draft_head_loss(student, teacher, off, start, "soft").item() == pytest.approx(soft / n,
                                                                                       rel=1e-5)
    assert draft_head_loss(student, teacher, off, start, "hard").item() == pytest.approx(hard / n,
                                                                                       rel=1e-5)


def test_distill_loss_touches_only_the_draft_heads():
    model = random_model()
    for p in model.parameters():
        p.requires_grad_(False)
    for i in (1, 2, 3):
        model.heads[i].requires_grad_(True)
    loss, per_head = distill_loss(model, torch.randint(0, 37, (2, 20)), start=5)
    loss.backward()
    assert len(per_head) == 3 and loss.item() == pytest.approx(sum(per_head), rel=1e-5)
    for name, p in model.named_parameters():
        assert (p.grad is not None) == name.startswith(("heads.1.", "heads.2.", "heads.3.")), name


SMALL = dict(sequences=48, prompt_len=8, new_tokens=40, gen_batch=16, eval_sequences=8,
             steps=80, batch_size=8, lr=1e-2, warmup_steps=5)


@pytest.mark.parametrize("head_type", ["transformer", "causal", "linear"])
def test_distill_raises_agreement_and_keeps_head_1(head_type):
    # A random model: its drafts agree with head 1 by chance only, so distillation has
    # everything to gain; its greedy continuations are a deterministic function to learn.
    original = random_model(head_type, seed=1, max_seq_len=64)
    model = copy.deepcopy(original)
    metrics = distill(model, pattern_tokens(2000, vocab=37, seed=3),
                      pattern_tokens(2000, vocab=37, seed=4), DistillConfig(**SMALL))
    before, after = metrics["before"], metrics["after"]
    assert sum(after["top1"]) / 3 > sum(before["top1"]) / 3 + 0.2, (before, after)
    assert after["chain_tokens_per_forward"]["3"] > before["chain_tokens_per_forward"]["3"] + 0.3
    # everything head 1 reads is bit for bit unchanged...
    new = model.state_dict()
    draft = ("heads.1.", "heads.2.", "heads.3.")
    for name, t in original.state_dict().items():
        assert name.startswith(draft) or torch.equal(t, new[name]), name
    assert all(not torch.equal(t, new[n]) for n, t in original.state_dict().items()
               if n.startswith(draft) and n.endswith(("wq.weight", "w2.weight", "heads.1.weight")))
    # ...so plain greedy decoding is identical, and speculation still reproduces it
    prompts = pattern_tokens(60, vocab=37, seed=9).view(3, 20)
    ref = generate(original, prompts, 30).tokens
    assert generate(model, prompts, 30).tokens == ref
    assert generate(model, prompts, 30, speculative="chain").tokens == ref
    assert generate(model, prompts, 30, speculative="tree").tokens == ref
    assert all(not p.requires_grad for p in model.parameters())


def test_distill_refuses_what_it_cannot_do():
    val = pattern_tokens(500, vocab=37)
    with pytest.raises(MultitokenError, match="anticausal"):
        distill(random_model("anticausal"), val, val, DistillConfig(**SMALL))
    with pytest.raises(MultitokenError, match="n_future=1"):
        distill(random_model(n_future=1), val, val, DistillConfig(**SMALL))
    with pytest.raises(ConfigError, match="exceeds the model's context"):
        distill(random_model(), val, val, DistillConfig(**{**SMALL, "new_tokens": 60}))
    with pytest.raises(ConfigError, match="distill.steps"):
        DistillConfig(steps=0).validate()


def _digest(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_cli_distill_writes_a_new_checkpoint_and_leaves_the_source(tmp_path, capsys):
    from multitoken.checkpoint import load_checkpoint

    ck = make_checkpoint(tmp_path)
    digest = _digest(ck)
    out = tmp_path / "distilled"
    args = ["--checkpoint", str(ck), "--out", str(out), "--no-progress", "--sequences", "8",
            "--prompt-len", "16", "--new-tokens", "24", "--eval-sequences", "4", "--steps", "4",
            "--batch-size", "4"]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(res["top1_before"]) == 3 and set(res["chain_tpf_after"]) == {"1", "2", "3"}
    assert _digest(ck) == digest  # the source is never modified
    model, _ = load_checkpoint(out)
    meta = json.loads((out / "checkpoint" / "config.json").read_text())
    assert meta["distilled_from"] == str(ck) and meta["distill"]["steps"] == 4
    assert meta["run"]["data"]["val_fraction"] == 0.3  # bench/calibrate find the same val split
    assert (out / "distill.json").is_file() and (out / "distill.png").stat().st_size > 1000
    src, _ = load_checkpoint(ck)
    assert torch.equal(model.layers[0].attention.wq.weight, src.layers[0].attention.wq.weight)
    # a second run into the same folder is refused, and so is writing over the source
    with pytest.raises(MultitokenError, match="not empty"):
        main(args)
    with pytest.raises(MultitokenError, match="overwrite the source"):
        main(["--checkpoint", str(ck), "--out", str(ck)])
    with pytest.raises(ConfigError, match="expected an integer"):
        main(["--checkpoint", str(ck), "--out", str(tmp_path / "x"), "--steps", "many"])
