"""Original BLIP state dict -> transformers `BlipForConditionalGeneration` state dict, strictly.

Every checkpoint key is either mapped, or known to be unused by captioning (BLIP pre-training modules,
the stored `position_ids` buffer); anything else, and any missing or mis-shaped weight, is an error.

Original BLIP (models/vit.py, models/med.py)       transformers BLIP
visual_encoder.cls_token                          vision_model.embeddings.class_embedding
visual_encoder.pos_embed                          vision_model.embeddings.position_embedding
visual_encoder.patch_embed.proj                   vision_model.embeddings.patch_embedding
visual_encoder.blocks.{i}.norm1 / norm2           vision_model.encoder.layers.{i}.layer_norm1 / layer_norm2
visual_encoder.blocks.{i}.attn.qkv (fused q,k,v)  vision_model.encoder.layers.{i}.self_attn.qkv (same order)
visual_encoder.blocks.{i}.attn.proj               vision_model.encoder.layers.{i}.self_attn.projection
visual_encoder.blocks.{i}.mlp.fc1 / fc2           vision_model.encoder.layers.{i}.mlp.fc1 / fc2
visual_encoder.norm                               vision_model.post_layernorm
text_decoder.*                                    text_decoder.* (MED BertLMHeadModel: same names)
text_decoder.bert.embeddings.position_ids         (buffer, dropped; transformers rebuilds it)
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ldm.checkpoint import CheckpointError

_VISION_RENAMES = (
    (r"visual_encoder\.cls_token", "vision_model.embeddings.class_embedding"),
    (r"visual_encoder\.pos_embed", "vision_model.embeddings.position_embedding"),
    (r"visual_encoder\.patch_embed\.proj\.(weight|bias)", r"vision_model.embeddings.patch_embedding.\1"),
    (r"visual_encoder\.blocks\.(\d+)\.norm1\.(weight|bias)", r"vision_model.encoder.layers.\1.layer_norm1.\2"),
    (r"visual_encoder\.blocks\.(\d+)\.norm2\.(weight|bias)", r"vision_model.encoder.layers.\1.layer_norm2.\2"),
    (r"visual_encoder\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"vision_model.encoder.layers.\1.self_attn.qkv.\2"),
    (
        r"visual_encoder\.blocks\.(\d+)\.attn\.proj\.(weight|bias)",
        r"vision_model.encoder.layers.\1.self_attn.projection.\2",
    ),
    (r"visual_encoder\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"vision_model.encoder.layers.\1.mlp.\2.\3"),
    (r"visual_encoder\.norm\.(weight|bias)", r"vision_model.post_layernorm.\1"),
)
_DROPPED_BUFFERS = ("text_decoder.bert.embeddings.position_ids",)
# BLIP_Pretrain (models/blip_pretrain.py) modules that captioning never runs: ITC/ITM heads, the text
# encoder, momentum copies and queues. BLIP's model_base_capfilt_large.pth carries them.
_PRETRAINING_ONLY_PREFIXES = (
    "text_encoder.",
    "text_encoder_m.",
    "visual_encoder_m.",
    "vision_proj.",
    "vision_proj_m.",
    "text_proj.",
    "text_proj_m.",
    "itm_head.",
)
_PRETRAINING_ONLY_KEYS = ("image_queue", "text_queue", "queue_ptr", "temp")
_POSITION_EMBEDDING = "vision_model.embeddings.position_embedding"
# transformers' BlipTextLMHeadModel shares these tensors; BLIP's BertLMHeadModel tied them too.
_TIED_WEIGHTS = (
    ("text_decoder.cls.predictions.decoder.weight", "text_decoder.bert.embeddings.word_embeddings.weight"),
    ("text_decoder.cls.predictions.decoder.bias", "text_decoder.cls.predictions.bias"),
)


def _is_unused_by_captioning(key: str) -> bool:
    return key in _DROPPED_BUFFERS or key in _PRETRAINING_ONLY_KEYS or key.startswith(_PRETRAINING_ONLY_PREFIXES)


def transformers_key(key: str) -> str | None:
    """transformers' name for an original BLIP key; None for keys captioning does not use.

    Raises CheckpointError for a key outside the BLIP layout."""
    if _is_unused_by_captioning(key):
        return None
    for pattern, replacement in _VISION_RENAMES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    if key.startswith("text_decoder."):
        return key
    raise CheckpointError(f"unknown key {key!r}: not part of BLIP's captioning or pre-training model")


def interpolate_position_embedding(position_embedding: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(1, 1 + g*g, C) ViT position embedding -> (1, 1 + num_patches, C), bicubic over the patch grid with
    the class token's embedding kept; BLIP's `interpolate_pos_embed`, which it runs when loading a checkpoint
    trained at another resolution (the 224 px pre-training checkpoints used at 384 px)."""
    class_embedding, grid = position_embedding[:, :1], position_embedding[:, 1:]
    old_side, new_side = math.isqrt(grid.shape[1]), math.isqrt(num_patches)
    if old_side == new_side:
        return position_embedding
    if old_side * old_side != grid.shape[1] or new_side * new_side != num_patches:
        raise CheckpointError(f"position embedding grid {grid.shape[1]} -> {num_patches} is not square to square")
    grid = grid.reshape(1, old_side, old_side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(new_side, new_side), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).flatten(1, 2).to(position_embedding.dtype)
    return torch.cat([class_embedding, grid], dim=1)


def convert_blip_state_dict(
    state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Rename an original BLIP state dict to transformers' layout.

    expected: the target model's state_dict() (names and shapes); source names the file in errors.
    Returns a dict with exactly expected's keys. Raises CheckpointError for unknown or missing keys, a
    mis-shaped tensor, or an LM head that is not tied to the word embeddings as in BLIP.
    """
    converted: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state_dict.items():
        try:
            new_key = transformers_key(key)
        except CheckpointError:
            unknown.append(key)
            continue
        if new_key is None:
            continue
        if new_key not in expected:
            unknown.append(key)
            continue
        converted[new_key] = tensor
    if unknown:
        raise CheckpointError(f"{source}: unknown keys not in BLIP's layout: {unknown[:10]} ({len(unknown)} in all)")
    missing = sorted(set(expected) - set(converted))
    if missing:
        raise CheckpointError(f"{source}: missing keys for transformers' BLIP: {missing[:10]} ({len(missing)} in all)")
    if _POSITION_EMBEDDING in converted:
        num_patches = expected[_POSITION_EMBEDDING].shape[1] - 1
        converted[_POSITION_EMBEDDING] = interpolate_position_embedding(converted[_POSITION_EMBEDDING], num_patches)
    for key, tensor in converted.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}"
            )
    for head_key, tied_key in _TIED_WEIGHTS:
        if not torch.equal(converted[head_key], converted[tied_key]):
            raise CheckpointError(f"{source}: {head_key} differs from {tied_key}; transformers' BLIP ties them")
    return converted
