"""The cosine learning-rate decay shared by training.py (--lr-schedule cosine) and the toy base's training."""

from __future__ import annotations

import math


def cosine_factor(step: int, total_steps: int) -> float:
    """The cosine schedule's multiplier of the rate at step `step` (0-based) of `total_steps`: 1 at the first
    step, 1/2 halfway, 0 from the last step on."""
    if total_steps <= 0:
        raise ValueError(f"the cosine schedule needs a positive number of steps, got {total_steps}")
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / total_steps)))
