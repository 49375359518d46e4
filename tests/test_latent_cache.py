"""--cache-latents (trainer/latent_cache.py) on the tiny model (CPU): training from the cache equals training
without it, never reads the photos nor runs the VAE encoder or text encoder in a step, is rebuilt exactly
when its inputs change, resumes exactly, and works with DataLoader workers and the sample-grid logger."""

from __future__ import annotations

import json
import pickle
import shutil
import signal
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import default_collate

import training
from dataset import ControlDataset
from ldm.checkpoint import load_weights
from tests.reference import TINY_CONFIG
from tests.training_helpers import (
    IMAGE_SIZE,
    AtStep,
    logged_losses,
    read_training_checkpoint,
    send,
    tool_add_control_init,
    train_args,
)
from trainer.latent_cache import (
    CONTEXTS_FILE,
    FINGERPRINT_FILE,
    POSTERIOR_FILE,
    CachedControlDataset,
    LatentCache,
    LatentCacheError,
    build_latent_cache,
    latent_cache_fingerprint,
    stale_reason,
)
from trainer.logger import ImageLogger
from trainer.module import ControlNetTrainer, channels_first, training_model_config

CACHE = "latent_cache"
STEPS = 4  # four pairs, batch 2: two epochs, so the shuffled order and the prompt dropout vary
# The VAE encoder's output for an image depends on the other images of its batch through float summation
# order only (CPU convolutions; measured 3e-6 in the moments, 0 for the text encoder), and the cache is built
# in other batches than training uses. The losses of four steps then agree to 2e-7 (measured).
CACHE_ATOL = 1e-5
# AdamW divides each element's update by its gradient's running RMS: where a gradient is near zero, a 1e-6
# relative change of it can move that element's update by up to the learning rate (3e-3 here). Measured
# after four steps: 192 of 916,688 ControlNet values differ by more than 1e-5, at most by 1.3e-4, and the
# difference of the two runs' weight updates is 1.4e-4 of the updates' norm (whose largest element is 1.2e-2).
WEIGHT_ATOL = 5e-4
UPDATE_RTOL = 1e-3


class ForbidEncoders(L.Callback):
    """Within training (after the cache is built): the target photos are moved away, and the VAE encoder or
    the text encoder raise when called."""

    def __init__(self, data: Path):
        self.data = data

    def on_train_start(self, trainer, module):
        def refuse(*args, **kwargs):
            raise AssertionError("an encoder ran during training from the cache")

        module.model.encode_first_stage = refuse
        module.model.get_learned_conditioning = refuse
        (self.data / "target").rename(self.data / "target.away")

    def on_train_end(self, trainer, module):
        (self.data / "target.away").rename(self.data / "target")
        del module.model.encode_first_stage, module.model.get_learned_conditioning


def control_weights(output: Path) -> dict[str, torch.Tensor]:
    state = read_training_checkpoint(output / "checkpoints" / "last.ckpt")["state_dict"]
    return {key: value for key, value in state.items() if key.startswith("control_model.")}


def run_args(init: Path, data: Path, output: Path, *extra: str) -> list[str]:
    # A sample grid at step 2 in each run: the logger's reconstruction row works from the cache too.
    return train_args(init, data, output, "--batch-size", "2", "--max-steps", str(STEPS), "--logger-freq", "2",
                      "--sample-ddim-steps", "2", *extra)


@pytest.fixture(scope="module")
def without_cache(tmp_path_factory, init_path, four_pairs) -> Path:
    output = tmp_path_factory.mktemp("without_cache")
    assert training.main(run_args(init_path, four_pairs, output)) == 0
    return output


@pytest.fixture(scope="module")
def with_cache(tmp_path_factory, init_path, four_pairs, without_cache) -> Path:
    output = tmp_path_factory.mktemp("with_cache")
    status = training.main(run_args(init_path, four_pairs, output, "--cache-latents"),
                           callbacks=[ForbidEncoders(four_pairs)])
    assert status == 0
    return output


def test_training_from_the_cache_equals_training_without_it(with_cache, without_cache):
    expected, losses = logged_losses(without_cache), logged_losses(with_cache)
    assert sorted(losses) == sorted(expected) == list(range(STEPS))
    for step, loss in expected.items():
        assert losses[step] == pytest.approx(loss, abs=CACHE_ATOL), step
    weights, reference = control_weights(with_cache), control_weights(without_cache)
    assert weights.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(weights[key], value, atol=WEIGHT_ATOL, rtol=0, msg=key)
    initial = tool_add_control_init()
    updates, expected_updates = (torch.cat([(run[key] - initial[key]).flatten() for key in sorted(reference)])
                                 for run in (weights, reference))
    assert expected_updates.abs().max() > 10 * WEIGHT_ATOL  # training moved the ControlNet well beyond the bound
    assert (updates - expected_updates).norm() < UPDATE_RTOL * expected_updates.norm()
    # Both runs logged the same grid (reconstruction from the cached posterior mean, control, samples).
    for run in (with_cache, without_cache):
        assert (run / "samples" / "step-00000002.png").is_file()
    with Image.open(with_cache / "samples" / "step-00000002.png") as cached, \
            Image.open(without_cache / "samples" / "step-00000002.png") as plain:
        difference = np.abs(np.asarray(cached, dtype=np.int16) - np.asarray(plain, dtype=np.int16))
    assert difference.max() <= 1  # 8-bit rounding of values equal to about 1e-6


