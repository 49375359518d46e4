"""ControlNet++'s Canny protocol (evaluation.controlnetpp, evaluate.py --protocol controlnetpp).

The trusted side is a direct transcription, in this file, of what ControlNet++'s eval/eval.py and
eval/eval_edge.py do with the images: torchvision's pil_to_tensor / 255, kornia's canny, to_pil_image 'L',
PNG files written and read back as 'L', 255 -> 1, torchmetrics' BinaryF1Score over the K edge maps flattened.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from kornia.filters import canny
from PIL import Image
from torchmetrics.classification import BinaryF1Score

import evaluate
import prepare_dataset
from evaluation import controlnetpp as cpp
from tests.reference import TINY_CONFIG, TINY_WEIGHTS
from toy.photos import write_photo_folder
from toy.shapes import Scene, render

SIDE = 64
K = cpp.IMAGES_PER_PROMPT


def _their_condition(photo: np.ndarray, folder: Path, name: str) -> Path:
    """eval.py's condition of a photo, saved as its annotation PNG."""
    image = Image.fromarray(photo).convert("RGB").resize((SIDE, SIDE), Image.Resampling.BICUBIC)
    edges = canny(TF.pil_to_tensor(image).unsqueeze(0) / 255.0, 0.1, 0.2)[1]
    condition = TF.to_pil_image(edges.squeeze(0), "L").convert("RGB")
    path = folder / f"{name}.png"
    Image.fromarray(np.array(condition).astype("uint8")).resize((SIDE, SIDE), Image.Resampling.NEAREST).save(path)
    return path


def _their_edges(images: np.ndarray, folder: Path, name: str) -> list[Path]:
    """eval.py's edges of the K generated images (PIL images in, one PNG per image out)."""
    tensors = [TF.pil_to_tensor(Image.fromarray(image)) / 255.0 for image in images]
    edges = canny(torch.stack(tensors), 0.1, 0.2)[1]
    paths = []
    for k, chunk in enumerate(torch.chunk(edges, len(images), dim=0)):
        path = folder / f"{name}_{k}_edge.png"
        TF.to_pil_image(chunk.reshape(1, SIDE, SIDE), "L").convert("RGB").save(path)
        paths.append(path)
    return paths


def _their_f1(condition_path: Path, edge_paths: list[Path]) -> float:
    """eval_edge.py's eval_canny F1 of one condition."""
    gt = torch.from_numpy(np.array(Image.open(condition_path).convert("L")))
    gt = gt.reshape(1, 1, SIDE, SIDE).repeat(len(edge_paths), 1, 1, 1)
    pred = torch.stack([torch.from_numpy(np.array(Image.open(path).convert("L"))) for path in edge_paths])
    pred = pred.reshape(len(edge_paths), 1, SIDE, SIDE)
    gt[gt == 255] = 1
    pred[pred == 255] = 1
    return BinaryF1Score()(pred.flatten(), gt.flatten()).item()


def _photos() -> list[np.ndarray]:
    """Photos with strong, weak and no edges (a flat one gives an empty condition)."""
    rng = np.random.default_rng(0)
    return [render(Scene("square", "red", "white", 0.4, 0.45, 0.4), SIDE),
            render(Scene("circle", "blue", "black", 0.6, 0.5, 0.5), SIDE),
            render(Scene("triangle", "green", "gray", 0.5, 0.5, 0.5), 96),  # resized to 64 (bicubic)
            np.full((SIDE, SIDE, 3), 128, np.uint8),
            (rng.random((SIDE, SIDE, 3)) * 255).astype(np.uint8)]


def _generated(photos: list[np.ndarray]) -> np.ndarray:
    """K "generated" images per photo: the photo itself (resized), it shifted, a flat image, smooth noise."""
    rng = np.random.default_rng(1)
    groups = []
    for photo in photos:
        resized = np.asarray(Image.fromarray(photo).resize((SIDE, SIDE), Image.Resampling.BICUBIC))
        smooth = np.asarray(Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize(
            (SIDE, SIDE), Image.Resampling.BICUBIC))
        groups.append([resized, np.roll(resized, 3, axis=1), np.full_like(resized, 200), smooth])
    return np.array(groups, dtype=np.uint8)


