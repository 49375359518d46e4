"""Control types beyond Canny (annotator.controls, annotator.depth): the registry refuses unknown types and
settings by name; each annotator is a fixed function of (photo, settings, key); the depth and normal ones run
a transformers depth model (a tiny random DPT saved with save_pretrained, the real format) in batches; and
for every type a dataset built with prepare_dataset.py --control trains two steps and inference.py --image
makes its control image with the annotator the checkpoint records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import evaluate
import inference
import prepare_dataset
import training
from annotator import read_image_rgb
from annotator.controls import (
    CONTROL_TYPES,
    ControlSettingsError,
    NormalSettings,
    get_control,
    parse_control_record,
)
from annotator.depth import normal_image
from annotator.models import load_annotator
from bench.control_types import write_hed_weights, write_tiny_depth_model, write_tiny_seg_model
from cldm.hint import control_from_record
from cldm.inference_loading import control_record_of
from dataset import CONTROL_FILE, ControlDataset, read_control_record
from evaluation.control_metrics import METRIC_OF_TYPE, normal_angle_degrees, score
from tests.image_cases import photo
from tests.reference import TINY_CONFIG
from tests.training_helpers import IMAGE_SIZE, train_args

PHOTOS = 6


@pytest.fixture(scope="module")
def tiny_depth_model(tmp_path_factory) -> Path:
    """A randomly initialised DPT depth model and its image processor, as save_pretrained writes them."""
    return write_tiny_depth_model(tmp_path_factory.mktemp("tiny-dpt"))


@pytest.fixture(scope="module")
def tiny_segmentation_model(tmp_path_factory) -> Path:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    folder = tmp_path_factory.mktemp("tiny-segformer")
    config = SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
                             num_attention_heads=[1, 1], decoder_hidden_size=16, num_labels=3)
    SegformerForSemanticSegmentation(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_ade_model(tmp_path_factory) -> Path:
    """A tiny random SegFormer with ADE20K's 150 classes and its image processor (save_pretrained)."""
    return write_tiny_seg_model(tmp_path_factory.mktemp("tiny-ade"))


@pytest.fixture(scope="module")
def hed_weights(tmp_path_factory) -> Path:
    """Random weights in the released ControlNetHED.pth layout (a plain state dict saved by torch.save)."""
    import torch

    torch.manual_seed(0)
    return write_hed_weights(tmp_path_factory.mktemp("hed") / "ControlNetHED.pth")


@pytest.fixture(scope="module")
def annotator_models(tiny_depth_model, tiny_ade_model, hed_weights) -> dict[str, Path]:
    return {"depth": tiny_depth_model, "normal": tiny_depth_model, "seg": tiny_ade_model, "softedge": hed_weights}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for index in range(PHOTOS):
        Image.fromarray(photo(80, IMAGE_SIZE, seed=index)).save(folder / f"p{index}.jpg", quality=95)
        (folder / f"p{index}.txt").write_text(f"photo {index}\n", encoding="utf-8")
    return folder


# ------------------------------------------------------------------------------------------ registry


def test_unknown_types_and_settings_are_refused_by_name():
    with pytest.raises(ControlSettingsError, match=r"unknown control type 'bogus' \(known: canny, scribble, tile"):
        get_control("bogus")
    with pytest.raises(ControlSettingsError, match="control 'tile' has no setting lvl"):
        get_control("tile").settings_from({"lvl": 2})
    with pytest.raises(ControlSettingsError, match="control 'tile': level must be from 1 to 6, got 9"):
        get_control("tile").settings_from({"level": 9})
    with pytest.raises(ControlSettingsError, match="min_width <= max_width"):
        get_control("scribble").settings_from({"min_width": 30})


def test_a_record_round_trips_and_no_record_is_canny():
    control = get_control("tile")
    record = control.record(control.settings_from({"level": 2}))
    assert parse_control_record(json.loads(json.dumps(record)))[:2] == (control, control.settings_from({"level": 2}))
    canny, settings, model = parse_control_record(None)
    assert canny.name == "canny" and (settings.low, settings.high, settings.random) == (100, 200, False)


@pytest.mark.parametrize("name", [name for name, control in CONTROL_TYPES.items() if not control.model_based])
def test_weight_free_annotators_are_fixed_functions_of_photo_settings_and_key(name):
    control = get_control(name)
    image = photo(96, 80, seed=3)
    settings = control.settings_from()
    first = control.annotate(image, settings, "a.jpg")
    assert first.dtype == np.uint8 and first.shape[:2] == image.shape[:2]
    assert np.array_equal(first, control.annotate(image, settings, "a.jpg"))


