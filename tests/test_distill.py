"""Self-distillation of the draft heads: the loss, what stays frozen, that acceptance rises,
and the command's errors."""

from __future__ import annotations

import copy
import hashlib
import json
import math

import pytest
import torch

from helpers_decode import (  # noqa: F401 - one_thread is an autouse fixture
    make_checkpoint,
    one_thread,
    pattern_tokens,
    random_model,
)
from multitoken.config import DistillConfig
from multitoken.decoding.calibrate import prompts_from
from multitoken.decoding.generate import generate
from multitoken.decoding.sampling import Sampling
from multitoken.distill import (
    continuations,
    distill,
    distill_loss,
    draft_agreement,
    draft_head_loss,
    expected_acceptance,
    main,
    overlap,
)
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


def test_sampled_soft_loss_is_hand_computed_cross_entropy_over_the_top_p_support():
    # One scored position (T=4, offset 2, start 1: student at t=1 against teacher at t=3).
    # At temperature 0.5, teacher logits 0.5*log(r) give head 1's tempered distribution r;
    # top-p 0.75 keeps 0.5 and 0.3 (the mass before 0.15 is 0.8 >= 0.75), so
    # p = (0.625, 0.375, 0, 0). The student's tempered distribution is u = (0.5, 0.2, 0.2, 0.1);
    # the two tokens p drops contribute exactly 0.
    s = Sampling(temperature=0.5, top_p=0.75)
    r = torch.tensor([0.5, 0.3, 0.15, 0.05])
    u = torch.tensor([0.5, 0.2, 0.2, 0.1])
    student, teacher = torch.randn(1, 4, 4), torch.randn(1, 4, 4)
    student[0, 1], teacher[0, 3] = 0.5 * u.log(), 0.5 * r.log()
    expected = -(0.625 * math.log(0.5) + 0.375 * math.log(0.2))  # 1.03686...
    loss = draft_head_loss(student, teacher, 2, 1, "soft", s)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # finite even where the student's own top-p would drop a token that p keeps (u(1) tiny),
    # and lowest at u = p: the minimum is the student reproducing p
    student[0, 1] = 0.5 * torch.tensor([0.999, 1e-6, 5e-4, 5e-4]).log()
    assert math.isfinite(draft_head_loss(student, teacher, 2, 1, "soft", s).item())
    entropy = -(0.625 * math.log(0.625) + 0.375 * math.log(0.375))
    student[0, 1] = 0.5 * torch.tensor([0.625, 0.375, 1e-9, 1e-9]).log()
    assert draft_head_loss(student, teacher, 2, 1, "soft", s).item() == pytest.approx(entropy,
                                                                                      rel=1e-5)
    # greedy keeps today's targets: head 1's plain softmax
    full = -(torch.softmax(teacher[0, 3], -1) * torch.log_softmax(student[0, 1], -1)).sum()
    assert draft_head_loss(student, teacher, 2, 1, "soft").item() == pytest.approx(full.item(),
                                                                                   rel=1e-5)