def test_cache_files_hold_the_encoders_outputs(with_cache, four_pairs, init_path):
    cache_dir = with_cache / CACHE
    assert sorted(path.name for path in cache_dir.iterdir()) == sorted(
        [POSTERIOR_FILE, CONTEXTS_FILE, "prompt_rows.npy", FINGERPRINT_FILE])
    dataset = CachedControlDataset(ControlDataset(four_pairs, resolution=IMAGE_SIZE), LatentCache(cache_dir))
    batch = default_collate([dataset[i] for i in range(len(dataset))])
    module = ControlNetTrainer(training_model_config(TINY_CONFIG))
    load_weights(module.model, load_file(str(init_path)))
    images = default_collate(list(ControlDataset(four_pairs, resolution=IMAGE_SIZE)))
    with torch.no_grad():
        moments = module.model.encode_first_stage(channels_first(images["jpg"], module.device)).parameters
        contexts = module.model.get_learned_conditioning(list(images["txt"]))
        empty = module.model.get_learned_conditioning([""] * len(dataset))
    torch.testing.assert_close(batch["posterior"], moments, atol=CACHE_ATOL, rtol=0)
    torch.testing.assert_close(batch["context"], contexts, atol=CACHE_ATOL, rtol=0)
    torch.testing.assert_close(batch["empty_context"], empty, atol=CACHE_ATOL, rtol=0)
    assert batch["txt"] == images["txt"]
    assert torch.equal(batch["hint"], images["hint"])
    # What a DataLoader worker started by "spawn" receives: the folder, not the mapped arrays.
    assert len(pickle.dumps(dataset.cache)) < 1000
    copy = pickle.loads(pickle.dumps(dataset))
    assert all(np.array_equal(copy[1][key], dataset[1][key]) for key in ("posterior", "context", "hint"))


def test_logger_grid_from_a_cached_batch(with_cache, four_pairs, init_path, tmp_path):
    module = ControlNetTrainer(training_model_config(TINY_CONFIG))
    load_weights(module.model, load_file(str(init_path)))
    pairs_dataset = ControlDataset(four_pairs, resolution=IMAGE_SIZE)
    cached = default_collate([CachedControlDataset(pairs_dataset, LatentCache(with_cache / CACHE))[i]
                              for i in range(2)])
    images = default_collate([pairs_dataset[i] for i in range(2)])
    generator = torch.Generator().manual_seed(0)
    from_cache = module.log_images(cached, ddim_steps=2, generator=generator)
    generator.manual_seed(0)
    from_images = module.log_images(images, ddim_steps=2, generator=generator)
    for name, value in from_images.items():
        torch.testing.assert_close(from_cache[name], value, atol=CACHE_ATOL, rtol=0, msg=name)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    ImageLogger(tmp_path, every_n_steps=1, ddim_steps=2).log_grid(trainer, module, cached, step=1)
    assert (tmp_path / "step-00000001.png").is_file()


def test_with_workers_the_cached_run_is_the_same(tmp_path, init_path, four_pairs, with_cache):
    output = tmp_path / "run"
    shutil.copytree(with_cache / CACHE, output / CACHE)
    assert training.main(run_args(init_path, four_pairs, output, "--cache-latents", "--num-workers", "2")) == 0
    assert logged_losses(output) == logged_losses(with_cache)


@pytest.mark.slow
def test_interrupted_cached_run_reuses_the_cache_and_resumes_exactly(tmp_path, init_path, four_pairs, with_cache,
                                                                     capsys):
    output = tmp_path / "run"
    argv = run_args(init_path, four_pairs, output, "--cache-latents")
    assert training.main(argv, callbacks=[AtStep(1, send(signal.SIGTERM))]) == 128 + signal.SIGTERM
    assert "latent cache: building" in capsys.readouterr().out
    built = (output / CACHE / FINGERPRINT_FILE).stat().st_mtime_ns
    assert training.main(argv + ["--resume", "last"], callbacks=[ForbidEncoders(four_pairs)]) == 0
    assert "latent cache: reusing" in capsys.readouterr().out
    assert (output / CACHE / FINGERPRINT_FILE).stat().st_mtime_ns == built
    assert logged_losses(output) == logged_losses(with_cache)  # exactly, step by step
    for key, value in control_weights(with_cache).items():
        assert torch.equal(control_weights(output)[key], value), key


