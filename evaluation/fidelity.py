"""Control fidelity of a ControlNet for Canny, the project's measure: F1 pooled over the set, OpenCV Canny.

(ControlNet++'s own protocol, kornia Canny 0.1/0.2 and a per-condition F1 averaged, is evaluation.controlnetpp.)

Generate an image from each held-out (edge map, prompt) pair, take the Canny edges of the generated image
with the thresholds that made the edge maps, and score them against the input edge map: pixel F1
(exact, and with a small tolerance, see `evaluation.edge_metrics`) and SSIM. Each pair starts from its own
noise, drawn once from `seed`, so two models (e.g. trained vs untrained ControlNet) see the same noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from annotator.canny import CannyThresholds, canny
from annotator.controls import hint_values
from cldm.sampling import latent_shape, sample_images
from evaluation.edge_metrics import EdgeCounts, edge_counts, edge_ssim

# The thresholds of ControlNet 1.0's canny training data and demo.
DEFAULT_THRESHOLDS = CannyThresholds()
DEFAULT_DDIM_STEPS = 20
DEFAULT_GUIDANCE_SCALE = 3.0
DEFAULT_TOLERANCE = 2
DEFAULT_BATCH_SIZE = 16

# (edge map HWC uint8 in {0, 255}, prompt): one held-out pair.
Pair = tuple[np.ndarray, str]


@dataclass
class FidelityReport:
    """Scores over a set of pairs, and what they were computed from (for a comparison grid).

    f1: exact pixel F1 (pooled over the pairs); f1_tolerant: F1 with `tolerance` pixels; ssim: mean SSIM of the
    edge maps; hints / generated / generated_edges: (N, H, W, 3) / (N, H, W, 3) / (N, H, W) uint8.
    """

    f1: float
    precision: float
    recall: float
    f1_tolerant: float
    tolerance: int
    ssim: float
    hints: np.ndarray = field(repr=False)
    generated: np.ndarray = field(repr=False)
    generated_edges: np.ndarray = field(repr=False)

    def summary(self) -> str:
        return (f"Canny F1 {self.f1:.3f} (precision {self.precision:.3f}, recall {self.recall:.3f}), "
                f"F1 within {self.tolerance}px {self.f1_tolerant:.3f}, edge SSIM {self.ssim:.3f}")


def _hint_tensor(controls: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3 or 4) uint8 -> (B, 3, H, W) float: [0, 1], and -1 where an RGBA (inpaint) control is masked."""
    return torch.from_numpy(np.stack([hint_values(control) for control in controls])).permute(0, 3, 1, 2).contiguous()


def _as_rgb_edges(edge_map: np.ndarray) -> np.ndarray:
    if edge_map.dtype != np.uint8:
        raise TypeError(f"edge maps must be uint8, got {edge_map.dtype}")
    if edge_map.ndim == 2:
        return np.repeat(edge_map[..., None], 3, axis=2)
    if edge_map.ndim != 3 or edge_map.shape[2] != 3:
        raise ValueError(f"edge maps must be (H, W) or (H, W, 3), got {edge_map.shape}")
    return edge_map


@torch.no_grad()
def generate_for_pairs(model: torch.nn.Module, hints: np.ndarray, prompts: Sequence[str], *,
                       ddim_steps: int = DEFAULT_DDIM_STEPS, guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
                       batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0,
                       control_scales: float | Sequence[float] | None = None, progress: bool = True) -> np.ndarray:
    """One generated image (uint8 (H, W, 3)) per (control image, prompt), each pair from its own noise drawn
    once from `seed`: DDIM (eta 0), guidance against "", the control in both branches."""
    height, width = hints.shape[1:3]
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(hints), *latent_shape(model, height, width)), generator=generator)
    generated = []
    starts = range(0, len(hints), batch_size)
    for start in tqdm(starts, desc="fidelity", unit="batch", disable=not progress, leave=False):
        stop = start + batch_size
        generated.append(sample_images(model, _hint_tensor(hints[start:stop]), list(prompts[start:stop]),
                                       steps=ddim_steps, guidance_scale=guidance_scale, noise=noise[start:stop],
                                       control_scales=control_scales))
    return np.concatenate(generated)


@torch.no_grad()
def control_fidelity(model: torch.nn.Module, pairs: Sequence[Pair], *,
                     thresholds: CannyThresholds = DEFAULT_THRESHOLDS, tolerance: int = DEFAULT_TOLERANCE,
                     ddim_steps: int = DEFAULT_DDIM_STEPS, guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
                     batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0,
                     control_scales: float | Sequence[float] | None = None, progress: bool = True) -> FidelityReport:
    """Generate from every (edge map, prompt) pair with a ControlLDM and score the generated edges.

    DDIM (eta 0) with guidance against the "" prompt, the control in both branches (the original apps'
    default). control_scales: the control strength (one, or one per residual; None: the model's
    default, 1). The model is used as it is (eval mode is the caller's business; `FidelityCallback`
    handles it). Edge maps: (H, W) or (H, W, 3) uint8 {0, 255}, one size, sides multiples of 64.
    """
    if not pairs:
        raise ValueError("control_fidelity needs at least one (edge map, prompt) pair")
    hints = np.stack([_as_rgb_edges(edge_map) for edge_map, _ in pairs])
    images = generate_for_pairs(model, hints, [prompt for _, prompt in pairs], ddim_steps=ddim_steps,
                                guidance_scale=guidance_scale, batch_size=batch_size, seed=seed,
                                control_scales=control_scales, progress=progress)
    edges = np.stack([canny(image, thresholds) for image in images])
    exact, tolerant = EdgeCounts(), EdgeCounts()
    for predicted, target in zip(edges, hints, strict=True):
        exact = exact + edge_counts(predicted, target)
        tolerant = tolerant + edge_counts(predicted, target, tolerance)
    ssim = float(np.mean([edge_ssim(predicted, target) for predicted, target in zip(edges, hints, strict=True)]))
    return FidelityReport(f1=exact.f1, precision=exact.precision, recall=exact.recall, f1_tolerant=tolerant.f1,
                          tolerance=tolerance, ssim=ssim, hints=hints, generated=images, generated_edges=edges)
