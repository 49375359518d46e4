"""The one guard of every callback that acts "every N optimizer steps" (image log, fidelity, checkpoints).

Lightning calls `on_train_batch_end` after every batch, but under gradient accumulation several batches
end on the same global step, and a resumed run starts at the step it was saved at. A step counts once,
when the global step has moved since the start of this fit or since the last batch.
"""

from __future__ import annotations

from typing import Any

import lightning as L


class EveryNSteps(L.Callback):
    """Calls `on_optimizer_step(trainer, pl_module, batch, step)` once per new global step and
    `on_every_n_steps(...)` (from there) when the step is a multiple of `every_n_steps` (>= 1)."""

    def __init__(self, every_n_steps: int):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._last_step: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:  # inside a gradient accumulation (or before the first step): no new step
            return
        self._last_step = step
        self.on_optimizer_step(trainer, pl_module, batch, step)

    def on_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, step: int) -> None:
        """After each optimizer step (global step `step`); the default runs `on_every_n_steps` when due."""
        if step % self.every_n_steps == 0:
            self.on_every_n_steps(trainer, pl_module, batch, step)

    def on_every_n_steps(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, step: int) -> None:
        """What the callback does every `every_n_steps` global steps."""
