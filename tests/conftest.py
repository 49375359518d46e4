"""Fixtures shared by the test modules. Helpers that are plain functions live in tests/training_helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import save_file

from tests.training_helpers import make_dataset, tool_add_control_init


@pytest.fixture(scope="module")
def init_path(tmp_path_factory) -> Path:
    """The tiny model's tool_add_control.py output (control_tiny_ini.safetensors), training.py's --init."""
    path = tmp_path_factory.mktemp("init") / "control_tiny_ini.safetensors"
    save_file(tool_add_control_init(), str(path))
    return path


@pytest.fixture(scope="module")
def four_pairs(tmp_path_factory) -> Path:
    """A dataset folder of four random 64x64 pairs (prompt.json format), one per test module."""
    return make_dataset(tmp_path_factory.mktemp("four_pairs"), 4)
