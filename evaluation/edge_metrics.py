"""How well one edge map matches another: pixel F1 (ControlNet++'s measure of Canny control) and SSIM.

Edge maps are (H, W) arrays where nonzero (or > 127 for uint8 {0, 255} maps) marks an edge pixel.

F1 with `tolerance` r: a predicted edge pixel counts as correct when a target edge pixel lies within
Euclidean distance r of it (precision), and a target edge pixel as found when a predicted one lies within
r (recall). r = 0 is the exact pixel match of ControlNet++ (Li et al. 2024, torchmetrics BinaryF1Score
over all pixels); a small r forgives the one-pixel shifts of a re-drawn outline, as edge-detection
benchmarks (BSDS) do. Counts add up over images (micro average), as a metric over a data set does.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# SSIM of Wang et al. 2004: 11 x 11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03, data range 1.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2
UINT8_EDGE_THRESHOLD = 127


def edge_mask(edges: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) edge map -> (H, W) bool. uint8 maps: > 127 (Canny gives {0, 255}); others: > 0.5.
    A colour map uses its first channel (edge maps are grey replicated to RGB)."""
    if edges.ndim == 3:
        edges = edges[..., 0]
    if edges.ndim != 2:
        raise ValueError(f"an edge map is (H, W) or (H, W, C), got shape {edges.shape}")
    if edges.dtype == np.bool_:
        return edges
    threshold = UINT8_EDGE_THRESHOLD if edges.dtype == np.uint8 else 0.5
    return edges > threshold


def _near(mask: np.ndarray, tolerance: int) -> np.ndarray:
    """Pixels within Euclidean distance `tolerance` of a True pixel of mask."""
    if tolerance == 0:
        return mask
    size = 2 * tolerance + 1
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    return cv2.dilate(mask.astype(np.uint8), disk).astype(bool)


@dataclass(frozen=True)
class EdgeCounts:
    """Pixel counts behind precision and recall; add them over images for a data set's score."""

    predicted: int = 0  # predicted edge pixels
    correct: int = 0  # predicted edge pixels near a target edge
    target: int = 0  # target edge pixels
    found: int = 0  # target edge pixels near a predicted edge

    def __add__(self, other: EdgeCounts) -> EdgeCounts:
        return EdgeCounts(self.predicted + other.predicted, self.correct + other.correct,
                          self.target + other.target, self.found + other.found)

    @property
    def precision(self) -> float:
        """Share of predicted edge pixels that are right; 1 when nothing was predicted and nothing expected."""
        return self.correct / self.predicted if self.predicted else float(self.target == 0)

    @property
    def recall(self) -> float:
        """Share of target edge pixels that were found; 1 when there were none."""
        return self.found / self.target if self.target else 1.0

    @property
    def f1(self) -> float:
        """Harmonic mean of precision and recall, in [0, 1]."""
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def edge_counts(predicted: np.ndarray, target: np.ndarray, tolerance: int = 0) -> EdgeCounts:
    """Counts of one pair of edge maps of the same size (see the module doc for `tolerance`, in pixels)."""
    predicted, target = edge_mask(predicted), edge_mask(target)
    if predicted.shape != target.shape:
        raise ValueError(f"edge maps differ in size: {predicted.shape} vs {target.shape}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
    return EdgeCounts(
        predicted=int(predicted.sum()), correct=int((predicted & _near(target, tolerance)).sum()),
        target=int(target.sum()), found=int((target & _near(predicted, tolerance)).sum()),
    )


def edge_f1(predicted: np.ndarray, target: np.ndarray, tolerance: int = 0) -> float:
    """F1 of the edge pixels of `predicted` against `target` (one image), in [0, 1]."""
    return edge_counts(predicted, target, tolerance).f1


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two (H, W) maps with values in [0, 1] (uint8 maps are divided by 255), in [-1, 1]."""
    a, b = (x.astype(np.float64) / (255.0 if x.dtype == np.uint8 else 1.0) for x in (a, b))
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"ssim needs two (H, W) maps of one size, got {a.shape} and {b.shape}")

    def blur(x: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(x, (SSIM_WINDOW, SSIM_WINDOW), SSIM_SIGMA, borderType=cv2.BORDER_REFLECT)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    covariance = blur(a * b) - mu_a * mu_b
    numerator = (2 * mu_a * mu_b + SSIM_C1) * (2 * covariance + SSIM_C2)
    denominator = (mu_a**2 + mu_b**2 + SSIM_C1) * (var_a + var_b + SSIM_C2)
    return float((numerator / denominator).mean())


def edge_ssim(predicted: np.ndarray, target: np.ndarray) -> float:
    """SSIM of two edge maps as binary images (edge = 1)."""
    return ssim(edge_mask(predicted).astype(np.float64), edge_mask(target).astype(np.float64))
