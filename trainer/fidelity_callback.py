"""Logs the Canny control fidelity (ControlNet++ F1, see evaluation.fidelity) during training.

Every `every_n_steps` optimizer steps the callback generates from a few held-out (edge map, prompt)
pairs with the LightningModule's ControlLDM (`pl_module.model`), and logs `fidelity/canny_f1`,
`fidelity/canny_f1_tolerant` and `fidelity/edge_ssim`. The same pairs and the same initial noise are used
every time, so the curve shows the ControlNet learning, not sampling noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch

from annotator.canny import CannyThresholds
from evaluation.fidelity import (
    DEFAULT_DDIM_STEPS,
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_THRESHOLDS,
    DEFAULT_TOLERANCE,
    Pair,
    control_fidelity,
)
from trainer.logger import DEFAULT_EVERY_N_STEPS
from trainer.step_callback import EveryNSteps


class FidelityCallback(EveryNSteps):
    """Canny F1 of `pairs` ((H, W, 3) uint8 edge map, prompt) every `every_n_steps` global steps (by
    default as often as ImageLogger's sample grids).

    `history` keeps (step, f1, f1_tolerant, ssim) of every evaluation, also when no logger is set.
    """

    def __init__(self, pairs: Sequence[Pair], every_n_steps: int = DEFAULT_EVERY_N_STEPS,
                 ddim_steps: int = DEFAULT_DDIM_STEPS, guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
                 tolerance: int = DEFAULT_TOLERANCE, thresholds: CannyThresholds = DEFAULT_THRESHOLDS, seed: int = 0):
        super().__init__(every_n_steps)
        if not pairs:
            raise ValueError("FidelityCallback needs at least one (edge map, prompt) pair")
        self.pairs = list(pairs)
        self.ddim_steps = ddim_steps
        self.guidance_scale = guidance_scale
        self.tolerance = tolerance
        self.thresholds = thresholds
        self.seed = seed
        self.history: list[tuple[int, float, float, float]] = []

    def on_every_n_steps(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, step: int) -> None:
        was_training = pl_module.training
        pl_module.eval()
        try:
            # The trainer's autocast: locked parts may be stored in half precision (ControlNetTrainer).
            with trainer.precision_plugin.forward_context():
                scores = self.measure(pl_module.model, step)
        finally:
            pl_module.train(was_training)
        for name, value in zip(("canny_f1", "canny_f1_tolerant", "edge_ssim"), scores, strict=True):
            pl_module.log(f"fidelity/{name}", value, on_step=True, on_epoch=False, rank_zero_only=True)

    @torch.no_grad()
    def measure(self, model: torch.nn.Module, step: int) -> tuple[float, float, float]:
        """Score a ControlLDM (in the mode it is in) and record it under `step`; returns (f1, f1_tolerant,
        ssim)."""
        report = control_fidelity(model, self.pairs, thresholds=self.thresholds, tolerance=self.tolerance,
                                  ddim_steps=self.ddim_steps, guidance_scale=self.guidance_scale, seed=self.seed,
                                  progress=False)
        scores = (report.f1, report.f1_tolerant, report.ssim)
        self.history.append((step, *scores))
        return scores
