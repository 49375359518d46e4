"""Loading a ControlLDM for inference from any of the kinds of checkpoint users have (and, for training,
a released ControlNet on top of an SD checkpoint).

- "training": a `.ckpt` written by training.py. Its `hyper_parameters["model_config"]` is the config's
  `model` section (target + params), so nothing else is needed.
- "full": a complete ControlLDM state dict in the original layout (`control_model.*`,
  `model.diffusion_model.*`, ...; e.g. control_sd15_canny.pth, or tool_add_control's output), built
  with a config (default models/cldm_v15.yaml).
- "control-only": only the ControlNet, as `control_model.*` keys or the same keys without that prefix
  (e.g. ControlNet 1.1 releases, tool_export.py's control files), fp16 or fp32, plus an SD checkpoint for
  everything else. A control file of tool_export.py carries its model config in its metadata, used when
  no config is given.
- "diffusers": a diffusers `ControlNetModel` folder (config.json + diffusion_pytorch_model.safetensors),
  plus an SD checkpoint; its config.json must describe the config's ControlNet (cldm/diffusers_format.py).

`load_base_and_control` does the same for training (training.py --init SD --init-control CONTROL):
fine-tuning a released ControlNet.

Tensors are read through `ldm.lazy_checkpoint` (`.ckpt` files are memory-mapped), so loading holds the
model plus at most the file's pages, not two in-memory copies.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cldm import diffusers_format
from cldm.model import load_config
from ldm.checkpoint import CONTROL_PREFIX, UNET_PREFIX, CheckpointError, LoadReport, load_weights
from ldm.lazy_checkpoint import LazyCheckpoint, open_lazy
from ldm.util import instantiate_from_config

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "models" / "cldm_v15.yaml"
TRAINING_KIND, FULL_KIND, CONTROL_ONLY_KIND, DIFFUSERS_KIND = "training", "full", "control-only", "diffusers"
# The weights file names of a diffusers model folder, in the order they are looked for.
DIFFUSERS_WEIGHTS = (diffusers_format.WEIGHTS_NAME, "diffusion_pytorch_model.fp16.safetensors",
                     "diffusion_pytorch_model.bin")
# The safetensors metadata entry in which tool_export.py's control files carry the model config.
MODEL_CONFIG_METADATA = "model_config"
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


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder with a diffusers config.json."""
    return Path(path).is_dir() and (Path(path) / diffusers_format.CONFIG_NAME).is_file()


def carried_control_config(checkpoint: LazyCheckpoint) -> dict | None:
    """The model config a tool_export.py control file carries in its metadata, else None."""
    text = checkpoint.metadata.get(MODEL_CONFIG_METADATA)
    if not isinstance(text, str):
        return None
    try:
        model_config = json.loads(text)
    except ValueError as err:
        raise CheckpointError(f"{checkpoint.path}: metadata {MODEL_CONFIG_METADATA!r} is not JSON ({err})") from err
    if not isinstance(model_config, dict) or "target" not in model_config:
        raise CheckpointError(f"{checkpoint.path}: metadata {MODEL_CONFIG_METADATA!r} is not a model config")
    return model_config


