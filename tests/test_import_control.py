"""Importing existing ControlNets: a diffusers ControlNetModel folder or a control-only file (ours, or one
in the layout of the released control_v11p_sd15_canny: bare keys, fp16) on top of an SD checkpoint, for
inference.py --ckpt CONTROL --sd-ckpt SD and training.py --init SD --init-control CONTROL."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from diffusers import ControlNetModel
from safetensors.torch import load_file, save_file

import inference
import tool_export
import training
from cldm.diffusers_format import controlnet_config
from cldm.inference_loading import load_base_and_control, load_for_inference
from cldm.model import load_config
from ldm.checkpoint import CheckpointError
from ldm.util import instantiate_from_config
from tests.export_helpers import (
    diffusers_residuals,
    fixed_inputs,
    our_residuals,
    random_checkpoint,
    tiny_model_config,
    train_tiny,
)
from tests.reference import TINY_CONFIG
from tests.training_helpers import IMAGE_SIZE, read_training_checkpoint, train_args


@pytest.fixture(scope="module")
def run(tmp_path_factory, init_path: Path, four_pairs: Path) -> Path:
    """last.ckpt of a real 2-step training run of the tiny model."""
    return train_tiny(init_path, four_pairs, tmp_path_factory.mktemp("run") / "run")


@pytest.fixture(scope="module")
def plain_sd(tmp_path_factory, init_path: Path) -> Path:
    """The tiny SD alone (no control_model.*), as a plain SD release is."""
    path = tmp_path_factory.mktemp("sd") / "sd_tiny.safetensors"
    save_file({k: v for k, v in load_file(str(init_path)).items() if not k.startswith("control_model.")}, str(path))
    return path


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory, run: Path) -> Path:
    folder = tmp_path_factory.mktemp("export") / "controlnet"
    assert tool_export.main([str(run), str(folder), "--format", "diffusers"]) == 0
    return folder


def _control_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = read_training_checkpoint(checkpoint)["state_dict"]
    return {k.removeprefix("control_model."): v for k, v in state.items() if k.startswith("control_model.")}


def test_diffusers_folder_round_trip(diffusers_folder: Path, run: Path, plain_sd: Path):
    model, lines = load_for_inference(diffusers_folder, TINY_CONFIG, plain_sd)
    assert any("diffusers checkpoint" in line for line in lines)
    original = load_for_inference(run)[0]
    inputs = fixed_inputs()
    for a, b in zip(our_residuals(model, inputs), our_residuals(original, inputs), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0.0)
    expected = _control_state(run)
    assert all(torch.equal(v, expected[k]) for k, v in model.control_model.state_dict().items())


def test_controlnet_made_by_diffusers_imports(tmp_path: Path, plain_sd: Path):
    """A folder that diffusers itself wrote (save_pretrained of a random ControlNetModel) loads into our
    ControlNet, and the two give the same residuals."""
    config = {k: v for k, v in controlnet_config(tiny_model_config()["params"]["control_stage_config"]["params"])
              .items() if not k.startswith("_")}
    torch.manual_seed(0)
    theirs = ControlNetModel(**config).eval()
    with torch.no_grad():
        for parameter in theirs.parameters():
            parameter.normal_(0, 0.1)
    theirs.save_pretrained(tmp_path / "made_by_diffusers")
    model = load_for_inference(tmp_path / "made_by_diffusers", TINY_CONFIG, plain_sd)[0]
    inputs = fixed_inputs()
    for a, b in zip(our_residuals(model, inputs), diffusers_residuals(theirs, inputs), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0.0)


class _ControlAtStart(L.Callback):
    """Keeps a copy of the ControlNet's weights as training starts (before the first step)."""

    def on_train_start(self, trainer, pl_module):
        self.weights = {k: v.detach().clone() for k, v in pl_module.model.control_model.state_dict().items()}


