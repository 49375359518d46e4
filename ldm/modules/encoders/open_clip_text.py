"""The text tower of an open_clip CLIP model, with open_clip's parameter names.

SD 2.x checkpoints store the OpenCLIP ViT-H-14 model with its visual tower deleted, under
`cond_stage_model.model.`: `token_embedding`, `positional_embedding`, `transformer.resblocks.N.*`,
`ln_final`, `text_projection` and `logit_scale`. Building that through open_clip would first build (and
randomly initialise) the 630M-parameter visual tower only to delete it, so the text tower is written here
with the same names and the same computation (pre-norm residual blocks, causal self-attention). It is
checked against open_clip's own modules in tests/test_text_encoders.py.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

# CLIP's temperature starts at 1 / 0.07; the parameter stores its log.
_INITIAL_LOGIT_SCALE = math.log(1 / 0.07)
# Coefficient of the sigmoid GELU approximation that OpenAI CLIP was trained with.
_QUICK_GELU_COEFFICIENT = 1.702


@dataclass(frozen=True)
class OpenCLIPTextConfig:
    """Text-tower fields of an open_clip model config (`model_configs/<arch>.json`: `text_cfg`, plus the
    top-level `embed_dim` and `quick_gelu`)."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 1024
    heads: int = 16
    layers: int = 24
    mlp_ratio: float = 4.0
    embed_dim: int = 1024
    quick_gelu: bool = False
    layer_norm_eps: float = 1e-5


# Only the tower that Stable Diffusion 2.x uses; other sizes go through `text_config` overrides.
OPEN_CLIP_TEXT_CONFIGS = {"ViT-H-14": OpenCLIPTextConfig()}


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the activation of OpenAI-trained CLIP models."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(_QUICK_GELU_COEFFICIENT * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, config: OpenCLIPTextConfig) -> None:
        super().__init__()
        width = config.width
        hidden = int(width * config.mlp_ratio)
        self.ln_1 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        # nn.MultiheadAttention gives the checkpoint's `in_proj_weight` (q, k, v stacked) and `out_proj`.
        self.attn = nn.MultiheadAttention(width, config.heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        activation = QuickGELU() if config.quick_gelu else nn.GELU()
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, hidden), gelu=activation, c_proj=nn.Linear(hidden, width))
        )

    def forward(self, x: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        """x: [B, L, width]; causal_mask: [L, L] of x's dtype, -inf where attention is forbidden, else 0."""
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=causal_mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    """The stack of blocks; exists so that parameter names read `transformer.resblocks.N.*`."""

    def __init__(self, config: OpenCLIPTextConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(config) for _ in range(config.layers))


class OpenCLIPTextModel(nn.Module):
    """open_clip's CLIP without `visual`: token ids -> per-token features.

    `text_projection` and `logit_scale` are kept only so that checkpoints load strictly; the per-token
    features that Stable Diffusion uses do not pass through them.
    """

    def __init__(self, config: OpenCLIPTextConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.width))
        self.transformer = TextTransformer(config)
        self.ln_final = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.text_projection = nn.Parameter(torch.empty(config.width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.full((), _INITIAL_LOGIT_SCALE))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """open_clip's random initialisation (real weights come from a checkpoint)."""
        width, layers = self.config.width, self.config.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        residual_std = width**-0.5 * (2 * layers) ** -0.5  # outputs that add into the residual stream
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width**-0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=residual_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=residual_std)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    def forward(self, tokens: torch.Tensor, skip_last_layers: int = 0) -> torch.Tensor:
        """Per-token features after `ln_final`.

        Args:
            tokens: int64 [B, L] with L <= context_length.
            skip_last_layers: how many of the last blocks to leave out (1 = SD 2.x "penultimate").

        Returns:
            float [B, L, width].
        """
        length = tokens.shape[1]
        if length > self.config.context_length:
            raise ValueError(f"{length} tokens exceed the context length {self.config.context_length}")
        if not 0 <= skip_last_layers < self.config.layers:
            raise ValueError(f"skip_last_layers must be in [0, {self.config.layers}), got {skip_last_layers}")
        x = self.token_embedding(tokens) + self.positional_embedding[:length]
        # An additive -inf mask (not a bool one) takes the same attention kernel as open_clip: bit-equal.
        causal_mask = torch.full((length, length), float("-inf"), dtype=x.dtype, device=x.device).triu(1)
        for block in self.transformer.resblocks[: self.config.layers - skip_last_layers]:
            x = block(x, causal_mask)
        return self.ln_final(x)
