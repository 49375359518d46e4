"""Soft edges: the HED network ControlNet 1.1 ships for its softedge model, loading the released annotator
weights (`ControlNetHED.pth` of lllyasviel/Annotators) in their own layout.

The network (ControlNet 1.1's Apache-2.0 re-implementation of HED): an input offset `norm` (1, 3, 1, 1)
subtracted from the RGB image in 0..255, then five VGG-style blocks `block1`..`block5` (64, 128, 256, 512,
512 channels; 2, 2, 3, 3, 3 convolutions of 3x3 with ReLU; 2x2 max pooling before blocks 2-5), each with a
1x1 `projection` to one channel. The five projections are resized (bilinear) to the image, averaged and
passed through a sigmoid: the soft edge map. "safe" (1.1's SoftEdge_HED_safe) quantises it to three levels.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from annotator.controls import ControlSettingsError, SoftEdgeSettings
from common.download import DownloadError, cached_download, is_url

DEFAULT_HED_WEIGHTS = "https://huggingface.co/lllyasviel/Annotators/resolve/main/ControlNetHED.pth"
# (output channels, convolutions) of each block, as the released weights have them.
HED_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
SAFE_STEPS = 2  # ControlNet 1.1's safe_step: three levels


def build_hed():
    """The HED network with random weights (the released layout's keys and shapes)."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, in_channels: int, out_channels: int, convolutions: int):
            super().__init__()
            self.convs = nn.Sequential(*(nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1)
                                         for i in range(convolutions)))
            self.projection = nn.Conv2d(out_channels, 1, 1)

        def forward(self, x: torch.Tensor, pool: bool) -> tuple[torch.Tensor, torch.Tensor]:
            if pool:
                x = nn.functional.max_pool2d(x, kernel_size=2, stride=2)
            for conv in self.convs:
                x = nn.functional.relu(conv(x))
            return x, self.projection(x)

    class HED(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
            channels = 3
            for index, (out_channels, convolutions) in enumerate(HED_BLOCKS, start=1):
                setattr(self, f"block{index}", Block(channels, out_channels, convolutions))
                channels = out_channels

        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            h = x - self.norm
            projections = []
            for index in range(1, len(HED_BLOCKS) + 1):
                h, projection = getattr(self, f"block{index}")(h, pool=index > 1)
                projections.append(projection)
            return projections

    return HED()


def _weights_path(weights: str) -> Path:
    if is_url(weights):
        try:
            return cached_download(weights)  # the project's download cache, as the BLIP weights
        except DownloadError as err:
            raise ControlSettingsError(f"cannot download the HED weights {weights}: {err}") from err
    return Path(weights)


def load_hed(weights: str = DEFAULT_HED_WEIGHTS, device: str = "cpu"):
    """The HED network with the weights of a ControlNetHED.pth / .safetensors file (or its URL), in eval mode.
    A file of another layout is a ControlSettingsError naming the keys that do not fit."""

    from ldm.lazy_checkpoint import open_lazy

    path = _weights_path(weights)
    if not path.is_file():
        raise ControlSettingsError(f"HED weights {path} not found (the released file: {DEFAULT_HED_WEIGHTS})")
    network = build_hed()
    expected = network.state_dict()
    try:
        with open_lazy(path) as checkpoint:
            state = {key: checkpoint[key] for key in checkpoint.specs}
    except Exception as err:  # the project's reader names the file and the problem
        raise ControlSettingsError(f"cannot read the HED weights {path}: {err}") from err
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(key for key in set(expected) & set(state) if tuple(state[key].shape) != tuple(expected[key].shape))
    if missing or unexpected or wrong:
        details = "; ".join(part for part in (
            f"missing {', '.join(missing[:4])}" if missing else "",
            f"unexpected {', '.join(unexpected[:4])}" if unexpected else "",
            f"other shapes: {', '.join(wrong[:4])}" if wrong else "") if part)
        raise ControlSettingsError(f"{path} is not ControlNet 1.1's HED (ControlNetHED.pth) layout: {details}")
    network.load_state_dict({key: value.float() for key, value in state.items()})
    return network.to(device).eval()


def soft_edges(network, photos: list[np.ndarray], settings: SoftEdgeSettings) -> list[np.ndarray]:
    """HW uint8 soft edge maps of RGB uint8 photos (one network call per photo: sizes may differ)."""
    import torch

    device = next(network.parameters()).device
    results = []
    with torch.no_grad():
        for photo in photos:
            image = torch.tensor(photo, device=device, dtype=torch.float32).permute(2, 0, 1)[None]
            height, width = photo.shape[:2]
            projections = [torch.nn.functional.interpolate(p, size=(height, width), mode="bilinear",
                                                           align_corners=False) for p in network(image)]
            edge = torch.sigmoid(torch.cat(projections, dim=1).mean(dim=1))[0].double().cpu().numpy()
            if settings.safe:
                edge = np.floor(edge * (SAFE_STEPS + 1)) / SAFE_STEPS
            results.append((edge * 255.0).clip(0, 255).astype(np.uint8))
    return results


def load_softedge_annotator(settings: SoftEdgeSettings, weights: str | None,
                            device: str = "cpu") -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    network = load_hed(weights or DEFAULT_HED_WEIGHTS, device)
    return lambda photos: soft_edges(network, photos, settings)
