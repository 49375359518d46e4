"""Small building blocks shared by the UNet and the ControlNet."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _torch_checkpoint


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of integer (or fractional) timesteps.

    timesteps: (B,) -> (B, dim), cosines first then sines, as in latent-diffusion.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` (the paper's zero convolution) and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (stable under fp16/bf16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(
            x.float(), self.num_groups, self.weight.float() if self.weight is not None else None,
            self.bias.float() if self.bias is not None else None, self.eps,
        ).type(x.dtype)


def normalization(channels: int) -> nn.Module:
    """The UNet's standard normalisation layer: 32 groups."""
    return GroupNorm32(32, channels)


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1-, 2- or 3-D convolution."""
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return nn.Conv2d(*args, **kwargs)
    if dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


def maybe_checkpoint(function: Callable, *args, enabled: bool):
    """Run `function(*args)`, recomputing it in backward (gradient checkpointing) when enabled and
    gradients are being recorded."""
    if enabled and torch.is_grad_enabled():
        return _torch_checkpoint(function, *args, use_reentrant=False)
    return function(*args)
