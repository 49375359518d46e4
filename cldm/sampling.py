"""Images from a (Control)LDM in one call: text encoding, DDIM or UniPC with classifier-free guidance, decoding.

DDIM (the original ControlNet's sampler) is the default; UniPC (`sampler="unipc"`) is what ControlNet++'s
evaluation samples with (diffusers' UniPCMultistepScheduler on SD 1.5's config, 20 steps). Every generating
path of the project goes through `sample_images` (inference.py, evaluation.fidelity, the training image log,
the toy base's evaluation), so the same noise, prompt and hint give the same pixels everywhere. Control
strength is an argument of each call, never state set on the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.unipc import UniPCSampler

# The samplers sample_images can run, by name: DDIM (the original ControlNet's) and UniPC (ControlNet++'s).
SAMPLERS = ("ddim", "unipc")

# Guess mode: residual i of n gets strength * GUESS_MODE_DECAY ** (n - 1 - i), so shallow blocks are
# damped most and the middle block gets full strength (the original's 0.825 ** (12 - i) for SD's 13).
GUESS_MODE_DECAY = 0.825


def control_scales(num_controls: int, strength: float, guess_mode: bool) -> list[float]:
    """Per-residual control scales (the ControlNet's outputs in order, the middle block last)."""
    if not guess_mode:
        return [strength] * num_controls
    return [strength * GUESS_MODE_DECAY ** (num_controls - 1 - i) for i in range(num_controls)]


def latent_shape(model: nn.Module, height: int, width: int) -> tuple[int, int, int]:
    """(C, h, w) of the latent of an image height x width: the VAE halves the sides once per encoder
    level after the first (8x for SD)."""
    factor = 2 ** (model.first_stage_model.encoder.num_resolutions - 1)
    return model.latent_channels, height // factor, width // factor


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [-1, 1] -> (B, H, W, 3) uint8, rounded to the nearest level."""
    return (images.float() * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _precision_context(device: torch.device, precision: torch.dtype | None) -> contextlib.AbstractContextManager:
    """None: the caller's (e.g. the trainer's autocast); float32: autocast off; float16/bfloat16: autocast."""
    if precision is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=precision, enabled=precision != torch.float32)


def _text_context(model: nn.Module, text: Sequence[str] | str | torch.Tensor, batch_size: int) -> torch.Tensor:
    """Prompts (or one prompt for the whole batch) encoded, or an encoded context (B, T, D) as it is."""
    if isinstance(text, torch.Tensor):
        return text
    prompts = [text] * batch_size if isinstance(text, str) else list(text)
    return model.get_learned_conditioning(prompts)


@torch.no_grad()
def sample_images(model: nn.Module, hints: torch.Tensor | None, prompts: Sequence[str] | torch.Tensor, *,
                  negative_prompt: str | Sequence[str] | torch.Tensor = "", steps: int = 20, eta: float = 0.0,
                  guidance_scale: float = 9.0, noise: torch.Tensor | None = None,
                  generator: torch.Generator | None = None, control_scales: float | Sequence[float] | None = None,
                  guess_mode: bool = False, precision: torch.dtype | None = None,
                  progress: bool = False, sampler: str = "ddim") -> np.ndarray:
    """DDIM or UniPC samples of `model`, decoded: (B, H, W, 3) uint8 RGB.

    hints: (B, 3, H, W) float in [0, 1] for a ControlLDM, or None for a model without control (then
    `noise` gives the size). prompts: B strings, or their text context (B, T, D) already encoded (e.g. a
    latent cache's). negative_prompt: the unconditional branch's prompt (one string for all), strings or
    context, weighted by `guidance_scale` (1: no unconditional branch). noise: x_T (B, C, H/8, W/8);
    otherwise drawn from `generator` on the model's device. control_scales: control strength for this
    call, one for all residuals or one per residual (None: the model's default). guess_mode: no control
    in the unconditional branch. precision: None keeps the caller's autocast, float32 turns it off,
    float16/bfloat16 turn it on (text encoding, sampling, decoding). sampler: one of SAMPLERS, "ddim" (eta
    is its stochasticity) or "unipc" (deterministic: eta must be 0); `steps` model evaluations either way.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if sampler == "unipc" and eta != 0:
        raise ValueError(f"eta={eta!r} is DDIM's; the UniPC sampler is deterministic (eta must be 0)")
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings (one per image) or a text context, not one string")
    device = next(model.parameters()).device
    batch_size = len(prompts)
    if hints is not None:
        hints = hints.to(device)
        shape = latent_shape(model, *hints.shape[2:])
    elif noise is not None:
        shape = tuple(noise.shape[1:])
    else:
        raise ValueError("sample_images needs hints or noise to know the image size")
    if (hints is not None and len(hints) != batch_size) or (noise is not None and len(noise) != batch_size):
        raise ValueError(f"{batch_size} prompts, {len(hints) if hints is not None else 'no'} hints and "
                         f"{len(noise) if noise is not None else 'no'} noise maps must match")
    with _precision_context(device, precision):
        cond = {"c_crossattn": [_text_context(model, prompts, batch_size)]}
        uncond = {"c_crossattn": [_text_context(model, negative_prompt, batch_size)]}
        if hints is not None:
            cond["c_concat"] = [hints]
            # Guess mode, and a globally pooled ControlNet (ControlNet 1.1's shuffle), control the conditional
            # half only.
            uncond["c_concat"] = None if guess_mode or getattr(model, "global_average_pooling", False) else [hints]
        loop = DDIMSampler(model) if sampler == "ddim" else UniPCSampler(model)
        latents, _ = loop.sample(
            steps, batch_size, shape, cond, eta=eta, x_T=None if noise is None else noise.to(device),
            unconditional_guidance_scale=guidance_scale, unconditional_conditioning=uncond, verbose=progress,
            generator=generator, control_scales=control_scales)
        images = model.decode_first_stage(latents)
    return to_uint8(images)