def test_scribble_strokes_are_thicker_than_edges_and_vary_by_photo():
    control = get_control("scribble")
    image = photo(256, 256, seed=4)
    widths = set()
    for key in ("a", "b", "c", "d"):
        strokes = control.annotate(image, control.settings_from(), key)
        assert set(np.unique(strokes)) <= {0, 255}
        widths.add(int((strokes > 0).sum()))
    assert len(widths) > 1  # the stroke width is drawn per photo


def test_tile_is_a_blurred_copy_of_the_photo():
    control = get_control("tile")
    image = np.asarray(Image.fromarray(photo(128, 128, seed=5)).resize((128, 128)))
    tile = control.annotate(image, control.settings_from({"noise": 0.0}), "k").astype(np.float64)
    assert np.abs(tile.mean() - image.mean()) < 3  # the same picture ...
    assert np.abs(np.diff(tile, axis=1)).mean() < 0.5 * np.abs(np.diff(image.astype(np.float64), axis=1)).mean()


# ------------------------------------------------------------------------------------------ depth models


def test_depth_and_normal_run_a_transformers_depth_model_in_batches(tiny_depth_model):
    photos_ = [photo(96, 64, seed=1), photo(64, 80, seed=2)]
    depth = load_annotator(get_control("depth"), get_control("depth").settings_from(), str(tiny_depth_model))(photos_)
    assert [d.shape for d in depth] == [(64, 96), (80, 64)] and all(d.dtype == np.uint8 for d in depth)
    assert all(d.min() == 0 and d.max() == 255 for d in depth)  # each scaled between its own extremes
    normal = load_annotator(get_control("normal"), NormalSettings(), str(tiny_depth_model))(photos_)
    assert [n.shape for n in normal] == [(64, 96, 3), (80, 64, 3)]


def test_normals_follow_controlnet_1_0s_formula():
    depth = np.tile(np.linspace(0.0, 1.0, 32, dtype=np.float32), (16, 1))  # a slope along x
    image = normal_image(depth, NormalSettings(background=0.0))
    # Stored as the model was fed (channels reversed): z first, then y, then x.
    z, y, x = (image[8, 16].astype(np.float64) - 127.5) / 127.5
    slope = 8 * (1.0 / 31)  # Sobel's 3x3 x-derivative of a unit-spaced ramp
    assert abs(y) < 0.01 and x > 0 and z > 0
    assert abs(x / z - slope / (np.pi * 2.0)) < 0.01


def test_each_metric_is_best_for_a_perfect_reading():
    image = np.stack([photo(64, 64, seed=7)] * 1)[0]
    assert score("ssim", image, image) == pytest.approx(1.0)
    assert score("depth-rmse", image, image) == 0.0
    assert normal_angle_degrees(image, image) == pytest.approx(0.0, abs=1e-3)
    other = photo(64, 64, seed=8)
    assert score("ssim", image, other) < 0.9 and score("depth-rmse", image, other) > 0.05
    flipped = 255 - image
    assert normal_angle_degrees(image, flipped) > 90  # opposite normals


def test_seg_colours_ade20k_classes_and_reads_them_back(tiny_ade_model):
    from annotator.segmentation import ADE20K_PALETTE, classes_of

    [seg] = load_annotator(get_control("seg"), get_control("seg").settings_from(), str(tiny_ade_model))(
        [photo(96, 64, seed=3)])
    assert seg.shape == (64, 96, 3)
    colours = {tuple(c) for c in seg.reshape(-1, 3)}
    assert colours <= {tuple(c) for c in ADE20K_PALETTE}
    assert (classes_of(seg) >= 0).all()
    assert classes_of(ADE20K_PALETTE[None, :3])[0].tolist() == [0, 1, 2]  # wall, building, sky


def test_seg_miou_counts_classes_over_the_whole_set():
    from annotator.segmentation import ADE20K_PALETTE
    from evaluation.control_metrics import mean_iou

    a = ADE20K_PALETTE[np.array([[0, 0], [2, 2]])]
    b = ADE20K_PALETTE[np.array([[0, 2], [2, 2]])]
    assert mean_iou([a], [a]) == 1.0
    assert mean_iou([a], [b]) == pytest.approx((1 / 2 + 2 / 3) / 2)  # wall: 1 of 2, sky: 2 of 3


def test_an_ade_model_is_needed_for_seg(tiny_segmentation_model):
    with pytest.raises(ControlSettingsError, match="has 3 classes; the seg control colours ADE20K's 150"):
        load_annotator(get_control("seg"), get_control("seg").settings_from(), str(tiny_segmentation_model))


