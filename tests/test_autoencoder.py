"""The KL autoencoder against golden data from the original ControlNet code.

tiny: the VAE of tests/data/reference/tiny (config, weights and vectors from the original code);
full size: the VAE of models/cldm_v15.yaml and cldm_v21.yaml against the original's state-dict manifests.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

REFERENCE = Path(__file__).parent / "data" / "reference"
TINY = REFERENCE / "tiny"
MODELS = Path(__file__).parent.parent / "models"
PREFIX = "first_stage_model."
# Suggested in tiny/README.md for single forward passes; observed error here is <= 7e-6.
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}
# The ddconfig of the original ControlNet models/cldm_v15.yaml (identical in SD1.x v1-inference.yaml).
SD15_DDCONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}
SD15_EMBED_DIM = 4


@pytest.fixture(scope="module")
def tiny_params():
    return OmegaConf.load(TINY / "config.yaml").model.params.first_stage_config.params


@pytest.fixture(scope="module")
def tiny_state_dict() -> dict[str, torch.Tensor]:
    weights = load_file(TINY / "weights.safetensors")
    return {k.removeprefix(PREFIX): v for k, v in weights.items() if k.startswith(PREFIX)}


@pytest.fixture(scope="module")
def vectors() -> dict[str, torch.Tensor]:
    return load_file(TINY / "vectors.safetensors")


def build_tiny(params, state_dict, attention: str = "sdpa") -> AutoencoderKL:
    model = AutoencoderKL(**params, attention=attention).eval()
    model.load_state_dict(state_dict, strict=True)
    return model


# --- tiny model against the original's outputs -------------------------------------------------------


@pytest.mark.parametrize("attention", ["sdpa", "sliced", "math"])
def test_tiny_matches_reference(tiny_params, tiny_state_dict, vectors, attention):
    model = build_tiny(tiny_params, tiny_state_dict, attention)
    with torch.no_grad():
        posterior = model.encode(vectors["x"])
        decoded = model.decode(vectors["z_decode_in"])
    torch.testing.assert_close(posterior.mean, vectors["vae_posterior_mean"], **TOLERANCE)
    torch.testing.assert_close(posterior.logvar, vectors["vae_posterior_logvar"], **TOLERANCE)
    torch.testing.assert_close(vectors["scale_factor"] * posterior.mode(), vectors["z0"], **TOLERANCE)
    torch.testing.assert_close(decoded, vectors["vae_decoded"], **TOLERANCE)


def test_tiny_forward_reconstructs_through_mode_or_seeded_sample(tiny_params, tiny_state_dict, vectors):
    model = build_tiny(tiny_params, tiny_state_dict)
    x = vectors["x"]
    with torch.no_grad():
        reconstruction, posterior = model(x, sample_posterior=False)
        torch.testing.assert_close(reconstruction, model.decode(posterior.mode()))
        sampled, _ = model(x, generator=torch.Generator().manual_seed(3))
        expected_z = posterior.mean + posterior.std * torch.randn(
            posterior.mean.shape, generator=torch.Generator().manual_seed(3)
        )
        torch.testing.assert_close(sampled, model.decode(expected_z))
    assert reconstruction.shape == x.shape
    assert not torch.allclose(sampled, reconstruction)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tiny_runs_under_autocast(tiny_params, tiny_state_dict, vectors, dtype):
    model = build_tiny(tiny_params, tiny_state_dict)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        posterior = model.encode(vectors["x"])
        decoded = model.decode(vectors["z_decode_in"])
    assert posterior.mean.dtype == dtype and decoded.dtype == dtype
    # Half precision keeps ~3 significant digits: bf16 errors here are ~0.02 (mean) and ~0.06 (decoded)
    # on values up to 2.4, so 0.15 still catches any real defect (those move outputs by O(1)).
    half_precision = {"atol": 0.15, "rtol": 0.0}
    torch.testing.assert_close(posterior.mean.float(), vectors["vae_posterior_mean"], **half_precision)
    torch.testing.assert_close(decoded.float(), vectors["vae_decoded"], **half_precision)
    assert torch.isfinite(posterior.kl()).all()


def test_attention_resolutions_add_blocks_and_kernels_agree():
    ddconfig = {**SD15_DDCONFIG, "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "resolution": 32}
    ddconfig["attn_resolutions"] = [16]  # level 1 of the encoder and decoder runs at 16 px
    torch.manual_seed(0)
    sdpa = AutoencoderKL(ddconfig, embed_dim=4, attention="sdpa").eval()
    math_kernel = AutoencoderKL(ddconfig, embed_dim=4, attention="math").eval()
    math_kernel.load_state_dict(sdpa.state_dict())
    keys = set(sdpa.state_dict())
    assert {"encoder.down.1.attn.0.q.weight", "decoder.up.1.attn.1.proj_out.bias"} <= keys
    assert not any(key.startswith(("encoder.down.0.attn.", "decoder.up.0.attn.")) for key in keys)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        reconstructions = [model(x, sample_posterior=False)[0] for model in (sdpa, math_kernel)]
    torch.testing.assert_close(*reconstructions)


# --- full-size layout ---------------------------------------------------------------------------------


def build_full_size_on_meta(version: str) -> AutoencoderKL:
    """The VAE exactly as the project's models/cldm_{version}.yaml describes it, without allocating."""
    params = OmegaConf.load(MODELS / f"cldm_{version}.yaml").model.params.first_stage_config.params
    with torch.device("meta"):
        return AutoencoderKL(**params)


