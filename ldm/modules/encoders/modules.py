"""Frozen text encoders that turn prompts into the UNet's cross-attention context.

The class paths and constructor arguments are those of the original `ldm.modules.encoders.modules`, so
the original YAML configs (`cond_stage_config.target`) build them. Unlike the original, nothing is
downloaded: the networks are built from configs written in code and start from random weights, which
the Stable Diffusion checkpoint then overwrites (its `cond_stage_model.*` entries). Construction is
cheap and works under `with torch.device("meta")`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from typing import Any

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.modules.encoders.open_clip_text import OPEN_CLIP_TEXT_CONFIGS, OpenCLIPTextModel
from ldm.modules.encoders.tokenizer import CONTEXT_LENGTH, CLIPTokenizer

# The text half of openai/clip-vit-large-patch14 (its config.json), the SD 1.x text encoder.
CLIP_VIT_L_14_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": CONTEXT_LENGTH,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
    "attention_dropout": 0.0,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}

# Saved by transformers < 4.31 as a persistent buffer (arange(77)), so SD 1.x checkpoints hold it.
_LEGACY_POSITION_IDS_KEY = "transformer.text_model.embeddings.position_ids"


class CLIPTextModelHolder(nn.Module):
    """Holds a transformers CLIP text transformer as the child `text_model`.

    SD 1.x checkpoints name the weights `transformer.text_model.*` because transformers 4.x nested the
    network in `CLIPTextModel.text_model`. transformers 5 flattened CLIPTextModel, so its own names lack
    `text_model.`; holding the network under that name keeps the checkpoint names in every version.
    """

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        model = CLIPTextModel(config)
        self.text_model = getattr(model, "text_model", model)  # transformers < 5 still nests it

    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = False) -> Any:
        """input_ids: int64 [B, L] -> transformers `BaseModelOutputWithPooling`."""
        return self.text_model(input_ids=input_ids, output_hidden_states=output_hidden_states)


class FrozenTextEmbedder(nn.Module):
    """What both text encoders share: frozen weights, an offline tokenizer, and `encode` = `forward`.

    A subclass sets `self.tokenizer` (a `CLIPTokenizer`) and implements `embed(tokens)`:
    int64 [B, max_length] on the parameters' device -> context float [B, L, width].
    """

    tokenizer: CLIPTokenizer
    LAYERS: tuple[str, ...]

    def _check_layer(self, layer: str) -> None:
        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got {layer!r}")

    def _set_options(self, version: str, max_length: int, positions: int, layer: str) -> None:
        """Keep the options both encoders have; max_length must fit the model's `positions`."""
        if max_length > positions:
            raise ValueError(f"max_length {max_length} exceeds the model's {positions} positions")
        self.version = version
        self.max_length = max_length
        self.layer = layer

    def freeze(self) -> None:
        """Eval mode and no gradients for every parameter."""
        self.eval()
        for parameter in self.parameters():
            parameter.requires_grad = False

    def tokenize(self, text: str | Sequence[str]) -> torch.Tensor:
        """Prompts -> int64 [B, max_length] on CPU, padded with the tokenizer's pad id."""
        return self.tokenizer([text] if isinstance(text, str) else list(text))

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def forward(self, text: str | Sequence[str]) -> torch.Tensor:
        """Prompts -> context float [B, max_length, width] (see the subclass's `embed`)."""
        return self.embed(self.tokenize(text).to(next(self.parameters()).device))

    def encode(self, text: str | Sequence[str]) -> torch.Tensor:
        """Same as `forward` (the name LatentDiffusion calls)."""
        return self(text)


