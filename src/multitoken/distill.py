"""Self-distillation of the draft heads: `multitoken distill --checkpoint DIR --out DIR`.

Self-speculative decoding accepts a draft when it equals what head 1 would decode, not when it
equals the text the heads were trained on. Heads 2..n are trained on the corpus (the paper's
loss), so they predict the corpus's next tokens; head 1's greedy continuations are narrower
(more repetitive, more "typical") than the corpus, and a head that predicts them is accepted
more often. This stage closes that gap, as Medusa-2 and EAGLE do for their drafters:

1. decode continuations of prompts from the TRAINING split with head 1 (plain decoding):
   greedy by default, or sampled at the temperature / top-k / top-p the model will be decoded
   with (`--temperature`, `--top-k`, `--top-p`), since drafts are verified on exactly that
   kind of text;
2. fine-tune heads 2..n on them with the trunk, head 1, the shared norm and the unembedding
   frozen: head i at position t learns head 1's distribution at position t+i-1 (`soft`, the
   default: its softmax when greedy, its processed distribution p -- temperature, top-k,
   top-p -- when sampling) or its argmax (`hard`), for positions whose intermediate tokens
   were decoded (t >= prompt_len - 1), which is exactly the context drafts see while decoding;
3. measure, before and after, on continuations of VALIDATION prompts (never trained on)
   decoded with the same settings: per draft head the top-1 agreement (its argmax is the
   token head 1 emitted) and the expected acceptance sum_x min(p(x), q(x)) of a draft sampled
   from its processed distribution q (the speculative-sampling rule's acceptance), and the
   chain's tokens per forward with top-1 drafts (replayed); when sampling, also the greedy
   figures, so that a run for sampling shows what it does to greedy decoding. Then save a new
   checkpoint.

Because nothing that head 1 reads changes, plain decoding of the distilled checkpoint is
identical to the original's, bit for bit (tests/test_distill.py checks the weights and the
decoded tokens), and speculative decoding stays exact; only acceptance changes. The new heads
predict the corpus less well than before (their validation loss against the text rises): they
become drafters for this model, which is their only job at decode time.

Anticausal heads are refused: there head 1 reads head 2's output, so changing the draft heads
would change head 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from multitoken import cliargs
from multitoken.bench.common import format_table, print_json
from multitoken.checkpoint import (
    find_checkpoint,
    load_checkpoint,
    new_output_dir,
    read_config,
    save_checkpoint,
)
from multitoken.config import DistillConfig, from_dict, load_yaml
from multitoken.decoding.calibrate import (
    data_splits,
    draft_ranks,
    prompts_from,
    simulate_tokens_per_forward,
)
from multitoken.decoding.generate import generate
from multitoken.decoding.sampling import Sampling, process_logits
from multitoken.devices import resolve_device
from multitoken.errors import ConfigError, MultitokenError
from multitoken.model import MultiTokenModel
from multitoken.schedule import warmup_cosine

GREEDY = Sampling()

# ---------------------------------------------------------------------------------------------
# Data: the model's own continuations.


def sampling_of(cfg: DistillConfig) -> Sampling:
    return Sampling(float(cfg.temperature), cfg.top_k, cfg.top_p)


def describe(s: Sampling) -> str:
    """"greedy" or e.g. "T=0.8 top-p 0.95" (for tables and logs)."""
    if s.greedy:
        return "greedy"
    return " ".join([f"T={s.temperature:g}"] + ([f"top-k {s.top_k}"] if s.top_k else [])
                    + ([f"top-p {s.top_p:g}"] if s.top_p is not None else []))


def continuations(model: MultiTokenModel, prompts: list[list[int]], new_tokens: int,
                  batch: int, sampling: Sampling = GREEDY,
                  generator: torch.Generator | None = None, progress: bool = False,
                  desc: str = "decoding") -> Tensor:
    """[N, P + new_tokens]: each prompt (all of length P) followed by head 1's continuation
    (plain decoding, no stop tokens): greedy, or sampled with `sampling` from `generator`."""
    rows: list[list[int]] = []
    starts = range(0, len(prompts), batch)
    for i in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
        chunk = prompts[i:i + batch]
        res = generate(model, chunk, new_tokens, temperature=sampling.temperature,
                       top_k=sampling.top_k, top_p=sampling.top_p, generator=generator)
        rows += [p + t for p, t in zip(chunk, res.tokens)]
    device = model.tok_embeddings.weight.device
    return torch.tensor(rows, dtype=torch.long, device=device)


def processed(logits: Tensor, sampling: Sampling) -> Tensor:
    """Logits [..., V] -> the distribution decoding draws from: process_logits when sampling,
    the one-hot argmax when greedy (the limit of temperature -> 0)."""
    if sampling.greedy:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return process_logits(logits, sampling)


# ---------------------------------------------------------------------------------------------
# The loss.


def draft_head_loss(student: Tensor, teacher: Tensor, offset: int, start: int,
                    target: str, sampling: Sampling = GREEDY) -> Tensor:
    """Mean distillation loss of one draft head.

    student [B, T, V]: logits of the head with the given offset (head i+1 predicts token t+1+i
    at position t); teacher [B, T, V]: head 1's logits. Position t (start <= t <= T-1-offset)
    is scored against head 1 at t+offset, which predicts the same token t+1+offset.
    hard: cross-entropy against head 1's argmax. soft, greedy: against head 1's softmax.
    soft, sampling at temperature T: -sum_x p(x) log u(x), with p = head 1's processed
    distribution (temperature, top-k, top-p) and u = softmax(student / T).

    Why that form under top-k / top-p: p has exact zeros, and so does the student's processed
    distribution q. KL(p || q) or CE(p, log q) would take log q = -inf wherever the student's
    truncation drops a token p keeps (an infinite loss with no useful gradient), and
    KL(q || p) is infinite wherever q keeps a token p drops. u = softmax(student / T) is q
    before truncation: it is positive everywhere, so the loss is finite, and a token outside
    p's support contributes p(x) log u(x) = 0 exactly (no 0 * log 0). The loss equals
    KL(p || u) + H(p) >= H(p), approached as u -> p, i.e. as the student's tempered
    distribution puts p's mass on p's support and none elsewhere; then the student's
    processed q is p: exactly for temperature and top-k (p has at most k tokens), and for
    top-p up to the tail top-p would cut from p itself (at most 1 - top_p of p's mass, and
    none unless p's last tokens are tiny). Tokens outside the support are pushed down only as
    a whole, through the normalisation: their order does not matter once they fall out of the
    truncation, which is all the draft needs.
    """
    T = student.shape[1]
    s = student[:, start:T - offset].float()
    t = teacher[:, start + offset:T].float()
    if s.shape[1] <= 0:
        raise MultitokenError(f"sequences of {T} tokens are too short for a head with offset "
                              f"{offset} from position {start}")
    if target == "hard":
        return F.cross_entropy(s.flatten(0, 1), t.argmax(-1).flatten())
    if sampling.greedy:
        return -(t.softmax(-1) * s.log_softmax(-1)).sum(-1).mean()
    p = process_logits(t, sampling)  # [B, T', V], zeros outside the top-k / top-p support
    return -(p * (s / sampling.temperature).log_softmax(-1)).sum(-1).mean()


def draft_heads(model: MultiTokenModel) -> list[int]:
    """Code indices of the heads that distillation trains (all but head 1)."""
    return list(range(1, model.n_future))


def freeze_all_but_draft_heads(model: MultiTokenModel) -> list[torch.nn.Parameter]:
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for i in draft_heads(model) for p in model.heads[i].parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def distill_loss(model: MultiTokenModel, seqs: Tensor, start: int, target: str = "soft",
                 sampling: Sampling = GREEDY) -> tuple[Tensor, list[float]]:
    """Summed loss of the draft heads on sequences seqs [B, T] (graph attached to the draft
    heads only) and each head's value."""
    T = seqs.shape[1]
    cos, sin = model.rope(T, None)
    with torch.no_grad():  # the frozen teacher: trunk + head 1
        z = model.trunk(seqs, cos, sin)
        teacher = model.unembed(model.head(0, z, cos, sin))
    # Token-conditioned heads read the tokens they follow: head 1's own (teacher forced), which
    # are the drafts whenever the drafts before them are accepted.
    hs = model.run_heads(z, draft_heads(model), cos, sin, idx=seqs)
    losses = [draft_head_loss(model.unembed(hs[i]), teacher, i, start, target, sampling)
              for i in hs]
    return torch.stack(losses).sum(), [float(x.detach()) for x in losses]


# ---------------------------------------------------------------------------------------------
# Measuring what matters: does head 1 accept the drafts?


def overlap(p: Tensor, q: Tensor) -> Tensor:
    """sum_x min(p(x), q(x)) over the last dim: the probability that speculative sampling
    accepts a draft drawn from q when the target is p (accept x with min(1, p(x)/q(x)))."""
    return torch.minimum(p, q).sum(-1)


def expected_acceptance(model: MultiTokenModel, seqs: Tensor, start: int,
                        sampling: Sampling) -> list[float]:
    """Per draft head d (offset d), the mean over sequences seqs [N, T] and positions
    start <= t < T-1-D (those draft_ranks scores) of overlap(p, q): p = head 1's processed
    distribution at t+d, q = head d+1's processed distribution at t, both for the token t+1+d.
    Greedy: both are one-hot, and this is the share of positions where the argmaxes agree."""
    D = model.n_future - 1
    stop = seqs.shape[1] - 1 - D
    if stop <= start:
        raise MultitokenError("sequences too short to measure acceptance")
    sums = [0.0] * D
    with torch.inference_mode():
        for chunk in seqs.split(4):
            hs = model.hidden(chunk)
            for d in range(1, D + 1):
                q = processed(model.unembed(hs[d][:, start:stop]), sampling)  # [b, P, V]
                p = processed(model.unembed(hs[0][:, start + d:stop + d]), sampling)
                sums[d - 1] += float(overlap(p, q).sum())
    n = seqs.shape[0] * (stop - start)
    return [x / n for x in sums]


def draft_agreement(model: MultiTokenModel, seqs: Tensor, start: int,
                    sampling: Sampling = GREEDY) -> dict[str, Any]:
    """On continuations seqs [N, T] decoded with `sampling`: per draft head, `top1` = the share
    of positions t >= start where its argmax equals the token head 1 emitted there, and
    `accept` = expected_acceptance; and the tokens per forward that chain speculation with
    top-1 drafts achieves on these sequences (replayed).

    When sampling, top1 is also the acceptance of the head's top-1 draft under the one-hot
    rule (accepted with probability p(draft), i.e. when the token head 1 samples equals it),
    and the replay is distributed exactly as that chain decoding; accept is what a draft
    sampled from the head's q achieves (min(1, p/q) rule)."""
    D = model.n_future - 1
    ranks = draft_ranks(model, seqs, start, max_rank=1)  # 0 = top-1 is head 1's token
    top1 = [float((ranks[..., d] == 0).mean()) for d in range(D)]
    chain = {str(k): simulate_tokens_per_forward(ranks, [(0,) * d for d in range(1, k + 1)])
             for k in range(1, D + 1)}
    return {"top1": top1, "accept": expected_acceptance(model, seqs, start, sampling),
            "chain_tokens_per_forward": chain}


def held_out_metrics(model: MultiTokenModel, held: dict[str, Tensor], start: int,
                     sampling: Sampling) -> dict[str, Any]:
    """draft_agreement on the held-out continuations at the run's settings, plus (when those
    sample) on greedy ones under "greedy"."""
    out = draft_agreement(model, held["run"], start, sampling)
    if "greedy" in held:
        out["greedy"] = draft_agreement(model, held["greedy"], start, GREEDY)
    return out


# ---------------------------------------------------------------------------------------------
# The run.


def resolve_new_tokens(model: MultiTokenModel, cfg: DistillConfig) -> int:
    if cfg.new_tokens is not None:
        return cfg.new_tokens
    return max(1, min(256, model.cfg.max_seq_len - cfg.prompt_len))


def check_distillable(model: MultiTokenModel, cfg: DistillConfig) -> None:
    if model.n_future < 2:
        raise MultitokenError("this model has n_future=1: there are no draft heads to distill")
    if model.cfg.head_type == "anticausal":
        raise MultitokenError("anticausal heads cannot be distilled: head 1 reads head 2's "
                              "output, so training the draft heads would change head 1")
    new_tokens = resolve_new_tokens(model, cfg)
    if cfg.prompt_len + new_tokens > model.cfg.max_seq_len:
        raise ConfigError(f"distill.prompt_len + distill.new_tokens ({cfg.prompt_len} + "
                          f"{new_tokens}) exceeds the model's context "
                          f"({model.cfg.max_seq_len})")
    if new_tokens < model.n_future:
        raise ConfigError(f"distill.new_tokens must be >= n_future ({model.n_future})")


def distill(model: MultiTokenModel, train_tokens: Any, val_tokens: Any, cfg: DistillConfig, *,
            progress: bool = False, log: Any = None) -> dict[str, Any]:
    """Distill the draft heads of `model` in place; returns the metrics (see module docstring)."""
    say = log or (lambda *_: None)
    cfg.validate()
    check_distillable(model, cfg)
    torch.manual_seed(cfg.seed)
    model.eval()  # no dropout anywhere; eval() only documents that the forward is deterministic
    n_new = resolve_new_tokens(model, cfg)
    cfg = dataclasses.replace(cfg, new_tokens=n_new)  # recorded as run
    start = cfg.prompt_len - 1
    t0 = time.perf_counter()

    sampling = sampling_of(cfg)
    kind = "greedy" if sampling.greedy else f"sampled ({describe(sampling)})"
    say(f"decoding {cfg.sequences} training and {cfg.eval_sequences} held-out {kind} "
        f"continuations of {n_new} tokens")
    device = model.tok_embeddings.weight.device
    # Two streams from the seed, so the held-out texts do not depend on distill.sequences.
    gen_train = torch.Generator(device=device).manual_seed(cfg.seed)
    gen_held = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    train = continuations(model, prompts_from(train_tokens, cfg.sequences, cfg.prompt_len),
                          n_new, cfg.gen_batch, sampling, gen_train, progress,
                          "decoding (train)")
    val_prompts = prompts_from(val_tokens, cfg.eval_sequences, cfg.prompt_len)
    held = {"run": continuations(model, val_prompts, n_new, cfg.gen_batch, sampling, gen_held,
                                 progress, "decoding (held-out)")}
    if not sampling.greedy:
        held["greedy"] = continuations(model, val_prompts, n_new, cfg.gen_batch, GREEDY, None,
                                       progress, "decoding (held-out, greedy)")
    gen_s = time.perf_counter() - t0
    before = held_out_metrics(model, held, start, sampling)

    params = freeze_all_but_draft_heads(model)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(train), generator=gen)
    cursor = 0
    history: list[dict[str, Any]] = []
    bar = tqdm(range(cfg.steps), desc="distilling", disable=not progress, leave=False)
    t1 = time.perf_counter()
    try:
        for step in bar:
            if cursor + cfg.batch_size > len(order):
                order, cursor = torch.randperm(len(train), generator=gen), 0
            idx = order[cursor:cursor + cfg.batch_size].to(train.device)
            cursor += cfg.batch_size
            loss, head_losses = distill_loss(model, train[idx], start, cfg.target, sampling)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            loss_f = float(loss.detach())
            history.append({"step": step + 1, "loss": loss_f, "head_loss": head_losses})
            bar.set_postfix(loss=f"{loss_f:.3f}")
            if not progress and (step + 1) % max(1, cfg.steps // 10) == 0:
                say(f"step {step + 1}/{cfg.steps}: loss per draft head "
                    + " ".join(f"{x:.3f}" for x in head_losses))
    finally:
        for p in model.parameters():
            p.requires_grad_(False)
    train_s = time.perf_counter() - t1
    after = held_out_metrics(model, held, start, sampling)
    return {"config": dataclasses.asdict(cfg), "before": before, "after": after,
            "history": history, "decode_s": gen_s, "train_s": train_s,
            "train_tokens": int(cfg.steps * cfg.batch_size * (n_new + 1))}


def plot(metrics: dict[str, Any], path: Path) -> None:
    """Loss per draft head over the steps, and per head before/after on held-out text: top-1
    agreement and expected acceptance sum(min(p, q))."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = metrics["history"]
    D = len(metrics["before"]["top1"])
    cfg = metrics["config"]
    how = describe(Sampling(float(cfg["temperature"]), cfg["top_k"], cfg["top_p"]))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for d in range(D):
        axes[0].plot([h["step"] for h in hist], [h["head_loss"][d] for h in hist], lw=1,
                     label=f"head {d + 2}")
    axes[0].set(xlabel="step", ylabel=f"distillation loss ({cfg['target']})",
                title=f"draft heads: loss against head 1 ({how})")
    axes[0].legend()
    x = list(range(D))
    w = 0.38
    panels = [("top1", "top-1 = the token head 1 emitted", "held-out top-1 agreement"),
              ("accept", "sum min(p, q)", "held-out expected acceptance")]
    for ax, (key, ylabel, title) in zip(axes[1:], panels):
        ax.bar([i - w / 2 for i in x], metrics["before"][key], w, label="before")
        ax.bar([i + w / 2 for i in x], metrics["after"][key], w, label="after")
        ax.set_xticks(x, [f"head {d + 2}" for d in range(D)])
        ax.set(ylim=(0, 1), ylabel=ylabel, title=f"{title} ({how})")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _add_config_arguments(p: argparse.ArgumentParser) -> None:
    """One --option per DistillConfig field: the dataclass is the single source of truth."""
    for f in dataclasses.fields(DistillConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f"cfg_{f.name}", default=None,
                       metavar=type(f.default).__name__.upper() if f.default is not None
                       else "N", help=f"default: {f.default}")


def build_parser() -> cliargs.ArgumentParser:
    p = cliargs.ArgumentParser(prog="multitoken distill", description=(
        "Fine-tune the draft heads on the model's own continuations, greedy or sampled "
        "(--temperature, --top-k, --top-p), with trunk and head 1 frozen so decoding output is "
        "unchanged, to raise speculative acceptance."))
    p.add_argument("--checkpoint", required=True, help="source checkpoint (never modified)")
    p.add_argument("--out", required=True, help="new run directory for the distilled model")
    p.add_argument("--config", help="YAML file with DistillConfig fields (flags override it)")
    cliargs.add_device_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_config_arguments(p)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)

    data = load_yaml(args.config) if args.config else {}
    for f in dataclasses.fields(DistillConfig):
        v = getattr(args, f"cfg_{f.name}")
        if v is not None:
            data[f.name] = v
    cfg: DistillConfig = from_dict(DistillConfig, data, prefix="distill.")
    cfg.validate()
    device = resolve_device(args.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    src = find_checkpoint(args.checkpoint)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory")
    if out.resolve() == src.resolve() or out.resolve() in src.resolve().parents:
        raise MultitokenError(f"--out {out} would overwrite the source checkpoint {src}")
    new_output_dir(out, "--out")
    model, tokenizer = load_checkpoint(src, device=device)
    check_distillable(model, cfg)
    meta = read_config(src)
    run = meta.get("run") or {}
    splits = data_splits(src, tokenizer)

    metrics = distill(model, splits.train, splits.val, cfg, progress=not args.no_progress,
                      log=print)
    ckpt = save_checkpoint(out / "checkpoint", model, tokenizer, run_config=run,
                           step=meta.get("step"),
                           extra={"distilled_from": str(src), "distill": metrics["config"]})
    (out / "distill.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot(metrics, out / "distill.png")

    b, a = metrics["before"], metrics["after"]
    sampling = sampling_of(cfg)
    print(format_table([f"held-out (validation prompts), {describe(sampling)}", "before",
                        "after"], _table_rows(b, a)))
    if "greedy" in b:
        print(format_table(["held-out (validation prompts), greedy", "before", "after"],
                           _table_rows(b["greedy"], a["greedy"])))
    print(f"decoded {cfg.sequences} continuations in {metrics['decode_s']:.0f} s, distilled "
          f"{cfg.steps} steps in {metrics['train_s']:.0f} s -> {ckpt}")
    print(f"next: multitoken calibrate --checkpoint {out}", file=sys.stderr)
    summary: dict[str, Any] = {
        "checkpoint": str(ckpt),
        "sampling": {"temperature": sampling.temperature, "top_k": sampling.top_k,
                     "top_p": sampling.top_p},
        "top1_before": b["top1"], "top1_after": a["top1"],
        "accept_before": b["accept"], "accept_after": a["accept"],
        "chain_tpf_before": b["chain_tokens_per_forward"],
        "chain_tpf_after": a["chain_tokens_per_forward"]}
    if "greedy" in b:
        summary |= {"greedy_top1_before": b["greedy"]["top1"],
                    "greedy_top1_after": a["greedy"]["top1"],
                    "greedy_chain_tpf_before": b["greedy"]["chain_tokens_per_forward"],
                    "greedy_chain_tpf_after": a["greedy"]["chain_tokens_per_forward"]}
    summary |= {"decode_s": round(metrics["decode_s"], 1),
                "train_s": round(metrics["train_s"], 1)}
    print_json(summary)
    return 0


def _table_rows(b: dict[str, Any], a: dict[str, Any]) -> list[list[Any]]:
    """Per head top-1 and sum(min(p, q)), then replayed chain tokens per forward."""
    D = len(b["top1"])
    rows: list[list[Any]] = [[f"head {d + 2} top-1", b["top1"][d], a["top1"][d]]
                             for d in range(D)]
    rows += [[f"head {d + 2} sum min(p, q)", b["accept"][d], a["accept"][d]] for d in range(D)]
    rows += [[f"chain-{k} tokens/forward (top-1 drafts, replayed)",
              b["chain_tokens_per_forward"][k], a["chain_tokens_per_forward"][k]]
             for k in b["chain_tokens_per_forward"]]
    return rows
