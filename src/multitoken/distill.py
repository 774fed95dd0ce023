"""Self-distillation of the draft heads: `multitoken distill --checkpoint DIR --out DIR`.

Self-speculative decoding accepts a draft when it equals what head 1 would decode, not when it
equals the text the heads were trained on. Heads 2..n are trained on the corpus (the paper's
loss), so they predict the corpus's next tokens; head 1's greedy continuations are narrower
(more repetitive, more "typical") than the corpus, and a head that predicts them is accepted
more often. This stage closes that gap, as Medusa-2 and EAGLE do for their drafters:

1. decode greedy continuations of prompts from the TRAINING split with head 1 (plain decoding);
2. fine-tune heads 2..n on them with the trunk, head 1, the shared norm and the unembedding
   frozen: head i at position t learns head 1's distribution at position t+i-1 (`soft`, the
   default) or its argmax (`hard`), for positions whose intermediate tokens were decoded
   (t >= prompt_len - 1), which is exactly the context drafts see while decoding;
3. measure draft agreement and the chain's tokens per forward before and after on greedy
   continuations of VALIDATION prompts (never trained on), and save a new checkpoint.

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

from multitoken import cliargs
from multitoken.config import DistillConfig, from_dict, load_yaml
from multitoken.devices import resolve_device
from multitoken.errors import ConfigError, MultitokenError
from multitoken.model import MultiTokenModel

# ---------------------------------------------------------------------------------------------
# Data: the model's own greedy continuations.


def greedy_continuations(model: MultiTokenModel, prompts: list[list[int]], new_tokens: int,
                         batch: int, progress: bool = False, desc: str = "decoding") -> Tensor:
    """[N, P + new_tokens]: each prompt (all of length P) followed by head 1's greedy
    continuation (plain decoding, no stop tokens)."""
    from tqdm.auto import tqdm

    from multitoken.decoding.generate import generate

    rows: list[list[int]] = []
    starts = range(0, len(prompts), batch)
    for i in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
        chunk = prompts[i:i + batch]
        res = generate(model, chunk, new_tokens)
        rows += [p + t for p, t in zip(chunk, res.tokens)]
    device = model.tok_embeddings.weight.device
    return torch.tensor(rows, dtype=torch.long, device=device)


# ---------------------------------------------------------------------------------------------
# The loss.


def draft_head_loss(student: Tensor, teacher: Tensor, offset: int, start: int,
                    target: str) -> Tensor:
    """Mean distillation loss of one draft head.

    student [B, T, V]: logits of the head with the given offset (head i+1 predicts token t+1+i
    at position t); teacher [B, T, V]: head 1's logits. Position t (start <= t <= T-1-offset)
    is scored against head 1 at t+offset, which predicts the same token t+1+offset.
    soft: cross-entropy against head 1's softmax; hard: against its argmax.
    """
    T = student.shape[1]
    s = student[:, start:T - offset].float()
    t = teacher[:, start + offset:T].float()
    if s.shape[1] <= 0:
        raise MultitokenError(f"sequences of {T} tokens are too short for a head with offset "
                              f"{offset} from position {start}")
    if target == "hard":
        return F.cross_entropy(s.flatten(0, 1), t.argmax(-1).flatten())
    return -(t.softmax(-1) * s.log_softmax(-1)).sum(-1).mean()


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


def distill_loss(model: MultiTokenModel, seqs: Tensor, start: int,
                 target: str = "soft") -> tuple[Tensor, list[float]]:
    """Summed loss of the draft heads on sequences seqs [B, T] (graph attached to the draft
    heads only) and each head's value."""
    T = seqs.shape[1]
    cos, sin = model.rope(T, None)
    with torch.no_grad():  # the frozen teacher: trunk + head 1
        z = model.trunk(seqs, cos, sin)
        teacher = model.unembed(model.head(0, z, cos, sin))
    hs = model.run_heads(z, draft_heads(model), cos, sin)
    losses = [draft_head_loss(model.unembed(hs[i]), teacher, i, start, target) for i in hs]
    return torch.stack(losses).sum(), [float(x.detach()) for x in losses]


# ---------------------------------------------------------------------------------------------
# Measuring what matters: does head 1 accept the drafts?


