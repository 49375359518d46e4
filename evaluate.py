"""Control fidelity of a trained ControlNet: for Canny as ControlNet++ measures it; for the other control
types (the checkpoint's or the dataset's control record) with the type's metric (evaluation.control_metrics:
tile SSIM with the photo, depth RMSE, normal angle, scribble SSIM).

    python evaluate.py --ckpt runs/controlnet/checkpoints/last.ckpt --dataset outputs/toy/heldout_dataset

For each (edge map, prompt) pair of a dataset folder (prompt.json + source/ + target/, see dataset.py):
generate an image, take its Canny edges with the thresholds that made the edge maps (default 100/200),
and score them against the edge map: pixel F1 (exact, as ControlNet++; and within --tolerance pixels),
plus the SSIM of the edge maps. Writes a comparison grid (per pair: edge map | generated | generated's
edges) and, with --json, the scores. Any checkpoint inference.py reads works (training .ckpt, full
ControlNet file with --config, control-only file with --sd-ckpt); an untrained ControlNet (the output
of tool_add_control.py) gives the base model's score without control.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from annotator.canny import DEFAULT_HIGH_THRESHOLD, DEFAULT_LOW_THRESHOLD, CannyThresholds
from annotator.controls import DEFAULT_CONTROL, parse_control_record
from cldm.inference_loading import control_record_of, load_for_inference
from dataset import ControlDataset, DatasetError, read_control_record
from evaluation.control_metrics import PHOTO_METRICS, ControlReport, control_type_fidelity
from evaluation.fidelity import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_DDIM_STEPS,
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_THRESHOLDS,
    DEFAULT_TOLERANCE,
    FidelityReport,
    Pair,
    control_fidelity,
)
from ldm.checkpoint import CheckpointError

DEFAULT_MAX_PAIRS = 64
DEFAULT_GRID_ROWS = 8
GRID_PADDING = 2


def load_pairs(dataset_root: str | os.PathLike, max_pairs: int | None = DEFAULT_MAX_PAIRS,
               resolution: int | None = None) -> list[Pair]:
    """The first `max_pairs` (edge map (H, W, 3) uint8 {0, 255}, prompt) pairs of a dataset folder.

    resolution: scale the short side to this and centre-crop (as training does); None keeps the stored
    size (then all pairs must share it).
    """
    data = ControlDataset(dataset_root, resolution=resolution)
    count = len(data) if max_pairs is None else min(max_pairs, len(data))
    pairs = []
    for index in range(count):
        item = data[index]
        pairs.append((np.rint(item["hint"] * 255.0).astype(np.uint8), item["txt"]))
    return pairs


def comparison_grid(reports: Sequence[FidelityReport], rows: int = DEFAULT_GRID_ROWS) -> Image.Image:
    """One row per pair (the first `rows`): the edge map, then for each report its generated image and that
    image's Canny edges. Returns an RGB image."""
    count = min(rows, len(reports[0].hints))
    tiles = []
    for i in range(count):
        row = [reports[0].hints[i]]
        for report in reports:
            row += [report.generated[i], np.repeat(report.generated_edges[i][..., None], 3, axis=2)]
        tiles.append(row)
    height, width = tiles[0][0].shape[:2]
    columns = len(tiles[0])
    step_y, step_x = height + GRID_PADDING, width + GRID_PADDING
    grid = np.full((count * step_y + GRID_PADDING, columns * step_x + GRID_PADDING, 3), 255, dtype=np.uint8)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            top, left = GRID_PADDING + r * step_y, GRID_PADDING + c * step_x
            grid[top:top + height, left:left + width] = tile
    return Image.fromarray(grid)


