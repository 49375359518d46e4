"""Control fidelity for the control types other than Canny (annotator.controls): generate an image from each
held-out (control image, prompt) pair, then score how well it follows the control.

Where the type has an annotator that reads a generated image back, the image is annotated again with the
control's own settings and compared with the control image it was made from (the cycle ControlNet++
scores): depth by the RMSE of the two depth maps in [0, 1] (lower is better, as ControlNet++ reports
depth); normal by the mean angle between the normals in degrees (lower is better); scribble by the SSIM of
the stroke maps (scribbles are thick and drawn with a random width, so a pixel F1 would mostly measure the
width). Tile has no such cycle: its control is the photo degraded, so the generated image is scored by its
SSIM with the held-out photo itself (grey, in [0, 1]; higher is better) - what a tile ControlNet is for;
inpaint likewise (the photo with its masked areas filled in should be the photo). Shuffle's ControlNet keeps
a photo's content and style but recomposes it, so it is scored by the colour-histogram similarity of the
generated image and the photo (1 = the same colours, in any arrangement).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch

from annotator.controls import INFERENCE_KEY, ControlType
from evaluation.edge_metrics import ssim
from evaluation.fidelity import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_DDIM_STEPS,
    DEFAULT_GUIDANCE_SCALE,
    generate_for_pairs,
)

# Scored against the held-out photo rather than the generated image's control read back.
PHOTO_METRICS = ("ssim", "inpaint-ssim", "shuffle-colour")
COLOUR_BINS = 8  # per channel, for shuffle's colour-histogram similarity
# metric name -> whether a higher score is better
METRICS = {"ssim": True, "inpaint-ssim": True, "shuffle-colour": True, "scribble-ssim": True, "softedge-ssim": True,
           "depth-rmse": False, "normal-angle": False, "seg-miou": True}
METRIC_OF_TYPE = {"tile": "ssim", "inpaint": "inpaint-ssim", "shuffle": "shuffle-colour", "scribble": "scribble-ssim",
                  "softedge": "softedge-ssim", "depth": "depth-rmse", "normal": "normal-angle", "seg": "seg-miou"}


@dataclass
class ControlReport:
    """One control type's score over held-out pairs, and what it was computed from (for a grid).

    hints / generated / read_back: (N, H, W, 3) uint8; read_back is the generated images annotated again
    (tile: the held-out photos, the reference it is scored against)."""

    control: str
    metric: str
    score: float
    higher_is_better: bool
    hints: np.ndarray = field(repr=False)
    generated: np.ndarray = field(repr=False)
    read_back: np.ndarray = field(repr=False)

    def summary(self) -> str:
        better = "higher" if self.higher_is_better else "lower"
        return f"{self.control}: {self.metric} {self.score:.4f} ({better} is better, {len(self.hints)} pairs)"


def _rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image


def _grey(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def normal_angle_degrees(predicted: np.ndarray, target: np.ndarray) -> float:
    """Mean angle between two normal maps (HWC uint8, channels as stored), in degrees."""
    a, b = ((x.astype(np.float64) - 127.5) / 127.5 for x in (predicted, target))
    a /= np.maximum(np.linalg.norm(a, axis=2, keepdims=True), 1e-8)
    b /= np.maximum(np.linalg.norm(b, axis=2, keepdims=True), 1e-8)
    cosine = np.clip((a * b).sum(axis=2), -1.0, 1.0)
    return float(np.degrees(np.arccos(cosine)).mean())


def colour_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """1 - half the L1 distance of two images' colour histograms (COLOUR_BINS per channel): 1 for the same
    colours in any arrangement, 0 for none in common."""
    def histogram(image: np.ndarray) -> np.ndarray:
        codes = (image[..., :3].astype(np.int64) * COLOUR_BINS // 256)
        flat = (codes[..., 0] * COLOUR_BINS + codes[..., 1]) * COLOUR_BINS + codes[..., 2]
        counts = np.bincount(flat.ravel(), minlength=COLOUR_BINS ** 3).astype(np.float64)
        return counts / counts.sum()

    return float(1.0 - 0.5 * np.abs(histogram(a) - histogram(b)).sum())


def mean_iou(predicted: Sequence[np.ndarray], target: Sequence[np.ndarray]) -> float:
    """mIoU over a set of segmentation maps drawn with the ADE20K palette: intersections and unions summed
    over all images per class, averaged over the classes present in either (as mmsegmentation's mIoU,
    which ControlNet++ reports)."""
    from annotator.segmentation import ADE20K_CLASSES, classes_of

    intersection = np.zeros(ADE20K_CLASSES, dtype=np.int64)
    union = np.zeros(ADE20K_CLASSES, dtype=np.int64)
    for a, b in zip(predicted, target, strict=True):
        ca, cb = classes_of(a).ravel(), classes_of(b).ravel()
        valid = cb >= 0
        ca, cb = ca[valid], cb[valid]
        area_a = np.bincount(ca[ca >= 0], minlength=ADE20K_CLASSES)
        area_b = np.bincount(cb, minlength=ADE20K_CLASSES)
        both = np.bincount(cb[ca == cb], minlength=ADE20K_CLASSES)
        intersection += both
        union += area_a + area_b - both
    present = union > 0
    return float((intersection[present] / union[present]).mean()) if present.any() else 0.0


def score(metric: str, read_back: np.ndarray, reference: np.ndarray) -> float:
    """One pair's score: read_back (the generated image annotated again, or for tile the generated image)
    against reference (the control image, or for tile the photo); both HWC uint8 of one size."""
    if metric in ("ssim", "inpaint-ssim", "scribble-ssim", "softedge-ssim"):
        return ssim(_grey(read_back), _grey(reference))
    if metric == "shuffle-colour":
        return colour_similarity(read_back, reference)
    if metric == "depth-rmse":
        difference = _grey(read_back).astype(np.float64) / 255.0 - _grey(reference).astype(np.float64) / 255.0
        return float(np.sqrt(np.mean(difference ** 2)))
    if metric == "normal-angle":
        return normal_angle_degrees(read_back, reference)
    raise ValueError(f"unknown metric {metric!r} (known: {', '.join(METRICS)})")


def read_back(control: ControlType, settings: Any, model: str | None, images: np.ndarray,
              device: str = "cpu") -> np.ndarray:
    """The generated images annotated again with the control's own annotator and settings (HWC uint8)."""
    if control.model_based:
        from annotator.models import load_annotator  # transformers: only for the model-based types

        return np.stack([_rgb(image) for image in load_annotator(control, settings, model, device)(list(images))])
    return np.stack([_rgb(control.annotate(image, settings, INFERENCE_KEY)) for image in images])


