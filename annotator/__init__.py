"""Annotators: turn a photo into a control image (here: Canny edges), plus the image helpers they share."""

from annotator.canny import (
    DEFAULT_HIGH_THRESHOLD,
    DEFAULT_LOW_THRESHOLD,
    CannyDetector,
    CannyThresholds,
    canny,
    random_thresholds,
)
from annotator.image_io import DecodedImage, UnreadableImageError, read_image_rgb
from annotator.util import HWC3, resize_image

__all__ = [
    "DEFAULT_HIGH_THRESHOLD",
    "DEFAULT_LOW_THRESHOLD",
    "HWC3",
    "CannyDetector",
    "CannyThresholds",
    "DecodedImage",
    "UnreadableImageError",
    "canny",
    "random_thresholds",
    "read_image_rgb",
    "resize_image",
]
