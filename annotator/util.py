"""Image helpers shared by the annotators, with the original ControlNet's semantics.

Images are numpy arrays, HWC uint8 in [0, 255], RGB channel order.
"""

from __future__ import annotations

import cv2
import numpy as np

# The SD UNet downsamples by 8 in the VAE and by 8 more in the UNet, so sizes that are multiples of
# 64 need no padding anywhere in the network.
SIZE_MULTIPLE = 64


def HWC3(image: np.ndarray) -> np.ndarray:
    """Any uint8 image -> 3-channel HWC uint8.

    Accepts HW or HW1 (grey, replicated), HW3 (returned as is) or HW4 (alpha-composited onto white, as
    the original does, so transparent areas read as a white background).
    """
    if image.dtype != np.uint8:
        raise TypeError(f"HWC3 expects a uint8 image, got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"HWC3 expects HW, HW1, HW3 or HW4, got shape {image.shape}")
    channels = image.shape[2]
    if channels == 3:
        return image
    if channels == 1:
        return np.concatenate([image, image, image], axis=2)
    color = image[:, :, :3].astype(np.float32)
    alpha = image[:, :, 3:4].astype(np.float32) / 255.0
    blended = color * alpha + 255.0 * (1.0 - alpha)
    # Round (the original truncates) so opaque pixels come back unchanged despite float error.
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def resize_image(image: np.ndarray, resolution: int) -> np.ndarray:
    """Scale so the short side is about `resolution`, then snap both sides to a multiple of 64.

    image: HWC uint8. Returns HWC uint8 of size (round(H*k/64)*64, round(W*k/64)*64) with
    k = resolution / min(H, W); Lanczos when enlarging, area averaging when shrinking (the original's
    choice: area averaging does not alias).
    """
    height, width = image.shape[:2]
    scale = float(resolution) / min(height, width)
    new_height = max(SIZE_MULTIPLE, int(np.round(height * scale / SIZE_MULTIPLE)) * SIZE_MULTIPLE)
    new_width = max(SIZE_MULTIPLE, int(np.round(width * scale / SIZE_MULTIPLE)) * SIZE_MULTIPLE)
    interpolation = cv2.INTER_LANCZOS4 if scale > 1 else cv2.INTER_AREA
    return cv2.resize(image, (new_width, new_height), interpolation=interpolation)


def resize_and_crop(image: np.ndarray, size: int, offset: tuple[float, float] = (0.5, 0.5)) -> np.ndarray:
    """Scale so the short side is `size`, then cut a `size` x `size` square.

    image: HWC (or HW) uint8. offset: (vertical, horizontal) position of the square within the slack,
    each in [0, 1]; (0.5, 0.5) is a centre crop. Two images of the same size given the same offset get
    the same crop window, which keeps a photo and its control image aligned.
    Returns (size, size[, C]) uint8; Lanczos when enlarging, area averaging when shrinking.
    """
    height, width = image.shape[:2]
    scale = size / min(height, width)
    new_height = max(size, int(round(height * scale)))
    new_width = max(size, int(round(width * scale)))
    if (new_height, new_width) != (height, width):
        interpolation = cv2.INTER_LANCZOS4 if scale > 1 else cv2.INTER_AREA
        image = cv2.resize(image, (new_width, new_height), interpolation=interpolation)
    top = int(round(offset[0] * (new_height - size)))
    left = int(round(offset[1] * (new_width - size)))
    return image[top : top + size, left : left + size]
