"""The UNet and the ControlNet take the encoder arguments from one definition: both accept every key of
the original's cldm_v15.yaml / cldm_v21.yaml and refuse a misspelled one by name."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from cldm.cldm import ControlledUnetModel, ControlNet
from ldm.modules.diffusionmodules.openaimodel import UNetModel

# Small sizes in place of SD's (only the keys matter here).
SMALL = {"model_channels": 32, "num_res_blocks": 1, "channel_mult": [1, 2], "attention_resolutions": [2],
         "context_dim": 32, "num_heads": 2}


def _params(config: str, section: str) -> dict:
    params = OmegaConf.to_container(OmegaConf.load(config).model.params[section].params)
    heads = {"num_head_channels": 16} if "num_head_channels" in params else {"num_heads": 2}
    return {**params, **{k: v for k, v in SMALL.items() if k != "num_heads"}, **heads}


@pytest.mark.parametrize("config", ["models/cldm_v15.yaml", "models/cldm_v21.yaml"])
def test_released_config_keys_are_accepted(config):
    control_params, unet_params = _params(config, "control_stage_config"), _params(config, "unet_config")
    assert {"image_size", "use_checkpoint", "legacy"} <= set(control_params) & set(unet_params)
    with torch.device("meta"):
        control, unet = ControlNet(**control_params), ControlledUnetModel(**unet_params)
    assert control.input_block_chans == unet.input_block_chans


@pytest.mark.parametrize("cls, extra", [(ControlNet, {"hint_channels": 3}), (UNetModel, {"out_channels": 4}),
                                        (ControlledUnetModel, {"out_channels": 4})])
@pytest.mark.parametrize("typo", [{"use_linear_in_tranformer": False}, {"num_head_chanels": 0},
                                  {"legacy_mode": True}])
def test_misspelled_key_is_refused_by_name(cls, extra, typo):
    params = {"image_size": 32, "in_channels": 4, "use_spatial_transformer": True, "use_fp16": False,
              "legacy": False, **SMALL, **extra, **typo}
    with pytest.raises(TypeError, match=next(iter(typo))):
        cls(**params)


@pytest.mark.parametrize("option", [{"resblock_updown": True}, {"n_embed": 8}, {"use_new_attention_order": True}])
def test_unsupported_original_options_are_refused(option):
    params = {"image_size": 32, "in_channels": 4, "use_spatial_transformer": True, **SMALL, **option}
    with pytest.raises(ValueError, match=next(iter(option))):
        ControlNet(hint_channels=3, **params)
    with pytest.raises(ValueError, match="num_classes"):
        UNetModel(out_channels=4, num_classes=10, **{k: v for k, v in params.items() if k not in option})