def test_hed_loads_the_released_layout_and_refuses_others(hed_weights, tmp_path):
    import torch

    from annotator.controls import SoftEdgeSettings

    [edges] = load_annotator(get_control("softedge"), SoftEdgeSettings(), str(hed_weights))([photo(96, 64, seed=2)])
    assert edges.shape == (64, 96) and edges.dtype == np.uint8
    [safe] = load_annotator(get_control("softedge"), SoftEdgeSettings(safe=True), str(hed_weights))(
        [photo(96, 64, seed=2)])
    assert set(np.unique(safe)) <= {0, 127, 255}
    state = torch.load(hed_weights, weights_only=True)
    state["block6.projection.weight"] = state.pop("block5.projection.weight")
    torch.save(state, tmp_path / "other.pth")
    with pytest.raises(ControlSettingsError, match=r"not ControlNet 1.1's HED .*missing block5.projection.weight"):
        load_annotator(get_control("softedge"), SoftEdgeSettings(), str(tmp_path / "other.pth"))


def test_a_segmentation_model_given_as_depth_is_refused(tiny_segmentation_model):
    with pytest.raises(ControlSettingsError, match="is not a depth-estimation model .*Segformer"):
        load_annotator(get_control("depth"), get_control("depth").settings_from(), str(tiny_segmentation_model))


# ------------------------------------------------------------------------------------------ end to end


def pooled_config(folder: Path) -> Path:
    """The tiny model's config with ControlNet 1.1's global average pooling (what shuffle needs)."""
    from omegaconf import OmegaConf

    config = OmegaConf.load(TINY_CONFIG)
    config.model.params.global_average_pooling = True
    path = folder / "cldm_tiny_avg_pool.yaml"
    OmegaConf.save(config, path)
    return path


def build(photos: Path, output: Path, *options: str) -> int:
    return prepare_dataset.main(["--input", str(photos), "--output", str(output), "--captions-from-txt",
                                 "--workers", "0", "--resolution", str(IMAGE_SIZE), *options])


def control_options(name: str, models: dict[str, Path]) -> list[str]:
    options = ["--control", name]
    if get_control(name).model_based:
        options += ["--annotator-model", str(models[name]), "--device", "cpu"]
    if name == "tile":
        options += ["--control-option", "level=2"]
    return options


@pytest.mark.parametrize("name", list(CONTROL_TYPES))
def test_each_type_builds_trains_and_infers_with_its_recorded_annotator(name, photos, annotator_models, init_path,
                                                                        tmp_path, capsys):
    data = tmp_path / "data"
    assert build(photos, data, *control_options(name, annotator_models)) == 0
    record = read_control_record(data)
    assert record["name"] == name
    assert json.loads((data / CONTROL_FILE).read_text())["model"] == (
        str(annotator_models[name]) if get_control(name).model_based else None)
    assert len(ControlDataset(data, resolution=IMAGE_SIZE)) == PHOTOS

    run = tmp_path / "run"
    config = ["--config", str(pooled_config(tmp_path))] if get_control(name).model_options else []
    assert training.main(train_args(init_path, data, run, "--batch-size", "2", "--max-steps", "2", *config)) == 0
    checkpoint = run / "checkpoints" / "last.ckpt"
    assert control_record_of(checkpoint) == record

    capsys.readouterr()
    out = tmp_path / "samples"
    assert inference.main(["--ckpt", str(checkpoint), "--image", str(photos / "p0.jpg"), "--resolution",
                           str(IMAGE_SIZE), "--steps", "1", "--output", str(out), "--device", "cpu",
                           "--seed", "1"]) == 0
    made = np.asarray(Image.open(out / "seed1_control.png"))
    control, settings, model = parse_control_record(record)
    pixels = read_image_rgb(photos / "p0.jpg").pixels
    assert np.array_equal(made, control_from_record(pixels, IMAGE_SIZE, control, settings, model))
    if name != "canny":
        assert f"control: {name}" in capsys.readouterr().out

    scores = tmp_path / "scores.json"
    assert evaluate.main(["--ckpt", str(checkpoint), "--dataset", str(data), "--steps", "1", "--json", str(scores),
                          "--grid", str(tmp_path / "grid.png"), "--device", "cpu", "--quiet"]) == 0
    result = json.loads(scores.read_text())
    if name == "canny":
        assert 0 <= result["f1"] <= 1
    else:
        assert (result["control"], result["metric"]) == (name, METRIC_OF_TYPE[name])
        assert result["pairs"] == PHOTOS and np.isfinite(result["score"])
        assert Image.open(tmp_path / "grid.png").size == (3 * (IMAGE_SIZE + 2) + 2, PHOTOS * (IMAGE_SIZE + 2) + 2)