def test_f1_matches_their_eval_scripts(tmp_path):
    photos = _photos()
    generated = _generated(photos)
    conditions = np.stack([cpp.photo_condition(photo, SIDE) for photo in photos])
    report = cpp.score(conditions, generated, [str(i) for i in range(len(photos))], ["a prompt"] * len(photos),
                       cpp.ProtocolSettings(resolution=SIDE))
    theirs = []
    for i, (photo, images) in enumerate(zip(photos, generated, strict=True)):
        condition_path = _their_condition(photo, tmp_path, str(i))
        np.testing.assert_array_equal(np.array(Image.open(condition_path).convert("L")), conditions[i])
        edge_paths = _their_edges(images, tmp_path, str(i))
        for path, ours in zip(edge_paths, report.generated_edges[i], strict=True):
            np.testing.assert_array_equal(np.array(Image.open(path).convert("L")), ours)
        theirs.append(_their_f1(condition_path, edge_paths))
    assert report.f1s == pytest.approx(theirs, abs=1e-6)
    assert report.f1 == pytest.approx(float(np.mean(theirs)), abs=1e-6)
    # The cases are not degenerate: good, middling and empty conditions, and an empty one scores 0.
    assert conditions[3].max() == 0 and report.f1s[3] == 0.0
    assert all(0.1 < f1 < 0.9 for f1 in report.f1s[:3] + report.f1s[4:])
    # The first "generated" image of each is the resized photo: its edges are the condition, up to kornia's float
    # results differing with the batch they are computed in on some CPUs (an AMD EPYC: one hysteresis chain of
    # 5 pixels, 36 of 20,480 in all; an Intel Xeon: none).
    assert (report.generated_edges[:, 0] != conditions).mean() < 0.005
    print("ControlNet++ parity, per-condition F1 (ours = theirs):", [round(f, 6) for f in report.f1s])


def test_condition_f1_is_the_f1_of_the_k_maps_pooled():
    condition = np.zeros((8, 8), np.uint8)
    condition[2, :] = 255  # 8 edge pixels
    hit = condition.copy()
    half = np.zeros_like(condition)
    half[2, :4] = 255
    half[5, :4] = 255  # 4 right, 4 wrong
    empty = np.zeros_like(condition)
    # Pooled over the three maps: tp 8 + 4 + 0, fp 0 + 4 + 0, fn 0 + 4 + 8.
    tp, fp, fn = 12, 4, 12
    assert cpp.condition_f1(np.stack([hit, half, empty]), condition) == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert cpp.condition_f1(np.stack([empty, empty]), empty) == 0.0
    assert cpp.condition_f1(np.stack([hit]), condition) == 1.0


def test_edge_psnr_and_ms_ssim_as_eval_edge():
    condition = np.zeros((SIDE, SIDE), np.uint8)
    condition[10, 5:50] = 255
    ssim, psnr = cpp.condition_ssim_psnr(np.stack([condition] * 2), condition)
    assert ssim is None and psnr == cpp.PSNR_OF_IDENTICAL  # 64 px is too small for 5 MS-SSIM scales
    wrong = np.roll(condition, 4, axis=0)
    _, psnr = cpp.condition_ssim_psnr(np.stack([wrong]), condition)
    # 90 of 4096 pixels differ by 1: PSNR = -10 log10(90 / 4096).
    assert psnr == pytest.approx(-10 * np.log10(90 / SIDE ** 2), rel=1e-5)
    large = np.zeros((192, 192), np.uint8)
    large[50:150, 60] = 255
    ssim, _ = cpp.condition_ssim_psnr(np.stack([large]), large)
    assert ssim == pytest.approx(1.0, abs=1e-5)


