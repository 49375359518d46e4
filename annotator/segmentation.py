"""Semantic segmentation control images: a transformers semantic-segmentation model trained on ADE20K (for
example UperNet `openmmlab/upernet-convnext-small`, or SegFormer `nvidia/segformer-b0-finetuned-ade-512-512`),
each pixel coloured with its class's ADE20K colour, as ControlNet's seg model was trained to read.

The colours are ADE20K's 150 class colours in the order of its class ids, as mmsegmentation's ADE20KDataset
lists them (the palette ControlNet's UniFormer annotator draws with, RGB). Two classes share one grey
(140, 140, 140); reading a map back to classes merges them (`classes_of`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from annotator.controls import ControlSettingsError
from annotator.transformers_models import load_vision_model

ADE20K_CLASSES = 150
ADE20K_PALETTE = np.array([
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
    (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),
    (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
    (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0),
    (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133),
    (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0),
    (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),
    (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255),
    (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),
    (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255),
    (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255),
    (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0),
    (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255),
    (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),], dtype=np.uint8)


def load_segmentation_model(model: str, device: str = "cpu") -> tuple[Any, Any]:
    """(image processor, segmentation model in eval mode on `device`). A model of another kind, or one
    without ADE20K's 150 classes, is a ControlSettingsError naming it."""
    from transformers import AutoModelForSemanticSegmentation

    def ade20k_classes(network: Any) -> None:
        if network.config.num_labels != ADE20K_CLASSES:
            raise ControlSettingsError(f"{model} has {network.config.num_labels} classes; the seg control colours "
                                       f"ADE20K's {ADE20K_CLASSES}: give a model trained on ADE20K")

    return load_vision_model(model, AutoModelForSemanticSegmentation, "semantic-segmentation",
                             "openmmlab/upernet-convnext-small", device, check=ade20k_classes)


def predict_classes(processor: Any, network: Any, photos: list[np.ndarray]) -> list[np.ndarray]:
    """The class id of every pixel (int64 HW at each photo's size) for a batch of RGB uint8 photos."""
    import torch
    from PIL import Image

    device = next(network.parameters()).device
    inputs = processor(images=[Image.fromarray(photo) for photo in photos], return_tensors="pt")
    with torch.no_grad():
        logits = network(pixel_values=inputs["pixel_values"].to(device)).logits
    classes = []
    for photo, scores in zip(photos, logits, strict=True):
        upsampled = torch.nn.functional.interpolate(scores[None].float(), size=photo.shape[:2], mode="bilinear",
                                                    align_corners=False)
        classes.append(upsampled[0].argmax(dim=0).cpu().numpy())
    return classes


def colour_classes(classes: np.ndarray) -> np.ndarray:
    """HWC uint8: each class id's ADE20K colour."""
    return ADE20K_PALETTE[classes]


def classes_of(image: np.ndarray) -> np.ndarray:
    """The class ids (HW int64) of a map drawn with the palette; a colour not in it is -1. Classes that
    share a colour read back as the first of them."""
    codes = (image[..., 0].astype(np.int64) << 16) | (image[..., 1].astype(np.int64) << 8) | image[..., 2]
    palette_codes = (ADE20K_PALETTE[:, 0].astype(np.int64) << 16) | (ADE20K_PALETTE[:, 1].astype(np.int64) << 8) \
        | ADE20K_PALETTE[:, 2]
    lookup = {}
    for index, code in enumerate(palette_codes.tolist()):
        lookup.setdefault(code, index)
    unique, inverse = np.unique(codes, return_inverse=True)
    return np.array([lookup.get(code, -1) for code in unique.tolist()], dtype=np.int64)[inverse].reshape(codes.shape)
