"""The KL-regularised autoencoder that maps images to Stable Diffusion's latent space and back.

A plain `nn.Module` for inference and for encoding training targets: the VAE stays frozen while a
ControlNet trains, so the original's LightningModule parts (adversarial loss, optimizers, logging)
are left out. The constructor takes the original's arguments, so `target:
ldm.models.autoencoder.AutoencoderKL` configs build it unchanged.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.checkpoint import load_weights, read_state_dict
from ldm.modules.attention import AttentionKind
from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

# The original's training-only loss modules (LPIPS + discriminator) live under this prefix in the
# CompVis VAE checkpoints; they are never built here.
LOSS_PREFIX = "loss."
# Prefix of the VAE entries inside a full LatentDiffusion / ControlLDM checkpoint.
FIRST_STAGE_PREFIX = "first_stage_model."
# A lossconfig that builds no parameters, as in every Stable Diffusion inference config.
IDENTITY_LOSS_TARGET = "torch.nn.Identity"


class AutoencoderKL(nn.Module):
    """Image <-> latent autoencoder with a diagonal-Gaussian posterior (the SD "kl-f8" VAE).

    Args:
        ddconfig: the Encoder/Decoder fields (`ch`, `ch_mult`, `num_res_blocks`, `attn_resolutions`,
            `dropout`, `resolution`, `in_channels`, `out_ch`, `z_channels`, `double_z`, ...).
            `double_z` must be true: the encoder predicts a mean and a log-variance.
        lossconfig: accepted for config compatibility and ignored; a target other than
            torch.nn.Identity (a training loss such as LPIPSWithDiscriminator) gets a warning.
        embed_dim: channels of the latent that the diffusion model sees (4 for SD).
        ckpt_path: optional `.safetensors` / `.ckpt` / `.pth` to load (see `init_from_ckpt`).
        ignore_keys: key prefixes to drop from that checkpoint.
        image_key: batch key of the image, kept for config compatibility.
        colorize_nlabels: when set, registers the original's random `colorize` buffer
            (3, colorize_nlabels, 1, 1) so checkpoints that hold it load strictly.
        monitor: kept as an attribute for config compatibility.
        attention: kernel of the self-attention blocks, "sdpa", "sliced" or "math" (same function).
        **kwargs: training options of later ldm versions (e.g. `ema_decay`, `learn_logvar`); they are
            ignored with a warning that names them.
    """

    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        lossconfig: Mapping[str, Any] | None = None,
        embed_dim: int | None = None,
        ckpt_path: str | Path | None = None,
        ignore_keys: Sequence[str] = (),
        image_key: str = "image",
        colorize_nlabels: int | None = None,
        monitor: str | None = None,
        attention: AttentionKind = "sdpa",
        **kwargs: Any,
    ):
        super().__init__()
        # embed_dim sits after lossconfig in the original's positional order, so it cannot be a
        # required positional argument here while lossconfig has a default.
        if embed_dim is None:
            raise TypeError("AutoencoderKL needs embed_dim (latent channels, 4 for Stable Diffusion)")
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig double_z=true (encoder predicts mean and logvar)")
        if lossconfig is not None and lossconfig.get("target") != IDENTITY_LOSS_TARGET:
            warnings.warn(
                f"AutoencoderKL ignores lossconfig target {lossconfig.get('target')!r} (no VAE training)",
                stacklevel=2,
            )
        if kwargs:
            warnings.warn(f"AutoencoderKL ignores the training options {sorted(kwargs)}", stacklevel=2)

        self.image_key = image_key
        self.monitor = monitor
        self.embed_dim = embed_dim
        z_channels = ddconfig["z_channels"]
        self.encoder = Encoder(**ddconfig, attention=attention)
        self.decoder = Decoder(**ddconfig, attention=attention)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1)
        if colorize_nlabels is not None:
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Image (B, in_channels, H, W) in [-1, 1] -> posterior over latents (B, embed_dim, H/f, W/f),
        f = 2**(len(ch_mult) - 1) (8 for SD). Use `.mode()` for a deterministic latent, `.sample()` for
        a draw; multiply by the diffusion model's scale_factor (0.18215 for SD1.x) before diffusion."""
        expected = self.encoder.in_channels
        if x.ndim != 4 or x.shape[1] != expected:
            raise ValueError(f"encode expects images of shape (B, {expected}, H, W), got {tuple(x.shape)}")
        moments = self.quant_conv(self.encoder(x))  # (B, 2 * embed_dim, h, w): mean then logvar
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent (B, embed_dim, h, w) -> image (B, out_ch, h*f, w*f), nominally in [-1, 1]
        (not clamped). Divide a diffusion latent by scale_factor first."""
        if z.ndim != 4 or z.shape[1] != self.embed_dim:
            raise ValueError(f"decode expects latents (B, {self.embed_dim}, h, w), got {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """Reconstruct x (B, in_channels, H, W) in [-1, 1]: returns (reconstruction, posterior)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def init_from_ckpt(self, path: str | Path, ignore_keys: Sequence[str] = ()) -> None:
        """Load VAE weights from a checkpoint with a strict key and shape check.

        Reads `.safetensors` or `.ckpt`/`.pth` (weights_only) through `ldm.checkpoint`; takes the
        `first_stage_model.` entries of a full Stable Diffusion checkpoint, or the file's own keys for a
        bare VAE. Keys under `loss.` (the original's training loss) and under any `ignore_keys` prefix
        are dropped. A model built on the meta device receives the checkpoint tensors as parameters.
        Raises CheckpointError (a ValueError) naming the file and the missing/unexpected/mis-shaped keys.
        """
        state = read_state_dict(path)
        if any(key.startswith(FIRST_STAGE_PREFIX) for key in state):
            state = {
                key.removeprefix(FIRST_STAGE_PREFIX): value
                for key, value in state.items()
                if key.startswith(FIRST_STAGE_PREFIX)
            }
        dropped = (LOSS_PREFIX, *ignore_keys)
        state = {key: value for key, value in state.items() if not key.startswith(dropped)}
        load_weights(self, state, source=str(path))
