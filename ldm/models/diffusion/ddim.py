"""DDIM sampling (Song et al. 2021) with classifier-free guidance (Ho & Salimans 2022).

`DDIMSchedule` is the scheduler: it knows the timesteps and how to take one step from a model output
(eps, v or x0: it converts with alpha_bar at the step), and never touches the network. `DDIMSampler`
runs the loop around a model with the original's `sample(...)` signature.

Paper symbols -> names here, for the step from tau_i to tau_{i-1}:
    alpha_{tau_i}       alphas[i]        (alpha_bar of the DDPM schedule at timestep tau_i)
    alpha_{tau_{i-1}}   alphas_prev[i]   (alpha_bar[0] for the last step, as the original, not 1)
    sigma_{tau_i}       sigmas[i]        = eta * sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    x_0 prediction      pred_x0          = (x - sqrt(1 - a) eps) / sqrt(a)
    from v              eps = sqrt(a) v + sqrt(1 - a) x,  pred_x0 = sqrt(a) x - sqrt(1 - a) v
    x_{tau_{i-1}}       x_prev           = sqrt(a_prev) pred_x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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

    def step(self, output: torch.Tensor, index: int, x: torch.Tensor, parameterization: str = "eps",
             noise: torch.Tensor | None = None, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step from timesteps[index] to the previous one: returns (x_prev, pred_x0).

        output: the (guided) model output at x (B, C, h, w), a prediction of eps, x0 or v (Salimans & Ho
        2022: v = sqrt(a) eps - sqrt(1 - a) x0) as `parameterization` says. noise: z for eta > 0 (drawn
        from `generator` when None).
        """
        a_t, a_prev, sigma = (float(v[index]) for v in (self.alphas, self.alphas_prev, self.sigmas))
        eps, pred_x0 = _eps_and_x0(output, x, a_t, parameterization)
        x_prev = a_prev**0.5 * pred_x0 + (1 - a_prev - sigma**2) ** 0.5 * eps
        if sigma > 0:
            if noise is None:
                noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x_prev = x_prev + sigma * noise
        return x_prev, pred_x0