@pytest.mark.parametrize("version", ["v15", "v21"])
def test_full_size_state_dict_matches_original_manifest(version):
    manifest = json.loads((REFERENCE / f"sd{version[1:]}_state_dict.json").read_text())
    expected = {key.removeprefix(PREFIX): shape for key, shape, _ in manifest if key.startswith(PREFIX)}
    model = build_full_size_on_meta(version)
    actual = {key: list(tensor.shape) for key, tensor in model.state_dict().items()}
    counts = json.loads((REFERENCE / "param_counts.json").read_text())
    reference_counts = counts[f"cldm_{version}"]["first_stage_model"]
    assert len(expected) == reference_counts["state_dict_keys"] == 248
    assert sorted(actual) == sorted(expected)
    assert actual == expected
    assert sum(p.numel() for p in model.parameters()) == reference_counts["parameters"]


def test_sd15_config_is_the_kl_f8_vae():
    params = OmegaConf.load(MODELS / "cldm_v15.yaml").model.params.first_stage_config.params
    assert OmegaConf.to_container(params.ddconfig) == SD15_DDCONFIG
    assert params.embed_dim == SD15_EMBED_DIM


def test_sd15_on_meta_maps_256px_to_32px_latents():
    model = build_full_size_on_meta("v15")
    with torch.device("meta"):
        posterior = model.encode(torch.empty(2, 3, 256, 256))
        decoded = model.decode(posterior.sample())
    assert posterior.mean.shape == (2, SD15_EMBED_DIM, 32, 32)
    assert decoded.shape == (2, 3, 256, 256)


# --- checkpoint loading and argument checks -----------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_ckpt_path_loads_full_checkpoint_onto_meta_model(tmp_path, tiny_params, vectors, suffix):
    full = load_file(TINY / "weights.safetensors")
    full[PREFIX + "loss.logvar"] = torch.zeros(())  # the original's training loss: must be dropped
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        save_file(full, path)
    else:
        torch.save({"state_dict": full, "global_step": 7}, path)
    with torch.device("meta"):
        model = AutoencoderKL(**tiny_params, ckpt_path=path)
    model.eval()
    with torch.no_grad():
        decoded = model.decode(vectors["z_decode_in"])
    torch.testing.assert_close(decoded, vectors["vae_decoded"], **TOLERANCE)


def test_ckpt_path_mismatch_names_file_and_key(tmp_path, tiny_params, tiny_state_dict):
    broken = {k: v for k, v in tiny_state_dict.items() if k != "quant_conv.bias"}
    path = tmp_path / "vae.safetensors"
    save_file(broken, path)
    with pytest.raises(ValueError, match=r"(?s)vae\.safetensors.*quant_conv\.bias"):
        AutoencoderKL(**tiny_params, ckpt_path=path)
    # ignore_keys drops an entry, which then is reported as missing.
    save_file(tiny_state_dict, path)
    with pytest.raises(ValueError, match=r"post_quant_conv\.weight"):
        AutoencoderKL(**tiny_params, ckpt_path=path, ignore_keys=["post_quant_conv."])


