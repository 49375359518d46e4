"""Encoder and Decoder of the KL autoencoder (the Stable Diffusion VAE, "kl-f8").

A convolutional ResNet that halves the resolution once per `ch_mult` level after the first
(Esser et al. 2021, Rombach et al. 2022), with one single-head self-attention block in the middle.
Attribute names (`down.N.block.M`, `mid.attn_1`, `up.N.upsample`, ...) follow CompVis
latent-diffusion, so released checkpoints load without renaming.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import AttentionKind, attention, check_attention_kind

# ddconfig `attn_type` values whose weights are an AttnBlock ("vanilla-xformers" only picked a kernel).
VANILLA_ATTN_TYPES: tuple[str, ...] = ("vanilla", "vanilla-xformers")
NORM_GROUPS = 32
NORM_EPS = 1e-6


def Normalize(channels: int) -> nn.GroupNorm:  # noqa: N802 -- the original's name for this layer
    """The autoencoder's GroupNorm: 32 groups, eps 1e-6, affine."""
    return nn.GroupNorm(NORM_GROUPS, channels, eps=NORM_EPS, affine=True)


class ResnetBlock(nn.Module):
    """norm-SiLU-conv twice plus a skip; a 1x1 `nin_shortcut` when the channel count changes.

    (B, in_channels, H, W) -> (B, out_channels, H, W). The VAE has no timestep embedding.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        else:
            self.nin_shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class Downsample(nn.Module):
    """Halve H and W: a stride-2 3x3 conv, or 2x2 average pooling when `with_conv` is False."""

    def __init__(self, channels: int, with_conv: bool = True):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            # No built-in padding: the original pads right and bottom only (see forward).
            self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.with_conv:
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        # Asymmetric (left, right, top, bottom) zero padding, as trained; symmetric padding would shift
        # every output pixel by half a pixel and break released weights.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour interpolation, then a 3x3 conv when `with_conv`."""

    def __init__(self, channels: int, with_conv: bool = True):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W pixels of a feature map, with a residual.

    (B, C, H, W) -> (B, C, H, W). q, k, v and proj_out are 1x1 convs. `attention` picks the kernel of
    `ldm.modules.attention.attention` ("sdpa", "sliced" or "math"); all compute the same function.
    """

    def __init__(self, channels: int, attention: AttentionKind = "sdpa"):
        super().__init__()
        self.attention = check_attention_kind(attention)
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        normed = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C): one head whose tokens are the pixels.
        q, k, v = (proj(normed).reshape(b, 1, c, h * w).transpose(2, 3) for proj in (self.q, self.k, self.v))
        out = attention(q, k, v, self.attention).transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


def make_attn(channels: int, attn_type: str, attention: AttentionKind) -> nn.Module:
    """The attention layer a ddconfig `attn_type` asks for ("none" gives an identity)."""
    if attn_type in VANILLA_ATTN_TYPES:
        return AttnBlock(channels, attention)
    if attn_type == "none":
        return nn.Identity()
    raise NotImplementedError(
        f"ddconfig attn_type {attn_type!r} is not supported; use one of {VANILLA_ATTN_TYPES + ('none',)}"
    )


class MiddleBlock(nn.Module):
    """The bottleneck at the lowest resolution: ResnetBlock -> attention -> ResnetBlock, C channels."""

    def __init__(self, channels: int, dropout: float, attn_type: str, attention: AttentionKind):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = make_attn(channels, attn_type, attention)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


@dataclass(frozen=True, kw_only=True)
class DDConfig:
    """The original's `ddconfig` fields, the one definition of the Encoder's and the Decoder's keyword
    arguments (an unknown key is a TypeError naming it). One ddconfig builds both halves: `double_z` and
    `in_channels` are encoder-only, `give_pre_end`, `tanh_out` and `out_ch` decoder-only."""

    ch: int
    out_ch: int
    ch_mult: Sequence[int] = (1, 2, 4, 8)
    num_res_blocks: int
    attn_resolutions: Sequence[int]
    dropout: float = 0.0
    resamp_with_conv: bool = True
    in_channels: int
    resolution: int
    z_channels: int
    double_z: bool = True
    give_pre_end: bool = False
    tanh_out: bool = False
    use_linear_attn: bool = False
    attn_type: str = "vanilla"

    def __post_init__(self) -> None:
        if self.use_linear_attn:
            raise NotImplementedError("ddconfig use_linear_attn=True (LinAttnBlock) is not supported")


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) in [-1, 1] -> latent moments (B, 2*z_channels or z_channels, h, w)
    with h = H / 2**(len(ch_mult) - 1).

    Keyword arguments: the `DDConfig` fields and the attention kernel.
    """

    def __init__(self, *, attention: AttentionKind = "sdpa", **ddconfig):
        super().__init__()
        config = DDConfig(**ddconfig)
        ch, ch_mult, num_res_blocks, dropout = config.ch, config.ch_mult, config.num_res_blocks, config.dropout
        in_channels, current_res, attn_type = config.in_channels, config.resolution, config.attn_type
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.in_channels = in_channels
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, padding=1)

        in_ch_mult = (1, *ch_mult)
        self.down = nn.ModuleList()
        for level, mult in enumerate(ch_mult):
            block_in, block_out = ch * in_ch_mult[level], ch * mult
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if current_res in config.attn_resolutions:
                    stage.attn.append(make_attn(block_in, attn_type, attention))
            if level != self.num_resolutions - 1:
                stage.downsample = Downsample(block_in, config.resamp_with_conv)
                current_res //= 2
            self.down.append(stage)

        self.mid = MiddleBlock(block_in, dropout, attn_type, attention)

        self.norm_out = Normalize(block_in)
        # mean and logvar when double_z
        moment_channels = 2 * config.z_channels if config.double_z else config.z_channels
        self.conv_out = nn.Conv2d(block_in, moment_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, stage in enumerate(self.down):
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[i](h)
            if level != self.num_resolutions - 1:
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h * 2**(len(ch_mult) - 1), ...), nominally in
    [-1, 1] (unbounded unless `tanh_out`).

    `up[i]` is the stage at the resolution of encoder stage `down[i]`; it runs in reverse order
    (`up[len(ch_mult) - 1]` first) and holds `num_res_blocks + 1` ResnetBlocks. With `give_pre_end`
    the features before the output norm/conv are returned. Keyword arguments: the `DDConfig` fields
    and the attention kernel.
    """

    def __init__(self, *, attention: AttentionKind = "sdpa", **ddconfig):
        super().__init__()
        config = DDConfig(**ddconfig)
        ch, ch_mult, num_res_blocks, dropout = config.ch, config.ch_mult, config.num_res_blocks, config.dropout
        attn_type = config.attn_type
        self.num_resolutions = len(ch_mult)
        self.give_pre_end = config.give_pre_end
        self.tanh_out = config.tanh_out

        block_in = ch * ch_mult[-1]
        current_res = config.resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(config.z_channels, block_in, kernel_size=3, padding=1)

        self.mid = MiddleBlock(block_in, dropout, attn_type, attention)

        stages: list[nn.Module] = []
        for level in reversed(range(self.num_resolutions)):
            block_out = ch * ch_mult[level]
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if current_res in config.attn_resolutions:
                    stage.attn.append(make_attn(block_in, attn_type, attention))
            if level != 0:
                stage.upsample = Upsample(block_in, config.resamp_with_conv)
                current_res *= 2
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, config.out_ch, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid(h)
        for level in reversed(range(self.num_resolutions)):
            stage = self.up[level]
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[i](h)
            if level != 0:
                h = stage.upsample(h)
        if self.give_pre_end:
            return h
        h = self.conv_out(F.silu(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h