def test_bad_control_options_are_refused_before_anything_is_written(photos, tmp_path, capsys):
    for options, message in ((["--control", "tile", "--control-option", "lvl=2"], "has no setting lvl"),
                             (["--control", "tile", "--annotator-model", "x"], "uses no model"),
                             (["--control-option", "level=2"], "canny takes --canny-low")):
        with pytest.raises(SystemExit) as exit_info:
            build(photos, tmp_path / "data", *options)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "data").exists()


def test_loading_a_transformers_model_leaves_torchs_meta_device_working(tiny_depth_model):
    # Run in a fresh process: transformers' from_pretrained patches torch.linspace while building the model,
    # and a process whose first `with torch.device(...)` happens then would keep the patched function.
    import subprocess
    import sys

    probe = ("import torch, sys\n"
             "from annotator.controls import get_control\nfrom annotator.models import load_annotator\n"
             "load_annotator(get_control('depth'), get_control('depth').settings_from(), sys.argv[1])\n"
             "with torch.device('meta'):\n    print(torch.linspace(0, 1, 3).device)\n")
    result = subprocess.run([sys.executable, "-c", probe, str(tiny_depth_model)], capture_output=True, text=True,
                            timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip().splitlines()[-1] == "meta", result.stderr[-2000:]


def test_inpaint_hints_are_the_photo_with_minus_one_where_masked(photos, tmp_path):
    # ControlNet 1.1's inpaint convention: the control is the photo in [0, 1] and -1 on the pixels to fill.
    data = tmp_path / "data"
    assert build(photos, data, "--control", "inpaint") == 0
    item = ControlDataset(data, resolution=IMAGE_SIZE)[0]
    hint, target = item["hint"], (item["jpg"] + 1.0) / 2.0
    masked = (hint == -1.0).all(axis=2)
    assert 0 < masked.mean() < 1
    assert ((hint >= 0) | masked[..., None]).all()
    assert np.abs(hint[~masked] - target[~masked]).max() < 0.08  # the photo itself (JPEG vs PNG copy)
    from cldm.hint import hint_tensor

    rgba = np.asarray(Image.open(data / "source" / "p0.png"))
    assert rgba.shape[2] == 4
    tensor = hint_tensor(rgba, batch_size=2)
    assert tensor.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE) and tensor.min() == -1.0


def test_inpaint_masks_are_fixed_by_key_and_vary_between_photos():
    from annotator.controls import InpaintSettings, inpaint_mask

    first = inpaint_mask(64, 96, InpaintSettings(), "a")
    assert np.array_equal(first, inpaint_mask(64, 96, InpaintSettings(), "a"))
    assert not np.array_equal(first, inpaint_mask(64, 96, InpaintSettings(), "b"))
    coverage = [inpaint_mask(128, 128, InpaintSettings(), str(key)).mean() for key in range(20)]
    assert 0.02 < np.mean(coverage) < 0.7


def test_shuffle_needs_a_pooled_config_and_the_pooled_model_controls_the_conditional_half(photos, init_path, tmp_path,
                                                                                            capsys):
    import torch

    from cldm.model import create_model
    from cldm.sampling import sample_images

    data = tmp_path / "data"
    assert build(photos, data, "--control", "shuffle") == 0
    assert training.main(train_args(init_path, data, tmp_path / "run", "--max-steps", "1")) == 2
    assert "control 'shuffle' needs `global_average_pooling: True`" in capsys.readouterr().err

    torch.manual_seed(0)
    model = create_model(str(pooled_config(tmp_path))).eval()
    assert model.global_average_pooling
    hint = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    context = model.get_learned_conditioning([""])
    residuals = []
    model.model.diffusion_model.register_forward_pre_hook(
        lambda module, args, kwargs: residuals.append(kwargs["control"]), with_kwargs=True)
    model.apply_model(torch.randn(1, 4, 8, 8), torch.tensor([10]), {"c_crossattn": [context], "c_concat": [hint]})
    assert residuals[0] and all(c.shape[2:] == (1, 1) for c in residuals[0])  # each pooled over H and W
    calls = []
    model.control_model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["x"].shape[0]),
                                                  with_kwargs=True)
    sample_images(model, hint, ["a"], steps=1, guidance_scale=3.0, noise=torch.randn(1, 4, 8, 8))
    assert calls and all(batch == 1 for batch in calls)  # the ControlNet saw the conditional half only