def test_cache_dir_option_and_a_changed_prompt_rebuilds(tmp_path, init_path, four_pairs, capsys):
    data = tmp_path / "data"
    shutil.copytree(four_pairs, data)
    cache_dir = tmp_path / "elsewhere"
    argv = train_args(init_path, data, tmp_path / "run", "--batch-size", "2", "--max-steps", "1",
                      "--cache-latents", "--cache-dir", str(cache_dir))
    assert training.main(argv) == 0
    assert (cache_dir / FINGERPRINT_FILE).is_file() and not (tmp_path / "run" / CACHE).exists()
    prompt_file = data / "prompt.json"
    prompt_file.write_text(prompt_file.read_text().replace("pair 0", "a changed prompt"))
    shutil.rmtree(tmp_path / "run")
    capsys.readouterr()
    assert training.main(argv) == 0
    assert "latent cache: building" in (out := capsys.readouterr().out) and "changed since it was built: " \
        "prompt.json" in out


def test_the_fingerprint_names_what_changed(tmp_path, four_pairs, init_path):
    data = tmp_path / "data"
    shutil.copytree(four_pairs, data)
    dataset = ControlDataset(data, resolution=IMAGE_SIZE)
    config = training_model_config(TINY_CONFIG)
    module = ControlNetTrainer(config)
    load_weights(module.model, load_file(str(init_path)))
    model = module.model

    def fingerprint(precision: str = "32-true", resolution: int = IMAGE_SIZE):
        return latent_cache_fingerprint(ControlDataset(data, resolution=resolution), model, config, precision)

    cache_dir = tmp_path / "cache"
    assert stale_reason(cache_dir, fingerprint()) == "no complete cache there yet"
    build_latent_cache(cache_dir, dataset, model, fingerprint(), torch.device("cpu"), batch_size=3)
    assert stale_reason(cache_dir, fingerprint()) is None
    assert "resolution" in stale_reason(cache_dir, fingerprint(resolution=128))
    assert "precision" in stale_reason(cache_dir, fingerprint(precision="bf16-mixed"))

    # A changed target image (same name).
    Image.fromarray(np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)).save(data / "target" / "2.png")
    assert stale_reason(cache_dir, fingerprint()).endswith("changed since it was built: target images")
    build_latent_cache(cache_dir, dataset, model, fingerprint(), torch.device("cpu"), batch_size=3)
    # A changed VAE weight, then a changed text-encoder weight.
    for encoder, name in ((model.first_stage_model, "VAE"), (model.cond_stage_model, "text encoder")):
        weight = next(encoder.parameters())
        kept = weight.detach().clone()
        with torch.no_grad():
            weight[0] += 1e-3
        assert stale_reason(cache_dir, fingerprint()).endswith(f"changed since it was built: {name}")
        with torch.no_grad():
            weight.copy_(kept)
    assert stale_reason(cache_dir, fingerprint()) is None
    # An interrupted build (no fingerprint written yet) is no cache.
    (cache_dir / FINGERPRINT_FILE).unlink()
    assert stale_reason(cache_dir, fingerprint()) == "no complete cache there yet"
    with pytest.raises(LatentCacheError, match="no complete latent cache"):
        LatentCache(cache_dir)


def test_a_non_finite_encoding_names_the_images(tmp_path, four_pairs):
    module = ControlNetTrainer(training_model_config(TINY_CONFIG))
    with torch.no_grad():
        next(module.model.first_stage_model.parameters()).fill_(float("nan"))
    dataset = ControlDataset(four_pairs, resolution=IMAGE_SIZE)
    with pytest.raises(LatentCacheError, match="target/0.png, target/1.png"):
        build_latent_cache(tmp_path, dataset, module.model, {}, torch.device("cpu"), batch_size=2)
    assert not (tmp_path / FINGERPRINT_FILE).exists()


def test_cached_batches_hold_only_their_own_prompts_and_empty(with_cache, four_pairs):
    dataset = CachedControlDataset(ControlDataset(four_pairs, resolution=IMAGE_SIZE), LatentCache(with_cache / CACHE))
    batch = default_collate([dataset[0], dataset[1]])
    module = ControlNetTrainer(training_model_config(TINY_CONFIG))
    context = module.text_context(batch, ["", batch["txt"][1]])
    assert torch.equal(context[0], batch["empty_context"][0]) and torch.equal(context[1], batch["context"][1])
    with pytest.raises(ValueError, match="own prompts"):
        module.text_context(batch, ["another prompt", ""])


@pytest.mark.parametrize("extra, message", [
    (["--cache-latents", "--random-crop"], "one (centre) crop"),
    (["--cache-dir", "somewhere"], "give --cache-latents too"),
])
def test_option_errors(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit):
        training.parse_args(train_args(tmp_path / "init.ckpt", tmp_path, tmp_path / "run", *extra))
    assert message in capsys.readouterr().err


def test_cached_dataset_refuses_random_crops(with_cache, four_pairs):
    with pytest.raises(ValueError, match="centre crop"):
        CachedControlDataset(ControlDataset(four_pairs, resolution=IMAGE_SIZE, random_crop=True),
                             LatentCache(with_cache / CACHE))
    assert json.loads((with_cache / CACHE / FINGERPRINT_FILE).read_text())["resolution"] == IMAGE_SIZE