def test_settings_refuse_bad_values():
    for kwargs, flag in (({"resolution": 100}, "--resolution"), ({"images_per_prompt": 0}, "--images-per-prompt"),
                         ({"steps": 0}, "--steps"), ({"sampler": "euler"}, "--sampler")):
        with pytest.raises(ValueError, match=flag):
            cpp.ProtocolSettings(**kwargs)
    assert cpp.ProtocolSettings().to_dict() == {
        "resolution": 512, "images_per_prompt": 4, "seed": 42, "guidance_scale": 7.5, "steps": 20,
        "sampler": "unipc", "negative_prompt": "worst quality, low quality", "low_threshold": 0.1,
        "high_threshold": 0.2}


# --- evaluate.py --protocol controlnetpp on the tiny ControlLDM ---------------------------------------------


@pytest.fixture(scope="module")
def heldout_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("controlnetpp")
    write_photo_folder(root / "photos", 3, seed=0, split="heldout", progress=False)
    assert prepare_dataset.main(["--input", str(root / "photos"), "--output", str(root / "data"),
                                 "--captions-from-txt", "--workers", "1"]) == 0
    return root / "data"


def test_generation_follows_the_settings(heldout_dataset):
    from cldm.model import create_model
    from ldm.checkpoint import load_weights
    from tests.reference import tiny_weights

    model = create_model(TINY_CONFIG)
    load_weights(model, tiny_weights())
    model.eval()
    names, conditions, prompts = evaluate.load_protocol_dataset(heldout_dataset, SIDE, max_pairs=2)
    assert names == ["toy_00000", "toy_00001"] and conditions.shape == (2, SIDE, SIDE)
    conditions, prompts = conditions[:1], prompts[:1]
    settings = cpp.ProtocolSettings(resolution=SIDE, images_per_prompt=2, steps=2)
    unipc = cpp.generate(model, conditions, prompts, settings, progress=False)
    assert unipc.shape == (1, 2, SIDE, SIDE, 3) and unipc.dtype == np.uint8
    np.testing.assert_array_equal(unipc, cpp.generate(model, conditions, prompts, settings, progress=False))
    assert not np.array_equal(unipc[:, 0], unipc[:, 1])  # each image of a prompt has its own noise
    for other in (dict(sampler="ddim"), dict(seed=7), dict(negative_prompt="")):
        changed = cpp.generate(model, conditions, prompts, cpp.ProtocolSettings(
            resolution=SIDE, images_per_prompt=2, steps=2, **other), progress=False)
        assert not np.array_equal(changed, unipc), other


def _run(*extra: str) -> int:
    return evaluate.main(["--ckpt", str(TINY_WEIGHTS), "--config", str(TINY_CONFIG), "--protocol", "controlnetpp",
                          "--resolution", str(SIDE), "--steps", "2", "--quiet", *extra])


def _recomputed_f1(saved: Path) -> float:
    """The F1 from --save-images' files alone, their way: edges of each generated PNG, F1 per condition."""
    lines = [json.loads(line) for line in (saved / "pairs.jsonl").read_text().splitlines()]
    groups: dict[str, list[np.ndarray]] = {}
    for line in lines:
        groups.setdefault(line["condition"], []).append(np.array(Image.open(saved / line["generated"])))
    scores = []
    for condition, images in groups.items():
        name = Path(condition).stem
        scores.append(_their_f1(saved / condition, _their_edges(np.stack(images), saved, f"check_{name}")))
    return float(np.mean(scores))


