"""Model sizes of the benchmarks, as our config dicts, and the same architecture in diffusers' terms.

Both sides are built from one `model` section (the schema of `models/cldm_v15.yaml`), so ours and the
peer always have the same channel counts, levels, heads, context width, VAE and text encoder.

Mapping from our (CompVis) UNet params to diffusers' `UNet2DConditionModel`:
    model_channels * channel_mult       block_out_channels
    num_res_blocks                      layers_per_block
    level i has attention iff 2**i in attention_resolutions
                                        CrossAttnDownBlock2D / CrossAttnUpBlock2D (else DownBlock2D / UpBlock2D)
    num_heads (or ch // num_head_channels per level)
                                        attention_head_dim (diffusers' name for the number of heads)
    transformer_depth                   transformer_layers_per_block
    use_linear_in_transformer           use_linear_projection
    context_dim                         cross_attention_dim
    timestep embedding cos-first        flip_sin_to_cos=True, freq_shift=0
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from cldm.model import load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
SD15_CONFIG = REPO_ROOT / "models" / "cldm_v15.yaml"
# The tiny test model (64 px images, 8x8 latents): for smoke runs of the benchmark code.
TINY_CONFIG = REPO_ROOT / "tests" / "data" / "reference" / "tiny" / "config.yaml"
# The VAE downsamples by 8 (three stride-2 levels); the hint block does the same.
LATENT_DOWNSAMPLING = 8

# A mid-size model for the CPU preset: SD 1.5's first three levels (each with attention, the first over
# all 32x32 latent pixels at 256 px) and its middle block, with fewer channels and blocks and a smaller
# VAE and text encoder, so that a training step at 256 px takes about a second on 2 cores.
MIDSIZE_DENOISER = {
    "model_channels": 128,
    "channel_mult": [1, 2, 4],
    "num_res_blocks": 1,
    "attention_resolutions": [1, 2, 4],
    "num_heads": 4,
    "context_dim": 256,
}
MIDSIZE_VAE = {"ch": 32, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1}
MIDSIZE_TEXT = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 4,
                "projection_dim": 256}

MODEL_SIZES = ("sd15", "midsize", "tiny")


def model_config(size: str) -> dict[str, Any]:
    """The `model` section (target + params) of a ControlLDM config: "sd15" (full size), "midsize" or
    "tiny" (the test model)."""
    if size not in MODEL_SIZES:
        raise ValueError(f"model size must be one of {MODEL_SIZES}, got {size!r}")
    if size == "tiny":
        return load_config(TINY_CONFIG)["model"]
    config = load_config(SD15_CONFIG)["model"]
    if size == "sd15":
        return config
    params = config["params"]
    for name in ("unet_config", "control_stage_config"):
        params[name]["params"].update(copy.deepcopy(MIDSIZE_DENOISER))
    params["first_stage_config"]["params"]["ddconfig"].update(copy.deepcopy(MIDSIZE_VAE))
    params["cond_stage_config"]["params"] = {"text_config": dict(MIDSIZE_TEXT)}
    return config


@contextmanager
def config_file(model: Mapping[str, Any]) -> Iterator[Path]:
    """A temporary YAML file holding `{"model": model}`, for `cldm.model.create_model`."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        OmegaConf.save(OmegaConf.create({"model": dict(model)}), path)
        yield path


def diffusers_unet_config(model: Mapping[str, Any]) -> dict[str, Any]:
    """`UNet2DConditionModel` arguments with the same architecture as our `unet_config`."""
    p = model["params"]["unet_config"]["params"]
    if p.get("disable_self_attentions") or p.get("use_scale_shift_norm"):
        raise ValueError("the diffusers mapping covers the SD 1.x / 2.x UNet options only")
    block_out = [p["model_channels"] * mult for mult in p["channel_mult"]]
    has_attention = [2**level in p["attention_resolutions"] for level in range(len(block_out))]
    num_head_channels = p.get("num_head_channels", -1)
    heads = [ch // num_head_channels if num_head_channels != -1 else p["num_heads"] for ch in block_out]
    return {
        "sample_size": p["image_size"],
        "in_channels": p["in_channels"],
        "out_channels": p["out_channels"],
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attention)],
        "block_out_channels": block_out,
        "layers_per_block": p["num_res_blocks"],
        "cross_attention_dim": p["context_dim"],
        "attention_head_dim": heads,
        "transformer_layers_per_block": p.get("transformer_depth", 1),
        "use_linear_projection": bool(p.get("use_linear_in_transformer", False)),
        "norm_num_groups": 32,
    }


def diffusers_vae_config(model: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers `AutoencoderKL` arguments with the same architecture as our `first_stage_config`."""
    dd = model["params"]["first_stage_config"]["params"]["ddconfig"]
    levels = len(dd["ch_mult"])
    return {
        "in_channels": dd["in_channels"],
        "out_channels": dd["out_ch"],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [dd["ch"] * mult for mult in dd["ch_mult"]],
        "layers_per_block": dd["num_res_blocks"],
        "latent_channels": dd["z_channels"],
        "norm_num_groups": 32,
        "sample_size": dd["resolution"],
        "scaling_factor": model["params"].get("scale_factor", 1.0),
    }


def text_encoder_config(model: Mapping[str, Any]) -> dict[str, Any]:
    """`CLIPTextConfig` fields of our text encoder (ViT-L/14 unless the config overrides them)."""
    from ldm.modules.encoders.modules import CLIP_VIT_L_14_TEXT_CONFIG

    overrides = (model["params"]["cond_stage_config"].get("params") or {}).get("text_config") or {}
    return {**CLIP_VIT_L_14_TEXT_CONFIG, **overrides}


def scheduler_config(model: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers scheduler arguments for our DDPM schedule (SD's "scaled_linear" = our "linear")."""
    p = model["params"]
    if p.get("beta_schedule", "linear") != "linear":
        raise ValueError("only the linear (SD) beta schedule is mapped")
    return {
        "num_train_timesteps": p.get("timesteps", 1000),
        "beta_start": p.get("linear_start", 1e-4),
        "beta_end": p.get("linear_end", 2e-2),
        "beta_schedule": "scaled_linear",
        "prediction_type": "v_prediction" if p.get("parameterization") == "v" else "epsilon",
    }
