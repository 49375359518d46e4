"""The transformers `BlipConfig` of an original BLIP captioning checkpoint.

Sizes come from the tensor shapes. Attention head counts are not in the shapes: they come from
`med_config.json` / `vision_config.json` beside the checkpoint when present, else from the sizes BLIP
itself builds (`create_vit` 'base'/'large', the BERT-base `med_config.json`). Values in those files are
checked against the shapes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from transformers import BlipConfig

from ldm.checkpoint import CheckpointError

# BLIP's create_vit: ViT-B/16 (width 768) has 12 heads, ViT-L/16 (width 1024) 16.
BLIP_VIT_HEADS = {768: 12, 1024: 16}
# BLIP's MED decoder is BERT-base: 768 wide, 12 heads.
BLIP_MED_HEADS = {768: 12}
# BLIP's ViT builds its LayerNorms with eps 1e-6; its MED (BERT) config uses 1e-12.
BLIP_VIT_LAYER_NORM_EPS = 1e-6
BLIP_MED_LAYER_NORM_EPS = 1e-12


def _count_layers(state_dict: Mapping[str, torch.Tensor], pattern: str) -> int:
    indices = {int(m.group(1)) for key in state_dict if (m := re.match(pattern, key))}
    if indices != set(range(len(indices))):
        raise CheckpointError(f"layer indices matching {pattern!r} are not 0..n-1: {sorted(indices)}")
    return len(indices)


def _shape(state_dict: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise CheckpointError(f"checkpoint has no {key!r}; is it a BLIP captioning/pre-training checkpoint?")
    return tuple(state_dict[key].shape)


def _check_file_value(config_file: Mapping[str, Any], name: str, key: str, from_shapes: int | float) -> None:
    if key in config_file and config_file[key] != from_shapes:
        raise CheckpointError(f"{name}: {key}={config_file[key]} but the checkpoint's weights give {from_shapes}")


def _heads(config_file: Mapping[str, Any], key: str, width: int, known: Mapping[int, int], name: str) -> int:
    if key in config_file:
        return int(config_file[key])
    if width in known:
        return known[width]
    raise CheckpointError(
        f"cannot infer the number of attention heads for width {width}: put {name} (with {key!r}) beside the checkpoint"
    )


def vision_config_from_checkpoint(
    state_dict: Mapping[str, torch.Tensor], image_size: int, vision_config: Mapping[str, Any]
) -> dict[str, Any]:
    """BlipVisionConfig arguments for BLIP's `visual_encoder.*` weights, built for image_size pixels
    (the checkpoint's position embeddings are interpolated to that grid, as BLIP's load_checkpoint does)."""
    name = "vision_config.json"
    width = _shape(state_dict, "visual_encoder.cls_token")[-1]
    patch_size = _shape(state_dict, "visual_encoder.patch_embed.proj.weight")[-1]
    depth = _count_layers(state_dict, r"visual_encoder\.blocks\.(\d+)\.")
    intermediate = _shape(state_dict, "visual_encoder.blocks.0.mlp.fc1.weight")[0]
    _check_file_value(vision_config, name, "vision_width", width)
    _check_file_value(vision_config, name, "patch_size", patch_size)
    _check_file_value(vision_config, name, "depth", depth)
    _check_file_value(vision_config, name, "mlp_ratio", intermediate / width)
    if not vision_config.get("qkv_bias", True) or "visual_encoder.blocks.0.attn.qkv.bias" not in state_dict:
        raise CheckpointError("ViT without qkv bias is not supported (transformers' BLIP always has one)")
    if image_size % patch_size:
        raise CheckpointError(f"image_size {image_size} is not a multiple of the patch size {patch_size}")
    return dict(
        hidden_size=width,
        intermediate_size=intermediate,
        num_hidden_layers=depth,
        num_attention_heads=_heads(vision_config, "num_heads", width, BLIP_VIT_HEADS, name),
        image_size=image_size,
        patch_size=patch_size,
        hidden_act="gelu",
        layer_norm_eps=float(vision_config.get("layer_norm_eps", BLIP_VIT_LAYER_NORM_EPS)),
    )


def text_config_from_checkpoint(
    state_dict: Mapping[str, torch.Tensor], med_config: Mapping[str, Any]
) -> dict[str, Any]:
    """BlipTextConfig arguments for BLIP's `text_decoder.*` (MED BertLMHeadModel) weights."""
    name = "med_config.json"
    prefix = "text_decoder.bert."
    vocab_size, hidden = _shape(state_dict, prefix + "embeddings.word_embeddings.weight")
    max_positions = _shape(state_dict, prefix + "embeddings.position_embeddings.weight")[0]
    layers = _count_layers(state_dict, r"text_decoder\.bert\.encoder\.layer\.(\d+)\.")
    intermediate = _shape(state_dict, prefix + "encoder.layer.0.intermediate.dense.weight")[0]
    _check_file_value(med_config, name, "vocab_size", vocab_size)
    _check_file_value(med_config, name, "hidden_size", hidden)
    _check_file_value(med_config, name, "max_position_embeddings", max_positions)
    _check_file_value(med_config, name, "num_hidden_layers", layers)
    _check_file_value(med_config, name, "intermediate_size", intermediate)
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=_heads(med_config, "num_attention_heads", hidden, BLIP_MED_HEADS, name),
        max_position_embeddings=max_positions,
        hidden_act=med_config.get("hidden_act", "gelu"),
        layer_norm_eps=float(med_config.get("layer_norm_eps", BLIP_MED_LAYER_NORM_EPS)),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def blip_config_from_checkpoint(
    state_dict: Mapping[str, torch.Tensor],
    image_size: int,
    token_ids: Mapping[str, int],
    med_config: Mapping[str, Any] | None = None,
    vision_config: Mapping[str, Any] | None = None,
) -> BlipConfig:
    """BlipConfig for an original BLIP state dict (`torch.load(path)["model"]`).

    token_ids: "bos" ([DEC]), "sep" (eos) and "pad" ids of the checkpoint's tokenizer.
    med_config / vision_config: the parsed json files, if any; their values must agree with the shapes.
    """
    text = text_config_from_checkpoint(state_dict, med_config or {})
    vision = vision_config_from_checkpoint(state_dict, image_size, vision_config or {})
    for role, token_id in token_ids.items():
        if not 0 <= token_id < text["vocab_size"]:
            raise CheckpointError(f"{role} id {token_id} is outside the decoder vocabulary ({text['vocab_size']})")
    text.update(
        bos_token_id=token_ids["bos"],
        sep_token_id=token_ids["sep"],
        eos_token_id=token_ids["sep"],
        pad_token_id=token_ids["pad"],
    )
    return BlipConfig(text_config=text, vision_config=vision)
