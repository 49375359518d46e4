"""ControlNet++'s cycle-consistency reward, one per control type: run a differentiable condition extractor on the
generated image and compare what it finds with the condition the ControlNet was given.

ControlNet++ (Li et al. 2024, liming-ai/ControlNet_Plus_Plus, train/reward_control.py) decodes the one-step x0
prediction to an image and scores it with a frozen reward model: Kornia's Canny magnitude against the photo's
(canny), DPT depth against the depth label (depth), a segmentation model's cross entropy against the label map
(seg), HED against the soft-edge label (hed). This module builds that loss for the types of annotator.controls
whose `consistency` is differentiable (`CONSISTENCY_TYPES`):

    loss = build_consistency_loss(get_control("depth"), settings, None, "cuda")
    per_sample = loss(images, hints, references)      # (B,) float32, differentiable w.r.t. images

images: (B, 3, H, W) in [0, 1], the decoded prediction (requires grad); hints: (B, 3, H, W), the control images as
the ControlNet saw them (annotator.controls.hint_values: [0, 1], inpaint -1 where masked); references: (B, 3, H, W)
in [0, 1], the photo as the VAE reproduces it (no grad), used where the label comes from the photo (canny). Every
loss runs in float32 with autocast disabled (ControlNet++ casts to float32 for the same reason: fp16 softmax and
sqrt give NaNs); the extractors' weights are frozen.

Where ControlNet++ is silent or does differently, this project's choices (each loss's docstring has its own):
- softedge compares HED's sigmoid output before the uint8 quantisation (ControlNet++ quantises, which leaves no
  gradient).
- depth normalises both maps per sample between their minimum and maximum, as annotator.depth makes the control
  image (ControlNet++ divides by the maximum); the hint is normalised again because a crop of a depth map need
  not span 0..1.
- seg reads the hint's colours back to ADE20K classes; blended colours (from resizing) are ignored, and a colour
  two classes share scores the sum of their probabilities.
- tile, inpaint and normal have no ControlNet++ reward; theirs are this project's (see their functions).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from annotator.controls import (
    CONSISTENCY_TYPES,
    ControlSettingsError,
    ControlType,
    NormalSettings,
    TileSettings,
)

ConsistencyLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = ["CONSISTENCY_TYPES", "ConsistencyLoss", "build_consistency_loss", "require_consistency"]

# ControlNet++'s Canny thresholds (train/reward_control.py); the magnitude the loss compares does not depend on them.
CANNY_LOW, CANNY_HIGH = 0.1, 0.2
# Below this a depth map's range counts as flat (normalising it would only amplify noise).
FLAT_DEPTH = 1e-6
# OpenCV's 5-tap Gaussian of pyrDown / pyrUp.
PYRAMID_TAPS = (1.0, 4.0, 6.0, 4.0, 1.0)
# PIL resampling codes an image processor stores, as torch interpolation modes.
PROCESSOR_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


@contextlib.contextmanager
def _float32(images: torch.Tensor) -> Iterator[None]:
    """Autocast off on the images' device (the loss computes in float32 as ControlNet++ does)."""
    with torch.autocast(device_type=images.device.type, enabled=False):
        yield


def _check_inputs(images: torch.Tensor, hints: torch.Tensor, references: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"consistency loss: images must be (B, 3, H, W), got {tuple(images.shape)}")
    for name, tensor in (("hints", hints), ("references", references)):
        if tuple(tensor.shape) != tuple(images.shape):
            raise ValueError(f"consistency loss: {name} must have the images' shape {tuple(images.shape)}, "
                             f"got {tuple(tensor.shape)}")


