"""Read a toy scene back from an image: background, shape colour and shape class.

Used to check that a generated image shows what its prompt asked for. Works on flat, roughly clean
images: the background is the median of the border pixels, the shape is every pixel far from it, the
colour is the nearest named colour to the shape's median, and the shape class follows from two ratios of
the shape's bounding box that survive the rounded corners and tips of a decoded image: the height of the
shape's centroid in its box (the toy's triangles point up, so theirs lies at 2/3, a circle's and a square's
at 1/2) tells triangles apart, then the fill of the box (square 1, circle pi/4) squares from circles.
Reading the fill alone (triangle 1/2) misreads the toy VAE's own reconstructions of the photos, whose
small triangles come back with rounded tips: 92% of 512 held-out photos read right, against 97% with the
centroid (tests/test_toy_base.py holds the reader to the reconstructions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from toy.shapes import BACKGROUNDS, COLOURS

# A pixel belongs to the shape when its RGB distance from the background exceeds this (uint8 units):
# well above decoder noise, well below the distance of any named colour from any background.
FOREGROUND_DISTANCE = 60.0
# Fewer shape pixels than this (of a 64 x 64 image) means "no shape" (smallest toy shape: ~370 pixels).
MIN_SHAPE_PIXELS = 40
# Boundaries halfway between the shapes' exact values: the centroid's height in the bounding box, from the
# top (an upward triangle 2/3, a circle or square 1/2), and the fill of the box (circle pi/4, square 1).
TRIANGLE_CENTROID_HEIGHT = (0.5 + 2 / 3) / 2
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
    """'square' | 'circle' | 'triangle' from a (H, W) bool mask (see the module doc), None if nearly empty."""
    if mask.sum() < MIN_SHAPE_PIXELS:
        return None
    rows, cols = np.nonzero(mask)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    if (rows - rows.min() + 0.5).mean() / height >= TRIANGLE_CENTROID_HEIGHT:
        return "triangle"
    return "square" if mask.sum() / (height * width) >= CIRCLE_SQUARE_FILL else "circle"


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


def shape_agreement(generated: np.ndarray, photos: np.ndarray) -> tuple[float, list[str | None], list[str | None]]:
    """How often a generated image shows the shape of its control: (share of pairs whose shape as `read_scene`
    reads it from the generated image equals the shape it reads from the photo the control was made from, the
    generated images' shapes, the photos' shapes). generated, photos: (N, H, W, 3) uint8."""
    if len(generated) != len(photos) or not len(photos):
        raise ValueError(f"shape_agreement needs as many generated images as photos (>0), got {len(generated)} "
                         f"and {len(photos)}")
    made = [read_scene(image).shape for image in generated]
    wanted = [read_scene(photo).shape for photo in photos]
    return float(np.mean(shape_hits(made, wanted))), made, wanted


def shape_hits(made: Sequence[str | None], wanted: Sequence[str | None]) -> list[bool]:
    """Per pair: the generated image's shape is the photo's (a generated image without a shape never is)."""
    return [m is not None and m == w for m, w in zip(made, wanted, strict=True)]


# Frames of `shape_grid`: the generated image shows the control's shape, or not.
MATCH_FRAME = (40, 170, 60)
MISS_FRAME = (210, 40, 40)
FRAME = 3


def shape_grid(controls: np.ndarray, generated: Sequence[np.ndarray], hits: Sequence[Sequence[bool]],
               blocks: int = 4) -> np.ndarray:
    """A picture of `shape_agreement`: per pair the control image, then each model's generated image framed
    green where its shape matches the photo's and red where not; the pairs in `blocks` side-by-side columns.
    controls: (N, H, W, 3) uint8; generated[k]: model k's (N, H, W, 3); hits[k]: model k's N booleans.
    Returns (rows, columns, 3) uint8."""
    count, height, width = controls.shape[:3]
    cell_h, cell_w = height + 2 * FRAME, width + 2 * FRAME
    per_block = -(-count // blocks)
    pair_w = cell_w * (1 + len(generated)) + 2 * FRAME
    grid = np.full((per_block * cell_h, blocks * pair_w, 3), 255, np.uint8)
    for index in range(count):
        top, left = (index % per_block) * cell_h, (index // per_block) * pair_w
        tiles = [(controls[index], (255, 255, 255))]
        tiles += [(images[index], MATCH_FRAME if model_hits[index] else MISS_FRAME)
                  for images, model_hits in zip(generated, hits, strict=True)]
        for column, (tile, colour) in enumerate(tiles):
            x = left + column * cell_w
            grid[top:top + cell_h, x:x + cell_w] = colour
            grid[top + FRAME:top + FRAME + height, x + FRAME:x + FRAME + width] = tile
    return grid
