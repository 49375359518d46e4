"""Cross-attention and the SpatialTransformer of the latent-diffusion UNet.

The attention kernel is chosen per module by a constructor argument, never by global patching:

- ``"sdpa"``   torch's ``scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU);
- ``"sliced"`` the original's "save_memory" path: one (batch x head) slice at a time, so the attention
               matrix of only ``slice_size`` heads lives in memory at once;
- ``"math"``   the plain softmax(Q K^T / sqrt(d)) V of the paper, one einsum for all heads.

All three compute the same function; they differ in speed and peak memory.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.util import maybe_checkpoint

AttentionKind = Literal["sdpa", "sliced", "math"]
ATTENTION_KINDS: tuple[str, ...] = ("sdpa", "sliced", "math")


def check_attention_kind(kind: str) -> str:
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {kind!r}")
    return kind


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: AttentionKind = "sdpa", slice_size: int = 1
) -> torch.Tensor:
    """Multi-head attention on split heads.

    q: (B, heads, N, d), k and v: (B, heads, M, d) -> (B, heads, N, d).
    """
    if kind == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    scale = q.shape[-1] ** -0.5
    if kind == "math":
        weights = torch.einsum("bhnd,bhmd->bhnm", q, k).mul(scale).softmax(dim=-1)
        return torch.einsum("bhnm,bhmd->bhnd", weights, v)
    # sliced: fold batch and heads, then walk the (B * heads) axis in chunks of `slice_size`.
    b, h, n, d = q.shape
    qf, kf, vf = (t.reshape(b * h, t.shape[2], d) for t in (q, k, v))
    out = torch.empty_like(qf)
    for start in range(0, b * h, slice_size):
        stop = start + slice_size
        weights = torch.bmm(qf[start:stop], kf[start:stop].transpose(1, 2)).mul(scale).softmax(dim=-1)
        out[start:stop] = torch.bmm(weights, vf[start:stop])
    return out.reshape(b, h, n, d)


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """torch.channels_last for an NHWC-strided (B, C, H, W) tensor, else torch.contiguous_format."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class CrossAttention(nn.Module):
    """Multi-head attention of `query_dim` tokens over `context_dim` tokens (self-attention when the
    context is None)."""

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        attention: AttentionKind = "sdpa",
    ):
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.attention = check_attention_kind(attention)
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, query_dim), context: (B, M, context_dim) -> (B, N, query_dim)."""
        context = x if context is None else context
        b = x.shape[0]
        q, k, v = (
            proj(src).view(b, src.shape[1], self.heads, -1).transpose(1, 2)  # (B, heads, tokens, d)
            for proj, src in ((self.to_q, x), (self.to_k, context), (self.to_v, context))
        )
        out = attention(q, k, v, self.attention)
        out = out.transpose(1, 2).reshape(b, x.shape[1], -1)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020): half of the projection gates the other half."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, glu: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        project_in = GEGLU(dim, inner) if glu else nn.Sequential(nn.Linear(dim, inner), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner, dim_out or dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text context, gated feed-forward; pre-norm residuals."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        disable_self_attn: bool = False,
        use_checkpoint: bool = False,
        attention: AttentionKind = "sdpa",
    ):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.use_checkpoint = use_checkpoint
        self.attn1 = CrossAttention(dim, context_dim if disable_self_attn else None, n_heads, d_head, dropout,
                                    attention)
        self.ff = FeedForward(dim, dropout=dropout, glu=True)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout, attention)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return maybe_checkpoint(self._forward, x, context, enabled=self.use_checkpoint)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = self.attn1(self.norm1(x), context if self.disable_self_attn else None) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map: norm, project in, `depth` transformer blocks,
    project out (zero-initialised), residual."""

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | list[int] | None = None,
        disable_self_attn: bool = False,
        use_linear: bool = False,
        use_checkpoint: bool = False,
        attention: AttentionKind = "sdpa",
    ):
        super().__init__()
        if not isinstance(context_dim, list | tuple):
            context_dim = [context_dim] * depth
        inner_dim = n_heads * d_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6, affine=True)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout, context_dim[d], disable_self_attn,
                                  use_checkpoint, attention)
            for d in range(depth)
        )
        if use_linear:
            self.proj_out = nn.Linear(inner_dim, in_channels)
        else:
            self.proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1)
        for p in self.proj_out.parameters():
            nn.init.zeros_(p)

    def forward(self, x: torch.Tensor, context: torch.Tensor | list[torch.Tensor] | None = None) -> torch.Tensor:
        """x: (B, C, H, W), context: (B, M, context_dim) -> (B, C, H, W)."""
        contexts = context if isinstance(context, list) else [context] * len(self.transformer_blocks)
        b, c, h, w = x.shape
        layout = memory_format(x)
        residual = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # (B, H*W, inner)
        if self.use_linear:
            x = self.proj_in(x)
        for block, ctx in zip(self.transformer_blocks, contexts, strict=True):
            x = block(x, ctx)
        if self.use_linear:
            x = self.proj_out(x)
        # (B, H*W, C) -> (B, C, H, W) is a channels-last view; give it the input's layout, or every conv
        # after this block would see mixed layouts and reorder its weights on each call.
        x = x.transpose(1, 2).reshape(b, -1, h, w).contiguous(memory_format=layout)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + residual
