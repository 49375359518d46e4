"""The diagonal Gaussian posterior q(z|x) that the KL autoencoder's encoder predicts."""

from __future__ import annotations

import math

import torch

# The original clamps the log-variance so that exp() stays finite and std never reaches exactly 0.
LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


class DiagonalGaussianDistribution:
    """N(mean, diag(exp(logvar))) over latent maps.

    parameters: (B, 2*C, H, W), the mean channels first and then the log-variance channels (the
    output of `AutoencoderKL.quant_conv`). The log-variance is clamped to [-30, 20].
    With `deterministic=True` the variance is treated as zero: `sample()` returns the mean and
    `kl()` / `nll()` return zeros.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        if parameters.ndim != 4 or parameters.shape[1] % 2:
            raise ValueError(
                f"parameters must be (B, 2*C, H, W) with mean and logvar stacked on dim 1, "
                f"got shape {tuple(parameters.shape)}"
            )
        self.parameters = parameters
        self.deterministic = deterministic
        mean, logvar = parameters.chunk(2, dim=1)
        self.mean = mean
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        if deterministic:
            self.std = torch.zeros_like(mean)
            self.var = torch.zeros_like(mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A reparameterised draw mean + std * eps, shape (B, C, H, W), differentiable in the parameters.

        eps ~ N(0, 1) is drawn in float32 on the generator's device (the CPU default generator when
        `generator` is None), as the original does, so a seeded run draws the same noise on any
        accelerator; it is then moved to the mean's device and dtype.
        """
        noise_device = generator.device if generator is not None else torch.device("cpu")
        if self.mean.is_meta:
            noise_device = self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=noise_device, dtype=torch.float32)
        return self.mean + self.std * noise.to(device=self.mean.device, dtype=self.mean.dtype)

    def mode(self) -> torch.Tensor:
        """The most likely latent, i.e. the mean: (B, C, H, W)."""
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(self || other) summed over (C, H, W): shape (B,). `other=None` means the prior N(0, I).

        Computed in float32 because exp(logvar) overflows float16 for logvar > ~11.
        """
        if self.deterministic:
            return torch.zeros_like(self.mean, dtype=torch.float32).sum(dim=(1, 2, 3))
        mean, logvar = self.mean.float(), self.logvar.float()
        if other is None:
            other_mean, other_logvar = torch.zeros_like(mean), torch.zeros_like(logvar)
        else:
            other_mean, other_logvar = other.mean.float(), other.logvar.float()
        per_element = (
            (mean - other_mean).pow(2) / other_logvar.exp()
            + (logvar - other_logvar).exp()
            - 1.0
            - logvar
            + other_logvar
        )
        return 0.5 * per_element.sum(dim=(1, 2, 3))

    def nll(self, sample: torch.Tensor, dims: tuple[int, ...] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of `sample` (B, C, H, W) summed over `dims`: shape (B,) by default.

        Computed in float32, like `kl`.
        """
        if self.deterministic:
            return torch.zeros_like(self.mean, dtype=torch.float32).sum(dim=dims)
        mean, logvar = self.mean.float(), self.logvar.float()
        per_element = math.log(2.0 * math.pi) + logvar + (sample.float() - mean).pow(2) / logvar.exp()
        return 0.5 * per_element.sum(dim=dims)
