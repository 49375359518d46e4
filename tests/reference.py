"""Paths and loaders for the golden data under tests/data/reference (see its README)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import torch
from safetensors.torch import load_file

REFERENCE = Path(__file__).parent / "data" / "reference"
TINY = REFERENCE / "tiny"
TINY_CONFIG = TINY / "config.yaml"
TINY_WEIGHTS = TINY / "weights.safetensors"
PROMPTS = ["a photo of a cat", "a bird, best quality, extremely detailed"]
UNCOND_PROMPTS = ["", ""]
# Tolerances the reference README suggests for a reimplementation.
FORWARD_TOL = {"atol": 1e-5, "rtol": 1e-5}
DDIM_ATOL = 5e-4


@cache
def tiny_vectors() -> dict[str, torch.Tensor]:
    return load_file(str(TINY / "vectors.safetensors"))


@cache
def tiny_weights() -> dict[str, torch.Tensor]:
    return load_file(str(TINY_WEIGHTS))


def manifest(name: str) -> dict[str, tuple[int, ...]]:
    """{key: shape} of a state-dict manifest such as "cldm_v15_state_dict"."""
    entries = json.loads((REFERENCE / f"{name}.json").read_text())
    return {key: tuple(shape) for key, shape, _dtype in entries}
