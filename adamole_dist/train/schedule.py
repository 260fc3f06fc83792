"""Learning-rate schedule shared by the DeepSpeed optimizer and the expert optimizer."""

from __future__ import annotations

import math
from typing import Callable


def warmup_steps_for(total_steps: int, warmup_steps: int, warmup_ratio: float) -> int:
    return warmup_steps if warmup_steps >= 0 else int(math.ceil(warmup_ratio * total_steps))


def lr_lambda(kind: str, total_steps: int, warmup: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warm-up, then decay."""

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        progress = min(max(progress, 0.0), 1.0)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress  # linear

    return fn