def draft_agreement(model: MultiTokenModel, seqs: Tensor, start: int) -> dict[str, Any]:
    """On greedy continuations seqs [N, T]: per draft head, the share of positions t >= start
    where its argmax equals the token head 1 decoded there; and the tokens per forward that
    chain speculation with all draft heads achieves on these sequences (replayed)."""
    from multitoken.decoding.calibrate import draft_ranks, simulate_tokens_per_forward

    D = model.n_future - 1
    ranks = draft_ranks(model, seqs, start, max_rank=1)  # 0 = top-1 is head 1's token
    top1 = [float((ranks[..., d] == 0).mean()) for d in range(D)]
    chain = {str(k): simulate_tokens_per_forward(ranks, [(0,) * d for d in range(1, k + 1)])
             for k in range(1, D + 1)}
    return {"top1": top1, "chain_tokens_per_forward": chain}


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
    from tqdm.auto import tqdm

    from multitoken.decoding.calibrate import prompts_from
    from multitoken.train import warmup_cosine

    say = log or (lambda *_: None)
    cfg.validate()
    check_distillable(model, cfg)
    torch.manual_seed(cfg.seed)
    model.eval()  # no dropout anywhere; eval() only documents that nothing is stochastic
    n_new = resolve_new_tokens(model, cfg)
    cfg = dataclasses.replace(cfg, new_tokens=n_new)  # recorded as run
    start = cfg.prompt_len - 1
    t0 = time.perf_counter()

    say(f"decoding {cfg.sequences} training and {cfg.eval_sequences} held-out greedy "
        f"continuations of {n_new} tokens")
    train = greedy_continuations(model, prompts_from(train_tokens, cfg.sequences, cfg.prompt_len),
                                 n_new, cfg.gen_batch, progress, "decoding (train)")
    held = greedy_continuations(model, prompts_from(val_tokens, cfg.eval_sequences,
                                                    cfg.prompt_len),
                                n_new, cfg.gen_batch, progress, "decoding (held-out)")
    gen_s = time.perf_counter() - t0
    before = draft_agreement(model, held, start)

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
            loss, head_losses = distill_loss(model, train[idx], start, cfg.target)
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
    after = draft_agreement(model, held, start)
    return {"config": dataclasses.asdict(cfg), "before": before, "after": after,
            "history": history, "decode_s": gen_s, "train_s": train_s,
            "train_tokens": int(cfg.steps * cfg.batch_size * (n_new + 1))}


def plot(metrics: dict[str, Any], path: Path) -> None:
    """Loss per draft head over the steps, and held-out agreement per head before/after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = metrics["history"]
    D = len(metrics["before"]["top1"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for d in range(D):
        axes[0].plot([h["step"] for h in hist], [h["head_loss"][d] for h in hist], lw=1,
                     label=f"head {d + 2}")
    axes[0].set(xlabel="step", ylabel=f"distillation loss ({metrics['config']['target']})",
                title="draft heads: loss against head 1")
    axes[0].legend()
    x = torch.arange(D).tolist()
    w = 0.38
    axes[1].bar([i - w / 2 for i in x], metrics["before"]["top1"], w, label="before")
    axes[1].bar([i + w / 2 for i in x], metrics["after"]["top1"], w, label="after")
    axes[1].set_xticks(x, [f"head {d + 2}" for d in range(D)])
    axes[1].set(ylim=(0, 1), ylabel="top-1 = head 1's greedy token",
                title="held-out draft agreement")
    axes[1].legend()
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
        "Fine-tune the draft heads on the model's own greedy continuations (trunk and head 1 "
        "frozen, so decoding output is unchanged) to raise speculative acceptance."))
    p.add_argument("--checkpoint", required=True, help="source checkpoint (never modified)")
    p.add_argument("--out", required=True, help="new run directory for the distilled model")
    p.add_argument("--config", help="YAML file with DistillConfig fields (flags override it)")
    cliargs.add_device_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_config_arguments(p)
    return p


def main(argv: list[str]) -> int:
    from multitoken.bench.common import format_table, print_json
    from multitoken.checkpoint import (
        find_checkpoint,
        load_checkpoint,
        new_output_dir,
        read_config,
        save_checkpoint,
    )
    from multitoken.decoding.calibrate import data_splits

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
    rows = [[f"head {d + 2}", b["top1"][d], a["top1"][d]] for d in range(len(b["top1"]))]
    rows += [[f"chain-{k} tokens/forward", b["chain_tokens_per_forward"][k],
              a["chain_tokens_per_forward"][k]] for k in b["chain_tokens_per_forward"]]
    print(format_table(["held-out (validation prompts)", "before", "after"], rows))
    print(f"decoded {cfg.sequences} continuations in {metrics['decode_s']:.0f} s, distilled "
          f"{cfg.steps} steps in {metrics['train_s']:.0f} s -> {ckpt}")
    print(f"next: multitoken calibrate --checkpoint {out}", file=sys.stderr)
    print_json({"checkpoint": str(ckpt), "top1_before": b["top1"], "top1_after": a["top1"],
                "chain_tpf_before": b["chain_tokens_per_forward"],
                "chain_tpf_after": a["chain_tokens_per_forward"],
                "decode_s": round(metrics["decode_s"], 1), "train_s": round(metrics["train_s"], 1)})
    return 0
