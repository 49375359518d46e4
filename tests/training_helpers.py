"""Helpers shared by the training tests (test_training, test_latent_cache, test_half_locked,
test_optimizer_options): the tiny model's tool_add_control.py initialisation, random datasets in the
prompt.json format, training.py's arguments for the tiny model, and reading what a run wrote."""

from __future__ import annotations

import csv
import json
import signal
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.reference import TINY, TINY_CONFIG, tiny_weights

IMAGE_SIZE = 64  # the tiny VAE: 64 px -> 8x8 latents
TINY_LR = "3e-3"  # the tiny model learns visibly in a few steps only with a larger rate than SD's 1e-5


def tool_add_control_init() -> dict[str, torch.Tensor]:
    """What tool_add_control.py makes of the tiny SD: control_model.* copied from the UNet encoder,
    the hint block and zero convs new (tests/data/reference/tiny/README.md)."""
    weights = tiny_weights()
    new = load_file(str(TINY / "tool_add_control_init.safetensors"))
    sources = json.loads((TINY / "tool_add_control_map.json").read_text())
    init = {key: value for key, value in weights.items() if not key.startswith("control_model.")}
    for key, source in sources.items():
        init[key] = new[key] if source == "new" else weights[source].clone()
    return init


def make_dataset(root: Path, pairs: int, seed: int = 0) -> Path:
    """A dataset folder of random 64x64 pairs in the prompt.json format."""
    rng = np.random.default_rng(seed)
    (root / "source").mkdir(parents=True)
    (root / "target").mkdir()
    lines = []
    for i in range(pairs):
        for folder in ("source", "target"):
            pixels = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / folder / f"{i}.png")
        lines.append(json.dumps({"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": f"pair {i}"}))
    (root / "prompt.json").write_text("\n".join(lines) + "\n")
    return root


def train_args(init: Path, data: Path, output: Path, *extra: str) -> list[str]:
    """training.py's arguments for a CPU run of the tiny model; `extra` is appended (later flags win)."""
    return ["--config", str(TINY_CONFIG), "--init", str(init), "--data", str(data), "--output-dir", str(output),
            "--resolution", str(IMAGE_SIZE), "--accelerator", "cpu", "--devices", "1", "--log-every-n-steps", "1",
            "--logger-freq", "1000", "--checkpoint-every", "1000", "--prompt-dropout", "0.5", "--lr", TINY_LR,
            *extra]


def logged_losses(output: Path) -> dict[int, float]:
    """{step: train/loss_simple} from every invocation's metrics.csv of a run."""
    losses = {}
    for path in sorted((output / "logs" / "csv").glob("version_*/metrics.csv")):
        with open(path) as rows:
            for row in csv.DictReader(rows):
                if row.get("train/loss_simple"):
                    losses[int(row["step"])] = float(row["train/loss_simple"])
    return losses


def read_training_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


class AtStep(L.Callback):
    """Runs `action(trainer, module)` once, in `hook`, when the global step equals `step`."""

    def __init__(self, step: int, action: Callable, hook: str = "on_train_batch_end"):
        self.step, self.action, self.done = step, action, False
        setattr(self, hook, self._maybe_act)

    def _maybe_act(self, trainer, pl_module, *args):
        if trainer.global_step == self.step and not self.done:
            self.done = True
            self.action(trainer, pl_module)


def send(signum: int) -> Callable:
    """An AtStep action that raises `signum` in this process (as Ctrl-C or a scheduler's SIGTERM would)."""
    return lambda trainer, module: signal.raise_signal(signum)
