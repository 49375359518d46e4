"""The DDPM noise schedule (Ho et al. 2020) as the buffers latent-diffusion checkpoints store.

Paper symbols -> names here:
    beta_t            betas
    alpha_t           1 - beta_t
    alpha_bar_t       alphas_cumprod            (prod of alpha_s for s <= t)
    alpha_bar_{t-1}   alphas_cumprod_prev       (1 at t = 0)
    beta~_t           posterior_variance        (variance of q(x_{t-1} | x_t, x_0))
    mu~_t coefficients  posterior_mean_coef1 (on x_0), posterior_mean_coef2 (on x_t)

Everything is computed in float64 and stored in float32, as the original did, so a fresh model and a
released checkpoint hold the same bits.
"""

from __future__ import annotations

import math

import torch

SCHEDULE_BUFFERS: tuple[str, ...] = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


def make_beta_schedule(kind: str, n_timestep: int, linear_start: float = 1e-4, linear_end: float = 2e-2,
                       cosine_s: float = 8e-3) -> torch.Tensor:
    """Betas (float64, shape (n_timestep,)). SD uses "linear", which is linear in sqrt(beta)."""
    if kind == "linear":
        return torch.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=torch.float64) ** 2
    if kind == "cosine":  # Nichol & Dhariwal 2021
        steps = torch.arange(n_timestep + 1, dtype=torch.float64) / n_timestep + cosine_s
        alphas = torch.cos(steps / (1 + cosine_s) * math.pi / 2).pow(2)
        alphas = alphas / alphas[0]
        return (1 - alphas[1:] / alphas[:-1]).clamp(0, 0.999)
    if kind == "sqrt_linear":
        return torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64)
    if kind == "sqrt":
        return torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64) ** 0.5
    raise ValueError(f"unknown beta schedule {kind!r}")


def schedule_buffers(betas: torch.Tensor, v_posterior: float = 0.0) -> dict[str, torch.Tensor]:
    """All schedule buffers (float32) for float64 `betas`, keyed by the checkpoint names."""
    betas = betas.double()
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    posterior_variance = (1 - v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (
        1.0 - alphas_cumprod
    ) + v_posterior * betas
    values = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1).sqrt(),
        "posterior_variance": posterior_variance,
        # the variance is 0 at t = 0, so the log is clipped
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
    }
    return {name: values[name].float() for name in SCHEDULE_BUFFERS}


def lvlb_weights(buffers: dict[str, torch.Tensor], parameterization: str) -> torch.Tensor:
    """Per-timestep weights of the variational bound term (float32, computed from the float32 buffers)."""
    betas, ac = buffers["betas"], buffers["alphas_cumprod"]
    if parameterization == "eps":
        weights = betas**2 / (2 * buffers["posterior_variance"] * (1 - betas) * (1 - ac))
    elif parameterization == "x0":
        # `2.0 * 1 - ac` (not 2 * (1 - ac)) is the original ddpm.py's operator precedence, kept on purpose
        # so the buffer matches the original's checkpoints.
        weights = 0.5 * ac.sqrt() / (2.0 * 1 - ac)
    elif parameterization == "v":
        # The original builds the eps weights only for their shape: all ones, kept as written for parity.
        weights = torch.ones_like(betas**2 / (2 * buffers["posterior_variance"] * (1 - betas) * (1 - ac)))
    else:
        raise ValueError(f"unknown parameterization {parameterization!r}")
    weights[0] = weights[1]  # entry 0 is inf/nan (posterior variance 0)
    return weights


def extract(values: torch.Tensor, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """values[t] reshaped to broadcast over a batch of `shape`: (B,) -> (B, 1, 1, ...)."""
    out = values.to(t.device)[t]
    return out.reshape(t.shape[0], *([1] * (len(shape) - 1)))