def _per_sample_mse(prediction: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return (prediction - label).square().flatten(1).mean(dim=1)


def _frozen(network: Any) -> Any:
    network.eval()
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    return network


# ---- canny ----------------------------------------------------------------------------------------------------
def canny_magnitude(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W): Kornia's Canny gradient magnitude after non-maximum suppression (ControlNet++'s
    eval/canny_tools.py is Kornia's canny; hysteresis only shapes the edge map, which is not used, so it is off)."""
    import kornia

    return kornia.filters.canny(images, CANNY_LOW, CANNY_HIGH, hysteresis=False)[0]


def canny_loss(images: torch.Tensor, hints: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """ControlNet++'s Canny reward: per-sample mean of (magnitude(images) - magnitude(references))^2. The label
    comes from the photo, not from the hint's binary edges, whose thresholds do not reach the magnitude."""
    _check_inputs(images, hints, references)
    with _float32(images):
        generated = canny_magnitude(images.float())
        with torch.no_grad():
            label = canny_magnitude(references.detach().float())
        return _per_sample_mse(generated, label)


# ---- tile -----------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _reflect101_indices(size: int, before: int, after: int) -> tuple[int, ...]:
    """Source indices of a row padded as OpenCV's BORDER_REFLECT_101 (any size, as its borderInterpolate)."""
    indices = []
    for position in range(-before, size + after):
        if size == 1:
            indices.append(0)
            continue
        while not 0 <= position < size:
            position = -position if position < 0 else 2 * size - position - 2
        indices.append(position)
    return tuple(indices)


def _reflect101(size: int, before: int, after: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(_reflect101_indices(size, before, after), device=device)


def _taps(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(PYRAMID_TAPS, dtype=x.dtype, device=x.device) / 16.0


def pyr_down(x: torch.Tensor) -> torch.Tensor:
    """cv2.pyrDown of (B, C, H, W): the 5x5 Gaussian with reflect-101 borders, then every other pixel from the
    first; the result is ((H + 1) // 2, (W + 1) // 2)."""
    channels = x.shape[1]
    taps = _taps(x)
    for dim in (2, 3):
        size = x.shape[dim]
        x = x.index_select(dim, _reflect101(size, 2, 2, x.device))
        kernel = taps.view(1, 1, 5, 1) if dim == 2 else taps.view(1, 1, 1, 5)
        x = F.conv2d(x, kernel.expand(channels, 1, *kernel.shape[2:]), groups=channels)
        x = x.narrow(dim, 0, size).index_select(dim, torch.arange(0, size, 2, device=x.device))
    return x


def _up_axis(x: torch.Tensor, dim: int) -> torch.Tensor:
    """One axis of cv2.pyrUp: output 2i = (s[i-1] + 6 s[i] + s[i+1]) / 8, 2i+1 = (s[i] + s[i+1]) / 2, where
    s[-1] = s[1] (reflect-101) and s[n] = s[n-1] (OpenCV's last column)."""
    size = x.shape[dim]
    before = x.index_select(dim, _reflect101(size, 1, 0, x.device)[:size])
    after_index = torch.clamp(torch.arange(1, size + 1, device=x.device), max=size - 1)
    after = x.index_select(dim, after_index)
    even = (before + 6.0 * x + after) / 8.0
    odd = (x + after) / 2.0
    return torch.stack([even, odd], dim=dim + 1).flatten(dim, dim + 1)


def pyr_up(x: torch.Tensor) -> torch.Tensor:
    """cv2.pyrUp of (B, C, H, W) to (2H, 2W)."""
    return _up_axis(_up_axis(x, 2), 3)


def tile_degrade(images: torch.Tensor, settings: TileSettings) -> torch.Tensor:
    """The tile annotator's degradation (annotator.controls.tile_control) in torch, differentiably: `level`
    pyrDowns, as many pyrUps, a bilinear resize back where odd sizes did not return exactly (cv2.resize's
    INTER_LINEAR). Its Gaussian noise is left out: it is random per photo, zero-mean, and the pyramid is linear,
    so this is the hint's expected value, and the MSE to a noisy hint is off by a constant (the noise's variance
    after the pyramid) that carries no gradient. The final rounding to uint8 is left out too."""
    height, width = images.shape[-2:]
    x = images
    for _ in range(settings.level):
        x = pyr_down(x)
    for _ in range(settings.level):
        x = pyr_up(x)
    if x.shape[-2:] != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    return x


def tile_loss(settings: TileSettings, images: torch.Tensor, hints: torch.Tensor,
              references: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE of the degraded images and the hint (a project choice; ControlNet++ has no tile reward).
    The hint was degraded at the stored photo's size before the training crop; the degradation is local, so
    it differs from degrading the crop only within a few pixels of the crop's border."""
    _check_inputs(images, hints, references)
    with _float32(images):
        return _per_sample_mse(tile_degrade(images.float(), settings), hints.detach().float())


# ---- inpaint --------------------------------------------------------------------------------------------------
def inpaint_loss(images: torch.Tensor, hints: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE of the images and the hint on the hint's unmasked pixels (ControlNet 1.1's inpaint hint is
    -1 where masked, the photo elsewhere): the ControlNet must keep what it was shown. A sample masked
    everywhere scores 0. A project choice; ControlNet++ has no inpaint reward."""
    _check_inputs(images, hints, references)
    with _float32(images):
        hints = hints.detach().float()
        kept = (hints >= 0).all(dim=1, keepdim=True).float()
        squared = (images.float() - hints).square() * kept
        count = kept.flatten(1).sum(dim=1) * images.shape[1]
        return squared.flatten(1).sum(dim=1) / count.clamp_min(1.0)


# ---- softedge (HED) -------------------------------------------------------------------------------------------
def hed_soft_edges(network: Any, images: torch.Tensor) -> torch.Tensor:
    """(B, H, W): ControlNet 1.1's HED soft edges of images in [0, 1], as annotator.hed.soft_edges makes them
    (the network on 0..255, the five projections resized bilinear to the image, averaged, sigmoid), with
    gradients and without the uint8 quantisation."""
    height, width = images.shape[-2:]
    projections = [F.interpolate(p, size=(height, width), mode="bilinear", align_corners=False)
                   for p in network(images * 255.0)]
    return torch.sigmoid(torch.cat(projections, dim=1).mean(dim=1))


def softedge_loss(network: Any, images: torch.Tensor, hints: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE of HED's soft edges of the images and the hint's first channel (ControlNet++'s hed reward,
    less its quantisation). With the `safe` setting the hint has three levels and the edges do not, so the loss
    does not reach 0; its gradient still points to the hint."""
    _check_inputs(images, hints, references)
    with _float32(images):
        return _per_sample_mse(hed_soft_edges(network, images.float()), hints.detach().float()[:, 0])


# ---- transformers models: the image processor in torch -----------------------------------------------------------
def _multiple_of(value: float, multiple: int) -> int:
    """DPT's constrain_to_multiple_of without bounds: the nearest multiple, at least one multiple."""
    result = round(value / multiple) * multiple
    return int(result if result > 0 else np.ceil(value / multiple) * multiple)


def processor_size(processor: Any, height: int, width: int) -> tuple[int, int]:
    """The (height, width) the image processor resizes an image of (height, width) to: its size, or with DPT's
    keep_aspect_ratio the scale closest to 1 of the two, snapped to ensure_multiple_of."""
    size = processor.size
    target_height, target_width = (size.get("height"), size.get("width")) if isinstance(size, dict) else \
        (getattr(size, "height", None), getattr(size, "width", None))
    if not target_height or not target_width:
        raise ControlSettingsError(f"the image processor {type(processor).__name__} resizes to {size}; the "
                                   f"consistency reward reproduces only a (height, width) size")
    scale_height, scale_width = target_height / height, target_width / width
    if getattr(processor, "keep_aspect_ratio", False):
        if abs(1 - scale_width) < abs(1 - scale_height):
            scale_height = scale_width
        else:
            scale_width = scale_height
    multiple = int(getattr(processor, "ensure_multiple_of", 1) or 1)
    return _multiple_of(scale_height * height, multiple), _multiple_of(scale_width * width, multiple)


def processor_inputs(processor: Any, images: torch.Tensor) -> torch.Tensor:
    """pixel_values as the transformers image processor (DPT, SegFormer and the like) makes them from these images
    in [0, 1], in torch and differentiably: resize to its size with its resampling (antialiased, as its
    torchvision backend resizes), rescale, normalise with its mean and std, and DPT's centre padding to
    size_divisor. Steps it has that are not reproduced (centre crops) are a ControlSettingsError."""
    if getattr(processor, "do_center_crop", False):
        raise ControlSettingsError(f"the image processor {type(processor).__name__} centre-crops; the consistency "
                                   f"reward does not reproduce that: give a model whose processor only resizes")
    x = images
    if getattr(processor, "do_resize", True):
        resample = getattr(processor, "resample", 2)
        resample = getattr(resample, "value", resample)  # a PIL or torchvision enum
        mode = PROCESSOR_RESAMPLE.get(resample) if isinstance(resample, int) else \
            (resample if resample in PROCESSOR_RESAMPLE.values() else None)
        if mode is None:
            raise ControlSettingsError(f"the image processor {type(processor).__name__} resamples with {resample}; "
                                       f"the consistency reward reproduces nearest, bilinear and bicubic")
        size = processor_size(processor, *images.shape[-2:])
        if mode == "nearest":
            x = F.interpolate(x, size=size, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)
    if getattr(processor, "do_rescale", True):
        x = x * (255.0 * float(processor.rescale_factor))
    else:
        x = x * 255.0
    if getattr(processor, "do_normalize", True):
        mean = torch.tensor(processor.image_mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(processor.image_std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        x = (x - mean) / std
    divisor = getattr(processor, "size_divisor", None)
    if getattr(processor, "do_pad", False) and divisor:
        height, width = x.shape[-2:]
        pad_height, pad_width = (-height) % divisor, (-width) % divisor
        x = F.pad(x, (pad_width // 2, pad_width - pad_width // 2, pad_height // 2, pad_height - pad_height // 2))
    return x


# ---- depth and normal ---------------------------------------------------------------------------------------------
def predicted_depth(processor: Any, network: Any, images: torch.Tensor) -> torch.Tensor:
    """(B, H, W): the depth model's raw prediction for images in [0, 1], resized to the images bicubic as
    annotator.depth.predict_depth resizes it (ControlNet++ resizes bilinear; bicubic keeps to what made the
    hint)."""
    depth = network(pixel_values=processor_inputs(processor, images)).predicted_depth
    return F.interpolate(depth[:, None].float(), size=images.shape[-2:], mode="bicubic", align_corners=False)[:, 0]


def min_max(maps: torch.Tensor) -> torch.Tensor:
    """Each (H, W) map of (B, H, W) scaled to [0, 1] between its minimum and maximum (annotator.depth.normalised);
    a flat one becomes 0."""
    flat = maps.flatten(1)
    low = flat.min(dim=1).values.view(-1, 1, 1)
    span = flat.max(dim=1).values.view(-1, 1, 1) - low
    return (maps - low) / span.clamp_min(FLAT_DEPTH)


def depth_loss(processor: Any, network: Any, images: torch.Tensor, hints: torch.Tensor,
               references: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE of the images' depth and the hint's (its mean over channels), each min-max normalised per
    sample: the depth control image is the prediction min-max normalised (annotator.depth.depth_image), and
    the hint is normalised again because the training crop of a depth map need not span 0..1. ControlNet++
    divides both by their maximum instead."""
    _check_inputs(images, hints, references)
    with _float32(images):
        depth = min_max(predicted_depth(processor, network, images.float()))
        label = min_max(hints.detach().float().mean(dim=1))
        return _per_sample_mse(depth, label)


def _sobel(depth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cv2.Sobel(ksize=3) of (B, H, W) along x and y, with its default reflect-101 borders (torch's "reflect")."""
    smooth = torch.tensor([1.0, 2.0, 1.0], dtype=depth.dtype, device=depth.device)
    slope = torch.tensor([-1.0, 0.0, 1.0], dtype=depth.dtype, device=depth.device)
    padded = F.pad(depth[:, None], (1, 1, 1, 1), mode="reflect")
    kernels = torch.stack([torch.outer(smooth, slope), torch.outer(slope, smooth)])[:, None]
    slopes = F.conv2d(padded, kernels)
    return slopes[:, 0], slopes[:, 1]


def normal_map(depth: torch.Tensor, settings: NormalSettings) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1]: annotator.depth.normal_image in torch (ControlNet 1.0's MiDaS normals: Sobel
    slopes zeroed where the normalised depth is below `background`, z = `strength`, unit length, *0.5 + 0.5,
    channels reversed), differentiable except through the background mask, which is held fixed."""
    slope_x, slope_y = _sobel(depth)
    keep = (min_max(depth.detach()) >= settings.background).to(depth.dtype)
    slope_x, slope_y = slope_x * keep, slope_y * keep
    normal = torch.stack([slope_x, slope_y, torch.full_like(slope_x, settings.strength)], dim=1)
    normal = normal / normal.square().sum(dim=1, keepdim=True).sqrt()
    return (normal * 0.5 + 0.5).flip(1)


def normal_loss(settings: NormalSettings, processor: Any, network: Any, images: torch.Tensor, hints: torch.Tensor,
                references: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE of the images' normal map (from the depth model, as the annotator makes it) and the hint.
    A project choice; ControlNet++ has no normal reward. The slopes are of the raw prediction, whose scale the
    model sets, so the reward is meaningful with the model the dataset was annotated with."""
    _check_inputs(images, hints, references)
    with _float32(images):
        normals = normal_map(predicted_depth(processor, network, images.float()), settings)
        return _per_sample_mse(normals, hints.detach().float())


# ---- seg ----------------------------------------------------------------------------------------------------------
def palette_lookup(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """(sorted palette colour codes, the first class of each, the groups of classes that share a colour)."""
    from annotator.segmentation import ADE20K_PALETTE

    palette = ADE20K_PALETTE.astype(np.int64)
    codes = (palette[:, 0] << 16) | (palette[:, 1] << 8) | palette[:, 2]
    classes_of_code: dict[int, list[int]] = {}
    for index, code in enumerate(codes.tolist()):
        classes_of_code.setdefault(code, []).append(index)
    sorted_codes = sorted(classes_of_code)
    first = [classes_of_code[code][0] for code in sorted_codes]
    shared = [group for group in classes_of_code.values() if len(group) > 1]
    return (torch.tensor(sorted_codes, dtype=torch.int64, device=device),
            torch.tensor(first, dtype=torch.int64, device=device), shared)


def hint_classes(hints: torch.Tensor, lookup: tuple[torch.Tensor, torch.Tensor, list[list[int]]]) -> torch.Tensor:
    """(B, H, W) int64: the ADE20K class of each hint pixel's colour (annotator.segmentation.classes_of in torch),
    -1 for a colour not in the palette (a blend from resizing); a shared colour reads as its first class."""
    sorted_codes, first, _ = lookup
    values = torch.round(hints.clamp(0, 1) * 255.0).to(torch.int64)
    codes = (values[:, 0] << 16) | (values[:, 1] << 8) | values[:, 2]
    position = torch.searchsorted(sorted_codes, codes).clamp(max=len(sorted_codes) - 1)
    return torch.where(sorted_codes[position] == codes, first[position], torch.full_like(codes, -1))


def segmentation_logits(processor: Any, network: Any, images: torch.Tensor) -> torch.Tensor:
    """(B, classes, h, w): the segmentation model's logits at their own size for images in [0, 1]."""
    return network(pixel_values=processor_inputs(processor, images)).logits


def seg_loss(processor: Any, network: Any, lookup: tuple[torch.Tensor, torch.Tensor, list[list[int]]],
             images: torch.Tensor, hints: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Per-sample cross entropy of the model's logits on the images against the hint's classes, resized nearest
    to the logits' size (ControlNet++'s segmentation reward: cross entropy with an ignored label, averaged over
    the labelled pixels). Pixels whose colour is not in the palette are ignored; a sample with none labelled
    scores 0. Classes that share a colour (ADE20K's two greys) score the sum of their probabilities, since the
    hint cannot tell them apart. ControlNet++ also ignores ADE20K's background, which our palette, drawn from
    the model's 150 classes, does not have."""
    _check_inputs(images, hints, references)
    with _float32(images):
        logits = segmentation_logits(processor, network, images.float()).float()
        log_probs = F.log_softmax(logits, dim=1)
        shared = lookup[2]
        if shared:
            merged = [log_probs[:, index:index + 1] for index in range(log_probs.shape[1])]
            for group in shared:
                merged[group[0]] = torch.logsumexp(log_probs[:, group], dim=1, keepdim=True)
            log_probs = torch.cat(merged, dim=1)
        with torch.no_grad():
            labels = hint_classes(hints.detach().float(), lookup)
            labels = F.interpolate(labels[:, None].float(), size=logits.shape[-2:], mode="nearest")[:, 0].long()
        losses = F.nll_loss(log_probs, labels, ignore_index=-1, reduction="none")
        labelled = (labels >= 0).to(losses.dtype)
        return (losses * labelled).flatten(1).sum(dim=1) / labelled.flatten(1).sum(dim=1).clamp_min(1.0)


# ---- the builder --------------------------------------------------------------------------------------------------
def require_consistency(control: ControlType) -> None:
    """ControlSettingsError naming the types that have one when `control` has no differentiable reward (a check
    that loads nothing, for a command line to run before the model)."""
    if not control.consistency.differentiable:
        raise ControlSettingsError(f"control {control.name!r} has no differentiable consistency reward "
                                   f"({control.consistency.description}); the types with one: "
                                   f"{', '.join(CONSISTENCY_TYPES)}")


def build_consistency_loss(control: ControlType, settings: Any, annotator_model: str | None,
                           device: torch.device | str) -> ConsistencyLoss:
    """The consistency loss of `control`, its extractor loaded on `device` and frozen: `annotator_model` (a
    transformers model for depth / normal / seg, HED weights for softedge; None: the type's default) as the
    dataset's annotator used it. A type without a differentiable reward is a ControlSettingsError naming the
    types that have one; so is a model that cannot load."""
    require_consistency(control)
    model = annotator_model or control.model
    settings = control.settings_from() if settings is None else settings
    if control.name == "canny":
        return canny_loss
    if control.name == "tile":
        return lambda images, hints, references: tile_loss(settings, images, hints, references)
    if control.name == "inpaint":
        return inpaint_loss
    if control.name == "softedge":
        from annotator.hed import DEFAULT_HED_WEIGHTS, load_hed

        network = _frozen(load_hed(model or DEFAULT_HED_WEIGHTS, device))
        return lambda images, hints, references: softedge_loss(network, images, hints, references)
    if control.name in ("depth", "normal"):
        from annotator.depth import load_depth_model

        processor, network = load_depth_model(model, device)
        network = _frozen(network)
        if control.name == "depth":
            return lambda images, hints, references: depth_loss(processor, network, images, hints, references)
        return lambda images, hints, references: normal_loss(settings, processor, network, images, hints,
                                                             references)
    if control.name == "seg":
        from annotator.segmentation import load_segmentation_model

        processor, network = load_segmentation_model(model, device)
        network = _frozen(network)
        lookup = palette_lookup(torch.device(device))
        return lambda images, hints, references: seg_loss(processor, network, lookup, images, hints, references)
    raise ControlSettingsError(f"control {control.name!r} is marked as having a consistency reward, but "
                               f"annotator.consistency builds none for it")

