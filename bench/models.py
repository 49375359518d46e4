"""Building both sides of a benchmark from one config: ours (ControlLDM) and the peer (diffusers).

Weights are random. Freshly built ControlNets are zero-initialised where the paper says so (zero convs,
the last conv of the hint block, ...); left at zero, no gradient would reach most of the ControlNet and
the step would not look like mid-training. `wake_zero_parameters` gives every all-zero parameter small
random values on both sides. Timing and memory do not depend on the values.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bench.configs import (
    LATENT_DOWNSAMPLING,
    config_file,
    diffusers_unet_config,
    diffusers_vae_config,
    scheduler_config,
    text_encoder_config,
)
from cldm.model import create_model
from ldm.modules.encoders.tokenizer import CLIPTokenizer

# Scale of the random values for all-zero bias/norm vectors (as the tiny reference model was made).
VECTOR_INIT_STD = 0.02
TEXT_TOKENS = 77


@torch.no_grad()
def wake_zero_parameters(module: nn.Module, seed: int = 0) -> int:
    """Fill every all-zero parameter: U(+-1/sqrt(fan_in)) for weights, N(0, 0.02^2) for vectors.

    Returns how many parameters were changed (none on the meta device, where there are no values).
    """
    generator = torch.Generator().manual_seed(seed)
    changed = 0
    for parameter in module.parameters():
        if parameter.is_meta or parameter.count_nonzero() != 0:
            continue
        # Drawn on the CPU (where the generator lives) whatever the default device is.
        if parameter.dim() >= 2:
            bound = 1 / math.sqrt(parameter[0].numel())
            values = torch.rand(parameter.shape, generator=generator, device="cpu") * 2 * bound - bound
        else:
            values = torch.randn(parameter.shape, generator=generator, device="cpu") * VECTOR_INIT_STD
        parameter.copy_(values.to(parameter.device))
        changed += 1
    return changed


def build_ours(model: Mapping[str, Any], attention: str, use_checkpoint: bool, device: torch.device) -> nn.Module:
    """Our ControlLDM for `model` (a config's `model` section), on `device`, fp32, random weights."""
    with config_file(model) as path, torch.device(device):
        ldm = create_model(path, attention=attention, use_checkpoint=use_checkpoint)
    wake_zero_parameters(ldm)
    return ldm


@dataclass
class PeerModels:
    """diffusers' components, as train_controlnet.py and StableDiffusionControlNetPipeline hold them."""

    unet: nn.Module
    controlnet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    scheduler_config: dict[str, Any]


def peer_tokenizer() -> Any:
    """transformers' CLIPTokenizer with the CLIP vocabulary (built from the BPE file our tokenizer reads,
    since the hub is out of reach); the peer holds one, as train_controlnet.py does."""
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    ours = CLIPTokenizer()
    merges = [pair for pair, _ in sorted(ours.merge_ranks.items(), key=lambda item: item[1])]
    return HFCLIPTokenizer(vocab=dict(ours.encoder), merges=merges)


def build_peer(model: Mapping[str, Any], device: torch.device) -> PeerModels:
    """diffusers' UNet2DConditionModel + ControlNetModel.from_unet, AutoencoderKL, the CLIP text encoder
    and tokenizer, with the architecture of `model`, on `device`, fp32, random weights, SDPA attention."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device(device):
        unet = UNet2DConditionModel(**diffusers_unet_config(model))
        wake_zero_parameters(unet)
        controlnet = ControlNetModel.from_unet(unet)
        wake_zero_parameters(controlnet, seed=1)
        vae = AutoencoderKL(**diffusers_vae_config(model))
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_encoder_config(model), attn_implementation="sdpa"))
    return PeerModels(unet, controlnet, vae, text_encoder, peer_tokenizer(), scheduler_config(model))


def latent_channels(model: Mapping[str, Any]) -> int:
    return int(model["params"]["unet_config"]["params"]["in_channels"])


def context_dim(model: Mapping[str, Any]) -> int:
    return int(model["params"]["unet_config"]["params"]["context_dim"])


@dataclass
class Batch:
    """One training batch, the same on both sides.

    images (B, 3, H, W) in [-1, 1]; hints (B, 3, H, W) in [0, 1]; latents (B, 4, H/8, W/8) (already
    scaled, for runs without VAE encoding); contexts (B, 77, context_dim) (the text encoding, precomputed
    on both sides: it is the same CLIP transformer for both and small next to the UNet).
    """

    images: torch.Tensor
    hints: torch.Tensor
    latents: torch.Tensor
    contexts: torch.Tensor

    @property
    def size(self) -> int:
        return self.images.shape[0]


# Images pass the VAE's 8x downsampling and up to three more halvings in the UNet.
RESOLUTION_MULTIPLE = 64


def resolution_arg(text: str) -> int:
    """argparse type: an image size in px, a positive multiple of 64."""
    value = int(text)
    if value <= 0 or value % RESOLUTION_MULTIPLE:
        raise argparse.ArgumentTypeError(f"resolution must be a positive multiple of {RESOLUTION_MULTIPLE}, "
                                         f"got {value}")
    return value


def make_batch(model: Mapping[str, Any], batch_size: int, resolution: int, device: torch.device,
               seed: int = 0) -> Batch:
    """A random batch at `resolution` px (a multiple of 64, so every UNet level divides evenly)."""
    resolution = resolution_arg(str(resolution))
    generator = torch.Generator().manual_seed(seed)
    side = resolution // LATENT_DOWNSAMPLING
    batch = Batch(
        images=torch.rand(batch_size, 3, resolution, resolution, generator=generator) * 2 - 1,
        hints=torch.rand(batch_size, 3, resolution, resolution, generator=generator),
        latents=torch.randn(batch_size, latent_channels(model), side, side, generator=generator),
        contexts=torch.randn(batch_size, TEXT_TOKENS, context_dim(model), generator=generator),
    )
    return Batch(*(t.to(device) for t in vars(batch).values()))
