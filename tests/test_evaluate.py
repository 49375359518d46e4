"""Control fidelity: the edge metrics (F1, SSIM), generation from (edge map, prompt) pairs, evaluate.py
on a dataset folder, and the Lightning callback that logs F1 during training."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

import evaluate
import prepare_dataset
from annotator import canny
from cldm.model import load_config
from evaluation.edge_metrics import EdgeCounts, edge_counts, edge_f1, edge_ssim, ssim
from evaluation.fidelity import control_fidelity
from ldm.checkpoint import load_weights
from tests.reference import TINY_CONFIG, TINY_WEIGHTS, tiny_weights
from toy.photos import write_photo_folder
from toy.shapes import Scene, render
from trainer.fidelity_callback import FidelityCallback
from trainer.module import ControlNetTrainer


def _outline(scene: Scene) -> np.ndarray:
    return canny(render(scene))


SQUARE = _outline(Scene("square", "red", "white", 0.4, 0.45, 0.4))
CIRCLE = _outline(Scene("circle", "blue", "black", 0.6, 0.5, 0.5))


def test_f1_of_an_edge_map_with_itself_is_one_and_lower_for_others():
    assert edge_f1(SQUARE, SQUARE) == 1.0
    shifted = np.roll(SQUARE, 2, axis=1)
    assert 0.0 < edge_f1(shifted, SQUARE) < 0.6  # the vertical sides move off, the horizontal ones stay
    assert edge_f1(CIRCLE, SQUARE) < 0.2
    assert edge_f1(np.zeros_like(SQUARE), SQUARE) == 0.0
    assert edge_f1(SQUARE, np.zeros_like(SQUARE)) == 0.0


def test_tolerance_forgives_small_shifts_only():
    one_off = np.roll(SQUARE, 1, axis=0)
    assert edge_f1(one_off, SQUARE) < 0.7
    assert edge_f1(one_off, SQUARE, tolerance=1) == 1.0
    assert edge_f1(np.roll(SQUARE, 6, axis=0), SQUARE, tolerance=2) < 0.6
    with pytest.raises(ValueError, match="tolerance"):
        edge_counts(SQUARE, SQUARE, tolerance=-1)


def test_counts_add_up_over_images_as_a_micro_average():
    a, b = edge_counts(SQUARE, SQUARE), edge_counts(np.zeros_like(CIRCLE), CIRCLE)
    total = a + b
    assert total == EdgeCounts(a.predicted, a.correct, a.target + b.target, a.found)
    assert total.precision == 1.0 and total.recall == pytest.approx(a.found / (a.target + b.target))
    assert EdgeCounts().f1 == 1.0  # nothing expected and nothing predicted is a perfect match


def test_edge_maps_may_be_rgb_or_boolean():
    rgb = np.repeat(SQUARE[..., None], 3, axis=2)
    assert edge_f1(rgb, SQUARE > 0) == 1.0
    with pytest.raises(ValueError, match="size"):
        edge_f1(SQUARE, SQUARE[:32])


def test_ssim_is_sane():
    assert edge_ssim(SQUARE, SQUARE) == pytest.approx(1.0)
    shifted = edge_ssim(np.roll(SQUARE, 3, axis=1), SQUARE)
    assert edge_ssim(CIRCLE, SQUARE) < shifted < 1.0
    assert edge_ssim(CIRCLE, SQUARE) == pytest.approx(edge_ssim(SQUARE, CIRCLE))
    rng = np.random.default_rng(0)
    noise = rng.random((64, 64))
    assert ssim(noise, noise) == pytest.approx(1.0)
    assert ssim(noise, 1.0 - noise) < 0.0  # anti-correlated


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    from cldm.model import create_model

    model = create_model(TINY_CONFIG)
    load_weights(model, tiny_weights())
    return model.eval()


def _pairs(count: int) -> list[tuple[np.ndarray, str]]:
    scenes = [Scene("square", "red", "white", 0.4, 0.45, 0.4), Scene("circle", "blue", "black", 0.6, 0.5, 0.5),
              Scene("triangle", "green", "gray", 0.5, 0.5, 0.5)]
    return [(np.repeat(_outline(s)[..., None], 3, axis=2), s.caption) for s in scenes[:count]]


def test_control_fidelity_is_deterministic_and_scores_its_own_edges(tiny_model):
    pairs = _pairs(3)
    first = control_fidelity(tiny_model, pairs, ddim_steps=2, batch_size=2, seed=5, progress=False)
    again = control_fidelity(tiny_model, pairs, ddim_steps=2, batch_size=2, seed=5, progress=False)
    rebatched = control_fidelity(tiny_model, pairs, ddim_steps=2, batch_size=3, seed=5, progress=False)
    assert first.generated.shape == (3, 64, 64, 3) and first.generated.dtype == np.uint8
    assert first.generated_edges.shape == (3, 64, 64)
    np.testing.assert_array_equal(first.generated, again.generated)
    assert (first.f1, first.ssim) == (again.f1, again.ssim)
    # Each pair's noise does not depend on the batching (only float rounding does).
    np.testing.assert_allclose(first.generated, rebatched.generated, atol=2)
    assert 0.0 <= first.f1 <= first.f1_tolerant <= 1.0
    # The reported edges are the Canny edges of the reported images, scored against the hints.
    for image, edges in zip(first.generated, first.generated_edges, strict=True):
        np.testing.assert_array_equal(canny(image), edges)
    counts = sum((edge_counts(e, h) for e, (h, _) in zip(first.generated_edges, pairs, strict=True)), EdgeCounts())
    assert first.f1 == pytest.approx(counts.f1)
    other_seed = control_fidelity(tiny_model, pairs, ddim_steps=2, seed=6, progress=False)
    assert not np.array_equal(other_seed.generated, first.generated)


@pytest.fixture(scope="module")
def heldout_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evaluate")
    write_photo_folder(root / "photos", 4, seed=0, split="heldout", progress=False)
    assert prepare_dataset.main(["--input", str(root / "photos"), "--output", str(root / "data"),
                                 "--captions-from-txt", "--workers", "1"]) == 0
    return root / "data"


def test_evaluate_cli_on_a_dataset_folder(tmp_path, heldout_dataset):
    grid, scores = tmp_path / "grid.png", tmp_path / "scores.json"
    status = evaluate.main(["--ckpt", str(TINY_WEIGHTS), "--config", str(TINY_CONFIG), "--dataset",
                            str(heldout_dataset), "--max-pairs", "3", "--steps", "2", "--grid", str(grid),
                            "--json", str(scores), "--quiet"])
    assert status == 0
    result = json.loads(scores.read_text())
    assert result["pairs"] == 3 and 0.0 <= result["f1"] <= 1.0 and result["tolerance"] == 2
    # One row per pair: edge map | generated | generated's edges, 64 px tiles with 2 px padding.
    assert Image.open(grid).size == (3 * 66 + 2, 3 * 66 + 2)
    pairs = evaluate.load_pairs(heldout_dataset, max_pairs=2)
    assert len(pairs) == 2 and pairs[0][0].shape == (64, 64, 3) and pairs[0][1].startswith("a")
    assert set(np.unique(pairs[0][0])) <= {0, 255}


def test_evaluate_cli_reports_a_bad_dataset(tmp_path, capsys):
    status = evaluate.main(["--ckpt", str(TINY_WEIGHTS), "--config", str(TINY_CONFIG), "--dataset", str(tmp_path)])
    assert status == 1 and "prompt.json" in capsys.readouterr().err


class _Pairs(torch.utils.data.Dataset):
    """Two training items in the dataset contract (HWC target in [-1, 1], hint in [0, 1])."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        hint, prompt = self.pairs[index]
        return {"jpg": np.zeros((64, 64, 3), np.float32), "txt": prompt, "hint": hint.astype(np.float32) / 255.0}


def test_callback_logs_f1_during_training(tmp_path):
    pairs = _pairs(2)
    module = ControlNetTrainer(load_config(TINY_CONFIG)["model"], learning_rate=1e-4)
    load_weights(module.model, tiny_weights())
    callback = FidelityCallback(pairs, every_n_steps=2, ddim_steps=2)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", devices=1, callbacks=[callback], logger=CSVLogger(tmp_path),
                        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(_Pairs(pairs), batch_size=2))
    assert [entry[0] for entry in callback.history] == [2, 4]
    assert module.training  # the callback puts the module back into train mode
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        logged = [row["fidelity/canny_f1"] for row in csv.DictReader(f) if row.get("fidelity/canny_f1")]
    assert len(logged) == 2
    assert [float(v) for v in logged] == pytest.approx([entry[1] for entry in callback.history])
    with pytest.raises(ValueError, match="pair"):
        FidelityCallback([], every_n_steps=1)
