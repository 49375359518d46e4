"""inference.py on the tiny model: the three checkpoint kinds, the canny app's pipeline, the output files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import inference
from annotator.canny import CannyThresholds
from cldm.hint import control_from_photo, hint_tensor
from cldm.inference_loading import load_for_inference
from cldm.model import load_config
from ldm.checkpoint import CONTROL_PREFIX, CheckpointError
from ldm.models.diffusion.ddim import DDIMSampler
from tests.reference import TINY_CONFIG, TINY_WEIGHTS, tiny_vectors, tiny_weights

REPO = Path(__file__).resolve().parent.parent
SIZE = 64  # the tiny model's image size
FAST = ["--resolution", str(SIZE), "--steps", "2", "--seed", "7", "--num-samples", "2"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A photo, an edge map and the tiny weights as each checkpoint kind."""
    root = tmp_path_factory.mktemp("inference")
    rng = np.random.default_rng(0)
    photo = np.full((80, 96, 3), 40, np.uint8)
    photo[20:60, 25:70] = (200, 180, 30)  # a rectangle whose outline Canny finds
    photo += rng.integers(0, 10, photo.shape, dtype=np.uint8)
    Image.fromarray(photo).save(root / "photo.png")
    edges = np.zeros((SIZE, SIZE), np.uint8)
    edges[16, 8:56] = edges[48, 8:56] = edges[16:49, 8] = 255
    Image.fromarray(edges).save(root / "edges.png")

    weights = tiny_weights()
    training = root / "last.ckpt"
    torch.save({"state_dict": weights, "global_step": 30, "epoch": 1,
                "hyper_parameters": {"model_config": load_config(TINY_CONFIG)["model"], "lr": 1e-5}}, training)
    sd = root / "sd.ckpt"
    torch.save({"state_dict": {k: v for k, v in weights.items() if not k.startswith(CONTROL_PREFIX)}}, sd)
    control = root / "control.safetensors"
    save_file({k: v for k, v in weights.items() if k.startswith(CONTROL_PREFIX)}, str(control))
    bare = root / "control_bare.pth"
    torch.save({k.removeprefix(CONTROL_PREFIX): v for k, v in weights.items() if k.startswith(CONTROL_PREFIX)}, bare)
    return {"root": root, "photo": root / "photo.png", "edges": root / "edges.png", "training": training,
            "sd": sd, "control": control, "bare": bare}


def _run(*args: object) -> int:
    return inference.main([str(a) for a in args])


def _images(folder: Path, seed: int = 7) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob(f"seed{seed}_*.png"))}


