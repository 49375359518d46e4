"""Toy scenes: one flat shape of a named colour on a plain background, and the caption that names it.

Scenes are drawn at 4x and downsampled (anti-aliased edges, like a photo's), and the colours are far
apart in RGB, so a scene's Canny edges are exactly the shape's outline and a generated image's colour and
shape can be read back (`toy.classify`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
# Named colours (RGB uint8): far apart from each other and from every background in at least one channel,
# so the outline of every colour on every background is a strong Canny edge.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
DEFAULT_RESOLUTION = 64
# Shape size (circle diameter, square side, triangle side) as a fraction of the image side.
SIZE_RANGE = (0.3, 0.65)
# Minimum distance of the shape's bounding box from the image border, as a fraction of the side, so the
# whole outline is inside the image.
MARGIN = 0.05
SUPERSAMPLING = 4


@dataclass(frozen=True)
class Scene:
    """One toy scene. centre_x, centre_y and size are fractions of the image side (0..1)."""

    shape: str
    colour: str
    background: str
    centre_x: float
    centre_y: float
    size: float

    def __post_init__(self) -> None:
        for value, names, what in ((self.shape, SHAPES, "shape"), (self.colour, COLOURS, "colour"),
                                   (self.background, BACKGROUNDS, "background")):
            if value not in names:
                raise ValueError(f"unknown {what} {value!r}; expected one of {list(names)}")

    @property
    def caption(self) -> str:
        """The prompt of this scene, e.g. 'a red circle on a white background'."""
        return caption(self.shape, self.colour, self.background)


def caption(shape: str, colour: str, background: str) -> str:
    """'a red circle on a white background', 'an orange square on a black background'."""
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {shape} on a {background} background"


def sample_scene(rng: np.random.Generator) -> Scene:
    """A random scene: uniform shape, colour and background, size in SIZE_RANGE, anywhere inside the margin."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    size = float(rng.uniform(*SIZE_RANGE))
    low, high = MARGIN + size / 2, 1.0 - MARGIN - size / 2
    centre_x, centre_y = (float(v) for v in rng.uniform(low, high, size=2))
    return Scene(shape, colour, background, centre_x, centre_y, size)


def shape_outline(scene: Scene, side: float) -> list[tuple[float, float]]:
    """Bounding box (circle, square) or vertices (triangle) of the shape in pixels of an image `side` wide."""
    cx, cy, half = scene.centre_x * side, scene.centre_y * side, scene.size * side / 2
    if scene.shape == "triangle":
        # Equilateral, pointing up, centred on its bounding box (height = side * sqrt(3) / 2).
        half_height = half * math.sqrt(3) / 2
        return [(cx, cy - half_height), (cx + half, cy + half_height), (cx - half, cy + half_height)]
    return [(cx - half, cy - half), (cx + half, cy + half)]


def render(scene: Scene, resolution: int = DEFAULT_RESOLUTION) -> np.ndarray:
    """The scene as an RGB image: (resolution, resolution, 3) uint8."""
    side = resolution * SUPERSAMPLING
    image = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    outline = shape_outline(scene, side)
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse(outline, fill=fill)
    elif scene.shape == "square":
        draw.rectangle(outline, fill=fill)
    else:
        draw.polygon(outline, fill=fill)
    return np.asarray(image.resize((resolution, resolution), Image.Resampling.BOX))


def all_captions() -> list[str]:
    """Every caption of the domain (shape x colour x background), in a fixed order."""
    return [caption(s, c, b) for s in SHAPES for c in COLOURS for b in BACKGROUNDS]
