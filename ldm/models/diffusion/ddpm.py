"""Latent diffusion (Rombach et al. 2022): a UNet denoiser in the latent space of a KL autoencoder,
conditioned on text through a frozen encoder.

`LatentDiffusion` is a plain `nn.Module` holding the networks and the DDPM schedule buffers with the
checkpoint layout of CompVis/lllyasviel (`model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.*`, the schedule buffers and `logvar`). It knows how to noise (`q_sample`), how to
call the denoiser (`apply_model`) and the training loss (`p_losses`). Sampling lives in
`ldm.models.diffusion.ddim`; the Lightning training system lives in `trainer.module`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm.models.diffusion.schedule import extract, lvlb_weights, make_beta_schedule, schedule_buffers
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config

Conditioning = Mapping[str, Any]

# Arguments of the original LatentDiffusion that only steered its Lightning training loop, logging or
# loading (which live elsewhere here). They are accepted so that the original configs load unchanged.
_TRAINING_LOOP_ARGS = frozenset({
    "monitor", "ckpt_path", "ignore_keys", "load_only_unet", "log_every_t", "clip_denoised",
    "use_positional_encodings", "make_it_fit", "ucg_training", "reset_ema", "reset_num_ema_updates",
    "num_timesteps_cond", "cond_stage_forward", "concat_mode", "use_ema", "image_size", "channels",
    "first_stage_key", "cond_stage_key", "cond_stage_trainable", "scheduler_config", "learn_logvar",
    "unet_trainable",
})


class DiffusionWrapper(nn.Module):
    """Holds the UNet under the attribute name every checkpoint uses: `model.diffusion_model`."""

    def __init__(self, diffusion_model: nn.Module, conditioning_key: str | None):
        super().__init__()
        if conditioning_key not in ("crossattn", None):
            raise ValueError(f"conditioning_key {conditioning_key!r} is not supported (SD uses 'crossattn')")
        self.diffusion_model = diffusion_model
        self.conditioning_key = conditioning_key


class LatentDiffusion(nn.Module):
    """Text-to-image latent diffusion with the original's constructor arguments and buffers."""

    def __init__(
        self,
        first_stage_config: Mapping,
        cond_stage_config: Mapping,
        unet_config: Mapping,
        timesteps: int = 1000,
        beta_schedule: str = "linear",
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
        given_betas: list[float] | None = None,
        v_posterior: float = 0.0,
        parameterization: str = "eps",
        loss_type: str = "l2",
        l_simple_weight: float = 1.0,
        original_elbo_weight: float = 0.0,
        logvar_init: float = 0.0,
        scale_factor: float = 1.0,
        scale_by_std: bool = False,
        conditioning_key: str | None = "crossattn",
        first_stage_key: str = "jpg",
        cond_stage_key: str = "txt",
        **training_loop_args,
    ):
        super().__init__()
        unknown = set(training_loop_args) - _TRAINING_LOOP_ARGS
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected arguments: {sorted(unknown)}")
        if parameterization not in ("eps", "x0", "v"):
            raise ValueError(f"parameterization must be 'eps', 'x0' or 'v', got {parameterization!r}")
        if loss_type not in ("l1", "l2"):
            raise ValueError(f"loss_type must be 'l1' or 'l2', got {loss_type!r}")
        if scale_by_std:
            raise ValueError("scale_by_std is not supported: give the scale_factor (SD: 0.18215)")
        self.parameterization = parameterization
        self.loss_type = loss_type
        self.l_simple_weight = l_simple_weight
        self.original_elbo_weight = original_elbo_weight
        self.scale_factor = scale_factor
        self.first_stage_key = first_stage_key
        self.cond_stage_key = cond_stage_key
        self.latent_channels = int(unet_config.get("params", {}).get("in_channels", 4))

        self.model = DiffusionWrapper(instantiate_from_config(unet_config), conditioning_key)
        self.first_stage_model = instantiate_from_config(first_stage_config)
        self.cond_stage_model = instantiate_from_config(cond_stage_config)
        for frozen in (self.first_stage_model, self.cond_stage_model):
            frozen.eval()
            frozen.requires_grad_(False)

        if given_betas is not None:
            betas = torch.tensor(given_betas, dtype=torch.float64)
        else:
            betas = make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        self.num_timesteps = int(betas.shape[0])
        buffers = schedule_buffers(betas, v_posterior)
        for name, value in buffers.items():
            self.register_buffer(name, value)
        self.register_buffer("lvlb_weights", lvlb_weights(buffers, parameterization), persistent=False)
        # ControlNet's ddpm.py stores logvar (per-timestep loss weighting, zeros) as a buffer.
        self.register_buffer("logvar", torch.full((self.num_timesteps,), float(logvar_init)))

    def train(self, mode: bool = True) -> LatentDiffusion:
        """Train mode for the denoiser; the frozen autoencoder and text encoder always stay in eval."""
        super().train(mode)
        self.first_stage_model.eval()
        self.cond_stage_model.eval()
        return self

    # ---- forward process ------------------------------------------------------------------------
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise.

        x_start: (B, C, H, W), t: (B,) integer timesteps.
        """
        noise = torch.randn_like(x_start) if noise is None else noise
        return (extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def get_v(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The v target of Salimans & Ho 2022: sqrt(alpha_bar) noise - sqrt(1 - alpha_bar) x_0."""
        return (extract(self.sqrt_alphas_cumprod, t, x.shape) * noise
                - extract(self.sqrt_one_minus_alphas_cumprod, t, x.shape) * x)

    def predict_start_from_z_and_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (extract(self.sqrt_alphas_cumprod, t, x_t.shape) * x_t
                - extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v)

    def predict_eps_from_z_and_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (extract(self.sqrt_alphas_cumprod, t, x_t.shape) * v
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * x_t)

    def predict_start(self, x_t: torch.Tensor, t: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        """The one-step x_0 prediction from the denoiser's output at (x_t, t), whatever its `parameterization`:
        eps: (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar); v: sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v;
        x0: the output itself. Differentiable (ControlNet++'s reward decodes it)."""
        if self.parameterization == "x0":
            return model_output
        if self.parameterization == "v":
            return self.predict_start_from_z_and_v(x_t, t, model_output)
        return ((x_t - extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * model_output)
                / extract(self.sqrt_alphas_cumprod, t, x_t.shape))

    # ---- first stage (VAE) and text conditioning --------------------------------------------------
    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Images (B, 3, H, W) in [-1, 1] -> posterior over unscaled latents (B, 4, H/8, W/8)."""
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, posterior: DiagonalGaussianDistribution | torch.Tensor,
                                 generator: torch.Generator | None = None) -> torch.Tensor:
        """A latent sample scaled by `scale_factor` (what the UNet sees)."""
        if isinstance(posterior, DiagonalGaussianDistribution):
            z = posterior.sample(generator=generator)
        else:
            z = posterior
        return self.scale_factor * z

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 4, h, w) -> images (B, 3, 8h, 8w), roughly in [-1, 1]."""
        return self.first_stage_model.decode(z / self.scale_factor)

    @torch.no_grad()
    def get_learned_conditioning(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> text context (B, 77, context_dim)."""
        encode = getattr(self.cond_stage_model, "encode", self.cond_stage_model)
        context = encode(prompts)
        if isinstance(context, DiagonalGaussianDistribution):
            context = context.mode()
        return context

    # ---- denoiser and loss --------------------------------------------------------------------------
    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Conditioning | torch.Tensor) -> torch.Tensor:
        """The denoiser's output (eps, x0 or v per `parameterization`) for x_noisy (B, C, h, w)."""
        context = cond if isinstance(cond, torch.Tensor) else torch.cat(list(cond["c_crossattn"]), dim=1)
        return self.model.diffusion_model(x_noisy, timesteps=t, context=context)

    def _elementwise_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.loss_type == "l1":
            return (target - pred).abs()
        return F.mse_loss(target, pred, reduction="none")

    def p_losses(self, x_start: torch.Tensor, cond: Conditioning, t: torch.Tensor,
                 noise: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss at timesteps t for scaled latents x_start (B, C, h, w).

        Returns (loss, logs) with logs under "train/..." or "val/..." as the original names them:
        loss_simple (plain MSE to the target), loss_vlb (reported, weighted by original_elbo_weight)
        and loss.
        """
        loss, logs, _, _ = self.denoising_loss(x_start, cond, t, noise)
        return loss, logs

    def denoising_loss(self, x_start: torch.Tensor, cond: Conditioning, t: torch.Tensor,
                       noise: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """`p_losses` and what it was computed from: (loss, logs, x_noisy, model_output), for a loss that also
        uses the prediction (ControlNet++'s consistency reward, `predict_start`)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        x_noisy = self.q_sample(x_start, t, noise)
        model_output = self.apply_model(x_noisy, t, cond)
        if self.parameterization == "eps":
            target = noise
        elif self.parameterization == "x0":
            target = x_start
        else:
            target = self.get_v(x_start, noise, t)
        per_sample = self._elementwise_loss(model_output.float(), target.float()).mean(dim=(1, 2, 3))
        logvar_t = self.logvar.to(t.device)[t]
        loss = self.l_simple_weight * (per_sample / torch.exp(logvar_t) + logvar_t).mean()
        loss_vlb = (self.lvlb_weights.to(t.device)[t] * per_sample).mean()
        loss = loss + self.original_elbo_weight * loss_vlb
        prefix = "train" if self.training else "val"
        logs = {f"{prefix}/loss_simple": per_sample.mean().detach(), f"{prefix}/loss_vlb": loss_vlb.detach(),
                f"{prefix}/loss": loss.detach()}
        return loss, logs, x_noisy, model_output