def _control_weights(checkpoint: LazyCheckpoint) -> dict[str, torch.Tensor]:
    """The ControlNet's own state dict (keys relative to `control_model`) of a file that holds a ControlNet:
    its control_model.* keys when it has them (a full or training checkpoint too), else every key (a bare
    released file)."""
    keys = list(checkpoint.specs)
    if any(k.startswith(CONTROL_PREFIX) for k in keys) and checkpoint_kind(checkpoint) != CONTROL_ONLY_KIND:
        keys = [k for k in keys if k.startswith(CONTROL_PREFIX)]
    return {k.removeprefix(CONTROL_PREFIX): checkpoint[k] for k in keys}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable JSON file ({err})") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_diffusers_controlnet(folder: str | os.PathLike, control_config: Mapping[str, Any]
                              ) -> dict[str, torch.Tensor]:
    """The ControlNet state dict (keys relative to `control_model`, original layout) of a diffusers
    ControlNetModel folder, after checking its config.json against `control_config` (the yaml's
    control_stage_config). Keys without an original name are kept as they are, so that the strict
    load names them. Raises CheckpointError naming the file and the disagreeing field."""
    folder = Path(folder)
    params = control_config["params"]
    config_path = folder / diffusers_format.CONFIG_NAME
    try:
        diffusers_format.check_controlnet_config(_read_json(config_path), params, str(config_path))
    except diffusers_format.DiffusersConfigError as err:
        raise CheckpointError(str(err)) from err
    weights = next((folder / name for name in DIFFUSERS_WEIGHTS if (folder / name).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{folder}: no weights file (looked for {', '.join(DIFFUSERS_WEIGHTS)})")
    with torch.device("meta"):
        keys = list(instantiate_from_config(control_config).state_dict())
    original = {name: key for key, name in diffusers_format.diffusers_names(keys, params["num_res_blocks"]).items()}
    with open_lazy(weights) as checkpoint:
        return {original.get(k, k): checkpoint[k] for k in checkpoint.specs}


def read_control_weights(path: str | os.PathLike, model_config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The ControlNet weights (keys relative to `control_model`) of a diffusers folder, a control-only file
    (with or without the control_model. prefix) or a full/training checkpoint, for the model of
    `model_config`."""
    if Path(path).is_dir():
        if not is_diffusers_folder(path):
            raise CheckpointError(f"{path}: a folder without {diffusers_format.CONFIG_NAME}, so not a diffusers "
                                  f"ControlNet")
        return read_diffusers_controlnet(path, model_config["params"]["control_stage_config"])
    with open_lazy(path) as checkpoint:
        if not any(k.startswith((CONTROL_PREFIX, *CONTROLNET_ONLY_MODULES)) for k in checkpoint.specs):
            raise CheckpointError(f"{path}: holds no ControlNet (no control_model.*, input_hint_block.* or "
                                  f"zero_convs.* keys; first keys: {list(checkpoint.specs)[:5]})")
        return _control_weights(checkpoint)


def _check_control(model_config: Mapping[str, Any], control: Mapping[str, torch.Tensor], source: str) -> LoadReport:
    """The strict, explained check of ControlNet weights against the config's ControlNet, on the meta device."""
    with torch.device("meta"):
        shadow = instantiate_from_config(model_config["params"]["control_stage_config"])
    return load_weights(shadow, {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in control.items()},
                        source=source)


def load_base_and_control(model: nn.Module, model_config: Mapping[str, Any], sd_path: str | os.PathLike,
                          control_path: str | os.PathLike) -> list[str]:
    """Load an SD checkpoint and a ControlNet (any of `read_control_weights`' kinds) into `model`, a
    ControlLDM built from `model_config`; report lines. Both are checked (keys, shapes) before any tensor
    is copied; the SD file is read one tensor at a time (its control_model.* tensors, if any, are replaced
    by the ControlNet's). fp16 files load into the model's dtypes."""
    control = read_control_weights(control_path, model_config)
    _check_control(model_config, control, str(control_path))
    lines = []
    with open_lazy(sd_path) as sd:
        with torch.device("meta"):
            shadow = instantiate_from_config(model_config)
        shapes = {k: torch.empty(s.shape, dtype=s.dtype, device="meta") for k, s in sd.specs.items()
                  if not k.startswith(CONTROL_PREFIX)}
        report = load_weights(shadow, shapes, allow_missing=(CONTROL_PREFIX,), source=str(sd_path))
        replaced = sum(1 for k in sd.specs if k.startswith(CONTROL_PREFIX))
        with torch.no_grad():
            for key, target in model.state_dict().items():
                if not key.startswith(CONTROL_PREFIX) and key in sd:
                    target.copy_(sd[key])
        report.filled_from_model = [k for k in report.filled_from_model if not k.startswith(CONTROL_PREFIX)]
        lines.append(f"{sd_path}: {report}" + (f"; its {replaced} control_model.* tensors replaced by "
                                                f"{control_path}" if replaced else ""))
    lines.append(f"{control_path}: {load_weights(model.control_model, control, source=str(control_path))}")
    return lines


def control_record_of(ckpt_path: str | os.PathLike) -> dict | None:
    """How the control images of a checkpoint's training data were made (annotator.controls' record:
    name, settings, model), from a training checkpoint's hyper_parameters or a tool_export.py control file's
    metadata; None when the file does not say (then the control is Canny, as before records existed)."""
    if Path(ckpt_path).is_dir():
        return None
    with open_lazy(ckpt_path) as checkpoint:
        metadata = checkpoint.metadata
    record = metadata.get("control")
    if record is None:
        hyper_parameters = metadata.get("hyper_parameters")
        if isinstance(hyper_parameters, str):
            try:
                hyper_parameters = json.loads(hyper_parameters)
            except ValueError:
                hyper_parameters = None
        record = hyper_parameters.get("control") if isinstance(hyper_parameters, Mapping) else None
    if isinstance(record, str):
        try:
            record = json.loads(record)
        except ValueError:
            return None
    return record if isinstance(record, Mapping) and isinstance(record.get("name"), str) else None


def load_for_inference(ckpt_path: str | os.PathLike, config_path: str | os.PathLike | None = None,
                       sd_ckpt_path: str | os.PathLike | None = None) -> tuple[torch.nn.Module, list[str]]:
    """A ControlLDM with the checkpoint's weights, on CPU in fp32 and in eval mode, plus report lines.

    ckpt_path: a file of the kinds in the module docstring, or a diffusers ControlNet folder. config_path:
    the model config for "full", "control-only" and "diffusers" (default: a control file's carried config,
    else models/cldm_v15.yaml); a training checkpoint carries its own. sd_ckpt_path: the SD checkpoint a
    control-only file or a diffusers folder needs. Raises CheckpointError when a file does not fit the
    model (keys, shapes, likely cause).
    """
    if Path(ckpt_path).is_dir():
        if not is_diffusers_folder(ckpt_path):
            raise CheckpointError(f"{ckpt_path}: a folder without {diffusers_format.CONFIG_NAME}, so not a "
                                  f"diffusers ControlNet")
        return _load_with_sd(ckpt_path, DIFFUSERS_KIND, config_path, None, sd_ckpt_path)
    with open_lazy(ckpt_path) as checkpoint:
        kind = checkpoint_kind(checkpoint)
        if kind == CONTROL_ONLY_KIND:
            return _load_with_sd(ckpt_path, kind, config_path, carried_control_config(checkpoint), sd_ckpt_path)
        lines = [f"{ckpt_path}: {kind} checkpoint"]
        if kind == TRAINING_KIND:
            model_config = carried_model_config(checkpoint.metadata)
            if config_path is not None:
                lines.append(f"ignored --config {config_path}: the training checkpoint carries its config")
        else:
            config_path = config_path or DEFAULT_CONFIG
            model_config = load_config(config_path)["model"]
            lines.append(f"config {config_path}")
        if sd_ckpt_path is not None:
            raise CheckpointError(f"{ckpt_path} is a complete model; --sd-ckpt is only for control-only files "
                                  f"and diffusers folders")
        model = instantiate_from_config(model_config)
        report = load_weights(model, {k: checkpoint[k] for k in checkpoint.specs}, source=str(ckpt_path))
        lines.append(f"{ckpt_path}: {report}")
    return model.eval(), lines


def _load_with_sd(ckpt_path: str | os.PathLike, kind: str, config_path: str | os.PathLike | None,
                  carried: dict | None, sd_ckpt_path: str | os.PathLike | None) -> tuple[torch.nn.Module, list[str]]:
    """A ControlNet alone (control-only file or diffusers folder) on top of an SD checkpoint."""
    lines = [f"{ckpt_path}: {kind} checkpoint"]
    if sd_ckpt_path is None:
        raise CheckpointError(f"{ckpt_path} holds only a ControlNet: give the Stable Diffusion checkpoint it "
                              f"was trained on with --sd-ckpt")
    if config_path is None and carried is not None:
        model_config = carried
        lines.append("config: the one the control file carries")
    else:
        config_path = config_path or DEFAULT_CONFIG
        model_config = load_config(config_path)["model"]
        lines.append(f"config {config_path}")
    model = instantiate_from_config(model_config)
    lines += load_base_and_control(model, model_config, sd_ckpt_path, ckpt_path)
    return model.eval(), lines
