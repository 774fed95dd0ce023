"""T(m)/T(1) of a decode forward (trunk + all 4 heads over m tokens) against model width, on
random weights, with `decoding.calibrate.time_forwards` (the measurement `calibrate` and
`bench decode` use). It answers one question of docs/decoding.md: would a larger model make
self-speculation pay more on this CPU? (There it does not: MKL's small-M products scale with m.)

    .venv/bin/python scripts/forward_cost_vs_width.py [REPS]

Prints one line per width and, last, one JSON object with every figure.
"""

from __future__ import annotations

import json
import sys

import torch

from multitoken.config import ModelConfig
from multitoken.decoding.calibrate import time_forwards
from multitoken.model import MultiTokenModel

SHAPES = [(192, 16, 4), (384, 16, 6), (768, 16, 12), (1024, 16, 16)]  # dim, layers, heads
WIDTHS = (2, 4, 8, 11)  # m: chains of 1, 3, 7 drafts; a 10-node tree


def measure(dim: int, layers: int, heads: int, reps: int) -> dict[str, float]:
    cfg = ModelConfig(dim=dim, n_layers=layers, n_heads=heads, n_future=4, vocab_size=260,
                      max_seq_len=512)
    torch.manual_seed(0)
    model = MultiTokenModel(cfg).eval()
    shapes = [(1, 1), (1, 4)] + [(m, 4) for m in WIDTHS]
    t = time_forwards(model, shapes, context=256, reps=reps)
    t1 = t[(1, 4)]
    params = sum(p.numel() for n, p in model.named_parameters()
                 if "tok_emb" not in n and "output" not in n)
    return {"non_embedding_params_M": round(params / 1e6, 1),
            "plain_ms": round(t[(1, 1)] * 1e3, 3), "T1_ms": round(t1 * 1e3, 3),
            **{f"T({m})/T(1)": round(t[(m, 4)] / t1, 3) for m in WIDTHS}}


def main(argv: list[str]) -> int:
    reps = int(argv[0]) if argv else 20
    torch.set_num_threads(1)
    out = {}
    for dim, layers, heads in SHAPES:
        out[f"dim{dim}"] = measure(dim, layers, heads, reps)
        print(dim, out[f"dim{dim}"], flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