def test_evaluate_runs_the_protocol_end_to_end(tmp_path, heldout_dataset, capsys):
    grid, scores, saved = tmp_path / "grid.png", tmp_path / "scores.json", tmp_path / "saved"
    assert _run("--dataset", str(heldout_dataset), "--max-pairs", "2", "--grid", str(grid),
                "--json", str(scores), "--save-images", str(saved)) == 0
    out = capsys.readouterr().out
    assert "ControlNet++ protocol (controlnetpp)" in out and "not comparable" in out
    result = json.loads(scores.read_text())
    assert result["protocol"] == "controlnetpp" and result["sampler"] == "unipc" and result["conditions"] == 2
    assert result["settings"] == {**cpp.ProtocolSettings().to_dict(), "resolution": SIDE, "steps": 2}
    assert 0.0 <= result["f1"] <= 1.0
    assert result["f1"] == pytest.approx(np.mean(list(result["f1_per_condition"].values())))
    # One row per condition: condition | 4 generated | their 4 edge maps, 64 px tiles with 2 px padding.
    assert Image.open(grid).size == ((1 + 2 * K) * (SIDE + 2) + 2, 2 * (SIDE + 2) + 2)
    assert len((saved / "pairs.jsonl").read_text().splitlines()) == 2 * K
    assert _recomputed_f1(saved) == pytest.approx(result["f1"], abs=1e-6)


@pytest.mark.slow
def test_saved_conditions_rerun_to_the_same_score(tmp_path, heldout_dataset):
    # The saved conditions are a --conditions folder: the same conditions, noise and images, the same score.
    first, again, saved = tmp_path / "first.json", tmp_path / "again.json", tmp_path / "saved"
    assert _run("--dataset", str(heldout_dataset), "--json", str(first),
                "--grid", str(tmp_path / "first.png"), "--save-images", str(saved)) == 0
    assert _run("--conditions", str(saved / "conditions"), "--json", str(again),
                "--grid", str(tmp_path / "again.png")) == 0
    assert json.loads(again.read_text())["f1_per_condition"] == json.loads(first.read_text())["f1_per_condition"]


def _write_conditions(folder: Path, prompts: dict, levels: tuple[int, ...] = (0, 255)) -> Path:
    folder.mkdir()
    edges = np.zeros((SIDE, SIDE), np.uint8)
    edges[10:12, :] = levels[-1]
    Image.fromarray(edges, "L").save(folder / "a.png")
    (folder / "prompts.json").write_text(json.dumps(prompts))
    return folder


@pytest.mark.parametrize("case", ["resolution", "no source", "missing dataset", "extra prompt", "no prompt",
                                  "grey levels", "prompts not an object", "project flag", "images", "clip",
                                  "missing ckpt", "not canny"])
