"""Canny edge maps, the control signal of the canny ControlNet.

ControlNet 1.0 used fixed thresholds (low 100, high 200, the defaults of its demo); ControlNet 1.1
trained on edge maps with random thresholds so the model accepts both sparse and dense edges.
The original does not publish its random ranges; ours are the defaults +- 50.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import cv2
import numpy as np

DEFAULT_LOW_THRESHOLD = 100
DEFAULT_HIGH_THRESHOLD = 200
# Inclusive ranges for random thresholds. They do not overlap, so low < high always holds.
RANDOM_LOW_RANGE = (50, 149)
RANDOM_HIGH_RANGE = (150, 250)


@dataclass(frozen=True)
class CannyThresholds:
    """Hysteresis thresholds on the gradient magnitude (uint8 scale): low < high."""

    low: int = DEFAULT_LOW_THRESHOLD
    high: int = DEFAULT_HIGH_THRESHOLD

    def __post_init__(self) -> None:
        if not 0 <= self.low < self.high:
            raise ValueError(f"Canny thresholds need 0 <= low < high, got low={self.low} high={self.high}")


def canny(image: np.ndarray, thresholds: CannyThresholds = CannyThresholds()) -> np.ndarray:
    """Canny edge map of an image.

    image: HWC uint8 (RGB) or HW uint8. For colour input OpenCV takes, per pixel, the gradient of the
    channel where it is strongest, so edges between equally bright colours are kept.
    Returns HW uint8 with values in {0, 255} (255 = edge), the same size as the input.
    """
    if image.dtype != np.uint8:
        raise TypeError(f"canny expects a uint8 image, got {image.dtype}")
    return cv2.Canny(image, thresholds.low, thresholds.high)


def random_thresholds(seed: int, key: str) -> CannyThresholds:
    """Random thresholds as ControlNet 1.1 trained with, reproducible from (seed, key).

    key names the image (e.g. its path), so a resumed or sharded run draws the same thresholds for the
    same image whatever order the images are processed in.
    """
    key_digest = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    rng = np.random.default_rng([seed, key_digest])
    low = int(rng.integers(RANDOM_LOW_RANGE[0], RANDOM_LOW_RANGE[1], endpoint=True))
    high = int(rng.integers(RANDOM_HIGH_RANGE[0], RANDOM_HIGH_RANGE[1], endpoint=True))
    return CannyThresholds(low, high)


class CannyDetector:
    """The original's callable interface: `CannyDetector()(image, low, high) -> HW uint8 edges`."""

    def __call__(
        self,
        image: np.ndarray,
        low_threshold: int = DEFAULT_LOW_THRESHOLD,
        high_threshold: int = DEFAULT_HIGH_THRESHOLD,
    ) -> np.ndarray:
        return canny(image, CannyThresholds(low_threshold, high_threshold))
