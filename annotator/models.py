"""The model-based control types' annotators, loaded by name: depth and normal (annotator.depth), seg
(annotator.segmentation), softedge (annotator.hed). Each returns a batch function: RGB uint8 photos -> their
control images, in order. The models load on `device`; their libraries (transformers, torch) are imported only
here, so the weight-free types stay light for the build's worker processes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from annotator.controls import ControlSettingsError, ControlType

BatchAnnotator = Callable[[list[np.ndarray]], list[np.ndarray]]


def load_annotator(control: ControlType, settings: Any, model: str | None, device: str = "cpu") -> BatchAnnotator:
    """The batch annotator of a model-based control type with its model (`model`, else the type's default)."""
    model = model or control.model
    if control.name in ("depth", "normal"):
        from annotator.depth import depth_image, load_depth_model, normal_image, predict_depth

        processor, network = load_depth_model(model, device)
        if control.name == "depth":
            return lambda photos: [depth_image(d) for d in predict_depth(processor, network, photos)]
        return lambda photos: [normal_image(d, settings) for d in predict_depth(processor, network, photos)]
    if control.name == "seg":
        from annotator.segmentation import colour_classes, load_segmentation_model, predict_classes

        processor, network = load_segmentation_model(model, device)
        return lambda photos: [colour_classes(c) for c in predict_classes(processor, network, photos)]
    if control.name == "softedge":
        from annotator.hed import load_softedge_annotator

        return load_softedge_annotator(settings, model, device)
    raise ControlSettingsError(f"control {control.name!r} has no model-based annotator")
