"""Tiny trained checkpoints for the export and import tests: a real training.py run of the tiny model
with the decoder trained, and Lightning-format checkpoints of other tiny configs (an SD 2.x-style head
layout), plus the fixed inputs on which a ControlNet's residuals are compared."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

import training
from cldm.model import load_config
from ldm.util import instantiate_from_config
from tests.reference import TINY_CONFIG
from tests.training_helpers import IMAGE_SIZE, train_args

LATENT_SIZE = IMAGE_SIZE // 8
CONTEXT_DIM = 32  # the tiny text encoder's width


def tiny_model_config(sd2_heads: bool = False) -> dict:
    """The tiny config's model section; sd2_heads: SD 2.x's head layout (num_head_channels, so a head count
    per block, and linear transformer projections) instead of SD 1.x's num_heads."""
    model_config = copy.deepcopy(load_config(TINY_CONFIG)["model"])
    if sd2_heads:
        for name in ("control_stage_config", "unet_config"):
            params = model_config["params"][name]["params"]
            del params["num_heads"]
            params["num_head_channels"] = 8  # 32 and 64 channels: 4 and 8 heads
            params["use_linear_in_transformer"] = True
    return model_config


def train_tiny(init: Path, data: Path, output: Path, *extra: str) -> Path:
    """last.ckpt of a 2-step CPU run of the tiny model (training.py as the command line runs it)."""
    assert training.main(train_args(init, data, output, "--max-steps", "2", "--batch-size", "2", *extra)) == 0
    return output / "checkpoints" / "last.ckpt"


def random_checkpoint(path: Path, model_config: dict, sd_locked: bool, seed: int = 0) -> Path:
    """A training-format checkpoint of `model_config` with random weights, the zero convs and the
    hint block's last conv included (so that every residual is non-zero)."""
    torch.manual_seed(seed)
    model = instantiate_from_config(model_config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith("control_model.") and parameter.abs().max() == 0:
                parameter.normal_(0, 0.1)
    torch.save({"state_dict": model.state_dict(), "global_step": 7, "epoch": 1,
                "hyper_parameters": {"model_config": model_config, "sd_locked": sd_locked, "init": "random",
                                     "resolution": IMAGE_SIZE}}, path)
    return path


def relocked(source: Path, path: Path) -> Path:
    """A copy of a training checkpoint that says its decoder was locked (sd_locked True)."""
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["sd_locked"] = True
    torch.save(checkpoint, path)
    return path


def fixed_inputs(batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """x (B, 4, 8, 8) latents, t (B,) timesteps, context (B, 5, 32), hint (B, 3, 64, 64) in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch, 4, LATENT_SIZE, LATENT_SIZE, generator=generator),
            "t": torch.tensor([17, 640][:batch]),
            "context": torch.randn(batch, 5, CONTEXT_DIM, generator=generator),
            "hint": torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)}


@torch.no_grad()
def our_residuals(model, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The ControlNet's residuals (one per input block, then the middle block) of a ControlLDM."""
    return model.control_model(x=inputs["x"], hint=inputs["hint"], timesteps=inputs["t"], context=inputs["context"])


@torch.no_grad()
def diffusers_residuals(controlnet, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The same from a diffusers ControlNetModel: its down-block residuals, then the middle one."""
    down, mid = controlnet(inputs["x"], inputs["t"], encoder_hidden_states=inputs["context"],
                           controlnet_cond=inputs["hint"], return_dict=False)
    return [*down, mid]
