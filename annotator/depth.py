"""Model-based control images: depth from a transformers depth-estimation model, and surface normals derived
from that depth as ControlNet 1.0 derived them.

Any model that transformers loads with AutoModelForDepthEstimation works: Depth Anything V2
(`depth-anything/Depth-Anything-V2-Small-hf`, the default for depth), DPT-hybrid MiDaS
(`Intel/dpt-hybrid-midas`, what ControlNet 1.0 used, the default for normal, whose formula is tuned to its
scale), or a local `save_pretrained` folder. These
models predict relative inverse depth, near bright, which is what the depth ControlNets read. The weights
download where there is internet; transformers caches them.

Depth: each photo's prediction is resized to the photo (bicubic) and scaled to 0..255 between its own
minimum and maximum (ControlNet 1.0's normalisation). Normal: ControlNet 1.0's MiDaS normal map: Sobel
slopes of the raw prediction, zeroed where the normalised depth is below `background`, with z = `strength`,
normalised, mapped to 0..255, and stored in the channel order the normal ControlNet was fed (1.0 reversed
the channels before the model).
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from annotator.controls import NormalSettings
from annotator.transformers_models import load_vision_model


def load_depth_model(model: str, device: str = "cpu") -> tuple[Any, Any]:
    """(image processor, depth model in eval mode on `device`) from a hub id or a local folder. A model of
    another kind (segmentation, classification ...) is a ControlSettingsError naming it."""
    from transformers import AutoModelForDepthEstimation

    return load_vision_model(model, AutoModelForDepthEstimation, "depth-estimation", "Intel/dpt-hybrid-midas",
                             device)


def predict_depth(processor: Any, network: Any, photos: list[np.ndarray]) -> list[np.ndarray]:
    """The raw prediction (float32, HW at each photo's size) for a batch of RGB uint8 photos."""
    import torch
    from PIL import Image

    device = next(network.parameters()).device
    inputs = processor(images=[Image.fromarray(photo) for photo in photos], return_tensors="pt")
    with torch.no_grad():
        predicted = network(pixel_values=inputs["pixel_values"].to(device)).predicted_depth
    results = []
    for photo, depth in zip(photos, predicted, strict=True):
        resized = torch.nn.functional.interpolate(depth[None, None].float(), size=photo.shape[:2], mode="bicubic",
                                                  align_corners=False)
        results.append(resized[0, 0].cpu().numpy().astype(np.float32))
    return results


def normalised(depth: np.ndarray) -> np.ndarray:
    """depth scaled to [0, 1] between its minimum and maximum (all zeros for a flat prediction)."""
    shifted = depth - depth.min()
    top = shifted.max()
    return shifted / top if top > 0 else shifted


def depth_image(depth: np.ndarray) -> np.ndarray:
    """HW uint8: near bright."""
    return np.clip(normalised(depth) * 255.0, 0, 255).astype(np.uint8)


def normal_image(depth: np.ndarray, settings: NormalSettings) -> np.ndarray:
    """HWC uint8 normal map of a raw depth prediction (ControlNet 1.0's MiDaS normals)."""
    slope_x = cv2.Sobel(depth, cv2.CV_32F, 1, 0, ksize=3)
    slope_y = cv2.Sobel(depth, cv2.CV_32F, 0, 1, ksize=3)
    background = normalised(depth) < settings.background
    slope_x[background] = 0
    slope_y[background] = 0
    normal = np.stack([slope_x, slope_y, np.full_like(slope_x, settings.strength)], axis=2)
    normal /= np.sqrt(np.sum(normal ** 2, axis=2, keepdims=True))
    image = np.clip(normal * 127.5 + 127.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image[:, :, ::-1])
