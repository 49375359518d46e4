"""Read a toy scene back from an image: background, shape colour and shape class.

Used to check that a generated image shows what its prompt asked for. Works on flat, roughly clean
images: the background is the median of the border pixels, the shape is every pixel far from it, the
colour is the nearest named colour to the shape's median, and the shape class follows from how much of
its bounding box the shape fills (square 1, circle pi/4, triangle 1/2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from toy.shapes import BACKGROUNDS, COLOURS

# A pixel belongs to the shape when its RGB distance from the background exceeds this (uint8 units):
# well above decoder noise, well below the distance of any named colour from any background.
FOREGROUND_DISTANCE = 60.0
# Fewer shape pixels than this (of a 64 x 64 image) means "no shape" (smallest toy shape: ~370 pixels).
MIN_SHAPE_PIXELS = 40
# Fill-ratio boundaries halfway between the triangle (0.5), circle (pi/4) and square (1.0).
TRIANGLE_CIRCLE_FILL = (0.5 + math.pi / 4) / 2
CIRCLE_SQUARE_FILL = (math.pi / 4 + 1.0) / 2


@dataclass(frozen=True)
class Reading:
    """What an image shows. shape is None when no shape was found; mask is (H, W) bool."""

    background: str
    colour: str | None
    shape: str | None
    mask: np.ndarray


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    distances = np.linalg.norm(np.asarray([palette[n] for n in names], dtype=np.float64) - rgb, axis=1)
    return names[int(distances.argmin())]


def shape_class(mask: np.ndarray) -> str | None:
    """'square' | 'circle' | 'triangle' from a (H, W) bool mask's fill of its bounding box, None if empty."""
    if mask.sum() < MIN_SHAPE_PIXELS:
        return None
    rows, cols = np.nonzero(mask)
    box_area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    fill = mask.sum() / box_area
    if fill >= CIRCLE_SQUARE_FILL:
        return "square"
    return "circle" if fill >= TRIANGLE_CIRCLE_FILL else "triangle"


def read_scene(image: np.ndarray) -> Reading:
    """Classify an (H, W, 3) uint8 RGB toy image."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"read_scene expects (H, W, 3) uint8, got {image.shape} {image.dtype}")
    pixels = image.astype(np.float64)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background_rgb = np.median(border, axis=0)
    mask = np.linalg.norm(pixels - background_rgb, axis=2) > FOREGROUND_DISTANCE
    shape = shape_class(mask)
    colour = _nearest(np.median(pixels[mask], axis=0), COLOURS) if shape is not None else None
    return Reading(_nearest(background_rgb, BACKGROUNDS), colour, shape, mask)
