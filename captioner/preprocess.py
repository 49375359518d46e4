"""Image -> ViT input, the transform BLIP's own demo applies (Resize bicubic, ToTensor, Normalize)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision.transforms.functional as TF
from PIL import Image


def pixel_values(
    images: Sequence[Image.Image],
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """Stack images into a normalised batch.

    Each image is converted to RGB, resized to image_size x image_size with PIL's bicubic filter (aspect
    ratio NOT kept, as in BLIP), scaled to [0, 1] and normalised with mean/std per channel.

    Returns float32 (B, 3, image_size, image_size), roughly in [-1.8, 2.2] for CLIP mean/std.
    """
    if not images:
        raise ValueError("no images to preprocess")
    tensors = []
    for image in images:
        resized = TF.resize(image.convert("RGB"), [image_size, image_size], TF.InterpolationMode.BICUBIC)
        tensors.append(TF.normalize(TF.to_tensor(resized), list(mean), list(std)))
    return torch.stack(tensors)
