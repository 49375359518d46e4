"""The latent-diffusion UNet (Rombach et al. 2022), with the CompVis checkpoint key layout.

Attribute names (`time_embed`, `input_blocks`, `middle_block`, `output_blocks`, `out`) and the order of
layers inside each block are what every released SD checkpoint expects; keep them.

The encoder half (time embedding, input blocks, middle block) is built by `UNetEncoderMixin`, which the
ControlNet reuses for its trainable copy, so both derive channel counts and head sizes the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import AttentionKind, SpatialTransformer, check_attention_kind
from ldm.modules.diffusionmodules.util import (
    conv_nd,
    maybe_checkpoint,
    normalization,
    timestep_embedding,
    zero_module,
)


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """A sequential block that hands the timestep embedding to `TimestepBlock`s and the text context
    to `SpatialTransformer`s."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = conv_nd(dims, channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Stride-2 3x3 conv (or average pooling when `use_conv` is false)."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None):
        super().__init__()
        if use_conv:
            self.op = conv_nd(dims, channels, out_channels or channels, 3, stride=2, padding=1)
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding (added after the first conv)."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        dims: int = 2,
        use_checkpoint: bool = False,
        use_scale_shift_norm: bool = False,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), conv_nd(dims, channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, out_channels, out_channels, 3, padding=1)),
        )
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = conv_nd(dims, channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W), emb: (B, emb_channels) -> (B, out_channels, H, W)."""
        return maybe_checkpoint(self._forward, x, emb, enabled=self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            norm, rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)
            h = rest(norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class UNetEncoderMixin(nn.Module):
    """Builds the parts the UNet and the ControlNet share: time embedding, input blocks, middle block.

    After `_build_encoder`, `self.input_block_chans` lists the channel count after every input block
    (what the decoder's skip connections and the ControlNet's zero convs need).
    """

    def _check_options(self, num_heads: int, num_head_channels: int, use_spatial_transformer: bool,
                       context_dim: int | Sequence[int] | None, attention: str, extra: dict) -> None:
        unsupported = {k: v for k, v in extra.items() if v not in (None, False, -1, 0)}
        if unsupported:
            raise ValueError(f"unsupported UNet options: {unsupported}")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("either num_heads or num_head_channels has to be set")
        if not use_spatial_transformer or context_dim is None:
            raise ValueError("only the text-conditioned UNet (use_spatial_transformer with context_dim) is "
                             "supported")
        check_attention_kind(attention)

    def _heads(self, ch: int) -> tuple[int, int]:
        """(number of heads, channels per head) of an attention layer over `ch` channels."""
        if self._num_head_channels == -1:
            return self._num_heads, ch // self._num_heads
        return ch // self._num_head_channels, self._num_head_channels

    def _transformer(self, ch: int, disable_self_attn: bool = False) -> SpatialTransformer:
        heads, dim_head = self._heads(ch)
        return SpatialTransformer(
            ch, heads, dim_head, depth=self._transformer_depth, context_dim=self._context_dim,
            disable_self_attn=disable_self_attn, use_linear=self._use_linear,
            use_checkpoint=self._use_checkpoint, attention=self._attention,
        )

    def _resblock(self, ch: int, out_ch: int) -> ResBlock:
        return ResBlock(ch, self._time_embed_dim, self._dropout, out_ch, self._dims, self._use_checkpoint,
                        self._use_scale_shift_norm)

    def _build_encoder(
        self,
        in_channels: int,
        model_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float,
        channel_mult: Sequence[int],
        conv_resample: bool,
        dims: int,
        use_checkpoint: bool,
        num_heads: int,
        num_head_channels: int,
        use_scale_shift_norm: bool,
        transformer_depth: int,
        context_dim: int | Sequence[int] | None,
        use_linear_in_transformer: bool,
        disable_self_attentions: Sequence[bool] | None,
        disable_middle_self_attn: bool,
        attention: AttentionKind,
    ) -> None:
        if isinstance(context_dim, Sequence) and not isinstance(context_dim, str):
            context_dim = list(context_dim)
        self.model_channels = model_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.channel_mult = tuple(channel_mult)
        self._num_heads, self._num_head_channels = num_heads, num_head_channels
        self._transformer_depth, self._context_dim = transformer_depth, context_dim
        self._use_linear, self._use_checkpoint = use_linear_in_transformer, use_checkpoint
        self._attention, self._dropout, self._dims = attention, dropout, dims
        self._use_scale_shift_norm = use_scale_shift_norm
        self._time_embed_dim = model_channels * 4

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, self._time_embed_dim), nn.SiLU(),
            nn.Linear(self._time_embed_dim, self._time_embed_dim),
        )
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))]
        )
        chans = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [self._resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in self.attention_resolutions:
                    disabled = disable_self_attentions[level] if disable_self_attentions else False
                    layers.append(self._transformer(ch, disabled))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, conv_resample, dims, ch)))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            self._resblock(ch, ch), self._transformer(ch, disable_middle_self_attn), self._resblock(ch, ch)
        )
        self.input_block_chans = chans
        self._encoder_out_channels = ch
        self._encoder_downsampling = ds

    def time_embedding(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(B,) timesteps -> (B, 4 * model_channels)."""
        t_emb = timestep_embedding(timesteps, self.model_channels)
        return self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))


