"""Building a model from a YAML config and reading checkpoints: the original's public entry points."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from ldm.checkpoint import LoadReport, load_weights, read_state_dict
from ldm.modules.attention import AttentionKind, check_attention_kind
from ldm.util import instantiate_from_config, to_plain

# Params of the denoiser configs that `create_model` may override.
_DENOISER_CONFIGS = ("unet_config", "control_stage_config")


def load_config(config_path: str | os.PathLike) -> dict[str, Any]:
    """The YAML config as plain dicts, with a clear error for a missing file or a missing `model` key."""
    path = Path(config_path)
    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path}")
    config = to_plain(OmegaConf.load(path))
    if not isinstance(config, dict) or "model" not in config:
        raise KeyError(f"{path}: expected a top-level 'model' key with 'target' and 'params'")
    return config


def with_model_options(model_config: dict[str, Any], attention: AttentionKind | None = None,
                       use_checkpoint: bool | None = None) -> dict[str, Any]:
    """A copy of a config's `model` section with the attention kind and gradient checkpointing of the
    UNet and ControlNet set (None keeps the config's value)."""
    model_config = copy.deepcopy(to_plain(model_config))
    params = model_config.setdefault("params", {})
    for name in _DENOISER_CONFIGS:
        if name not in params:
            continue
        sub = params[name].setdefault("params", {})
        if attention is not None:
            sub["attention"] = check_attention_kind(attention)
        if use_checkpoint is not None:
            sub["use_checkpoint"] = use_checkpoint
    return model_config


def build_model(model_config: dict[str, Any], attention: AttentionKind | None = None,
                use_checkpoint: bool | None = None) -> torch.nn.Module:
    """Build a model from a config's `model` section (a dict with `target` and `params`).

    attention: "sdpa" | "sliced" | "math" for every attention layer of the UNet and ControlNet (default:
    what the config says, else "sdpa"). use_checkpoint: gradient checkpointing on/off (default: the
    config's value). To build without allocating memory, call it under `with torch.device("meta"):`.
    """
    return instantiate_from_config(with_model_options(model_config, attention, use_checkpoint))


def create_model(config_path: str | os.PathLike, attention: AttentionKind | None = None,
                 use_checkpoint: bool | None = None) -> torch.nn.Module:
    """Build the model a YAML config describes (on CPU, fp32), e.g. `create_model("models/cldm_v15.yaml")`.

    See `build_model` for the options.
    """
    return build_model(load_config(config_path)["model"], attention, use_checkpoint)


def load_state_dict(ckpt_path: str | os.PathLike, location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a checkpoint (`.safetensors`, `.ckpt`, `.pth`) into a flat state dict (never unpickles code)."""
    return read_state_dict(ckpt_path, location)


def load_model(config_path: str | os.PathLike, ckpt_path: str | os.PathLike, *, prefer_ema: bool = False,
               attention: AttentionKind | None = None, use_checkpoint: bool | None = None
               ) -> tuple[torch.nn.Module, LoadReport]:
    """Build from `config_path` and load `ckpt_path` with the strict, explained key check."""
    model = create_model(config_path, attention=attention, use_checkpoint=use_checkpoint)
    report = load_weights(model, read_state_dict(ckpt_path), prefer_ema=prefer_ema, source=str(ckpt_path))
    return model, report
