"""tool_export.py: a trained checkpoint as the control-only file of A1111/ComfyUI, a diffusers folder and the
original layout. diffusers itself loads the diffusers export (the real client), and the residuals and UNet
output it computes are compared with ours."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file

import tool_export
from cldm.diffusers_format import controlnet_config, unet_config
from cldm.export import CLIP_POSITION_IDS, control_plan, inspect_source, original_plan
from cldm.inference_loading import load_for_inference
from cldm.model import load_config
from ldm.lazy_checkpoint import LazyCheckpoint, TensorSpec
from tests.export_helpers import (
    diffusers_residuals,
    fixed_inputs,
    our_residuals,
    random_checkpoint,
    relocked,
    tiny_model_config,
    train_tiny,
)
from tests.reference import TINY_CONFIG, manifest

MODELS = Path(__file__).resolve().parent.parent / "models"
PARITY = {"atol": 1e-5, "rtol": 0.0}


@pytest.fixture(scope="module")
def unlocked_run(tmp_path_factory, init_path: Path, four_pairs: Path) -> Path:
    """last.ckpt of a real 2-step training run that also trained the decoder (--no-sd-locked)."""
    return train_tiny(init_path, four_pairs, tmp_path_factory.mktemp("unlocked") / "run", "--no-sd-locked")


@pytest.fixture(scope="module")
def locked_run(tmp_path_factory, unlocked_run: Path) -> Path:
    return relocked(unlocked_run, tmp_path_factory.mktemp("locked") / "last.ckpt")


@pytest.fixture(scope="module")
def sd2_run(tmp_path_factory) -> Path:
    """An SD 2.x-style tiny checkpoint (a head count per block, linear projections), decoder trained."""
    return random_checkpoint(tmp_path_factory.mktemp("sd2") / "last.ckpt", tiny_model_config(sd2_heads=True),
                             sd_locked=False)


def _export(checkpoint: Path, output: Path, *extra: str) -> int:
    return tool_export.main([str(checkpoint), str(output), *extra])


def _our_model(checkpoint: Path):
    return load_for_inference(checkpoint)[0]


@pytest.mark.parametrize("run", ["locked_run", "sd2_run"])
def test_diffusers_controlnet_residuals_equal_ours(request, tmp_path: Path, run: str):
    checkpoint = request.getfixturevalue(run)
    folder = tmp_path / "controlnet"
    assert _export(checkpoint, folder, "--format", "diffusers") == 0
    controlnet = ControlNetModel.from_pretrained(folder, local_files_only=True).eval()
    model = _our_model(checkpoint)
    inputs = fixed_inputs()
    ours, theirs = our_residuals(model, inputs), diffusers_residuals(controlnet, inputs)
    assert len(ours) == len(theirs) == model.control_model.num_controls
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a.abs().max() > 1e-4, f"residual {i} is zero: the comparison would prove nothing"
        torch.testing.assert_close(b, a, **PARITY, msg=lambda m, i=i: f"residual {i}: {m}")
    # The head layout reached diffusers as written: SD 1.x one count, SD 2.x one per block.
    heads = json.loads((folder / "config.json").read_text())["attention_head_dim"]
    assert heads == ([4, 8] if run == "sd2_run" else 4)
    assert (folder / "unet").exists() == (run == "sd2_run")


@pytest.mark.parametrize("run", ["unlocked_run", "sd2_run"])
def test_diffusers_unet_with_residuals_equals_apply_model(request, tmp_path: Path, run: str):
    checkpoint = request.getfixturevalue(run)
    folder = tmp_path / "controlnet"
    assert _export(checkpoint, folder, "--format", "diffusers") == 0
    controlnet = ControlNetModel.from_pretrained(folder, local_files_only=True).eval()
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True).eval()
    model = _our_model(checkpoint)
    inputs = fixed_inputs()
    *down, mid = diffusers_residuals(controlnet, inputs)
    with torch.no_grad():
        theirs = unet(inputs["x"], inputs["t"], encoder_hidden_states=inputs["context"],
                      down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        ours = model.apply_model(inputs["x"], inputs["t"], {"c_crossattn": [inputs["context"]],
                                                            "c_concat": [inputs["hint"]]})
    torch.testing.assert_close(theirs, ours, **PARITY)


def test_trained_decoder_differs_from_the_base(unlocked_run: Path, init_path: Path):
    """The unlocked run's decoder really moved, so exporting it (unet/, NAME-sd) matters."""
    trained = torch.load(unlocked_run, map_location="cpu", weights_only=True)["state_dict"]
    base = load_file(str(init_path))
    key = "model.diffusion_model.out.2.weight"
    assert not torch.equal(trained[key], base[key])


