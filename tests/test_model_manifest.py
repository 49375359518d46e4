"""Models built from the shipped configs have exactly the state-dict layout of the original (built on
the meta device: no memory for 1.4 B parameters)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cldm.model import create_model
from tests.reference import manifest

MODELS = Path(__file__).parent.parent / "models"


@pytest.mark.parametrize("version", ["v15", "v21"])
def test_state_dict_matches_manifest(version):
    with torch.device("meta"):
        model = create_model(MODELS / f"cldm_{version}.yaml")
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = manifest(f"cldm_{version}_state_dict")
    assert sorted(set(expected) - set(got)) == []
    assert sorted(set(got) - set(expected)) == []
    assert {k: s for k, s in got.items() if s != expected[k]} == {}
    assert model.control_model.num_controls == len(model.control_scales) == 13


@pytest.mark.parametrize("version", ["v15", "v21"])
def test_plain_sd_layout_is_the_manifest_without_control(version):
    with torch.device("meta"):
        model = create_model(MODELS / f"cldm_{version}.yaml")
    sd_keys = {k for k in model.state_dict() if not k.startswith("control_model.")}
    assert sd_keys == set(manifest(f"sd{version[1:]}_state_dict"))
