"""The shipped toy base (models/toy_base.safetensors) and the script that trains it (toy/train_base.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from cldm.model import create_model
from ldm.checkpoint import CONTROL_PREFIX, load_weights, read_checkpoint
from tests.reference import TINY_CONFIG
from toy.classify import read_scene
from toy.train_base import MAX_FILE_BYTES, render_images
from toy.train_base import main as train_base_main
from toy.vae_training import encode_means, random_crops, standardize_latents

REPO = Path(__file__).resolve().parent.parent
TOY_CONFIG = REPO / "models" / "cldm_toy.yaml"
TOY_BASE = REPO / "models" / "toy_base.safetensors"


def test_shipped_base_loads_strictly_and_is_small():
    assert TOY_BASE.stat().st_size <= MAX_FILE_BYTES
    state, metadata = read_checkpoint(TOY_BASE)
    assert not any(key.startswith(CONTROL_PREFIX) for key in state)
    model = create_model(TOY_CONFIG)
    report = load_weights(model, state, allow_missing=(CONTROL_PREFIX,), source=str(TOY_BASE))
    # Everything but the ControlNet comes from the file: the UNet, VAE, text encoder, schedule and logvar.
    assert report.loaded == len(state) and all(k.startswith(CONTROL_PREFIX) for k in report.filled_from_model)
    for prefix in ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."):
        assert any(key.startswith(prefix) for key in state)
    assert "alphas_cumprod" in state and "betas" in state
    figures = json.loads(metadata["figures"])
    # The base follows its prompts (its own evaluation, printed by toy/train_base.py): chance is 1/6 for the
    # colour, 1/3 for the background and 1/54 for all three.
    samples = figures["samples"]
    assert samples["colour"] > 0.8 and samples["background"] > 0.95 and samples["all_three"] > 0.3
    assert figures["heldout_reconstruction"]["edge_f1_tolerant"] > 0.95


def test_standardize_latents_keeps_reconstructions_and_whitens_each_channel():
    torch.manual_seed(0)
    vae = create_model(TINY_CONFIG).first_stage_model
    images, _ = render_images(8, seed=0, split="train", resolution=64)
    with torch.no_grad():
        before = vae.encode(images)
        reconstruction = vae.decode(before.mode())
        means = encode_means(vae, images)
        latents = standardize_latents(vae, means, scale_factor=0.18215)
        after = vae.encode(images)
        torch.testing.assert_close(vae.decode(after.mode()), reconstruction, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(0.18215 * after.mean, latents, atol=1e-4, rtol=1e-4)
    gain = (after.mean.std(dim=(0, 2, 3)) / before.mean.std(dim=(0, 2, 3)))[None, :, None, None]
    torch.testing.assert_close(after.std, gain * before.std, atol=1e-6, rtol=1e-3)  # same noise relative to the mean
    scaled = 0.18215 * encode_means(vae, images)
    torch.testing.assert_close(scaled.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(scaled.std(dim=(0, 2, 3)), torch.ones(4), atol=1e-4, rtol=0)


def test_random_crops_cut_the_chosen_images():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    crops = random_crops(images, torch.tensor([1, 0, 1]), 4, torch.Generator().manual_seed(0))
    assert crops.shape == (3, 3, 4, 4)
    for crop, source in zip(crops, (1, 0, 1), strict=True):
        top, left = divmod(int(crop[0, 0, 0] - images[source, 0, 0, 0]), 8)
        torch.testing.assert_close(crop, images[source, :, top:top + 4, left:left + 4])


def test_train_base_smoke_run_writes_the_original_layout(tmp_path):
    output = tmp_path / "base.safetensors"
    status = train_base_main([
        "--config", str(TINY_CONFIG), "--output", str(output), "--samples", str(tmp_path / "samples.png"),
        "--train-images", "16", "--heldout-images", "4", "--vae-steps", "2", "--vae-batch-size", "2",
        "--unet-steps", "2", "--unet-batch-size", "4", "--samples-per-caption", "1", "--ddim-steps", "2",
        "--threads", "1"])
    assert status == 0
    state, metadata = read_checkpoint(output)
    load_weights(create_model(TINY_CONFIG), state, allow_missing=(CONTROL_PREFIX,), source=str(output))
    assert not any(key.startswith(CONTROL_PREFIX) for key in state)
    figures = json.loads(metadata["figures"])
    assert figures["samples"]["count"] == 54 and 0.0 <= figures["samples"]["colour"] <= 1.0
    assert json.loads(metadata["arguments"])["unet_steps"] == 2
    with safe_open(str(output), framework="pt") as f:
        assert all(f.get_slice(key).get_dtype() == "F32" for key in f.keys())
    assert (tmp_path / "samples.png").is_file()


def test_the_shape_reader_reads_the_shipped_vaes_reconstructions():
    """toy/classify.py is the measure of whether a generated image shows its edge map's shape, and a generated
    image comes out of the same VAE decoder: the reader must read the decoder's reconstruction of each photo as
    that photo's shape (by the fill of the bounding box alone, rounded triangle tips read as circles)."""
    model = create_model(TOY_CONFIG)
    load_weights(model, read_checkpoint(TOY_BASE)[0], allow_missing=(CONTROL_PREFIX,), source=str(TOY_BASE))
    images, captions = render_images(512, seed=0, split="heldout", resolution=64)
    vae = model.first_stage_model
    with torch.no_grad():
        reconstructions = torch.cat([vae.decode(vae.encode(chunk).mode()) for chunk in images.split(128)])
    pixels = ((reconstructions.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    wanted = [caption.split()[2] for caption in captions]
    read = [read_scene(image).shape for image in pixels]
    assert sum(r == w for r, w in zip(read, wanted, strict=True)) / len(wanted) >= 0.95  # 0.967 (fill alone: 0.924)