def _eps_and_x0(output: torch.Tensor, x: torch.Tensor, a_t: float, parameterization: str
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps, x0) predicted at x_t = sqrt(a) x0 + sqrt(1 - a) eps from a model output of any parameterisation."""
    if parameterization == "eps":
        return output, (x - (1 - a_t) ** 0.5 * output) / a_t**0.5
    if parameterization == "v":
        return a_t**0.5 * output + (1 - a_t) ** 0.5 * x, a_t**0.5 * x - (1 - a_t) ** 0.5 * output
    if parameterization == "x0":
        return (x - a_t**0.5 * output) / (1 - a_t) ** 0.5, output
    raise ValueError(f"parameterization must be 'eps', 'v' or 'x0', got {parameterization!r}")


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


def guided_output(model: Any, x: torch.Tensor, t: torch.Tensor, cond: Any, uncond: Any, scale: float,
                  model_kwargs: Mapping[str, Any], *, batch_cfg: bool = True) -> torch.Tensor:
    """The classifier-free guided model output uncond + scale * (cond - uncond) at (x, t), as the samplers of
    this package (DDIM here, UniPC in unipc.py) feed to their steps.

    uncond None or scale 1: the conditional output alone (one call). batch_cfg: both branches in one batch of
    2B where their conditions stack (the original's ldm sampler), else two calls (the original's cldm
    "hacked" sampler, and always in guess mode, where the unconditional branch has no hint).
    """
    if uncond is None or scale == 1.0:
        return model.apply_model(x, t, cond, **model_kwargs)
    both = _concat_conditions(uncond, cond) if batch_cfg and isinstance(cond, Mapping) else None
    if both is not None:
        out_uncond, out_cond = model.apply_model(torch.cat([x, x]), torch.cat([t, t]), both, **model_kwargs).chunk(2)
    else:
        out_cond = model.apply_model(x, t, cond, **model_kwargs)
        out_uncond = model.apply_model(x, t, uncond, **model_kwargs)
    return out_uncond + scale * (out_cond - out_uncond)


# The original's sample(...) arguments that this sampler does not implement, with their defaults: a call
# that passes anything else (e.g. an inpainting mask and x0) is refused instead of sampling without it.
UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "normals_sequence": None, "quantize_x0": False, "mask": None, "x0": None, "temperature": 1.0,
    "noise_dropout": 0.0, "score_corrector": None, "corrector_kwargs": None, "dynamic_threshold": None,
}


def _check_unsupported(given: Mapping[str, Any], caller: str = "DDIMSampler.sample") -> None:
    for name, default in UNSUPPORTED_DEFAULTS.items():
        value = given[name]
        if value is default or (not isinstance(value, torch.Tensor) and value == default):
            continue
        raise NotImplementedError(f"{caller}: {name}={value!r} is not supported (only the default "
                                  f"{default!r}); inpainting (mask, x0), score correction, quantisation, "
                                  f"temperature, noise dropout and dynamic thresholding are not implemented")


class DDIMSampler:
    """DDIM around a diffusion model that has `apply_model(x, t, cond, **model_kwargs)`, `alphas_cumprod`
    and `parameterization` ("eps", "v" or "x0").

    schedule: the original's argument; only its "linear" (the model's own DDPM schedule) exists.
    batch_cfg: evaluate the conditional and unconditional branches in one batch of 2B (faster; the
    original's ldm sampler) instead of two calls (the original's cldm "hacked" sampler). They agree to
    float rounding.
    """

    def __init__(self, model: Any, schedule: str = "linear", *, batch_cfg: bool = True):
        if schedule != "linear":
            raise NotImplementedError(f"DDIMSampler: schedule={schedule!r} is not supported (only 'linear', the "
                                      f"model's own alphas_cumprod)")
        self.model = model
        self.schedule = schedule
        self.batch_cfg = batch_cfg

    def _guided_output(self, x: torch.Tensor, t: torch.Tensor, cond: Any, uncond: Any, scale: float,
                       model_kwargs: Mapping[str, Any]) -> torch.Tensor:
        return guided_output(self.model, x, t, cond, uncond, scale, model_kwargs, batch_cfg=self.batch_cfg)

    @torch.no_grad()
    def sample(
        self,
        S: int,
        batch_size: int,
        shape: tuple[int, int, int],
        conditioning: Any = None,
        callback: Callable[[int], None] | None = None,
        normals_sequence: Any = None,
        img_callback: Callable[[torch.Tensor, int], None] | None = None,
        quantize_x0: bool = False,
        eta: float = 0.0,
        mask: torch.Tensor | None = None,
        x0: torch.Tensor | None = None,
        temperature: float = 1.0,
        noise_dropout: float = 0.0,
        score_corrector: Any = None,
        corrector_kwargs: dict[str, Any] | None = None,
        verbose: bool = True,
        x_T: torch.Tensor | None = None,
        log_every_t: int = 100,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Any = None,
        dynamic_threshold: float | None = None,
        ucg_schedule: Sequence[float] | None = None,
        *,
        generator: torch.Generator | None = None,
        control_scales: float | Sequence[float] | None = None,
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Sample latents (batch_size, *shape) in S DDIM steps, with the original's arguments.

        callback(i) after step i; img_callback(pred_x0, i) with that step's x0 prediction. ucg_schedule:
        one guidance scale per step (replaces unconditional_guidance_scale). generator: for x_T (when not
        given) and the eta > 0 noise. control_scales: passed to `apply_model` (a ControlLDM's control
        strength for this call; None: the model's default). The original's other arguments must keep
        their defaults (NotImplementedError otherwise; see UNSUPPORTED_DEFAULTS).
        Returns (samples, {"x_inter": [...], "pred_x0": [...]}): x_T first, then the state after every
        step whose index is a multiple of log_every_t (and after the first step), like the original.
        """
        _check_unsupported(locals())
        schedule = DDIMSchedule(self.model.alphas_cumprod, S, eta)
        if ucg_schedule is not None and len(ucg_schedule) != len(schedule):
            raise ValueError(f"ucg_schedule has {len(ucg_schedule)} scales for {len(schedule)} DDIM steps")
        model_kwargs = {} if control_scales is None else {"control_scales": control_scales}
        device = self.model.alphas_cumprod.device
        if x_T is None:
            x_T = torch.randn((batch_size, *shape), generator=generator, device=device)
        x = x_T.to(device)
        intermediates = {"x_inter": [x], "pred_x0": [x]}
        total = len(schedule)
        steps = range(total - 1, -1, -1)
        for i, index in enumerate(tqdm(steps, desc="DDIM", total=total, disable=not verbose, leave=False)):
            t = torch.full((x.shape[0],), int(schedule.timesteps[index]), device=device, dtype=torch.long)
            scale = unconditional_guidance_scale if ucg_schedule is None else ucg_schedule[i]
            output = self._guided_output(x, t, conditioning, unconditional_conditioning, scale, model_kwargs)
            x, pred_x0 = schedule.step(output, index, x, self.model.parameterization, generator=generator)
            if index % log_every_t == 0 or i == 0:
                intermediates["x_inter"].append(x)
                intermediates["pred_x0"].append(pred_x0)
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(pred_x0, i)
        return x, intermediates