@torch.no_grad()
def control_type_fidelity(model: torch.nn.Module, control: ControlType, settings: Any, annotator_model: str | None,
                          hints: np.ndarray, prompts: Sequence[str], photos: np.ndarray | None = None, *,
                          ddim_steps: int = DEFAULT_DDIM_STEPS, guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
                          batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0,
                          control_scales: float | Sequence[float] | None = None, device: str = "cpu",
                          progress: bool = True) -> ControlReport:
    """Generate from every (control image, prompt) and score the images with the type's metric.

    hints: (N, H, W, 3) uint8 control images; photos: the held-out photos (N, H, W, 3) uint8, which tile
    needs as its reference."""
    if control.name not in METRIC_OF_TYPE:
        raise ValueError(f"no fidelity metric for control {control.name!r} here (Canny: evaluation.fidelity)")
    metric = METRIC_OF_TYPE[control.name]
    if len(hints) == 0:
        raise ValueError("control_type_fidelity needs at least one pair")
    generated = generate_for_pairs(model, hints, prompts, ddim_steps=ddim_steps, guidance_scale=guidance_scale,
                                   batch_size=batch_size, seed=seed, control_scales=control_scales,
                                   progress=progress)
    if metric in PHOTO_METRICS:
        if photos is None:
            raise ValueError(f"the {control.name} metric compares with the held-out photos: pass `photos`")
        references, readings = photos, generated
        shown = photos
    else:
        references, readings = hints, read_back(control, settings, annotator_model, generated, device)
        shown = readings
    if metric == "seg-miou":
        value = mean_iou(readings, references)
    else:
        value = float(np.mean([score(metric, reading, reference)
                               for reading, reference in zip(readings, references, strict=True)]))
    return ControlReport(control.name, metric, value, METRICS[metric], hints, generated, shown)