# Constructor arguments of the original UNet that this implementation accepts but does not need:
# they either select code paths SD never uses (class labels, codebooks) or are handled by autocast
# (use_fp16). A non-default value is refused rather than ignored.
_IGNORED_UNET_ARGS = ("num_classes", "n_embed", "use_new_attention_order", "resblock_updown",
                      "num_attention_blocks")


class UNetModel(UNetEncoderMixin):
    """Text-conditioned UNet: eps (or v) = UNet(x_t, t, context).

    x: (B, in_channels, H, W) latents, timesteps: (B,), context: (B, 77, context_dim).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: int = 1,
        context_dim: int | Sequence[int] | None = None,
        legacy: bool = True,
        disable_self_attentions: Sequence[bool] | None = None,
        disable_middle_self_attn: bool = False,
        use_linear_in_transformer: bool = False,
        attention: AttentionKind = "sdpa",
        **ignored,
    ):
        super().__init__()
        unknown = set(ignored) - set(_IGNORED_UNET_ARGS)
        if unknown:
            raise TypeError(f"UNetModel got unexpected arguments: {sorted(unknown)}")
        self._check_options(num_heads, num_head_channels, use_spatial_transformer, context_dim, attention,
                            ignored)
        # `legacy` only changed head sizes of the non-spatial AttentionBlock, which SD does not use; with a
        # SpatialTransformer both settings give heads = ch // num_heads (or ch // num_head_channels).
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self._build_encoder(
            in_channels, model_channels, num_res_blocks, attention_resolutions, dropout, channel_mult,
            conv_resample, dims, use_checkpoint, num_heads, num_head_channels, use_scale_shift_norm,
            transformer_depth, context_dim, use_linear_in_transformer, disable_self_attentions,
            disable_middle_self_attn, attention,
        )
        skip_chans = list(self.input_block_chans)
        ch, ds = self._encoder_out_channels, self._encoder_downsampling
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers: list[nn.Module] = [self._resblock(ch + skip_chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in self.attention_resolutions:
                    disabled = disable_self_attentions[level] if disable_self_attentions else False
                    layers.append(self._transformer(ch, disabled))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch, conv_resample, dims, ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1))
        )

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                **kwargs) -> torch.Tensor:
        emb = self.time_embedding(timesteps)
        h = x
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        return self.decode(h, skips, emb, context)

    def decode(self, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor,
               context: torch.Tensor | None) -> torch.Tensor:
        """The decoder half: output blocks over the skip connections (consumed from the end), then `out`."""
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)
