"""Control fidelity of a trained ControlNet: for Canny by the project's edge F1 (or, with --protocol
controlnetpp, by ControlNet++'s own protocol, below); for the other control types (the checkpoint's or the
dataset's control record) with the type's metric (evaluation.control_metrics: tile SSIM with the photo,
depth RMSE, normal angle, scribble SSIM).

    python evaluate.py --ckpt runs/controlnet/checkpoints/last.ckpt --dataset outputs/toy/heldout_dataset

For each (edge map, prompt) pair of a dataset folder (prompt.json + source/ + target/, see dataset.py):
generate an image, take its Canny edges with the thresholds that made the edge maps (default 100/200),
and score them against the edge map: pixel F1 pooled over the set (exact; and within --tolerance pixels),
plus the SSIM of the edge maps. Writes a comparison grid (per pair: edge map | generated | generated's
edges) and, with --json, the scores. Any checkpoint inference.py reads works (training .ckpt, full
ControlNet file with --config, control-only file with --sd-ckpt); an untrained ControlNet (the output
of tool_add_control.py) gives the base model's score without control.

    python evaluate.py --ckpt last.ckpt --protocol controlnetpp --dataset outputs/toy/heldout_dataset

--protocol controlnetpp runs ControlNet++'s own Canny evaluation instead (evaluation.controlnetpp: kornia
Canny 0.1/0.2 conditions from the photos, 4 images per prompt, seed 42, guidance 7.5 against "worst quality,
low quality", 20 UniPC steps, F1 per condition averaged), on a dataset folder's photos or a --conditions
folder of edge maps; its numbers compare with their paper's table, never with the project protocol's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from annotator.canny import DEFAULT_HIGH_THRESHOLD, DEFAULT_LOW_THRESHOLD, CannyThresholds
from annotator.controls import DEFAULT_CONTROL, parse_control_record
from annotator.image_io import UnreadableImageError, read_image_rgb
from cldm.inference_loading import control_record_of, load_for_inference
from common.cli import DefaultsHelpFormatter
from dataset import ControlDataset, DatasetError, read_control_record, read_prompt_file, resolve_inside
from evaluation import controlnetpp as cpp
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

PROTOCOLS = ("project", cpp.PROTOCOL)
# The defaults of the options whose default depends on --protocol, and the options of one protocol only.
PROJECT_DEFAULTS = {"max_pairs": DEFAULT_MAX_PAIRS, "steps": DEFAULT_DDIM_STEPS, "scale": DEFAULT_GUIDANCE_SCALE,
                    "seed": 0, "canny_low": DEFAULT_LOW_THRESHOLD, "canny_high": DEFAULT_HIGH_THRESHOLD,
                    "tolerance": DEFAULT_TOLERANCE, "batch_size": DEFAULT_BATCH_SIZE}
CONTROLNETPP_DEFAULTS = {"max_pairs": 0, "steps": cpp.STEPS, "scale": cpp.GUIDANCE_SCALE, "seed": cpp.SEED,
                         "resolution": cpp.RESOLUTION, "sampler": cpp.SAMPLER,
                         "images_per_prompt": cpp.IMAGES_PER_PROMPT}
PROJECT_ONLY = ("canny_low", "canny_high", "tolerance", "batch_size")
CONTROLNETPP_ONLY = ("conditions", "sampler", "images_per_prompt", "save_images", "clip_model")
# A --conditions folder: NAME.png edge maps and this JSON object {"NAME.png": prompt}.
CONDITION_PROMPTS = "prompts.json"
PAIRS_FILE = "pairs.jsonl"


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
    return _grid_of(tiles)


def _grid_of(tiles: Sequence[Sequence[np.ndarray]]) -> Image.Image:
    """Rows of equal-size (H, W, 3) uint8 tiles on white, GRID_PADDING apart. Returns an RGB image."""
    height, width = tiles[0][0].shape[:2]
    columns = len(tiles[0])
    step_y, step_x = height + GRID_PADDING, width + GRID_PADDING
    grid = np.full((len(tiles) * step_y + GRID_PADDING, columns * step_x + GRID_PADDING, 3), 255, dtype=np.uint8)
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
        description="Canny control fidelity: F1 and SSIM of the generated images' edges against the input edge "
                    "maps. --protocol project (default): OpenCV Canny, F1 pooled over the set; --protocol "
                    "controlnetpp: ControlNet++'s own evaluation (kornia Canny 0.1/0.2, 4 images per prompt, "
                    "F1 per condition averaged), whose numbers compare with their paper's table only. FID is "
                    "not built (torchmetrics' FID needs torch-fidelity and Inception weights).",
        formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="training .ckpt, full ControlNet file, or control-only file")
    parser.add_argument("--config", default=None, help="model config for full / control-only files "
                                                       "(default: models/cldm_v15.yaml)")
    parser.add_argument("--sd-ckpt", default=None, help="SD checkpoint for a control-only --ckpt")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="project",
                        help="project: this project's Canny F1; controlnetpp: ControlNet++'s (not comparable)")
    parser.add_argument("--dataset", default=None, help="dataset folder (prompt.json, source/, target/); with "
                                                        "controlnetpp the conditions are made from its target/ "
                                                        "photos")
    parser.add_argument("--conditions", default=None,
                        help="controlnetpp only, instead of --dataset: a folder of edge-map PNGs (0/255, resized "
                             "nearest to --resolution if need be) and prompts.json, a JSON object "
                             '{"NAME.png": "prompt", ...} naming every PNG of the folder')
    parser.add_argument("--max-pairs", type=int, default=None,
                        help=f"first N pairs (0: all; default {DEFAULT_MAX_PAIRS} for project, all for controlnetpp)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="project: short side scaled and centre-cropped to this (default: the stored size); "
                             f"controlnetpp: photos resized to N x N, a multiple of 64 (default {cpp.RESOLUTION})")
    parser.add_argument("--canny-low", type=int, default=None,
                        help=f"project only: OpenCV Canny low threshold (default {DEFAULT_LOW_THRESHOLD})")
    parser.add_argument("--canny-high", type=int, default=None,
                        help=f"project only: OpenCV Canny high threshold (default {DEFAULT_HIGH_THRESHOLD})")
    parser.add_argument("--tolerance", type=int, default=None,
                        help="project only: pixels of slack for the tolerant F1 (the exact F1 is always "
                             f"reported; default {DEFAULT_TOLERANCE})")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"sampling steps (default {DEFAULT_DDIM_STEPS} for project, {cpp.STEPS} for "
                             "controlnetpp)")
    parser.add_argument("--scale", type=float, default=None,
                        help="classifier-free guidance scale (project: against the empty prompt, default "
                             f"{DEFAULT_GUIDANCE_SCALE}; controlnetpp: against {cpp.NEGATIVE_PROMPT!r}, default "
                             f"{cpp.GUIDANCE_SCALE})")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"project only: pairs per sampling call (default {DEFAULT_BATCH_SIZE}; controlnetpp "
                             "samples one condition's images per call)")
    parser.add_argument("--seed", type=int, default=None,
                        help=f"seeds the initial noise of every pair (default 0 for project, {cpp.SEED} for "
                             "controlnetpp)")
    parser.add_argument("--sampler", choices=cpp.SAMPLERS, default=None,
                        help=f"controlnetpp only (default {cpp.SAMPLER}, theirs; ddim as their --ddim); the "
                             "project protocol samples with DDIM")
    parser.add_argument("--images-per-prompt", type=int, default=None,
                        help=f"controlnetpp only: images per condition (default {cpp.IMAGES_PER_PROMPT})")
    parser.add_argument("--save-images", default=None,
                        help="controlnetpp only: write every generated image, its edge map, the conditions "
                             "(a --conditions folder) and DIR/pairs.jsonl (one line per image: generated, edges, "
                             "condition paths relative to DIR, and the prompt) to this folder")
    parser.add_argument("--clip-model", default=None,
                        help="controlnetpp only: a local CLIP folder (transformers format, e.g. "
                             "openai/clip-vit-base-patch16 saved) to add their CLIP score")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    parser.add_argument("--grid", default="outputs/evaluate/grid.png",
                        help="comparison grid PNG (project: edge map | generated | generated's edges; "
                             "controlnetpp: condition | its images | their edges)")
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
    return _grid_of(tiles)


def _write_results(args: argparse.Namespace, grid: Image.Image, columns: str, scores: dict) -> None:
    """The comparison grid at --grid and, with --json, the scores."""
    path = Path(args.grid)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    print(f"grid ({columns}): {path}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(scores, indent=2) + "\n", encoding="utf-8")


class ProtocolInputError(ValueError):
    """Bad input of --protocol controlnetpp; the message names the flag, file or value."""


def _unique_names(stems: Sequence[str]) -> list[str]:
    """File stems as names, a repeated one suffixed with its position."""
    seen: set[str] = set()
    names = []
    for index, stem in enumerate(stems):
        name = stem if stem not in seen else f"{stem}_{index:05d}"
        seen.add(name)
        names.append(name)
    return names


def load_protocol_dataset(root: str | os.PathLike, resolution: int = cpp.RESOLUTION, max_pairs: int | None = None,
                          progress: bool = False) -> tuple[list[str], np.ndarray, list[str]]:
    """(names, conditions (N, resolution, resolution) uint8 {0, 255}, prompts) of a dataset folder for
    ControlNet++'s protocol: the conditions are made from the target/ photos (`cpp.photo_condition`), not
    read from source/; the prompts are prompt.json's; names are the photos' file stems."""
    root = Path(root)
    if not root.is_dir():
        raise ProtocolInputError(f"--dataset {root}: not a folder")
    entries = read_prompt_file(root)[:max_pairs]
    conditions = []
    for entry in tqdm(entries, desc="conditions", unit="photo", disable=not progress, leave=False):
        try:
            photo = read_image_rgb(resolve_inside(root, entry.target)).pixels
        except UnreadableImageError as err:
            raise ProtocolInputError(f"{root / entry.target}: {err}") from err
        conditions.append(cpp.photo_condition(photo, resolution))
    names = _unique_names([PurePosixPath(entry.target).stem for entry in entries])
    return names, np.stack(conditions), [entry.prompt for entry in entries]


def _read_condition_prompts(folder: Path) -> dict[str, str]:
    path = folder / CONDITION_PROMPTS
    if not path.is_file():
        raise ProtocolInputError(f"--conditions {folder}: no {CONDITION_PROMPTS} (a JSON object "
                                 '{"NAME.png": "prompt", ...})')
    try:
        prompts = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolInputError(f"{path}: not UTF-8 JSON ({err})") from err
    if not isinstance(prompts, dict) or not all(isinstance(value, str) for value in prompts.values()):
        raise ProtocolInputError(f'{path}: expected a JSON object {{"NAME.png": "prompt", ...}}')
    return prompts


def load_condition_folder(folder: str | os.PathLike, resolution: int = cpp.RESOLUTION,
                          max_pairs: int | None = None) -> tuple[list[str], np.ndarray, list[str]]:
    """(names, conditions (N, resolution, resolution) uint8 {0, 255}, prompts) of a --conditions folder:
    every NAME.png (in name order) read as an 'L' edge map, which must hold only 0 and 255 (resized nearest
    to resolution x resolution if it is another size, as ControlNet++'s eval.py does), with its prompt from
    prompts.json, which must name exactly the folder's PNGs. The conditions --save-images writes are such a
    folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ProtocolInputError(f"--conditions {folder}: not a folder")
    prompts = _read_condition_prompts(folder)
    files = sorted(path.name for path in folder.iterdir() if path.suffix.lower() == ".png" and path.is_file())
    if not files:
        raise ProtocolInputError(f"--conditions {folder}: no PNG edge maps")
    for listed, other, what in ((files, prompts, f"has no prompt in {folder / CONDITION_PROMPTS}"),
                                (list(prompts), files, f"is named in {folder / CONDITION_PROMPTS} but is not a PNG "
                                                      "of the folder")):
        unmatched = [name for name in listed if name not in other]
        if unmatched:
            more = f" (and {len(unmatched) - 1} more)" if len(unmatched) > 1 else ""
            raise ProtocolInputError(f"--conditions {folder}: {unmatched[0]} {what}{more}")
    files = files[:max_pairs]
    conditions = [_read_edge_map(folder / name, resolution) for name in files]
    return _unique_names([Path(name).stem for name in files]), np.stack(conditions), [prompts[name] for name in files]


def _read_edge_map(path: Path, resolution: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            edges = np.asarray(image.convert("L"))
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ProtocolInputError(f"{path}: not a readable image ({err})") from err
    levels = np.unique(edges)
    if not np.isin(levels, (0, cpp.EDGE)).all():
        odd = levels[~np.isin(levels, (0, cpp.EDGE))]
        raise ProtocolInputError(f"{path}: an edge map holds only 0 and 255, this one also has {odd[0]}"
                                 f"{f' and {len(odd) - 1} other values' if len(odd) > 1 else ''}")
    if edges.shape != (resolution, resolution):
        edges = np.asarray(Image.fromarray(edges).resize((resolution, resolution), Image.Resampling.NEAREST))
    return edges


def protocol_grid(report: cpp.ControlNetPPReport, rows: int = DEFAULT_GRID_ROWS) -> Image.Image:
    """One row per condition (the first `rows`): the condition, its generated images, their kornia edges."""
    def rgb(edges: np.ndarray) -> np.ndarray:
        return np.repeat(edges[..., None], 3, axis=2)

    count = min(rows, len(report.names))
    return _grid_of([[rgb(report.conditions[i]), *report.generated[i], *map(rgb, report.generated_edges[i])]
                     for i in range(count)])


def save_protocol_images(report: cpp.ControlNetPPReport, folder: str | os.PathLike) -> Path:
    """Every generated image (images/NAME_K.png) and its edge map (edges/NAME_K.png), the conditions
    (conditions/NAME.png with conditions/prompts.json: a --conditions folder) and pairs.jsonl, one JSON line
    per generated image: generated, edges, condition (paths relative to `folder`) and prompt. Their F1
    recomputes from these files: kornia_edges of each generated image, condition_f1 per condition, the mean.
    Returns the path of pairs.jsonl."""
    folder = Path(folder)
    for sub in ("conditions", "images", "edges"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    lines = []
    for name, prompt, condition, images, edges in zip(report.names, report.prompts, report.conditions,
                                                      report.generated, report.generated_edges, strict=True):
        Image.fromarray(condition, "L").save(folder / "conditions" / f"{name}.png")
        for k, (image, edge_map) in enumerate(zip(images, edges, strict=True)):
            Image.fromarray(image).save(folder / "images" / f"{name}_{k}.png")
            Image.fromarray(edge_map, "L").save(folder / "edges" / f"{name}_{k}.png")
            lines.append(json.dumps({"generated": f"images/{name}_{k}.png", "edges": f"edges/{name}_{k}.png",
                                     "condition": f"conditions/{name}.png", "prompt": prompt}, ensure_ascii=False))
    prompts = {f"{name}.png": prompt for name, prompt in zip(report.names, report.prompts, strict=True)}
    (folder / "conditions" / CONDITION_PROMPTS).write_text(json.dumps(prompts, indent=1, ensure_ascii=False) + "\n",
                                                            encoding="utf-8")
    pairs = folder / PAIRS_FILE
    pairs.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return pairs


def _one_line(err: Exception) -> str:
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


def _check_protocol_arguments(args: argparse.Namespace) -> cpp.ProtocolSettings:
    """The settings, once the flags that can be checked before any file is read are."""
    if (args.dataset is None) == (args.conditions is None):
        raise ProtocolInputError("--protocol controlnetpp needs one of --dataset (photos) or --conditions "
                                 "(edge maps)")
    if args.max_pairs < 0:
        raise ProtocolInputError(f"--max-pairs {args.max_pairs}: must be 0 (all) or more")
    if args.grid_rows < 1:
        raise ProtocolInputError(f"--grid-rows {args.grid_rows}: must be at least 1")
    for flag, path in (("--save-images", args.save_images), ("--grid", Path(args.grid).parent)):
        if path is not None and Path(path).exists() and not Path(path).is_dir():
            raise ProtocolInputError(f"{flag} {path} is a file, not a folder")
    if args.clip_model is not None and not (Path(args.clip_model) / "config.json").is_file():
        raise ProtocolInputError(f"--clip-model {args.clip_model}: not a CLIP folder (no config.json)")
    return cpp.ProtocolSettings(resolution=args.resolution, images_per_prompt=args.images_per_prompt,
                                seed=args.seed, guidance_scale=args.scale, steps=args.steps, sampler=args.sampler)


def _controlnetpp_main(args: argparse.Namespace, device: str) -> int:
    """ControlNet++'s Canny protocol (evaluation.controlnetpp); bad input: one line, exit status 2."""
    progress = not args.quiet
    try:
        settings = _check_protocol_arguments(args)
        if args.dataset is not None:
            names, conditions, prompts = load_protocol_dataset(args.dataset, settings.resolution,
                                                               args.max_pairs or None, progress)
        else:
            names, conditions, prompts = load_condition_folder(args.conditions, settings.resolution,
                                                               args.max_pairs or None)
        record = control_record_of(args.ckpt)
        if record is not None and record.get("name") != DEFAULT_CONTROL:
            raise ProtocolInputError(f"--protocol controlnetpp scores Canny ControlNets; {args.ckpt} was trained "
                                     f"on {record.get('name')} control")
        model, _ = load_for_inference(args.ckpt, args.config, args.sd_ckpt)
        report = cpp.evaluate_controlnetpp(model.to(device), conditions, prompts, names, settings,
                                           clip_model=args.clip_model, progress=progress)
    except (FileNotFoundError, CheckpointError, DatasetError, ValueError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    print(f"{args.ckpt}: {report.summary()}")
    scores = {**report.to_dict(), "ckpt": str(args.ckpt),
              "source": {"dataset": args.dataset} if args.dataset is not None else {"conditions": args.conditions}}
    _write_results(args, protocol_grid(report, args.grid_rows), "condition | generated | their kornia edges",
                   scores)
    if args.save_images is not None:
        print(f"images, edges and conditions: {save_protocol_images(report, args.save_images)}")
    return 0


def _project_main(args: argparse.Namespace, device: str) -> int:
    """The project protocol: OpenCV Canny F1 pooled over the set (or another control type's metric)."""
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    controlnetpp = args.protocol == cpp.PROTOCOL
    others = PROJECT_ONLY if controlnetpp else CONTROLNETPP_ONLY
    misplaced = [name for name in others if getattr(args, name) is not None]
    if misplaced:
        flag = "--" + misplaced[0].replace("_", "-")
        print(f"error: {flag} does not apply to --protocol {args.protocol}", file=sys.stderr)
        return 2
    for name, value in (CONTROLNETPP_DEFAULTS if controlnetpp else PROJECT_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if controlnetpp:
        return _controlnetpp_main(args, device)
    if args.dataset is None:
        parser.error("the following arguments are required: --dataset")
    return _project_main(args, device)


if __name__ == "__main__":
    sys.exit(main())
