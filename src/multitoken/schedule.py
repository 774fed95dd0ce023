"""Learning-rate schedules shared by `train` and `distill`."""

from __future__ import annotations

import math
from collections.abc import Callable


def warmup_cosine(warm: int, total: int, floor: float) -> Callable[[int], float]:
    """LR factor per step: linear warmup over `warm` steps, then cosine decay to `floor` at
    step `total` (and `floor` after it)."""

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f
