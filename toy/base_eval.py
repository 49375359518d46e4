"""The toy base model's own evaluation: VAE reconstructions and text-to-image samples.

- VAE: mean squared error and PSNR of held-out reconstructions, and the Canny F1 of a reconstruction's
  edges against the original's (the best control fidelity any model on this VAE can reach).
- UNet: for every caption of the domain, a few samples (DDIM, classifier-free guidance); `toy.classify`
  reads each back, and the rates at which colour, shape and background match the prompt are reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from annotator.canny import canny
from cldm.sampling import latent_shape, sample_images, to_uint8
from evaluation.edge_metrics import EdgeCounts, edge_counts
from ldm.models.diffusion.ddpm import LatentDiffusion
from toy.classify import read_scene
from toy.shapes import BACKGROUNDS, COLOURS, SHAPES, caption

EVAL_TOLERANCE = 2


@torch.no_grad()
def reconstruction_report(model: LatentDiffusion, images: torch.Tensor, batch_size: int = 128) -> dict[str, float]:
    """VAE round trip (posterior mean) of images (N, 3, H, W) in [-1, 1]: mse (on [-1, 1]), psnr (dB, on
    [0, 255]), edge_f1 (exact) and edge_f1_tolerant (2 px) of the reconstructions' Canny edges."""
    vae = model.first_stage_model
    reconstructions = torch.cat([vae.decode(vae.encode(images[i:i + batch_size]).mode()).clamp(-1, 1)
                                 for i in range(0, len(images), batch_size)])
    mse = (reconstructions - images).pow(2).mean().item()
    originals, rebuilt = to_uint8(images), to_uint8(reconstructions)
    exact, tolerant = EdgeCounts(), EdgeCounts()
    for original, copy in zip(originals, rebuilt, strict=True):
        edges, target = canny(copy), canny(original)
        exact = exact + edge_counts(edges, target)
        tolerant = tolerant + edge_counts(edges, target, EVAL_TOLERANCE)
    pixel_mse = ((originals.astype(np.float64) - rebuilt) ** 2).mean()
    return {"mse": mse, "psnr": 10 * math.log10(255.0**2 / max(pixel_mse, 1e-12)), "edge_f1": exact.f1,
            "edge_f1_tolerant": tolerant.f1}


@dataclass(frozen=True)
class SampleReport:
    """Rates (0..1) at which samples match their prompt; images (N, H, W, 3) uint8 for a grid."""

    colour: float
    shape: float
    background: float
    all_three: float
    images: np.ndarray
    prompts: list[str]


@torch.no_grad()
def sample_report(model: LatentDiffusion, resolution: int, samples_per_caption: int, ddim_steps: int,
                  guidance_scale: float, seed: int, batch_size: int = 128) -> SampleReport:
    """Text-to-image samples (no control), `resolution` px square, for every shape x colour x background
    caption, classified."""
    labels = [(s, c, b) for s in SHAPES for c in COLOURS for b in BACKGROUNDS for _ in range(samples_per_caption)]
    prompts = [caption(*label) for label in labels]
    generator = torch.Generator().manual_seed(seed)
    latent = latent_shape(model, resolution, resolution)
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        noise = torch.randn((len(chunk), *latent), generator=generator)
        images.append(sample_images(model, None, chunk, steps=ddim_steps, guidance_scale=guidance_scale,
                                    noise=noise))
    images = np.concatenate(images)
    readings = [read_scene(image) for image in images]
    hits = np.array([(r.colour == c, r.shape == s, r.background == b)
                     for r, (s, c, b) in zip(readings, labels, strict=True)], dtype=np.float64)
    return SampleReport(colour=hits[:, 0].mean(), shape=hits[:, 1].mean(), background=hits[:, 2].mean(),
                        all_three=hits.all(axis=1).mean(), images=images, prompts=prompts)
