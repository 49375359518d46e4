"""Stage 1 of the toy base: train the KL autoencoder (`first_stage_model`) on toy images.

Flat shapes need no perceptual or adversarial loss (SD's LPIPS + patch GAN): L1 + L2 reconstruction
losses keep their edges sharp and their colours right. The network is convolutional, so it trains on
random crops (a quarter of the pixels at 32 px), which is what makes CPU training affordable. The KL
term is weighted as in SD's VAE (1e-6 against the per-value sum), so the posterior is nearly
deterministic and the latent scale is arbitrary; `normalize_latent_scale` then rescales the latent
exactly so that SD's `scale_factor` gives unit variance, as it does for SD's VAE.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ldm.models.autoencoder import AutoencoderKL
from toy.schedule import make_optimizer

DEFAULT_KL_WEIGHT = 1e-6
# The posterior starts nearly deterministic (std e^-5): with SD's tiny KL weight the unit variance of a
# fresh encoder would otherwise drown the latent in noise for many steps before it shrinks.
INITIAL_LOGVAR = -10.0
# The last share of the steps trains on whole images, so the GroupNorm statistics match inference.
DEFAULT_FULL_IMAGE_FRACTION = 0.2


def random_crops(images: torch.Tensor, index: torch.Tensor, crop: int, generator: torch.Generator | None
                 ) -> torch.Tensor:
    """images[index], each cut to a random crop x crop window: (len(index), 3, crop, crop)."""
    height, width = images.shape[2:]
    tops = torch.randint(height - crop + 1, (len(index),), generator=generator).tolist()
    lefts = torch.randint(width - crop + 1, (len(index),), generator=generator).tolist()
    return torch.stack([images[i, :, top:top + crop, left:left + crop]
                        for i, top, left in zip(index.tolist(), tops, lefts, strict=True)])


def train_vae(vae: AutoencoderKL, images: torch.Tensor, steps: int, batch_size: int, learning_rate: float,
              crop: int, full_image_fraction: float = DEFAULT_FULL_IMAGE_FRACTION,
              kl_weight: float = DEFAULT_KL_WEIGHT, generator: torch.Generator | None = None,
              progress: bool = True) -> float:
    """Train `vae` in place on images (N, 3, H, W) in [-1, 1]; returns the mean L1 of the last 10% of steps.

    The first (1 - full_image_fraction) of the steps see `batch_size` random crop x crop windows (crop a
    multiple of 8), the rest whole images, as many as hold the same number of pixels (at least 1).

    Loss per batch: mean |x - decode(z)| + mean (x - decode(z))^2 + kl_weight * KL(q(z|x) || N(0, I)) /
    (3 crop^2), z sampled from the posterior (SD's VAE loss without LPIPS and GAN, normalised per value).
    """
    with torch.no_grad():
        vae.quant_conv.bias[vae.embed_dim:] = INITIAL_LOGVAR
    vae.requires_grad_(True)
    vae.train()
    optimizer, scheduler = make_optimizer(vae.parameters(), learning_rate, steps)
    side = images.shape[-1]
    crop_steps = round(steps * (1.0 - full_image_fraction))
    full_batch_size = max(1, batch_size * crop * crop // (side * side))
    tail = []
    bar = tqdm(range(steps), desc="VAE", disable=not progress)
    for step in bar:
        if step < crop_steps:
            index = torch.randint(len(images), (batch_size,), generator=generator)
            batch = random_crops(images, index, crop, generator)
        else:
            batch = images[torch.randint(len(images), (full_batch_size,), generator=generator)]
        posterior = vae.encode(batch)
        error = vae.decode(posterior.sample(generator=generator)) - batch
        l1 = error.abs().mean()
        loss = l1 + error.pow(2).mean() + kl_weight * posterior.kl().mean() / batch[0].numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step >= steps - max(1, steps // 10):
            tail.append(l1.item())
        bar.set_postfix(l1=f"{l1.item():.4f}")
    vae.eval()
    vae.requires_grad_(False)
    return sum(tail) / len(tail)


@torch.no_grad()
def encode_means(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Posterior means (N, embed_dim, H/8, W/8), unscaled, of images (N, 3, H, W) in [-1, 1]."""
    return torch.cat([vae.encode(images[i:i + batch_size]).mode() for i in range(0, len(images), batch_size)])


@torch.no_grad()
def standardize_latents(vae: AutoencoderKL, means: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """Reparameterise the VAE so that scale_factor * z has zero mean and unit variance per channel, as
    measured on `means` (N, C, h, w), the posterior means of the training images (`encode_means`).
    Returns those latents as the new VAE encodes them, times scale_factor: what the UNet trains on.

    SD's VAE has roughly unit variance after its scale_factor; the diffusion model learns best when no
    latent channel is much smaller than the noise. Exact: with the posterior mean m_c of channel c mapped
    to k_c (m_c - mu_c), `quant_conv`'s mean rows are scaled and shifted, its log-variance rows shifted by
    2 ln k_c (the same noise relative to the mean), and `post_quant_conv` takes z / k_c + mu_c, so
    decode(encode(x)) is unchanged.
    """
    mu = means.mean(dim=(0, 2, 3))
    k = 1.0 / (scale_factor * means.std(dim=(0, 2, 3)))
    latent = vae.embed_dim
    vae.quant_conv.weight[:latent] *= k[:, None, None, None]
    vae.quant_conv.bias[:latent] = k * (vae.quant_conv.bias[:latent] - mu)
    vae.quant_conv.bias[latent:] += 2.0 * torch.log(k)
    vae.post_quant_conv.bias += vae.post_quant_conv.weight[:, :, 0, 0] @ mu
    vae.post_quant_conv.weight /= k[None, :, None, None]
    return scale_factor * k[None, :, None, None] * (means - mu[None, :, None, None])