def test_bad_input_is_one_line_and_status_2(case, tmp_path, capsys):
    good = {"a.png": "a line"}
    if case == "resolution":
        args, named = ["--dataset", str(tmp_path), "--resolution", "100"], "--resolution 100"
    elif case == "no source":
        args, named = [], "--dataset"
    elif case == "missing dataset":
        args, named = ["--dataset", str(tmp_path / "nowhere")], "nowhere"
    elif case == "extra prompt":
        folder = _write_conditions(tmp_path / "c", {**good, "b.png": "gone"})
        args, named = ["--conditions", str(folder)], "b.png"
    elif case == "no prompt":
        folder = _write_conditions(tmp_path / "c", {})
        args, named = ["--conditions", str(folder)], "a.png has no prompt"
    elif case == "grey levels":
        folder = _write_conditions(tmp_path / "c", good, levels=(0, 128))
        args, named = ["--conditions", str(folder)], "128"
    elif case == "prompts not an object":
        folder = _write_conditions(tmp_path / "c", good)
        (folder / "prompts.json").write_text('["a line"]')
        args, named = ["--conditions", str(folder)], "prompts.json"
    elif case == "project flag":
        args, named = ["--dataset", str(tmp_path), "--canny-low", "50"], "--canny-low"
    elif case == "images":
        args, named = ["--dataset", str(tmp_path), "--images-per-prompt", "0"], "--images-per-prompt 0"
    elif case == "clip":
        args, named = ["--dataset", str(tmp_path), "--clip-model", str(tmp_path / "clip")], "--clip-model"
    elif case == "missing ckpt":
        folder = _write_conditions(tmp_path / "c", good)
        args = ["--conditions", str(folder), "--ckpt", str(tmp_path / "missing.ckpt")]
        named = "missing.ckpt"
    else:  # a checkpoint whose record says it was trained on another control type
        from safetensors.torch import save_file

        from tests.reference import tiny_weights

        tile = tmp_path / "tile.safetensors"
        save_file(tiny_weights(), tile, metadata={"control": json.dumps({"name": "tile", "settings": {}})})
        folder = _write_conditions(tmp_path / "c", good)
        args, named = ["--conditions", str(folder), "--ckpt", str(tile)], "trained on tile control"
    assert _run(*args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err, err


def test_protocol_flags_are_refused_by_the_project_protocol(tmp_path, capsys):
    status = evaluate.main(["--ckpt", str(TINY_WEIGHTS), "--dataset", str(tmp_path), "--sampler", "ddim"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and err == "error: --sampler does not apply to --protocol project"


# --- CLIP score (their eval_clip.py) with a tiny CLIP built here ---------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip_folder(tmp_path_factory) -> Path:
    """A random tiny CLIP in the transformers layout (the project's CLIP vocabulary, 32 px images)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from ldm.modules.encoders.tokenizer import CLIPTokenizer as ProjectTokenizer

    vocabulary = ProjectTokenizer()
    layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(vocab_size=len(vocabulary.encoder), max_position_embeddings=77, **layers),
                        vision_config=dict(image_size=32, patch_size=8, **layers), projection_dim=16)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=CLIPTokenizer(vocab=vocabulary.encoder, merges=list(vocabulary.merge_ranks))
                  ).save_pretrained(folder)
    return folder


def test_clip_score_is_the_mean_cosine_of_every_image_with_its_prompt(tiny_clip_folder):
    from transformers import CLIPModel, CLIPProcessor

    rng = np.random.default_rng(0)
    images = (rng.random((2, 3, SIDE, SIDE, 3)) * 255).astype(np.uint8)
    prompts = ["a red square on a white background", "a blue circle"]
    ours = cpp.clip_score(images, prompts, tiny_clip_folder)
    model = CLIPModel.from_pretrained(tiny_clip_folder).eval()
    processor = CLIPProcessor.from_pretrained(tiny_clip_folder)
    flat = list(images.reshape(-1, SIDE, SIDE, 3))
    texts = [prompt for prompt in prompts for _ in range(3)]
    with torch.no_grad():
        pixels = processor(images=[torch.tensor(image).permute(2, 0, 1) for image in flat], return_tensors="pt")
        tokens = processor(text=texts, return_tensors="pt", padding=True)
        image_features = model.get_image_features(pixel_values=pixels["pixel_values"]).pooler_output
        text_features = model.get_text_features(input_ids=tokens["input_ids"],
                                                attention_mask=tokens["attention_mask"]).pooler_output
    cosine = torch.nn.functional.cosine_similarity(image_features, text_features, dim=-1)
    assert ours == pytest.approx(float(100 * cosine.mean()), abs=1e-4)
    assert ours != pytest.approx(cpp.clip_score(images, prompts[::-1], tiny_clip_folder), abs=1e-3)


def test_evaluate_adds_the_clip_score(tmp_path, heldout_dataset, tiny_clip_folder):
    scores = tmp_path / "scores.json"
    assert _run("--dataset", str(heldout_dataset), "--sampler", "ddim", "--max-pairs", "1", "--images-per-prompt",
                "2", "--clip-model", str(tiny_clip_folder), "--grid", str(tmp_path / "grid.png"),
                "--json", str(scores)) == 0
    result = json.loads(scores.read_text())
    assert -100.0 <= result["clip_score"] <= 100.0 and result["settings"]["images_per_prompt"] == 2
