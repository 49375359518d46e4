"""The optimiser and learning-rate schedule shared by the base model's two training stages."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from common.lr_schedule import cosine_factor

# Fraction of the steps spent warming the learning rate up linearly from 0.
WARMUP_FRACTION = 0.05


def warmup_cosine(step: int, total_steps: int) -> float:
    """Learning-rate multiplier at `step` of `total_steps`: linear warm-up, then cosine decay to 0."""
    warmup = max(1, int(WARMUP_FRACTION * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    return cosine_factor(step - warmup, max(1, total_steps - warmup))


def make_optimizer(parameters: Iterable[torch.nn.Parameter], learning_rate: float, total_steps: int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no weight decay: the nets are small and the data is clean) with `warmup_cosine`."""
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, total_steps))
    return optimizer, scheduler