def test_a_dataset_holds_several_control_types(photos, init_path, tmp_path, capsys):
    from dataset.control_dataset import dataset_controls

    data = tmp_path / "data"
    assert build(photos, data) == 0  # Canny, in source/
    canny_sources = {path.name: path.read_bytes() for path in (data / "source").iterdir()}
    assert build(photos, data, "--control", "tile", "--control-option", "level=2") == 0
    assert "adding tile control images" in capsys.readouterr().out
    assert dataset_controls(data) == {"canny": "source", "tile": "source_tile"}
    assert {path.name: path.read_bytes() for path in (data / "source").iterdir()} == canny_sources
    assert len(list((data / "source_tile").glob("*.png"))) == PHOTOS
    assert read_control_record(data, "tile")["settings"]["level"] == 2
    assert read_control_record(data) is not None and read_control_record(data)["name"] == "canny"
    tile_items = ControlDataset(data, resolution=IMAGE_SIZE, control="tile")
    canny_items = ControlDataset(data, resolution=IMAGE_SIZE)
    assert tile_items[0]["txt"] == canny_items[0]["txt"] and not np.array_equal(tile_items[0]["hint"],
                                                                                  canny_items[0]["hint"])
    # Adding again continues (nothing to redo); rebuilding the Canny set keeps the added type listed.
    assert build(photos, data, "--control", "tile", "--control-option", "level=2") == 0
    assert "0 control images written, 6 there already" in capsys.readouterr().out
    assert build(photos, data) == 0
    assert dataset_controls(data) == {"canny": "source", "tile": "source_tile"}

    run = tmp_path / "run"
    assert training.main(train_args(init_path, data, run, "--max-steps", "1", "--control", "tile")) == 0
    assert control_record_of(run / "checkpoints" / "last.ckpt")["name"] == "tile"
    with pytest.raises(Exception, match="holds no depth control images .*it has: canny, tile"):
        ControlDataset(data, control="depth")


def test_canny_datasets_and_checkpoints_from_before_records_work_as_before(photos, tmp_path):
    import shutil

    from cldm.hint import control_from_photo

    data = tmp_path / "data"
    assert build(photos, data) == 0
    recorded = ControlDataset(data, resolution=IMAGE_SIZE)
    (data / CONTROL_FILE).unlink()  # a dataset built before control records
    settings = json.loads((data / ".build" / "settings.json").read_text())
    assert "control" not in settings  # Canny builds record no control: older builds resume unchanged
    old = ControlDataset(data, resolution=IMAGE_SIZE)
    assert old.control == "canny" and old.control_record is None
    for index in range(PHOTOS):
        assert np.array_equal(old[index]["hint"], recorded[index]["hint"])
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    assert build(photos, copy) == 0  # the same command resumes the old build, nothing redone
    assert all((copy / "source" / p.name).read_bytes() == p.read_bytes() for p in (data / "source").iterdir())
    # A checkpoint without a record (tool_add_control output, older training runs) is Canny 100/200.
    control, settings_, model = parse_control_record(None)
    pixels = read_image_rgb(photos / "p0.jpg").pixels
    assert np.array_equal(control_from_record(pixels, IMAGE_SIZE, control, settings_, model),
                          control_from_photo(pixels, IMAGE_SIZE))


def test_a_model_based_build_resumes_and_only_annotates_new_photos(tiny_depth_model, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(6):
        Image.fromarray(photo(80, IMAGE_SIZE, seed=index)).save(photos / f"p{index}.jpg", quality=95)
        (photos / f"p{index}.txt").write_text(f"photo {index}\n", encoding="utf-8")
    later = [photos / f"p{index}.{suffix}" for index in range(3, 6) for suffix in ("jpg", "txt")]
    hidden = tmp_path / "later"
    hidden.mkdir()
    for path in later:
        path.rename(hidden / path.name)
    data = tmp_path / "data"
    options = ["--control", "depth", "--annotator-model", str(tiny_depth_model), "--device", "cpu",
               "--batch-size", "2"]
    assert build(photos, data, *options) == 0
    first = {path.name: path.stat().st_mtime_ns for path in (data / "source").iterdir()}
    for path in hidden.iterdir():
        path.rename(photos / path.name)
    capsys.readouterr()
    assert build(photos, data, *options) == 0
    assert "6 input files in this shard, 3 done by an earlier run; this run: 3 pairs written" in capsys.readouterr().out
    assert {name: (data / "source" / name).stat().st_mtime_ns for name in first} == first
    assert len(list((data / "source").glob("*.png"))) == 6