def _released_style(run: Path, path: Path) -> dict[str, torch.Tensor]:
    """The run's ControlNet as a released 1.1 file is: bare keys (no control_model.), fp16."""
    weights = {k: v.half() for k, v in _control_state(run).items()}
    if path.suffix == ".safetensors":
        save_file(weights, str(path))
    else:
        torch.save(weights, path)
    return weights


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_training_starts_from_a_released_controlnet(tmp_path: Path, run: Path, plain_sd: Path, four_pairs: Path,
                                                    suffix: str, capsys):
    control = tmp_path / f"control_v11p_tiny_canny{suffix}"
    weights = _released_style(run, control)
    start = _ControlAtStart()
    output = tmp_path / "finetune"
    argv = train_args(plain_sd, four_pairs, output, "--init-control", str(control), "--max-steps", "2",
                      "--batch-size", "2")
    assert training.main(argv, callbacks=[start]) == 0
    assert sorted(start.weights) == sorted(weights)
    assert all(torch.equal(start.weights[k], v.float()) for k, v in weights.items())
    assert str(control) in capsys.readouterr().out
    checkpoint = read_training_checkpoint(output / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 2
    assert checkpoint["hyper_parameters"]["init_control"] == str(control)
    trained = {k.removeprefix("control_model."): v for k, v in checkpoint["state_dict"].items()
               if k.startswith("control_model.")}
    assert any(not torch.equal(trained[k], v.float()) for k, v in weights.items())  # it trained


def test_training_from_a_diffusers_folder(tmp_path: Path, diffusers_folder: Path, run: Path, plain_sd: Path,
                                          four_pairs: Path):
    start = _ControlAtStart()
    argv = train_args(plain_sd, four_pairs, tmp_path / "out", "--init-control", str(diffusers_folder),
                      "--max-steps", "1", "--batch-size", "2")
    assert training.main(argv, callbacks=[start]) == 0
    expected = _control_state(run)
    assert all(torch.equal(v, expected[k]) for k, v in start.weights.items())


def test_init_control_needs_init(four_pairs: Path, tmp_path: Path, capsys):
    argv = ["--config", str(TINY_CONFIG), "--resume", "last", "--init-control", "c.safetensors", "--data",
            str(four_pairs), "--output-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_:
        training.main(argv)
    assert exit_.value.code == 2 and "--init-control needs --init" in capsys.readouterr().err


def test_inference_with_an_exported_control_file(tmp_path: Path, run: Path, plain_sd: Path, capsys):
    """The control export (fp16) carries its config: --ckpt CONTROL --sd-ckpt SD is enough."""
    control = tmp_path / "control.safetensors"
    assert tool_export.main([str(run), str(control)]) == 0
    hint = tmp_path / "hint.png"
    from PIL import Image

    Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE)).save(hint)
    output = tmp_path / "samples"
    argv = ["--ckpt", str(control), "--sd-ckpt", str(plain_sd), "--hint", str(hint), "--resolution",
            str(IMAGE_SIZE), "--steps", "1", "--seed", "3", "--output", str(output)]
    assert inference.main(argv) == 0
    assert "the one the control file carries" in capsys.readouterr().out
    assert (output / "seed3_sample0.png").is_file()
    model = load_for_inference(control, sd_ckpt_path=plain_sd)[0]
    expected = _control_state(run)
    assert all(torch.equal(v, expected[k].half().float()) for k, v in model.control_model.state_dict().items())


# ---- files that do not fit: the file and the mismatch named -----------------------------------------------
@pytest.mark.parametrize(("field", "value", "shown"), [
    ("block_out_channels", [64, 128], "block_out_channels is [64, 128], the config gives [32, 64]"),
    ("attention_head_dim", 8, "attention_head_dim is [8, 8], the config gives [4, 4]"),
    ("use_linear_projection", True, "use_linear_projection is True, the config gives False"),
])
def test_diffusers_config_disagreeing_with_the_yaml(tmp_path: Path, diffusers_folder: Path, plain_sd: Path,
                                                    four_pairs: Path, field: str, value, shown: str, capsys):
    folder = tmp_path / "controlnet"
    folder.mkdir()
    config = json.loads((diffusers_folder / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    weights = "diffusion_pytorch_model.safetensors"
    (folder / weights).symlink_to(diffusers_folder / weights)
    with pytest.raises(CheckpointError, match="config.json") as error:
        load_for_inference(folder, TINY_CONFIG, plain_sd)
    assert str(folder / "config.json") in str(error.value) and shown in str(error.value)
    output = tmp_path / "out"
    argv = train_args(plain_sd, four_pairs, output, "--init-control", str(folder), "--max-steps", "1",
                      "--batch-size", "2")
    capsys.readouterr()
    assert training.main(argv) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and shown in errors[0]
    assert not (output / "checkpoints").exists() or list((output / "checkpoints").iterdir()) == []


def test_control_file_of_another_size(tmp_path: Path, plain_sd: Path, four_pairs: Path, capsys):
    """A ControlNet of the SD 2.x-style layout (linear projections) against the SD 1.x-style config."""
    other = random_checkpoint(tmp_path / "sd2.ckpt", tiny_model_config(sd2_heads=True), sd_locked=True)
    control = tmp_path / "control_other.safetensors"
    assert tool_export.main([str(other), str(control)]) == 0
    with pytest.raises(CheckpointError) as error:
        load_for_inference(control, TINY_CONFIG, plain_sd)
    message = str(error.value)
    assert str(control) in message and "shape mismatches" in message
    assert "input_blocks.1.1.proj_in.weight: file [32, 32], model [32, 32, 1, 1]" in message
    argv = train_args(plain_sd, four_pairs, tmp_path / "out", "--init-control", str(control), "--max-steps", "1",
                      "--batch-size", "2")
    capsys.readouterr()
    assert training.main(argv) == 1
    assert str(control) in capsys.readouterr().err


@pytest.mark.parametrize("case", ["plain-sd", "folder-without-config"])
def test_not_a_controlnet(tmp_path: Path, plain_sd: Path, case: str):
    path = plain_sd if case == "plain-sd" else tmp_path
    model_config = load_config(TINY_CONFIG)["model"]
    with torch.device("meta"):
        model = instantiate_from_config(model_config)
    with pytest.raises(CheckpointError, match=str(path)):
        load_base_and_control(model, model_config, plain_sd, path)


def test_inference_with_a_released_style_file(tmp_path: Path, run: Path, plain_sd: Path):
    """Bare keys, fp16, no carried config (as control_v11p_sd15_canny.pth): --config says the model."""
    control = tmp_path / "control_v11p_tiny_canny.pth"
    weights = _released_style(run, control)
    model, lines = load_for_inference(control, TINY_CONFIG, plain_sd)
    assert any(f"config {TINY_CONFIG}" in line for line in lines)
    assert all(torch.equal(v, weights[k].float()) for k, v in model.control_model.state_dict().items())
    with pytest.raises(CheckpointError, match="--sd-ckpt"):
        load_for_inference(control, TINY_CONFIG)
