"""DDIM sampling (Song et al. 2021) with classifier-free guidance (Ho & Salimans 2022).

`DDIMSchedule` is the scheduler: it knows the timesteps and how to take one step from a noise
prediction, and never touches the network. `DDIMSampler` runs the loop around a model with the
original's `sample(...)` signature.

Paper symbols -> names here, for the step from tau_i to tau_{i-1}:
    alpha_{tau_i}       alphas[i]        (alpha_bar of the DDPM schedule at timestep tau_i)
    alpha_{tau_{i-1}}   alphas_prev[i]   (alpha_bar[0] for the last step, as the original, not 1)
    sigma_{tau_i}       sigmas[i]        = eta * sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    x_0 prediction      pred_x0          = (x - sqrt(1 - a) eps) / sqrt(a)
    x_{tau_{i-1}}       x_prev           = sqrt(a_prev) pred_x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from tqdm.auto import tqdm


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The original's "uniform" timesteps: 1, 1 + c, 1 + 2c, ... with c = T // num_steps (ascending).

    Where that rule would step past the schedule's end (e.g. 3 steps of 1000 give 1, 334, 667, 1000, which
    makes the original fail), the out-of-range steps are dropped.
    """
    if not 0 < num_steps <= num_train_timesteps:
        raise ValueError(f"number of DDIM steps must be in 1..{num_train_timesteps}, got {num_steps}")
    stride = num_train_timesteps // num_steps
    steps = torch.arange(0, num_train_timesteps, stride) + 1
    return steps[steps < num_train_timesteps]


class DDIMSchedule:
    """Timesteps and per-step coefficients of DDIM for a DDPM `alphas_cumprod` (float32, (T,))."""

    def __init__(self, alphas_cumprod: torch.Tensor, num_steps: int, eta: float = 0.0):
        ac = alphas_cumprod.detach().double().cpu()
        self.timesteps = ddim_timesteps(num_steps, ac.shape[0])  # ascending
        self.eta = eta
        self.alphas = ac[self.timesteps]
        self.alphas_prev = torch.cat([ac[:1], ac[self.timesteps[:-1]]])
        self.sigmas = eta * ((1 - self.alphas_prev) / (1 - self.alphas) * (1 - self.alphas / self.alphas_prev)).sqrt()

    def __len__(self) -> int:
        return len(self.timesteps)

    def step(self, eps: torch.Tensor, index: int, x: torch.Tensor, pred_x0: torch.Tensor | None = None,
             noise: torch.Tensor | None = None, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step from timesteps[index] to the previous one: returns (x_prev, pred_x0).

        eps: the (guided) noise prediction at x (B, C, h, w). pred_x0 may be given (v-parameterisation).
        """
        a_t, a_prev, sigma = (float(v[index]) for v in (self.alphas, self.alphas_prev, self.sigmas))
        if pred_x0 is None:
            pred_x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        x_prev = a_prev**0.5 * pred_x0 + (1 - a_prev - sigma**2) ** 0.5 * eps
        if sigma > 0:
            if noise is None:
                noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x_prev = x_prev + sigma * noise
        return x_prev, pred_x0


def _concat_conditions(uncond: Mapping[str, Any], cond: Mapping[str, Any]) -> dict[str, list[torch.Tensor]] | None:
    """[uncond, cond] stacked along the batch, or None when they cannot be (e.g. guess mode drops the
    hint from the unconditional branch)."""
    if set(uncond) != set(cond):
        return None
    out = {}
    for key in cond:
        u, c = uncond[key], cond[key]
        if u is None or c is None:
            return None
        if len(u) != len(c) or any(a.shape[1:] != b.shape[1:] for a, b in zip(u, c, strict=True)):
            return None
        out[key] = [torch.cat([a, b]) for a, b in zip(u, c, strict=True)]
    return out


class DDIMSampler:
    """DDIM around a diffusion model that has `apply_model(x, t, cond)`, `alphas_cumprod` and
    `parameterization`.

    batch_cfg: evaluate the conditional and unconditional branches in one batch of 2B (faster; the
    original's ldm sampler) instead of two calls (the original's cldm "hacked" sampler). They agree to
    float rounding.
    """

    def __init__(self, model: Any, batch_cfg: bool = True, **_ignored: Any):
        self.model = model
        self.batch_cfg = batch_cfg

    def _guided_output(self, x: torch.Tensor, t: torch.Tensor, cond: Any, uncond: Any, scale: float) -> torch.Tensor:
        if uncond is None or scale == 1.0:
            return self.model.apply_model(x, t, cond)
        both = _concat_conditions(uncond, cond) if self.batch_cfg and isinstance(cond, Mapping) else None
        if both is not None:
            out_uncond, out_cond = self.model.apply_model(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        else:
            out_cond = self.model.apply_model(x, t, cond)
            out_uncond = self.model.apply_model(x, t, uncond)
        return out_uncond + scale * (out_cond - out_uncond)

    @torch.no_grad()
    def sample(
        self,
        S: int,
        batch_size: int,
        shape: tuple[int, int, int],
        conditioning: Any = None,
        callback: Callable[[int], None] | None = None,
        eta: float = 0.0,
        x_T: torch.Tensor | None = None,
        log_every_t: int = 100,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Any = None,
        verbose: bool = True,
        generator: torch.Generator | None = None,
        **_ignored: Any,
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Sample latents (batch_size, *shape) in S DDIM steps.

        Returns (samples, {"x_inter": [...], "pred_x0": [...]}): x_T first, then the state after every
        step whose index is a multiple of log_every_t (and after the first step), like the original.
        """
        schedule = DDIMSchedule(self.model.alphas_cumprod, S, eta)
        device = self.model.alphas_cumprod.device
        if x_T is None:
            x_T = torch.randn((batch_size, *shape), generator=generator, device=device)
        x = x_T.to(device)
        intermediates = {"x_inter": [x], "pred_x0": [x]}
        total = len(schedule)
        steps = range(total - 1, -1, -1)
        for i, index in enumerate(tqdm(steps, desc="DDIM", total=total, disable=not verbose, leave=False)):
            t = torch.full((x.shape[0],), int(schedule.timesteps[index]), device=device, dtype=torch.long)
            output = self._guided_output(x, t, conditioning, unconditional_conditioning, unconditional_guidance_scale)
            if self.model.parameterization == "v":
                eps = self.model.predict_eps_from_z_and_v(x, t, output)
                pred_x0 = self.model.predict_start_from_z_and_v(x, t, output)
            else:
                eps, pred_x0 = output, None
            x, pred_x0 = schedule.step(eps, index, x, pred_x0=pred_x0, generator=generator)
            if index % log_every_t == 0 or i == 0:
                intermediates["x_inter"].append(x)
                intermediates["pred_x0"].append(pred_x0)
            if callback is not None:
                callback(i)
        return x, intermediates