class FrozenCLIPEmbedder(FrozenTextEmbedder):
    """SD 1.x text encoder: OpenAI CLIP ViT-L/14 text transformer (transformers `CLIPTextModel`).

    Args:
        version: accepted for config compatibility; the weights come from the SD checkpoint.
        device: accepted for config compatibility; nothing moves at construction and tokens go to the
            device of the parameters.
        max_length: tokens per prompt (<= the model's 77 positions).
        freeze: call `freeze()` (eval mode, no gradients).
        layer: "last" = `last_hidden_state` (after the final layer norm), "pooled" = the end-of-text
            token's final state as [B, 1, hidden], "hidden" = `hidden_states[layer_idx]` (index 0 is the
            embedding output, -1 the last block before the final layer norm).
        layer_idx: index for layer="hidden".
        text_config: `CLIPTextConfig` fields overriding the ViT-L/14 values (tiny test models).
        attn_implementation: transformers attention backend. "eager" is the plain softmax(QK^T)V that
            the original (transformers 4.19) computed; "sdpa" differs by ~1e-6 and is faster on GPU.
    """

    LAYERS = ("last", "pooled", "hidden")

    def __init__(
        self,
        version: str = "openai/clip-vit-large-patch14",
        device: str | torch.device = "cuda",
        max_length: int = CONTEXT_LENGTH,
        freeze: bool = True,
        layer: str = "last",
        layer_idx: int | None = None,
        text_config: Mapping[str, Any] | None = None,
        attn_implementation: str = "eager",
    ) -> None:
        super().__init__()
        self._check_layer(layer)
        config = CLIPTextConfig(
            **{**CLIP_VIT_L_14_TEXT_CONFIG, **dict(text_config or {})}, attn_implementation=attn_implementation
        )
        if layer == "hidden" and (layer_idx is None or abs(layer_idx) > config.num_hidden_layers):
            raise ValueError(
                f"layer='hidden' needs layer_idx in [-{config.num_hidden_layers}, "
                f"{config.num_hidden_layers}], got {layer_idx}"
            )
        self._set_options(version, max_length, config.max_position_embeddings, layer)
        self.layer_idx = layer_idx
        self.tokenizer = CLIPTokenizer(max_length=max_length)
        self.transformer = CLIPTextModelHolder(config)
        if _LEGACY_POSITION_IDS_KEY not in self.state_dict():
            self.register_load_state_dict_pre_hook(self._drop_legacy_position_ids)
        if freeze:
            self.freeze()

    @staticmethod
    def _drop_legacy_position_ids(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        # The positions are rebuilt in code; some merged checkpoints even hold corrupted float copies.
        state_dict.pop(prefix + _LEGACY_POSITION_IDS_KEY, None)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids int64 [B, max_length] (padded with `<|endoftext|>`, 49407) -> context float
        [B, max_length, hidden] ([B, 1, hidden] for layer="pooled").

        Only the token ids go in (no padding mask), as in the original: padding tokens attend causally.
        """
        outputs = self.transformer(tokens, output_hidden_states=self.layer == "hidden")
        if self.layer == "last":
            return outputs.last_hidden_state
        if self.layer == "pooled":
            return outputs.pooler_output[:, None, :]
        return outputs.hidden_states[self.layer_idx]


class FrozenOpenCLIPEmbedder(FrozenTextEmbedder):
    """SD 2.x text encoder: the OpenCLIP ViT-H-14 text tower, stored under `model.` as in open_clip.

    Args:
        arch: open_clip architecture name; its text-tower sizes come from `OPEN_CLIP_TEXT_CONFIGS`.
        version: accepted for config compatibility (the open_clip pretrained tag); the weights come from
            the SD checkpoint.
        device: accepted for config compatibility; tokens go to the device of the parameters.
        max_length: tokens per prompt (<= context length 77).
        freeze: call `freeze()` (eval mode, no gradients).
        layer: "last" = all blocks then `ln_final`; "penultimate" = the last block skipped, then
            `ln_final` (what cldm_v21.yaml uses).
        text_config: `OpenCLIPTextConfig` fields overriding the arch's values (tiny test models).
    """

    LAYERS = ("last", "penultimate")

    def __init__(
        self,
        arch: str = "ViT-H-14",
        version: str = "laion2b_s32b_b79k",
        device: str | torch.device = "cuda",
        max_length: int = CONTEXT_LENGTH,
        freeze: bool = True,
        layer: str = "last",
        text_config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self._check_layer(layer)
        if arch not in OPEN_CLIP_TEXT_CONFIGS:
            raise ValueError(f"unknown open_clip arch {arch!r}; known: {sorted(OPEN_CLIP_TEXT_CONFIGS)}")
        overrides = dict(text_config or {})
        known = {f.name for f in fields(OPEN_CLIP_TEXT_CONFIGS[arch])}
        if unknown := sorted(set(overrides) - known):
            raise ValueError(f"text_config has unknown fields {unknown}; known: {sorted(known)}")
        config = replace(OPEN_CLIP_TEXT_CONFIGS[arch], **overrides)
        self._set_options(version, max_length, config.context_length, layer)
        self.arch = arch
        # How many final blocks the original's encode_with_transformer leaves out.
        self.layer_idx = self.LAYERS.index(layer)
        # open_clip.tokenize: HTML unescaped after ftfy, padded with 0.
        self.tokenizer = CLIPTokenizer(max_length=max_length, pad_token_id=0, unescape_html=True)
        self.model = OpenCLIPTextModel(config)
        if freeze:
            self.freeze()

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids int64 [B, max_length] (padded with 0, as open_clip.tokenize) -> context float
        [B, max_length, width]."""
        return self.model(tokens, skip_last_layers=self.layer_idx)
