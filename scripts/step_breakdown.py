"""Where a speculative step's time goes, measured in place inside `generate()`, as fractions of
a plain decoding step (docs/decoding.md, issue 18). Each part is timed by wrapping the function
that does it; the parts nest (the verification forward is inside the step), so they are listed,
not summed:

- `forward`: `Engine.forward` (trunk + head 1, and for parallel transformer heads the draft
  heads' keys/values) over the step's tokens;
- `verify`: `speculate.verify` (argmax, or the processed p and the acceptance rule);
- `draft heads`: token-conditioned heads' calls (`conditioned.run_draft_head`: exact columns
  and query columns), or the parallel heads' phase 2 (`Engine.draft_hidden`);
- `drafting`: turning draft-head states into draft tokens (`TreeDrafter.children`, or
  `speculate.propose`), logits included;
- `step`: the whole decoder step; `loop`: what generate() adds per step (wall / forwards - step).

    .venv/bin/python scripts/step_breakdown.py CHECKPOINT [--mode chain --drafts 3 | --mode tree]
        [--temperature 0.8 --top-p 0.95] [--prompts 8] [--new-tokens 256]

Prompts come from the checkpoint's validation split. Prints a table and, last, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from multitoken.checkpoint import load_checkpoint
from multitoken.data import prompts_from
from multitoken.decoding import conditioned, engine, speculate
from multitoken.decoding.calibrate import validation_tokens
from multitoken.decoding.generate import generate

TIMES: dict[str, float] = defaultdict(float)
IN_STEP = [False]  # parts are counted inside decode steps only (not the prefill)


def timed(name: str, fn: Callable[..., Any], step: bool = False) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not (step or IN_STEP[0]):
            return fn(*args, **kwargs)
        IN_STEP[0] = True
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[name] += time.perf_counter() - t0
            if step:
                IN_STEP[0] = False
    return wrapper


def instrument() -> None:
    """Wrap the parts (module attributes, so every caller sees the wrapped function)."""
    engine.Engine.forward = timed("forward", engine.Engine.forward)  # type: ignore[method-assign]
    engine.Engine.draft_hidden = timed("draft heads", engine.Engine.draft_hidden)  # type: ignore[method-assign]
    speculate.verify = timed("verify", speculate.verify)
    speculate.propose = timed("drafting", speculate.propose)
    conditioned.run_draft_head = timed("draft heads", conditioned.run_draft_head)
    conditioned.TreeDrafter.children = timed(  # type: ignore[method-assign]
        "drafting", conditioned.TreeDrafter.children)
    for cls in (speculate.SpeculativeDecoder, conditioned.ConditionedDecoder):
        cls.step = timed("step", cls.step, step=True)  # type: ignore[method-assign]


def run(model: Any, prompts: list[list[int]], new_tokens: int, **kw: Any) -> tuple[int, float]:
    """Decode every prompt alone; (decode forwards, wall seconds)."""
    forwards, wall = 0, 0.0
    for p in prompts:
        res = generate(model, p, new_tokens, **kw)
        forwards += res.stats.forwards
        wall += res.stats.wall_time_s - res.stats.prefill_time_s
    return forwards, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--mode", default="chain", choices=["chain", "tree"])
    ap.add_argument("--drafts", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_checkpoint(args.checkpoint)
    prompts = prompts_from(validation_tokens(args.checkpoint, tok), args.prompts, args.prompt_len)
    sampling = dict(temperature=args.temperature, top_p=args.top_p)
    spec = dict(speculative=args.mode, num_drafts=args.drafts, **sampling)
    with torch.inference_mode():
        run(model, prompts[:1], 32, **spec)  # warm-up
        plain_f, plain_s = run(model, prompts, args.new_tokens, **sampling)
        instrument()
        TIMES.clear()
        f, wall = run(model, prompts, args.new_tokens, generator=torch.Generator(), **spec)
    plain_step = plain_s / plain_f
    parts = {k: v / f / plain_step for k, v in TIMES.items()}
    parts["loop"] = wall / f / plain_step - parts["step"]
    print(f"{args.checkpoint}: {args.mode} ({args.drafts} drafts), T={args.temperature} "
          f"top-p={args.top_p}; plain step {plain_step * 1e3:.2f} ms; "
          f"about {args.new_tokens * len(prompts) / f:.2f} tokens/forward")
    for k in ("step", "forward", "draft heads", "drafting", "verify", "loop"):
        print(f"  {k:<12} {parts.get(k, 0.0):.3f} plain steps")
    print(json.dumps({"plain_step_ms": plain_step * 1e3, "forwards": f, "parts": parts}))


if __name__ == "__main__":
    main()