def test_overlap_is_sum_of_min_on_hand_made_distributions():
    p = torch.tensor([[0.625, 0.375, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.5, 0.2, 0.3, 0.0], [0.0, 1.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    assert overlap(p, q).tolist() == pytest.approx([0.5 + 0.2, 0.0, 1.0])
    assert overlap(q, p).tolist() == pytest.approx(overlap(p, q).tolist())


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


@pytest.mark.parametrize("head_type", ["transformer", "causal", "linear", "token_conditioned"])
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


def sharp_random_model(seed: int = 1, head_type: str = "transformer"):
    """A random model whose head 1 is confident (scaled unembedding), so that its distribution
    at T=0.8 / top-p 0.9 keeps a few tokens, not most of the vocabulary."""
    model = random_model(head_type, seed=seed, max_seq_len=64)
    with torch.no_grad():
        model.output.weight.mul_(10.0)
    return model


SAMPLED = dict(temperature=0.8, top_p=0.9)


@pytest.mark.parametrize("head_type", ["transformer", "token_conditioned"])
def test_sampled_distillation_raises_expected_acceptance_and_keeps_head_1(head_type):
    original = sharp_random_model(head_type=head_type)
    s = Sampling(**SAMPLED)
    held = continuations(original, prompts_from(pattern_tokens(2000, vocab=37, seed=5), 16, 8),
                         40, 16, s, torch.Generator().manual_seed(7))
    base = expected_acceptance(original, held, 7, s)
    train, val = pattern_tokens(2000, vocab=37, seed=3), pattern_tokens(2000, vocab=37, seed=4)
    model = copy.deepcopy(original)
    metrics = distill(model, train, val, DistillConfig(**SMALL, **SAMPLED))
    before, after = metrics["before"], metrics["after"]
    assert sum(after["accept"]) / 3 > sum(before["accept"]) / 3 + 0.07, (before, after)
    assert set(before["greedy"]) == {"top1", "accept", "chain_tokens_per_forward"}
    assert metrics["config"]["temperature"] == 0.8 and metrics["config"]["top_p"] == 0.9
    # on text sampled at those settings (not seen in training), the heads distilled for it
    # are accepted more often than before, and than heads distilled on greedy text
    greedy_distilled = copy.deepcopy(original)
    distill(greedy_distilled, train, val, DistillConfig(**SMALL))
    sampled_acc = expected_acceptance(model, held, 7, s)
    greedy_acc = expected_acceptance(greedy_distilled, held, 7, s)
    assert sum(sampled_acc) > sum(base) + 0.2 and sum(sampled_acc) > sum(greedy_acc) + 0.06, (
        base, sampled_acc, greedy_acc)
    # every weight but the draft heads' is bit for bit unchanged...
    new = model.state_dict()
    for name, t in original.state_dict().items():
        assert name.startswith(("heads.1.", "heads.2.", "heads.3.")) or torch.equal(t, new[name])
    # ...so plain decoding, sampled with the same seed or greedy, is unchanged
    prompts = pattern_tokens(60, vocab=37, seed=9).view(3, 20)
    for kw in ({}, SAMPLED):
        ref = generate(original, prompts, 30, generator=torch.Generator().manual_seed(0), **kw)
        out = generate(model, prompts, 30, generator=torch.Generator().manual_seed(0), **kw)
        assert out.tokens == ref.tokens


def test_expected_acceptance_is_top1_agreement_when_greedy():
    # greedy: p and q are one-hot, so sum(min(p, q)) = [the argmaxes agree], which on greedy
    # continuations is the top-1 agreement with the token head 1 decoded
    model = sharp_random_model(seed=2)
    seqs = continuations(model, prompts_from(pattern_tokens(500, vocab=37), 4, 8), 24, 4)
    m = draft_agreement(model, seqs, 7)
    assert m["accept"] == pytest.approx(m["top1"], abs=1e-6)
    hot = expected_acceptance(model, seqs, 7, Sampling(temperature=0.05))
    assert hot == pytest.approx(m["top1"], abs=0.02)


@pytest.mark.parametrize("bad, match", [
    (dict(temperature=-1.0), "distill.temperature"),
    (dict(temperature=float("nan")), "distill.temperature"),
    (dict(temperature=float("inf")), "distill.temperature"),
    (dict(temperature=0.8, top_p=0.0), "distill.top_p"),
    (dict(temperature=0.8, top_p=1.5), "distill.top_p"),
    (dict(temperature=0.8, top_k=0), "distill.top_k"),
    (dict(top_p=0.9), "only when sampling"),
    (dict(top_k=5), "only when sampling"),
])
def test_distill_config_refuses_bad_sampling(bad, match):
    with pytest.raises(ConfigError, match=match):
        DistillConfig(**bad).validate()
    DistillConfig(temperature=0.8, top_k=5, top_p=1.0).validate()


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
    assert len(res["accept_before"]) == len(res["accept_after"]) == 3
    assert res["sampling"] == {"temperature": 0.0, "top_k": None, "top_p": None}
    assert "greedy_top1_before" not in res  # greedy: the run's figures are the greedy ones
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


def test_cli_distill_sampled_reports_both_kinds_of_text(tmp_path, capsys):
    ck = make_checkpoint(tmp_path)
    out = tmp_path / "distilled"
    assert main(["--checkpoint", str(ck), "--out", str(out), "--no-progress", "--sequences", "8",
                 "--prompt-len", "16", "--new-tokens", "24", "--eval-sequences", "4",
                 "--steps", "2", "--batch-size", "4", "--temperature", "0.8", "--top-k", "20",
                 "--top-p", "0.95"]) == 0
    text = capsys.readouterr().out
    res = json.loads(text.strip().splitlines()[-1])
    assert res["sampling"] == {"temperature": 0.8, "top_k": 20, "top_p": 0.95}
    assert all(0.0 <= x <= 1.0 for x in res["accept_before"] + res["accept_after"])
    assert len(res["greedy_top1_after"]) == 3 and set(res["greedy_chain_tpf_after"]) == {
        "1", "2", "3"}
    assert "T=0.8 top-k 20 top-p 0.95" in text and "head 4 sum min(p, q)" in text
    meta = json.loads((out / "checkpoint" / "config.json").read_text())
    assert meta["distill"]["temperature"] == 0.8 and meta["distill"]["top_k"] == 20
