"""Control images for inference: from a photo (Canny edges, or the control type a checkpoint was trained
on, annotator.controls) or from a ready control image.

A control image is HWC uint8 RGB with both sides multiples of 64 (what the SD UNet needs after the VAE's
/8); the model takes it as `hint_tensor(...)`: (B, 3, H, W) float in [0, 1], the original apps' scaling.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from annotator.canny import CannyThresholds, canny
from annotator.controls import INFERENCE_KEY, ControlType, hint_values
from annotator.util import HWC3, SIZE_MULTIPLE, resize_image


def control_from_photo(photo: np.ndarray, resolution: int, thresholds: CannyThresholds | None = None
                       ) -> np.ndarray:
    """The original canny app's control image: resize (short side ~resolution, sides multiples of 64),
    then Canny (default thresholds 100/200). photo: HWC or HW uint8. Returns HWC uint8 in {0, 255}
    (white edges on black)."""
    image = resize_image(HWC3(photo), resolution)
    return HWC3(canny(image, thresholds or CannyThresholds()))


def control_from_record(photo: np.ndarray, resolution: int, control: ControlType, settings: Any,
                        model: str | None = None, device: str = "cpu") -> np.ndarray:
    """The control image of `photo` made as the training data's were (the checkpoint's control record):
    resized like control_from_photo, then annotated. Random settings (Canny's random thresholds, a scribble
    width, tile noise) draw from the fixed key "inference". Returns HWC uint8."""
    image = resize_image(HWC3(photo), resolution)
    if control.model_based:
        from annotator.models import load_annotator  # transformers: only for the model-based types

        return HWC3(load_annotator(control, settings, model, device)([image])[0])
    made = control.annotate(image, settings, INFERENCE_KEY)
    return made if made.ndim == 3 and made.shape[2] == 4 else HWC3(made)  # inpaint keeps its mask (alpha)


def control_from_map(edge_map: np.ndarray, resolution: int, keep_alpha: bool = False) -> np.ndarray:
    """A given control image (e.g. an edge map), resized like a photo. Returns HWC uint8; with keep_alpha an
    RGBA image stays RGBA (an inpaint control: transparent = masked), else alpha is composited onto white."""
    if keep_alpha and edge_map.ndim == 3 and edge_map.shape[2] == 4:
        return resize_image(edge_map, resolution)
    return resize_image(HWC3(edge_map), resolution)


def hint_tensor(control: np.ndarray, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """HWC uint8 control image -> (batch_size, 3, H, W) float32 on `device`: RGB in [0, 1], and for an RGBA
    (inpaint) control -1 where it is masked (annotator.controls.hint_values)."""
    height, width = control.shape[:2]
    if control.ndim != 3 or control.shape[2] not in (3, 4) or control.dtype != np.uint8:
        raise ValueError(f"control image must be HWC uint8 RGB or RGBA, got shape {control.shape} {control.dtype}")
    if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
        raise ValueError(f"control image sides must be multiples of {SIZE_MULTIPLE}, got {width}x{height}")
    hint = torch.from_numpy(hint_values(control)).to(device=device)
    return hint.permute(2, 0, 1)[None].expand(batch_size, -1, -1, -1).contiguous()
