"""Loading a transformers vision model for an annotator, with one clear error for every way it can fail."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from annotator.controls import ControlSettingsError
from common.torch_quirks import settle_device_constructors


def load_vision_model(model: str, auto_class: Any, kind: str, example: str, device: str = "cpu",
                      check: Callable[[Any], None] | None = None) -> tuple[Any, Any]:
    """(image processor, model in eval mode on `device`) from a hub id or a local folder, through the
    transformers Auto class `auto_class`. A model that cannot load, or one of another kind, is a
    ControlSettingsError naming it and `kind` ("depth-estimation", ...), with `example` as a model to give;
    `check(network)` may refuse the loaded model before its image processor is read."""
    from transformers import AutoConfig, AutoImageProcessor

    settle_device_constructors()
    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as err:
        raise ControlSettingsError(f"cannot load the {kind} model {model}: {err}") from err
    try:
        network = auto_class.from_pretrained(model)
    except ValueError as err:
        kinds = ", ".join(config.architectures or [type(config).__name__])
        raise ControlSettingsError(f"{model} is not a {kind} model (it is {kinds}); give one such as "
                                   f"{example}") from err
    except OSError as err:
        raise ControlSettingsError(f"cannot load the {kind} model {model}: {err}") from err
    if check is not None:
        check(network)
    try:
        processor = AutoImageProcessor.from_pretrained(model)
    except (OSError, ValueError) as err:
        raise ControlSettingsError(f"cannot load the image processor of {model}: {err}") from err
    return processor, network.to(device).eval()
