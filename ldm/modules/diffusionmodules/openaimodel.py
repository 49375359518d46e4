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
    """The part the UNet and the ControlNet share: time embedding, input blocks, middle block.

    Its constructor is the one definition of the encoder arguments of the original's UNetModel and
    ControlNet (the keys of cldm_v15.yaml / cldm_v21.yaml); `UNetModel` adds `out_channels` and
    `num_classes`, `ControlNet` adds `hint_channels`, and both hand the rest here by keyword, so an
    unknown key is a TypeError naming it. After construction, `self.input_block_chans` lists the channel
    count after every input block (what the decoder's skip connections and the ControlNet's zero convs
    need).

    Arguments the original accepts but SD never sets (`resblock_updown`, `use_new_attention_order`,
    `n_embed`, `num_attention_blocks`) select code paths this implementation does not have: a value other
    than the default is refused rather than ignored. `image_size`, `use_fp16` (autocast handles
    precision), `num_heads_upsample` and `legacy` are accepted and unused: `legacy` only changed head sizes
    of the non-spatial AttentionBlock, and with a SpatialTransformer both settings give
    heads = ch // num_heads (or ch // num_head_channels).
    """

    def __init__(
        self,
        *,
        image_size: int,
        in_channels: int,
        model_channels: int,
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
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: int = 1,
        context_dim: int | Sequence[int] | None = None,
        n_embed: int | None = None,
        legacy: bool = True,
        disable_self_attentions: Sequence[bool] | None = None,
        num_attention_blocks: Sequence[int] | None = None,
        disable_middle_self_attn: bool = False,
        use_linear_in_transformer: bool = False,
        attention: AttentionKind = "sdpa",
    ):
        super().__init__()
        _refuse_unsupported(resblock_updown=resblock_updown, use_new_attention_order=use_new_attention_order,
                            n_embed=n_embed, num_attention_blocks=num_attention_blocks)
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("either num_heads or num_head_channels has to be set")
        if not use_spatial_transformer or context_dim is None:
            raise ValueError("only the text-conditioned UNet (use_spatial_transformer with context_dim) is "
                             "supported")
        check_attention_kind(attention)
        if isinstance(context_dim, Sequence) and not isinstance(context_dim, str):
            context_dim = list(context_dim)
        self.image_size, self.in_channels = image_size, in_channels
        self.model_channels = model_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.channel_mult = tuple(channel_mult)
        self._disable_self_attentions = disable_self_attentions
        self._conv_resample = conv_resample
        self._num_heads, self._num_head_channels = num_heads, num_head_channels
        self._transformer_depth, self._context_dim = transformer_depth, context_dim
        self._use_linear, self._use_checkpoint = use_linear_in_transformer, use_checkpoint
        self._attention, self._dropout, self._dims = attention, dropout, dims
        self._use_scale_shift_norm = use_scale_shift_norm
        self._time_embed_dim = model_channels * 4
        self._build_encoder(disable_middle_self_attn)

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

    def _level_transformer(self, ch: int, level: int) -> SpatialTransformer:
        """The transformer of a block at `channel_mult` level `level`."""
        disabled = self._disable_self_attentions[level] if self._disable_self_attentions else False
        return self._transformer(ch, disabled)

    def _resblock(self, ch: int, out_ch: int) -> ResBlock:
        return ResBlock(ch, self._time_embed_dim, self._dropout, out_ch, self._dims, self._use_checkpoint,
                        self._use_scale_shift_norm)

    def _build_encoder(self, disable_middle_self_attn: bool) -> None:
        model_channels, dims = self.model_channels, self._dims
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, self._time_embed_dim), nn.SiLU(),
            nn.Linear(self._time_embed_dim, self._time_embed_dim),
        )
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, self.in_channels, model_channels, 3, padding=1))]
        )
        chans = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                layers: list[nn.Module] = [self._resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in self.attention_resolutions:
                    layers.append(self._level_transformer(ch, level))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(self.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, self._conv_resample, dims, ch)))
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


def _refuse_unsupported(**options: object) -> None:
    """ValueError naming every option of the original that is set to something other than its default
    (None or False): these select code paths SD never uses."""
    unsupported = {name: value for name, value in options.items() if value not in (None, False)}
    if unsupported:
        raise ValueError(f"unsupported UNet options: {unsupported}")


class UNetModel(UNetEncoderMixin):
    """Text-conditioned UNet: eps (or v) = UNet(x_t, t, context).

    x: (B, in_channels, H, W) latents, timesteps: (B,), context: (B, 77, context_dim).
    Keyword arguments: `out_channels`, the original's `num_classes` (class-conditioning, refused unless
    None) and the encoder arguments of `UNetEncoderMixin`.
    """

    def __init__(self, *, out_channels: int, num_classes: int | None = None, **encoder_args):
        _refuse_unsupported(num_classes=num_classes)
        super().__init__(**encoder_args)
        self.out_channels = out_channels
        model_channels, dims = self.model_channels, self._dims
        skip_chans = list(self.input_block_chans)
        ch, ds = self._encoder_out_channels, self._encoder_downsampling
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(self.num_res_blocks + 1):
                layers: list[nn.Module] = [self._resblock(ch + skip_chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in self.attention_resolutions:
                    layers.append(self._level_transformer(ch, level))
                if level and i == self.num_res_blocks:
                    layers.append(Upsample(ch, self._conv_resample, dims, ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1))
        )

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                **kwargs) -> torch.Tensor:
        h, skips, emb = self.encode(x, timesteps, context)
        return self.decode(h, skips, emb, context)

    def encode(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None
               ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """The encoder half: x (B, in_channels, H, W), timesteps (B,), context (B, 77, context_dim) ->
        (middle-block output (B, C, H / 2^k, W / 2^k), the input blocks' outputs in order (the skip
        connections), time embedding (B, 4 * model_channels))."""
        emb = self.time_embedding(timesteps)
        h = x
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        return self.middle_block(h, emb, context), skips, emb

    def decode(self, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor,
               context: torch.Tensor | None) -> torch.Tensor:
        """The decoder half: output blocks over the skip connections (consumed from the end), then `out`."""
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)
