"""ControlNet (Zhang et al. 2023): a trainable copy of the SD UNet encoder steers a locked SD.

- `ControlNet`: the copy (time embedding, input blocks, middle block) plus the hint block that turns the
  control image into a feature map, and one zero-initialised 1x1 conv per encoder output.
- `ControlledUnetModel`: the locked SD UNet; the control residuals are added to its middle output and to
  its skip connections.
- `ControlLDM`: latent diffusion with both; it overrides only how the denoiser is applied.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ldm.models.diffusion.ddpm import Conditioning, LatentDiffusion
from ldm.modules.diffusionmodules.openaimodel import TimestepEmbedSequential, UNetEncoderMixin, UNetModel
from ldm.modules.diffusionmodules.util import conv_nd, zero_module
from ldm.util import instantiate_from_config

# The hint block of the paper: a small conv net mapping the control image (full resolution) to the
# latent resolution (/8, three stride-2 convs). (out_channels, stride) of each conv; SiLU in between.
HINT_BLOCK_LAYOUT: tuple[tuple[int, int], ...] = (
    (16, 1), (16, 1), (32, 2), (32, 1), (96, 2), (96, 1), (256, 2),
)


class ControlledUnetModel(UNetModel):
    """The locked SD UNet, with control residuals added to the middle output and to each skip.

    control: the ControlNet's outputs (one per input block, then the middle one), already scaled.
    With only_mid_control, only the middle residual is used.
    """

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                control: Sequence[torch.Tensor] | None = None, only_mid_control: bool = False,
                **kwargs) -> torch.Tensor:
        # The encoder is locked and its activations are not needed for any gradient (the control enters
        # after it), so it runs without autograd state.
        with torch.no_grad():
            h, skips, emb = self.encode(x, timesteps, context)
        if control is None:
            return self.decode(h, skips, emb, context)
        control = list(control)
        # The encoder's outputs hold no autograd state and nothing else reads them, so the residuals are
        # added in place: no second copy of every skip connection.
        h = _add_residual(h, control.pop())
        if not only_mid_control:
            skips = [_add_residual(skip, residual) for skip, residual in zip(skips, control, strict=True)]
        return self.decode(h, skips, emb, context)


def _add_residual(features: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """features + residual, in place when that gives the same dtype as the out-of-place sum."""
    if torch.result_type(features, residual) == features.dtype:
        return features.add_(residual)
    return features + residual


class ControlNet(UNetEncoderMixin):
    """Trainable copy of the UNet encoder, conditioned on a hint image.

    forward(x (B, C, h, w) latents, hint (B, hint_channels, 8h, 8w) in [0, 1], timesteps (B,),
    context (B, 77, context_dim)) -> list of residuals: one (B, C_i, h_i, w_i) per input block of the
    UNet, then one for the middle block.
    """

    def __init__(self, *, hint_channels: int, **encoder_args):
        """hint_channels: channels of the control image; the rest: the encoder arguments of
        `UNetEncoderMixin` (the same keys as the UNet's, without out_channels)."""
        super().__init__(**encoder_args)
        dims, model_channels = self._dims, self.model_channels
        layers: list[nn.Module] = []
        channels = hint_channels
        for out_channels, stride in HINT_BLOCK_LAYOUT:
            layers += [conv_nd(dims, channels, out_channels, 3, padding=1, stride=stride), nn.SiLU()]
            channels = out_channels
        layers.append(zero_module(conv_nd(dims, channels, model_channels, 3, padding=1)))
        self.input_hint_block = TimestepEmbedSequential(*layers)
        self.zero_convs = nn.ModuleList(self._zero_conv(ch) for ch in self.input_block_chans)
        self.middle_block_out = self._zero_conv(self._encoder_out_channels)

    def _zero_conv(self, channels: int) -> TimestepEmbedSequential:
        return TimestepEmbedSequential(zero_module(conv_nd(self._dims, channels, channels, 1, padding=0)))

    @property
    def num_controls(self) -> int:
        """How many residuals forward returns (13 for SD)."""
        return len(self.zero_convs) + 1

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor,
                context: torch.Tensor | None = None, **kwargs) -> list[torch.Tensor]:
        emb = self.time_embedding(timesteps)
        guided_hint = self.input_hint_block(hint, emb, context)
        outs = []
        h = x
        for i, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs, strict=True)):
            h = block(h, emb, context)
            if i == 0:  # the hint enters once, after the first conv
                h = h + guided_hint
            outs.append(zero_conv(h, emb, context))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h, emb, context))
        return outs


class ControlLDM(LatentDiffusion):
    """Latent diffusion whose denoiser is the locked UNet steered by a ControlNet.

    cond for `apply_model`: {"c_crossattn": [context (B, 77, D)], "c_concat": [hint (B, 3, H, W) in [0, 1]]
    or None}. Control strength is an argument of `apply_model` (diffusers' `conditioning_scale`); the
    `control_scales` attribute is only its default, kept for the original's scripts (all ones: training).
    `only_mid_control` adds only the middle residual. `global_average_pooling` (ControlNet 1.1's, for its
    shuffle model) adds each residual's mean over height and width instead of the residual itself, and the
    control then belongs on the conditional half of classifier-free guidance only (cldm.sampling does so).
    """

    def __init__(self, control_stage_config: Mapping, control_key: str = "hint", only_mid_control: bool = False,
                 global_average_pooling: bool = False, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.control_model: ControlNet = instantiate_from_config(control_stage_config)
        self.control_key = control_key
        self.only_mid_control = only_mid_control
        self.global_average_pooling = global_average_pooling
        self.control_scales: list[float] = [1.0] * self.control_model.num_controls

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                    control_scales: float | Sequence[float] | None = None) -> torch.Tensor:
        """The locked UNet's output (eps or v, (B, C, h, w)) with the ControlNet's residuals added.

        control_scales: one strength for every residual, or one per residual (the ControlNet's outputs in
        order, the middle block last; e.g. guess mode's decay); None: the `control_scales` attribute.
        """
        context = _concat(cond["c_crossattn"])
        unet = self.model.diffusion_model
        hints = cond.get("c_concat")
        if hints is None:
            return unet(x_noisy, timesteps=t, context=context, control=None,
                        only_mid_control=self.only_mid_control)
        control = self.control_model(x=x_noisy, hint=_concat(hints), timesteps=t, context=context)
        if self.global_average_pooling:
            control = [c.mean(dim=(2, 3), keepdim=True) for c in control]
        scales = _per_residual(self.control_scales if control_scales is None else control_scales, len(control))
        # A scale of 1 (training) costs no copy.
        control = [c if scale == 1.0 else c * scale for c, scale in zip(control, scales, strict=True)]
        return unet(x_noisy, timesteps=t, context=context, control=control, only_mid_control=self.only_mid_control)


def _per_residual(scales: float | Sequence[float], num_controls: int) -> list[float]:
    """One scale per residual. Like the original, extra entries are ignored: a list written for SD's 13
    controls also works on a smaller ControlNet (only its first entries are used)."""
    if isinstance(scales, (int, float)):
        return [float(scales)] * num_controls
    scales = list(scales)
    if len(scales) < num_controls:
        raise ValueError(f"control_scales has {len(scales)} entries, the ControlNet gives {num_controls} residuals")
    return scales[:num_controls]


def _concat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The conditioning list joined along channels (no copy for the usual single entry)."""
    tensors = list(tensors)
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=1)
