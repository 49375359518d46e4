"""One image file -> a (photo, control image) training pair on disk; the unit of work of a dataset build.

Weight-free control types (annotator.controls: canny, scribble, tile) are made here, in worker processes;
model-based ones (annotator.depth) are computed in batches by the build, which then calls `write_pair`.
The pair-making runs in worker processes, so it imports only light libraries and gets everything it needs as arguments.
Files appear atomically (written to a scratch folder on the same disk, then renamed), so a killed
build leaves either a complete file or none.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from annotator.canny import CannyThresholds, canny, random_thresholds
from annotator.controls import DEFAULT_CONTROL, get_control
from annotator.image_io import UnreadableImageError, read_image_rgb
from annotator.util import SIZE_MULTIPLE, resize_and_crop

# High enough that re-encoding a photo loses nothing visible; photos that need no change are copied.
DEFAULT_JPEG_QUALITY = 95
PNG_LEVEL = 1  # zlib level of the control PNGs (lossless at every level)


@dataclass(frozen=True)
class PairSettings:
    """How every pair of a build is made.

    resolution: None keeps the photo's size, N scales the short side to N and centre-crops N x N.
    thresholds: fixed Canny thresholds, or None for random ones per image drawn from (random_seed, key).
    control: the control type (annotator.controls); options: its settings (None: its defaults). For
        "canny", `thresholds` and `random_seed` are used and `options` is ignored.
    min_side: photos whose shorter side is below this are skipped (64: one latent pixel per UNet level).
    max_pixels: photos with more pixels are skipped before decoding (decompression-bomb guard).
    """

    resolution: int | None = None
    thresholds: CannyThresholds | None = CannyThresholds()
    random_seed: int = 0
    min_side: int = SIZE_MULTIPLE
    max_pixels: int | None = Image.MAX_IMAGE_PIXELS
    jpeg_quality: int = DEFAULT_JPEG_QUALITY
    control: str = DEFAULT_CONTROL
    options: Any = None


@dataclass(frozen=True)
class PairJob:
    """One image: where to read it, its key (stable name, e.g. its relative path), where the pair goes.
    scratch_dir must be on the same file system as the outputs (the final step is a rename)."""

    image_path: Path
    key: str
    target_path: Path
    source_path: Path
    scratch_dir: Path


@dataclass(frozen=True)
class Skip:
    """Why an input file gives no pair. transient: the cause may pass (permissions, I/O errors), so a
    later run tries the file again; otherwise the file itself is unusable and stays skipped."""

    reason: str
    transient: bool = False


def init_pair_worker() -> None:
    """Run once in each worker process: N workers already keep N cores busy, and OpenCV's own thread pool
    on top of that would only oversubscribe them."""
    cv2.setNumThreads(1)


def _decode_for_pair(image_path: Path, settings: PairSettings) -> tuple[np.ndarray, bool]:
    decoded = read_image_rgb(image_path, settings.max_pixels)
    pixels = decoded.pixels
    height, width = pixels.shape[:2]
    if min(height, width) < settings.min_side:
        raise UnreadableImageError(f"too small: {width}x{height}, shorter side < {settings.min_side} px")
    if settings.resolution is not None:
        pixels = resize_and_crop(pixels, settings.resolution)
    return pixels, decoded.file_is_rgb_jpeg and settings.resolution is None


def make_pair(job: PairJob, settings: PairSettings) -> Skip | None:
    """Write the target photo (JPEG, RGB) and its control image (PNG, same size; for Canny grey, 255 =
    edge) for a weight-free control type.

    Returns None on success, or why the image was skipped (unreadable, too small, too large).
    Errors writing the outputs are not bad input and propagate.
    """
    try:
        pixels, copy_file = _decode_for_pair(job.image_path, settings)
    except UnreadableImageError as err:
        return Skip(str(err), err.transient)
    if settings.control == DEFAULT_CONTROL:
        thresholds = settings.thresholds or random_thresholds(settings.random_seed, job.key)
        control_image = canny(pixels, thresholds)
    else:
        control = get_control(settings.control)
        if control.model_based:
            raise ValueError(f"control {control.name!r} is model-based: the build computes it in batches")
        control_image = control.annotate(pixels, settings.options or control.settings_from(), job.key)
    write_pair(job, pixels, copy_file, control_image, settings)
    return None


def prepare_photo(job: PairJob, settings: PairSettings) -> tuple[np.ndarray, bool] | Skip:
    """The photo of a job as its pair holds it, before any JPEG encoding (decoded upright RGB uint8, scaled
    and centre-cropped with settings.resolution), and whether the file can be copied as the target; or why
    it is skipped. The first half of a model-based pair (the build annotates photos in batches), and what
    captions are computed from."""
    try:
        return _decode_for_pair(job.image_path, settings)
    except UnreadableImageError as err:
        return Skip(str(err), err.transient)


def write_pair(job: PairJob, pixels: np.ndarray, copy_file: bool, control_image: np.ndarray,
               settings: PairSettings) -> None:
    """Write the target (JPEG; the file's own bytes when copy_file) and the control image (PNG), each
    through the scratch folder and renamed into place."""
    job.scratch_dir.mkdir(parents=True, exist_ok=True)
    scratch_target = job.scratch_dir / job.target_path.name
    scratch_source = job.scratch_dir / job.source_path.name
    if copy_file:  # an upright RGB JPEG kept at its size: its bytes, not a lossy re-encoding
        shutil.copyfile(job.image_path, scratch_target)
    else:
        Image.fromarray(pixels).save(scratch_target, format="JPEG", quality=settings.jpeg_quality)
    # Level 1: photo-like controls (tile, shuffle, inpaint) compress 5-10x faster than at the default 6, for
    # files about a fifth larger; edge maps stay small either way.
    Image.fromarray(np.ascontiguousarray(control_image)).save(scratch_source, format="PNG", compress_level=PNG_LEVEL)
    os.replace(scratch_target, job.target_path)
    os.replace(scratch_source, job.source_path)


make_canny_pair = make_pair  # its name from when Canny was the only control type