def test_constructor_rejects_bad_arguments(tiny_params):
    ddconfig = OmegaConf.to_container(tiny_params.ddconfig)
    with pytest.raises(TypeError, match="embed_dim"):
        AutoencoderKL(ddconfig)
    with pytest.raises(ValueError, match="double_z"):
        AutoencoderKL({**ddconfig, "double_z": False}, embed_dim=4)
    with pytest.raises(ValueError, match="attention"):
        AutoencoderKL(ddconfig, embed_dim=4, attention="xformers")
    with pytest.raises(TypeError, match="attn_resolution"):  # a misspelled ddconfig key, by name
        AutoencoderKL({**ddconfig, "attn_resolution": []}, embed_dim=4)
    with pytest.warns(UserWarning, match="LPIPSWithDiscriminator"):
        AutoencoderKL(ddconfig, {"target": "ldm.modules.losses.LPIPSWithDiscriminator"}, 4)
    with pytest.warns(UserWarning, match="ema_decay"):
        AutoencoderKL(ddconfig, embed_dim=4, ema_decay=0.999)


def test_encode_and_decode_reject_wrong_channel_counts(tiny_params):
    model = AutoencoderKL(**tiny_params)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.encode(torch.zeros(1, 4, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        model.decode(torch.zeros(1, 3, 8, 8))


# --- DiagonalGaussianDistribution ---------------------------------------------------------------------


def gaussian(mean: float, logvar: float, shape=(4, 3, 8, 8)) -> DiagonalGaussianDistribution:
    return DiagonalGaussianDistribution(
        torch.cat([torch.full(shape, mean), torch.full(shape, logvar)], dim=1)
    )


def test_sample_statistics_match_mean_and_std():
    dist = gaussian(mean=1.5, logvar=math.log(0.25), shape=(2, 2, 64, 64))  # std 0.5
    draws = dist.sample(torch.Generator().manual_seed(0))
    assert draws.shape == (2, 2, 64, 64)
    # 16384 draws: the standard errors are ~0.004 (mean) and ~0.003 (std).
    assert abs(draws.mean().item() - 1.5) < 0.02
    assert abs(draws.std().item() - 0.5) < 0.02
    torch.testing.assert_close(draws, dist.sample(torch.Generator().manual_seed(0)))
    assert torch.equal(dist.mode(), dist.mean)


def test_kl_and_nll_match_torch_distributions():
    generator = torch.Generator().manual_seed(0)
    first = DiagonalGaussianDistribution(torch.randn(2, 6, 4, 4, generator=generator))
    second = DiagonalGaussianDistribution(torch.randn(2, 6, 4, 4, generator=generator))
    as_normal = [torch.distributions.Normal(d.mean, d.std) for d in (first, second)]
    prior = torch.distributions.Normal(torch.zeros_like(first.mean), torch.ones_like(first.mean))
    per_sample = (1, 2, 3)
    kl_divergence = torch.distributions.kl_divergence
    torch.testing.assert_close(first.kl(), kl_divergence(as_normal[0], prior).sum(per_sample))
    torch.testing.assert_close(first.kl(second), kl_divergence(as_normal[0], as_normal[1]).sum(per_sample))
    x = torch.randn(2, 3, 4, 4, generator=generator)
    torch.testing.assert_close(first.nll(x), -as_normal[0].log_prob(x).sum(per_sample))
    assert first.kl(first).abs().max() < 1e-5
    assert first.kl().shape == (2,)


def test_logvar_is_clamped_and_deterministic_has_no_spread():
    wide = gaussian(mean=0.0, logvar=100.0)
    narrow = gaussian(mean=0.0, logvar=-100.0)
    assert wide.logvar.max().item() == 20.0 and narrow.logvar.min().item() == -30.0
    torch.testing.assert_close(wide.var, torch.full_like(wide.var, math.exp(20.0)))
    assert torch.isfinite(narrow.kl()).all() and (narrow.std > 0).all()

    fixed = DiagonalGaussianDistribution(torch.randn(2, 8, 4, 4), deterministic=True)
    assert torch.equal(fixed.sample(), fixed.mean)
    assert torch.equal(fixed.kl(), torch.zeros(2)) and torch.equal(fixed.nll(fixed.mean), torch.zeros(2))


def test_rejects_odd_channel_count():
    with pytest.raises(ValueError, match="2\\*C"):
        DiagonalGaussianDistribution(torch.zeros(1, 3, 4, 4))
