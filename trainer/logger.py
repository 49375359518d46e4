"""Image grids during training, like the original's ImageLogger: every N global steps, for a few pairs of
the current batch, the VAE reconstruction, the control image and DDIM samples from the model so far.

A grid has three rows (reconstruction, control, samples) and one column per pair; it is written as
SAVE_DIR/step-00000300.png with the prompts beside it in step-00000300.txt, and added to TensorBoard
when that logger is in use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torchvision.utils import make_grid, save_image

from trainer.resumable_data import derived_seed
from trainer.step_callback import EveryNSteps

GRID_ROWS = ("reconstruction", "control", "samples")
# The original's: a grid every 300 steps (tutorial_train.py's logger_freq) of 4 pairs, DDIM 50 steps at
# guidance 9 against the "" prompt (its log_images).
DEFAULT_EVERY_N_STEPS = 300
DEFAULT_MAX_IMAGES = 4
DEFAULT_DDIM_STEPS = 50
DEFAULT_GUIDANCE_SCALE = 9.0


class ImageLogger(EveryNSteps):
    """Writes a sample grid every `every_n_steps` optimizer steps (global steps, as the original).

    The samples use `ddim_steps` DDIM steps with guidance `guidance_scale` against the "" prompt and a
    generator seeded by (seed, step), so they do not disturb the training's randomness.
    """

    def __init__(self, save_dir: str | Path, every_n_steps: int = DEFAULT_EVERY_N_STEPS,
                 max_images: int = DEFAULT_MAX_IMAGES, ddim_steps: int = DEFAULT_DDIM_STEPS,
                 guidance_scale: float = DEFAULT_GUIDANCE_SCALE, seed: int = 0):
        super().__init__(every_n_steps)
        self.save_dir = Path(save_dir)
        self.max_images = max_images
        self.ddim_steps = ddim_steps
        self.guidance_scale = guidance_scale
        self.seed = seed

    def on_every_n_steps(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, step: int) -> None:
        self.log_grid(trainer, pl_module, batch, step)

    def log_grid(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, step: int) -> None:
        """Sample in eval mode without gradients (every rank takes part: sharded models sample
        collectively), then write the grid on rank 0 and return to train mode."""
        was_training = pl_module.training
        pl_module.eval()
        try:
            generator = torch.Generator(device=pl_module.device).manual_seed(derived_seed(self.seed, step))
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                images = pl_module.log_images(batch, max_images=self.max_images, ddim_steps=self.ddim_steps,
                                              guidance_scale=self.guidance_scale, generator=generator)
        finally:
            pl_module.train(was_training)
        if not trainer.is_global_zero:
            return
        rows = torch.cat([images[name].float().cpu() for name in GRID_ROWS])
        grid = make_grid(rows, nrow=images["control"].shape[0], padding=2)
        self.save_dir.mkdir(parents=True, exist_ok=True)
        stem = self.save_dir / f"step-{step:08d}"
        save_image(grid, stem.with_suffix(".png"))
        prompts = list(batch["txt"])[: images["control"].shape[0]]
        stem.with_suffix(".txt").write_text(
            f"rows: {', '.join(GRID_ROWS)}; DDIM {self.ddim_steps} steps, guidance {self.guidance_scale}\n"
            + "".join(f"{i}: {prompt}\n" for i, prompt in enumerate(prompts)), encoding="utf-8")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples", grid, global_step=step)