def evaluate_checkpoint(ckpt: str | os.PathLike, dataset_root: str | os.PathLike, *,
                        config: str | os.PathLike | None = None, sd_ckpt: str | os.PathLike | None = None,
                        max_pairs: int | None = DEFAULT_MAX_PAIRS, resolution: int | None = None,
                        thresholds: CannyThresholds = DEFAULT_THRESHOLDS, tolerance: int = DEFAULT_TOLERANCE,
                        ddim_steps: int = DEFAULT_DDIM_STEPS, guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
                        batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0, device: str = "cpu",
                        progress: bool = True) -> FidelityReport:
    """Load a checkpoint (as inference.py does) and score it on a dataset folder's pairs."""
    model, _ = load_for_inference(ckpt, config, sd_ckpt)
    model = model.to(device)
    pairs = load_pairs(dataset_root, max_pairs, resolution)
    return control_fidelity(model, pairs, thresholds=thresholds, tolerance=tolerance, ddim_steps=ddim_steps,
                            guidance_scale=guidance_scale, batch_size=batch_size, seed=seed, progress=progress)


def report_dict(report: FidelityReport) -> dict[str, float | int]:
    """The scores of a report as plain values (for JSON)."""
    return {"f1": report.f1, "precision": report.precision, "recall": report.recall,
            "f1_tolerant": report.f1_tolerant, "tolerance": report.tolerance, "ssim": report.ssim,
            "pairs": len(report.hints)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Canny control fidelity (ControlNet++): F1 and SSIM of the generated images' edges "
                    "against the input edge maps.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="training .ckpt, full ControlNet file, or control-only file")
    parser.add_argument("--config", default=None, help="model config for full / control-only files "
                                                       "(default: models/cldm_v15.yaml)")
    parser.add_argument("--sd-ckpt", default=None, help="SD checkpoint for a control-only --ckpt")
    parser.add_argument("--dataset", required=True, help="dataset folder (prompt.json, source/, target/)")
    parser.add_argument("--max-pairs", type=int, default=DEFAULT_MAX_PAIRS, help="first N pairs (0: all)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="short side scaled and centre-cropped to this (default: the stored size)")
    parser.add_argument("--canny-low", type=int, default=DEFAULT_LOW_THRESHOLD)
    parser.add_argument("--canny-high", type=int, default=DEFAULT_HIGH_THRESHOLD)
    parser.add_argument("--tolerance", type=int, default=DEFAULT_TOLERANCE,
                        help="pixels of slack for the tolerant F1 (the exact F1 is always reported)")
    parser.add_argument("--steps", type=int, default=DEFAULT_DDIM_STEPS, help="DDIM steps")
    parser.add_argument("--scale", type=float, default=DEFAULT_GUIDANCE_SCALE,
                        help="classifier-free guidance scale (against the empty prompt)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--seed", type=int, default=0, help="seeds the initial noise of every pair")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    parser.add_argument("--grid", default="outputs/evaluate/grid.png",
                        help="comparison grid PNG (edge map | generated | generated's edges)")
    parser.add_argument("--grid-rows", type=int, default=DEFAULT_GRID_ROWS)
    parser.add_argument("--json", default=None, help="also write the scores here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def load_control_pairs(dataset_root: str | os.PathLike, max_pairs: int | None = DEFAULT_MAX_PAIRS,
                       resolution: int | None = None, control: str | None = None
                       ) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(control images, prompts, photos) of the first `max_pairs` pairs: (N, H, W, 3) uint8, N, (N, H, W, 3).
    control: which of the dataset's control types (None: the one it was built with)."""
    data = ControlDataset(dataset_root, resolution=resolution, control=control)
    items = [data[index] for index in range(len(data) if max_pairs is None else min(max_pairs, len(data)))]
    hints = np.stack([_control_image(item["hint"]) for item in items])
    photos = np.stack([np.rint((item["jpg"] + 1.0) * 127.5).clip(0, 255).astype(np.uint8) for item in items])
    return hints, [item["txt"] for item in items], photos


def _control_image(hint: np.ndarray) -> np.ndarray:
    """A hint back as its control image: uint8 RGB, or RGBA with alpha 0 where it is -1 (inpaint's mask)."""
    rgb = np.rint(np.clip(hint, 0.0, 1.0) * 255.0).astype(np.uint8)
    if (hint < 0).any():
        alpha = np.where((hint < 0).all(axis=2), 0, 255).astype(np.uint8)
        return np.concatenate([rgb, alpha[..., None]], axis=2)
    return rgb


def _shown(control: np.ndarray) -> np.ndarray:
    """A control image as RGB to look at: an RGBA (inpaint) one with its masked area black."""
    if control.shape[2] == 4:
        return np.where(control[..., 3:] < 128, 0, control[..., :3]).astype(np.uint8)
    return control


def evaluate_control_type(ckpt: str | os.PathLike, dataset_root: str | os.PathLike, record: dict, *,
                          config: str | os.PathLike | None = None, sd_ckpt: str | os.PathLike | None = None,
                          max_pairs: int | None = DEFAULT_MAX_PAIRS, resolution: int | None = None,
                          ddim_steps: int = DEFAULT_DDIM_STEPS, guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
                          batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0, device: str = "cpu",
                          progress: bool = True) -> ControlReport:
    """Score a checkpoint trained on another control type than Canny with that type's metric."""
    control, settings, annotator_model = parse_control_record(record)
    model, _ = load_for_inference(ckpt, config, sd_ckpt)
    model = model.to(device)
    hints, prompts, photos = load_control_pairs(dataset_root, max_pairs, resolution, control.name)
    return control_type_fidelity(model, control, settings, annotator_model, hints, prompts, photos,
                                 ddim_steps=ddim_steps, guidance_scale=guidance_scale, batch_size=batch_size,
                                 seed=seed, device=device, progress=progress)


def control_grid(report: ControlReport, rows: int = DEFAULT_GRID_ROWS) -> Image.Image:
    """One row per pair: the control image, the generated image, and what it was scored against (its
    control read back, or for tile the held-out photo)."""
    count = min(rows, len(report.hints))
    tiles = [[_shown(report.hints[i]), report.generated[i], report.read_back[i]] for i in range(count)]
    height, width = tiles[0][0].shape[:2]
    step_y, step_x = height + GRID_PADDING, width + GRID_PADDING
    grid = np.full((count * step_y + GRID_PADDING, 3 * step_x + GRID_PADDING, 3), 255, dtype=np.uint8)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            top, left = GRID_PADDING + r * step_y, GRID_PADDING + c * step_x
            grid[top:top + height, left:left + width] = tile
    return Image.fromarray(grid)


def _write_results(args: argparse.Namespace, grid: Image.Image, columns: str, scores: dict) -> None:
    """The comparison grid at --grid and, with --json, the scores."""
    path = Path(args.grid)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    print(f"grid ({columns}): {path}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(scores, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    common = dict(config=args.config, sd_ckpt=args.sd_ckpt, max_pairs=args.max_pairs or None,
                  resolution=args.resolution, ddim_steps=args.steps, guidance_scale=args.scale,
                  batch_size=args.batch_size, seed=args.seed, device=device, progress=not args.quiet)
    try:
        # The checkpoint's control type (the dataset's for a file without a record, e.g. a zero ControlNet).
        record = control_record_of(args.ckpt) or read_control_record(args.dataset)
        if record is not None and record.get("name") != DEFAULT_CONTROL:
            report = evaluate_control_type(args.ckpt, args.dataset, record, **common)
        else:
            report = evaluate_checkpoint(args.ckpt, args.dataset, tolerance=args.tolerance,
                                         thresholds=CannyThresholds(args.canny_low, args.canny_high), **common)
    except (FileNotFoundError, CheckpointError, DatasetError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if isinstance(report, ControlReport):
        print(f"{args.ckpt}: {report.summary()}")
        reference = "held-out photo" if report.metric in PHOTO_METRICS else f"generated image's {report.control}"
        scores = {"control": report.control, "metric": report.metric, "score": report.score,
                  "higher_is_better": report.higher_is_better, "pairs": len(report.hints)}
        _write_results(args, control_grid(report, args.grid_rows), f"control | generated | {reference}", scores)
    else:
        print(f"{args.ckpt}: {report.summary()} over {len(report.hints)} pairs")
        _write_results(args, comparison_grid([report], args.grid_rows), "edge map | generated | generated's edges",
                       report_dict(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
