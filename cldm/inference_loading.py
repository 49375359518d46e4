"""Loading a ControlLDM for inference from any of the three kinds of checkpoint users have.

- "training": a `.ckpt` written by training.py. Its `hyper_parameters["model_config"]` is the config's
  `model` section (target + params), so nothing else is needed.
- "full": a complete ControlLDM state dict in the original layout (`control_model.*`,
  `model.diffusion_model.*`, ...; e.g. control_sd15_canny.pth, or tool_add_control's output), built
  with a config (default models/cldm_v15.yaml).
- "control-only": only the ControlNet, as `control_model.*` keys or the same keys without that prefix
  (e.g. ControlNet 1.1 releases, training exports), plus an SD checkpoint for everything else.

Tensors are read through `ldm.lazy_checkpoint` (`.ckpt` files are memory-mapped), so loading holds the
model plus at most the file's pages, not two in-memory copies.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from cldm.model import load_config
from ldm.checkpoint import CONTROL_PREFIX, UNET_PREFIX, CheckpointError, load_weights
from ldm.lazy_checkpoint import LazyCheckpoint, open_lazy
from ldm.util import instantiate_from_config

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "models" / "cldm_v15.yaml"
TRAINING_KIND, FULL_KIND, CONTROL_ONLY_KIND = "training", "full", "control-only"
# Top-level module names of a bare ControlNet state dict (keys without the control_model. prefix); the
# hint block, zero convs and middle_block_out exist only in a ControlNet.
CONTROLNET_ONLY_MODULES = ("input_hint_block.", "zero_convs.", "middle_block_out.")


def carried_model_config(metadata: Mapping) -> dict | None:
    """The model config a training checkpoint carries (hyper_parameters["model_config"]), else None."""
    hyper_parameters = metadata.get("hyper_parameters")
    if not isinstance(hyper_parameters, Mapping) or "model_config" not in hyper_parameters:
        return None
    model_config = hyper_parameters["model_config"]
    if not isinstance(model_config, Mapping) or "target" not in model_config:
        raise CheckpointError("hyper_parameters['model_config'] should be the config's `model` section "
                              f"(a dict with 'target' and 'params'), found {type(model_config).__name__}")
    return dict(model_config)


def checkpoint_kind(checkpoint: LazyCheckpoint) -> str:
    """"training", "full" or "control-only" (see the module docstring); CheckpointError otherwise."""
    if carried_model_config(checkpoint.metadata) is not None:
        return TRAINING_KIND
    keys = list(checkpoint.specs)
    if any(k.startswith(UNET_PREFIX) for k in keys):
        return FULL_KIND
    if all(k.startswith(CONTROL_PREFIX) for k in keys) or any(k.startswith(CONTROLNET_ONLY_MODULES) for k in keys):
        return CONTROL_ONLY_KIND
    raise CheckpointError(f"{checkpoint.path}: neither a ControlLDM nor a ControlNet checkpoint (no "
                          f"model.diffusion_model.* or control_model.* keys; first keys: {keys[:5]})")


def _control_weights(checkpoint: LazyCheckpoint) -> dict[str, torch.Tensor]:
    """The ControlNet's own state dict (keys relative to `control_model`)."""
    return {k.removeprefix(CONTROL_PREFIX): checkpoint[k] for k in checkpoint.specs}


def load_for_inference(ckpt_path: str | os.PathLike, config_path: str | os.PathLike | None = None,
                       sd_ckpt_path: str | os.PathLike | None = None) -> tuple[torch.nn.Module, list[str]]:
    """A ControlLDM with the checkpoint's weights, on CPU in fp32 and in eval mode, plus report lines.

    config_path: the model config for "full" and "control-only" files (default models/cldm_v15.yaml);
    a training checkpoint carries its own. sd_ckpt_path: the SD checkpoint a control-only file needs.
    Raises CheckpointError when a file does not fit the model (keys, shapes, likely cause).
    """
    with open_lazy(ckpt_path) as checkpoint:
        kind = checkpoint_kind(checkpoint)
        lines = [f"{ckpt_path}: {kind} checkpoint"]
        if kind == TRAINING_KIND:
            model_config = carried_model_config(checkpoint.metadata)
            if config_path is not None:
                lines.append(f"ignored --config {config_path}: the training checkpoint carries its config")
        else:
            config_path = config_path or DEFAULT_CONFIG
            model_config = load_config(config_path)["model"]
            lines.append(f"config {config_path}")
        if kind == CONTROL_ONLY_KIND and sd_ckpt_path is None:
            raise CheckpointError(f"{ckpt_path} holds only a ControlNet: give the Stable Diffusion checkpoint it "
                                  f"was trained on with --sd-ckpt")
        if kind != CONTROL_ONLY_KIND and sd_ckpt_path is not None:
            raise CheckpointError(f"{ckpt_path} is a complete model; --sd-ckpt is only for control-only files")

        model = instantiate_from_config(model_config)
        if kind == CONTROL_ONLY_KIND:
            with open_lazy(sd_ckpt_path) as sd:
                report = load_weights(model, {k: sd[k] for k in sd.specs}, allow_missing=(CONTROL_PREFIX,),
                                      source=str(sd_ckpt_path))
            lines.append(f"{sd_ckpt_path}: {report}")
            report = load_weights(model.control_model, _control_weights(checkpoint), source=str(ckpt_path))
        else:
            report = load_weights(model, {k: checkpoint[k] for k in checkpoint.specs}, source=str(ckpt_path))
        lines.append(f"{ckpt_path}: {report}")
    return model.eval(), lines