def test_control_export_holds_the_control_weights_and_the_run_facts(tmp_path: Path, locked_run: Path):
    output = tmp_path / "control_tiny.safetensors"
    assert _export(locked_run, output) == 0
    trained = torch.load(locked_run, map_location="cpu", weights_only=True)
    control = {k: v for k, v in trained["state_dict"].items() if k.startswith("control_model.")}
    exported = load_file(str(output))
    assert sorted(exported) == sorted(control)
    assert all(v.dtype == torch.float16 for v in exported.values())
    assert all(torch.equal(exported[k], v.half()) for k, v in control.items())
    with safe_open(str(output), "pt") as file:
        metadata = file.metadata()
    assert json.loads(metadata["model_config"]) == trained["hyper_parameters"]["model_config"]
    assert metadata["steps"] == "2" and metadata["resolution"] == "64" and metadata["sd_locked"] == "true"
    assert metadata["base"] == trained["hyper_parameters"]["init"]
    assert not (tmp_path / "control_tiny-sd.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["control_tiny.safetensors"]  # no partial left


def test_control_export_fp32(tmp_path: Path, locked_run: Path):
    output = tmp_path / "control.safetensors"
    assert _export(locked_run, output, "--dtype", "fp32") == 0
    trained = torch.load(locked_run, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(v, trained[k]) for k, v in load_file(str(output)).items())


def test_unlocked_control_export_writes_its_sd_and_says_they_go_together(tmp_path: Path, unlocked_run: Path,
                                                                         capsys):
    output = tmp_path / "control.safetensors"
    assert _export(unlocked_run, output, "--dtype", "fp32") == 0
    out = capsys.readouterr().out
    assert "control-sd.safetensors" in out and "go together" in out
    trained = torch.load(unlocked_run, map_location="cpu", weights_only=True)["state_dict"]
    sd = load_file(str(tmp_path / "control-sd.safetensors"))
    assert sorted(sd) == sorted(k for k in trained if not k.startswith("control_model."))
    assert torch.equal(sd["model.diffusion_model.out.2.weight"], trained["model.diffusion_model.out.2.weight"])


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_original_export_is_the_whole_model_loaded_strictly(tmp_path: Path, locked_run: Path, suffix: str):
    output = tmp_path / f"full{suffix}"
    assert _export(locked_run, output, "--format", "original") == 0
    state = (torch.load(output, map_location="cpu", weights_only=True) if suffix == ".ckpt"
             else load_file(str(output)))
    trained = torch.load(locked_run, map_location="cpu", weights_only=True)["state_dict"]
    assert sorted(state) == sorted(trained)
    assert all(torch.equal(state[k], v) for k, v in trained.items())
    model = _our_model(locked_run)
    model.load_state_dict(state, strict=True)  # what the original's cldm code does with it


def test_original_export_with_clip_position_ids(tmp_path: Path, locked_run: Path):
    output = tmp_path / "full.ckpt"
    assert _export(locked_run, output, "--format", "original", "--clip-position-ids") == 0
    state = torch.load(output, map_location="cpu", weights_only=True)
    assert torch.equal(state[CLIP_POSITION_IDS], torch.arange(77)[None])


def _meta_checkpoint(version: str) -> LazyCheckpoint:
    """A full-size training checkpoint of models/cldm_{version}.yaml in shapes only: the reference
    manifest's keys and shapes, fp32, with its config as hyper_parameters; tensors are never read."""
    specs = {k: TensorSpec(shape, torch.float32) for k, shape in manifest(f"cldm_{version}_state_dict").items()}
    hyper_parameters = {"model_config": load_config(MODELS / f"cldm_{version}.yaml")["model"], "sd_locked": True}

    def unread(key: str) -> torch.Tensor:
        raise AssertionError(f"read {key}")

    return LazyCheckpoint(Path(f"cldm_{version}.ckpt"), specs, {"hyper_parameters": hyper_parameters,
                                                                "global_step": 1}, unread)


@pytest.mark.parametrize("version", ["v15", "v21"])
def test_full_size_control_and_original_layouts_are_the_manifest(version: str):
    source = inspect_source(_meta_checkpoint(version))
    expected = manifest(f"cldm_{version}_state_dict")
    control = {k: s.shape for k, s in control_plan(source, torch.float16).specs.items()}
    assert control == {k: s for k, s in expected.items() if k.startswith("control_model.")}
    assert len(control) == 340
    full = {k: s.shape for k, s in original_plan(source, torch.float32).specs.items()}
    assert full == expected


@pytest.mark.parametrize("version", ["v15", "v21"])
def test_full_size_diffusers_configs_are_diffusers_own_conversion(version: str):
    """Our UNet and ControlNet config.json fields for SD 1.5 / 2.1 equal what diffusers' own single-file
    converter derives from the same yaml (the SD 2.x head counts 5, 10, 20, 20 included). (Its ControlNet
    wrapper, create_controlnet_diffusers_config_from_ldm, fails in diffusers 0.42.1; it copies the
    UNet fields, so those are compared for the ControlNet.)"""
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    yaml_config = load_config(MODELS / f"cldm_{version}.yaml")
    params = yaml_config["model"]["params"]
    theirs = create_unet_diffusers_config_from_ldm(yaml_config, {}, image_size=512)
    ours = unet_config(params["unet_config"]["params"], params["image_size"])
    assert {k: ours[k] for k in theirs} == theirs
    control = controlnet_config(params["control_stage_config"]["params"])
    shared = [k for k in theirs if k in control]
    assert len(shared) >= 10
    assert {k: control[k] for k in shared} == {k: theirs[k] for k in shared}
    assert control["attention_head_dim"] == (8 if version == "v15" else [5, 10, 20, 20])
    assert control["use_linear_projection"] == (version == "v21")


@pytest.mark.slow
def test_full_size_control_file_written(tmp_path: Path):
    """The streamed control export of a full-size SD 1.5 checkpoint (zeros read tensor by tensor): 340
    fp16 tensors of the manifest's shapes in one .safetensors (723 MB)."""
    checkpoint = _meta_checkpoint("v15")
    checkpoint._read = lambda key: torch.zeros(checkpoint.specs[key].shape)
    from cldm.export import export

    output = tmp_path / "control_sd15.safetensors"
    export(inspect_source(checkpoint), output, "control")
    with safe_open(str(output), "pt") as file:
        shapes = {k: tuple(file.get_slice(k).get_shape()) for k in file.keys()}
        dtypes = {file.get_slice(k).get_dtype() for k in file.keys()}
    assert shapes == {k: s for k, s in manifest("cldm_v15_state_dict").items() if k.startswith("control_model.")}
    assert dtypes == {"F16"}


# ---- bad input: one line naming the file, exit 2, nothing written --------------------------------------
def _plain_sd(tmp_path: Path, init_path: Path) -> Path:
    path = tmp_path / "sd.safetensors"
    from safetensors.torch import save_file

    save_file({k: v for k, v in load_file(str(init_path)).items() if not k.startswith("control_model.")}, str(path))
    return path


@pytest.mark.parametrize("case", ["plain-sd", "control-only", "text", "wrong-shapes"])
def test_bad_checkpoint_is_one_line_and_nothing_written(tmp_path: Path, init_path: Path, locked_run: Path,
                                                       capsys, case: str):
    if case == "plain-sd":
        source, fragment = _plain_sd(tmp_path, init_path), "missing from the file"
    elif case == "control-only":
        source, fragment = tmp_path / "c.safetensors", "holds only a ControlNet"
        assert _export(locked_run, source) == 0
    elif case == "text":
        source, fragment = tmp_path / "notes.ckpt", "refused to load"
        source.write_text("not a checkpoint\n")
    else:  # a checkpoint whose config is SD 2.x-style but whose weights are the SD 1.x-style run's
        checkpoint = torch.load(locked_run, map_location="cpu", weights_only=True)
        checkpoint["hyper_parameters"]["model_config"] = tiny_model_config(sd2_heads=True)
        source, fragment = tmp_path / "mixed.ckpt", "shape mismatches"
        torch.save(checkpoint, source)
    out = tmp_path / "out"
    capsys.readouterr()
    for fmt, name in (("control", "x.safetensors"), ("diffusers", "folder"), ("original", "x.ckpt")):
        assert _export(source, out / name, "--format", fmt, "--config", str(TINY_CONFIG)) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error:" in line]
        assert len(errors) == 1 and source.name in errors[0] and "Traceback" not in err
        assert fragment in err
    assert not out.exists() or list(out.rglob("*")) == []


def test_failed_write_leaves_nothing(tmp_path: Path, locked_run: Path, monkeypatch):
    """An error while the files are written (here: the disk fills at the second diffusers file) removes
    what was written so far."""
    import cldm.export

    calls = []
    real = cldm.export.write_safetensors

    def failing(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(cldm.export, "write_safetensors", failing)
    checkpoint = random_checkpoint(tmp_path / "unlocked.ckpt", tiny_model_config(), sd_locked=False)
    out = tmp_path / "out"
    with pytest.raises(OSError):
        with cldm.export.open_source(checkpoint) as source:
            cldm.export.export(source, out / "folder", "diffusers")
    assert len(calls) == 2
    assert list(out.iterdir()) == []


def test_lightning_checkpoint_with_model_prefix(tmp_path: Path, locked_run: Path):
    """A Lightning module that holds the ControlLDM as `model` without our state_dict override saves
    `model.control_model.*`, `model.model.diffusion_model.*`, ...: the export reads those too."""
    checkpoint = torch.load(locked_run, map_location="cpu", weights_only=True)
    checkpoint["state_dict"] = {f"model.{k}": v for k, v in checkpoint["state_dict"].items()}
    prefixed = tmp_path / "prefixed.ckpt"
    torch.save(checkpoint, prefixed)
    assert _export(prefixed, tmp_path / "a.safetensors", "--dtype", "fp32") == 0
    assert _export(locked_run, tmp_path / "b.safetensors", "--dtype", "fp32") == 0
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("version", ["v15", "v21"])
def test_full_size_diffusers_layout_is_diffusers_models(version: str):
    """The full-size diffusers export's names and shapes are those of diffusers' own ControlNetModel and
    UNet2DConditionModel built from our config.json (on the meta device)."""
    from cldm.export import diffusers_controlnet_plan, diffusers_unet_plan

    source = inspect_source(_meta_checkpoint(version))
    for plan_of, model_class in ((diffusers_controlnet_plan, ControlNetModel),
                                 (diffusers_unet_plan, UNet2DConditionModel)):
        plan, config = plan_of(source, torch.float16)
        with torch.device("meta"):
            model = model_class.from_config(config)
        assert {k: s.shape for k, s in plan.specs.items()} == {k: tuple(v.shape)
                                                              for k, v in model.state_dict().items()}