def test_full_checkpoint_as_a_user_runs_it(files, tmp_path):
    """Subprocess, photo -> Canny -> samples; writes samples, the control and a grid of the asked size."""
    done = subprocess.run([sys.executable, "inference.py", "--ckpt", str(TINY_WEIGHTS), "--config",
                           str(TINY_CONFIG), "--image", str(files["photo"]), "--prompt", "a cat",
                           "--output", str(tmp_path), *FAST], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "full checkpoint" in done.stdout and "DDIM" in done.stderr  # the progress bar
    images = _images(tmp_path)
    assert set(images) == {"seed7_control.png", "seed7_sample0.png", "seed7_sample1.png", "seed7_grid.png"}
    for name in ("seed7_sample0.png", "seed7_sample1.png", "seed7_control.png"):
        assert images[name].shape == (SIZE, SIZE, 3)
    assert images["seed7_grid.png"].shape == (SIZE, 3 * SIZE, 3)
    photo = np.asarray(Image.open(files["photo"]).convert("RGB"))
    expected_control = control_from_photo(photo, SIZE, CannyThresholds(100, 200))
    assert np.array_equal(images["seed7_control.png"], expected_control) and expected_control.any()
    assert not np.array_equal(images["seed7_sample0.png"], images["seed7_sample1.png"])


def test_all_checkpoint_kinds_give_the_same_images(files, tmp_path):
    runs = {
        "full": ["--ckpt", TINY_WEIGHTS, "--config", TINY_CONFIG],
        "training": ["--ckpt", files["training"]],
        "control": ["--ckpt", files["control"], "--sd-ckpt", files["sd"], "--config", TINY_CONFIG],
        "bare": ["--ckpt", files["bare"], "--sd-ckpt", files["sd"], "--config", TINY_CONFIG],
    }
    results = {}
    for name, args in runs.items():
        assert _run(*args, "--hint", files["edges"], "--prompt", "a bird", "--output", tmp_path / name, *FAST) == 0
        results[name] = _images(tmp_path / name)
        assert results[name]["seed7_sample0.png"].shape == (SIZE, SIZE, 3)
    for name in ("training", "control", "bare"):
        for image, pixels in results["full"].items():
            assert np.array_equal(results[name][image], pixels), (name, image)


def test_loader_reports_the_kind_and_refuses_what_does_not_fit(files):
    model, lines = load_for_inference(files["training"])
    assert "training checkpoint" in lines[0] and not model.training
    _, lines = load_for_inference(files["control"], TINY_CONFIG, files["sd"])
    assert "control-only" in lines[0]
    with pytest.raises(CheckpointError, match="--sd-ckpt"):
        load_for_inference(files["control"], TINY_CONFIG)
    with pytest.raises(CheckpointError, match="only for control-only"):
        load_for_inference(TINY_WEIGHTS, TINY_CONFIG, files["sd"])

def test_loader_refuses_a_control_file_of_another_shape(files, tmp_path):
    weights = {k: v for k, v in tiny_weights().items() if k.startswith(CONTROL_PREFIX)}
    key = "control_model.input_hint_block.0.weight"
    weights[key] = torch.zeros(16, 1, 3, 3)  # a one-channel hint
    path = tmp_path / "other.safetensors"
    save_file(weights, str(path))
    with pytest.raises(CheckpointError, match=r"shape mismatches[\s\S]*input_hint_block.0.weight: file \[16, 1"):
        load_for_inference(path, TINY_CONFIG, files["sd"])


def test_errors_are_reported_not_raised(files, tmp_path, capsys):
    assert _run("--ckpt", files["control"], "--config", TINY_CONFIG, "--hint", files["edges"],
                "--output", tmp_path, *FAST) == 1
    assert "--sd-ckpt" in capsys.readouterr().err
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    assert _run("--ckpt", TINY_WEIGHTS, "--config", TINY_CONFIG, "--hint", not_an_image, *FAST) == 1
    assert "notes.png" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _run("--ckpt", TINY_WEIGHTS, "--hint", files["edges"], "--resolution", "100")
    assert "multiple of 64" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_model():
    model, _ = load_for_inference(TINY_WEIGHTS, TINY_CONFIG)
    return model


def test_guess_mode_scales_come_from_the_model():
    scales = inference.control_scales(13, 1.0, guess_mode=True)
    reference = tiny_vectors()["guess_mode_control_scales"]
    torch.testing.assert_close(torch.tensor(scales, dtype=torch.float32), reference)
    five = inference.control_scales(5, 0.5, guess_mode=True)
    assert five[-1] == 0.5 and five[0] == pytest.approx(0.5 * 0.825**4)
    assert inference.control_scales(5, 0.7, guess_mode=False) == [0.7] * 5


def test_generate_api(tiny_model):
    control = np.zeros((SIZE, 2 * SIZE, 3), np.uint8)
    control[20:40, 30:90] = 255
    kwargs = dict(num_samples=1, steps=2, seed=3, progress=False)
    first = inference.generate(tiny_model, control, "a cat", **kwargs)
    again = inference.generate(tiny_model, control, "a cat", **kwargs)
    assert len(first) == 1 and first[0].size == (2 * SIZE, SIZE) and first[0].mode == "RGB"
    assert np.array_equal(np.asarray(first[0]), np.asarray(again[0]))
    before = list(tiny_model.control_scales)
    guessed = inference.generate(tiny_model, control, "", guess_mode=True, strength=0.5, **kwargs)
    assert tiny_model.control_scales == before  # strength is an argument of the call, never model state
    assert not np.array_equal(np.asarray(first[0]), np.asarray(guessed[0]))


def test_generate_follows_the_canny_app(tiny_model, monkeypatch):
    """Conditioning as the original app builds it: prompt + a_prompt, n_prompt; hint in [0, 1] in both
    branches, none in the unconditional one in guess mode; control scales passed to the sampler."""
    seen = []

    def fake_sample(self, S, batch_size, shape, conditioning, **kwargs):
        seen.append((S, batch_size, shape, conditioning, kwargs, kwargs["control_scales"]))
        return torch.zeros(batch_size, *shape), {}

    monkeypatch.setattr(DDIMSampler, "sample", fake_sample)
    prompts = []
    real = tiny_model.get_learned_conditioning
    monkeypatch.setattr(tiny_model, "get_learned_conditioning", lambda p: prompts.append(p) or real(p))
    control = np.full((SIZE, SIZE, 3), 255, np.uint8)
    inference.generate(tiny_model, control, "a cat", num_samples=2, steps=5, scale=7.5, eta=0.1, progress=False)
    inference.generate(tiny_model, control, "", guess_mode=True, strength=2.0, num_samples=1, progress=False)
    (steps, batch, shape, cond, kwargs, scales), guess = seen
    assert (steps, batch, shape) == (5, 2, (4, SIZE // 8, SIZE // 8))
    assert prompts[:2] == [["a cat, " + inference.A_PROMPT] * 2, [inference.N_PROMPT] * 2]
    torch.testing.assert_close(cond["c_concat"][0], hint_tensor(control, 2))
    assert float(cond["c_concat"][0].max()) == 1.0
    assert kwargs["unconditional_guidance_scale"] == 7.5 and kwargs["eta"] == 0.1
    assert kwargs["unconditional_conditioning"]["c_concat"][0] is cond["c_concat"][0]
    assert scales == [1.0] * 5
    assert guess[4]["unconditional_conditioning"]["c_concat"] is None
    assert guess[5] == inference.control_scales(5, 2.0, guess_mode=True)
    assert tiny_model.control_scales == [1.0] * 5


def test_help():
    done = subprocess.run([sys.executable, "inference.py", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0
    for flag in ("--ckpt", "--image", "--hint", "--guess-mode", "--low-threshold", "--precision", "--sd-ckpt"):
        assert flag in done.stdout
