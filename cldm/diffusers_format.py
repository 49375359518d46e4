"""The diffusers layout of a ControlNet and of its SD UNet: config.json fields and state-dict key names.

diffusers (`ControlNetModel`, `UNet2DConditionModel`) names the same tensors differently from the original
(CompVis / ControlNet) layout this project trains in; the shapes are the same, so conversion is a key
rename in both directions (the facts are those of diffusers' single-file converters):

| original (relative to control_model / diffusion_model) | diffusers |
| --- | --- |
| `time_embed.0` / `time_embed.2` | `time_embedding.linear_1` / `linear_2` |
| `input_blocks.0.0` | `conv_in` |
| `input_blocks.i.0` (ResBlock), `.i.1` (transformer) | `down_blocks.b.resnets.j`, `down_blocks.b.attentions.j` |
| `input_blocks.i.0.op` (Downsample) | `down_blocks.b.downsamplers.0.conv` |
| `middle_block.0` / `.1` / `.2` | `mid_block.resnets.0` / `mid_block.attentions.0` / `mid_block.resnets.1` |
| `output_blocks.i.0` / `.i.1` / `.i.{1,2}.conv` | `up_blocks.b.resnets.j` / `.attentions.j` / `.upsamplers.0.conv` |
| `out.0` / `out.2` | `conv_norm_out` / `conv_out` |
| `input_hint_block.0`, `.2k`, `.14` | `controlnet_cond_embedding.conv_in`, `.blocks.(k-1)`, `.conv_out` |
| `zero_convs.i.0` / `middle_block_out.0` | `controlnet_down_blocks.i` / `controlnet_mid_block` |

with b = (i - 1) // (layers_per_block + 1), j = (i - 1) % (layers_per_block + 1) in the encoder and
b = i // (layers_per_block + 1), j = i % (layers_per_block + 1) in the decoder. Inside a ResBlock
`in_layers.0/2`, `out_layers.0/3`, `emb_layers.1`, `skip_connection` are `norm1`/`conv1`, `norm2`/`conv2`,
`time_emb_proj`, `conv_shortcut`; the transformers' inner names are the same in both.

Heads: diffusers' `attention_head_dim` is, for historical reasons, the number of heads (diffusers'
`num_attention_heads` falls back to it). SD 1.x configs give `num_heads: 8` (8 heads at every width), SD 2.x
give `num_head_channels: 64`, i.e. width / 64 heads per block (5, 10, 20, 20 for SD 2.1).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from cldm.cldm import HINT_BLOCK_LAYOUT

CONTROLNET_CLASS = "ControlNetModel"
UNET_CLASS = "UNet2DConditionModel"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
UNET_FOLDER = "unet"
# The diffusers release whose field names this writes (config.json's _diffusers_version).
DIFFUSERS_VERSION = "0.42.1"
NORM_NUM_GROUPS = 32  # GroupNorm32 of the original, diffusers' norm_num_groups

_RESNET_NAMES = (("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("out_layers.0.", "norm2."),
                 ("out_layers.3.", "conv2."), ("emb_layers.1.", "time_emb_proj."),
                 ("skip_connection.", "conv_shortcut."))
_MIDDLE_PARTS = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}
_BLOCK = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.*)")
_NUMBERED = re.compile(r"(input_hint_block|zero_convs|middle_block|middle_block_out)\.(\d+)\.(.*)")


class DiffusersConfigError(ValueError):
    """A diffusers config that does not describe the model of the project's config, or a model that
    diffusers cannot express."""


# ---- configs ----------------------------------------------------------------------------------------
def attention_heads(params: Mapping[str, Any]) -> int | list[int]:
    """diffusers' `attention_head_dim` (the number of heads) of a UNet/ControlNet config's params: one
    count for `num_heads` (SD 1.x), one per block for `num_head_channels` (SD 2.x)."""
    num_head_channels = params.get("num_head_channels", -1)
    if num_head_channels in (-1, None):
        return int(params["num_heads"])
    widths = [params["model_channels"] * mult for mult in params["channel_mult"]]
    for width in widths:
        if width % num_head_channels:
            raise DiffusersConfigError(f"num_head_channels {num_head_channels} does not divide the block width {width}")
    return [width // num_head_channels for width in widths]


def _check_expressible(params: Mapping[str, Any]) -> None:
    """Refuse the original's options that diffusers' SD classes cannot express."""
    problems = []
    if params.get("dims", 2) != 2:
        problems.append(f"dims {params['dims']}")
    if not params.get("conv_resample", True):
        problems.append("conv_resample False")
    if params.get("disable_middle_self_attn", False):
        problems.append("disable_middle_self_attn")
    if not isinstance(params.get("transformer_depth", 1), int):
        problems.append(f"transformer_depth per level {params['transformer_depth']}")
    if not isinstance(params.get("context_dim"), int):
        problems.append(f"context_dim {params.get('context_dim')}")
    if problems:
        raise DiffusersConfigError(f"diffusers has no equivalent of {', '.join(problems)}")


def _shared_config(params: Mapping[str, Any]) -> dict[str, Any]:
    """The fields that a ControlNetModel and a UNet2DConditionModel of the same encoder share."""
    _check_expressible(params)
    levels = len(params["channel_mult"])
    down_block_types = ["CrossAttnDownBlock2D" if 2 ** level in params["attention_resolutions"] else "DownBlock2D"
                        for level in range(levels)]
    disabled = params.get("disable_self_attentions")
    return {
        "in_channels": params["in_channels"],
        "down_block_types": down_block_types,
        "block_out_channels": [params["model_channels"] * mult for mult in params["channel_mult"]],
        "layers_per_block": params["num_res_blocks"],
        "cross_attention_dim": params["context_dim"],
        "attention_head_dim": attention_heads(params),
        "use_linear_projection": bool(params.get("use_linear_in_transformer", False)),
        "transformer_layers_per_block": params.get("transformer_depth", 1),
        "only_cross_attention": list(disabled) if disabled else False,
        "resnet_time_scale_shift": "scale_shift" if params.get("use_scale_shift_norm", False) else "default",
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "act_fn": "silu",
        "norm_num_groups": NORM_NUM_GROUPS,
        "norm_eps": 1e-5,
        "upcast_attention": False,
        "class_embed_type": None,
        "addition_embed_type": None,
        "addition_time_embed_dim": None,
        "projection_class_embeddings_input_dim": None,
    }


def conditioning_embedding_channels() -> list[int]:
    """diffusers' `conditioning_embedding_out_channels` of the hint block: the first conv's width and the
    width after each stride-2 conv (16, 32, 96, 256)."""
    return [HINT_BLOCK_LAYOUT[0][0]] + [channels for channels, stride in HINT_BLOCK_LAYOUT if stride == 2]


def controlnet_config(control_params: Mapping[str, Any], global_average_pooling: bool = False) -> dict[str, Any]:
    """config.json of the `ControlNetModel` equal to a `cldm.cldm.ControlNet` built from `control_params`
    (the yaml's control_stage_config.params); global_average_pooling: the ControlLDM's (diffusers'
    `global_pool_conditions`)."""
    return {"_class_name": CONTROLNET_CLASS, "_diffusers_version": DIFFUSERS_VERSION,
            **_shared_config(control_params),
            "conditioning_channels": control_params["hint_channels"],
            "conditioning_embedding_out_channels": conditioning_embedding_channels(),
            "controlnet_conditioning_channel_order": "rgb",
            "global_pool_conditions": bool(global_average_pooling)}


def unet_config(unet_params: Mapping[str, Any], sample_size: int) -> dict[str, Any]:
    """config.json of the `UNet2DConditionModel` equal to the project's UNet built from `unet_params`
    (the yaml's unet_config.params); sample_size: the latent side (the model's `image_size`)."""
    shared = _shared_config(unet_params)
    up_block_types = [kind.replace("Down", "Up") for kind in reversed(shared["down_block_types"])]
    return {"_class_name": UNET_CLASS, "_diffusers_version": DIFFUSERS_VERSION, **shared,
            "out_channels": unet_params["out_channels"], "up_block_types": up_block_types,
            "sample_size": sample_size, "center_input_sample": False}


# diffusers' ControlNetModel defaults of the fields `check_controlnet_config` compares (a config.json may
# leave them out).
CONTROLNET_DEFAULTS: dict[str, Any] = {
    "in_channels": 4, "conditioning_channels": 3, "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "downsample_padding": 1,
    "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1, "attention_head_dim": 8, "use_linear_projection": False,
    "class_embed_type": None, "addition_embed_type": None, "upcast_attention": False,
    "resnet_time_scale_shift": "default", "controlnet_conditioning_channel_order": "rgb",
    "conditioning_embedding_out_channels": [16, 32, 96, 256], "global_pool_conditions": False,
}


def _per_block(value: Any, blocks: int) -> Any:
    """An int or bool given for every block, as a list (diffusers accepts both)."""
    if isinstance(value, (int, float, bool)) and not isinstance(value, str):
        return [value] * blocks
    return list(value) if isinstance(value, (list, tuple)) else value


def check_controlnet_config(given: Mapping[str, Any], control_params: Mapping[str, Any], source: str) -> None:
    """Raise DiffusersConfigError naming every field of a diffusers ControlNet config.json (`given`) that
    disagrees with the ControlNet the yaml's control_stage_config.params describe."""
    expected = controlnet_config(control_params)
    blocks = len(expected["block_out_channels"])
    given = dict(given)
    if given.get("_class_name", CONTROLNET_CLASS) != CONTROLNET_CLASS:
        raise DiffusersConfigError(f"{source}: _class_name is {given['_class_name']!r}, not {CONTROLNET_CLASS!r}")
    if given.get("num_attention_heads") is not None:  # newer configs name the head count correctly
        given["attention_head_dim"] = given["num_attention_heads"]
    disagreements = []
    for name, default in CONTROLNET_DEFAULTS.items():
        value, want = given.get(name, default), expected[name]
        if name in ("attention_head_dim", "transformer_layers_per_block", "only_cross_attention"):
            value, want = _per_block(value, blocks), _per_block(want, blocks)
        elif isinstance(value, tuple):
            value = list(value)
        if value != want:
            disagreements.append(f"{name} is {value!r}, the config gives {want!r}")
    if disagreements:
        raise DiffusersConfigError(f"{source} does not describe the config's ControlNet: " + "; ".join(disagreements))


# ---- key names --------------------------------------------------------------------------------------
def _resnet_rest(rest: str) -> str:
    for old, new in _RESNET_NAMES:
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def _to_diffusers_key(key: str, layers_per_block: int) -> str | None:
    """The diffusers name of one UNet or ControlNet key (relative to the module), None if it has none."""
    for old, new in (("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
                     ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")):
        if key.startswith(old):
            return new + key[len(old):]
    match = _BLOCK.fullmatch(key)
    if match:
        kind, index, part, rest = match[1], int(match[2]), match[3], match[4]
        block, layer = divmod(index - 1 if kind == "input_blocks" else index, layers_per_block + 1)
        side = "down_blocks" if kind == "input_blocks" else "up_blocks"
        if kind == "input_blocks" and part == "0" and rest.startswith("op."):
            return f"down_blocks.{block}.downsamplers.0.conv.{rest[len('op.'):]}"
        if kind == "output_blocks" and part in ("1", "2") and rest.startswith("conv."):
            return f"up_blocks.{block}.upsamplers.0.conv.{rest[len('conv.'):]}"
        if part == "0":
            return f"{side}.{block}.resnets.{layer}.{_resnet_rest(rest)}"
        if part == "1":
            return f"{side}.{block}.attentions.{layer}.{rest}"
        return None
    match = _NUMBERED.fullmatch(key)
    if match:
        kind, index, rest = match[1], int(match[2]), match[3]
        if kind == "middle_block" and match[2] in _MIDDLE_PARTS:
            part = _MIDDLE_PARTS[match[2]]
            return f"mid_block.{part}.{_resnet_rest(rest) if part.startswith('resnets') else rest}"
        if kind == "zero_convs" and rest.startswith("0."):
            return f"controlnet_down_blocks.{index}.{rest[2:]}"
        if kind == "middle_block_out" and index == 0:
            return f"controlnet_mid_block.{rest}"
        if kind == "input_hint_block":
            last = 2 * len(HINT_BLOCK_LAYOUT)
            if index == 0:
                return f"controlnet_cond_embedding.conv_in.{rest}"
            if index == last:
                return f"controlnet_cond_embedding.conv_out.{rest}"
            if index % 2 == 0 and 0 < index < last:
                return f"controlnet_cond_embedding.blocks.{index // 2 - 1}.{rest}"
    return None


def diffusers_names(keys: list[str], layers_per_block: int) -> dict[str, str]:
    """{original key: diffusers key} for the keys of a ControlNet or UNet state dict (relative to the
    module). Raises DiffusersConfigError for a key without a diffusers name."""
    names = {}
    for key in keys:
        name = _to_diffusers_key(key, layers_per_block)
        if name is None:
            raise DiffusersConfigError(f"{key}: no diffusers name for this tensor")
        names[key] = name
    if len(set(names.values())) != len(names):
        raise DiffusersConfigError("two tensors map to one diffusers name (layers_per_block wrong?)")
    return names
