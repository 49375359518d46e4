"""Benchmark: photos/s of the dataset build's control stage for each control type, in one process, on the
same photos, against Canny in the same run (the peer: what prepare_dataset.py has always made).

Per photo, as the build does it: decode the photo, make its control image, write the target JPEG and the
control PNG. The weight-free types go through annotator.pairs.make_pair (what the worker processes run);
the model-based ones (depth, normal, seg, softedge) through the build's batched path. No weights can be
downloaded here, so by default the depth and seg models are tiny random ones in the real formats: their
figures measure the pipeline around the model, not DPT-hybrid's or UperNet's own cost (give --depth-model /
--seg-model for real ones where they are available; on a GPU add --device cuda). HED is the real network
with random weights, so its figure is its real cost.

    .venv/bin/python bench/control_types.py                       # 48 photos of 512x384
    .venv/bin/python bench/control_types.py --photos 200 --depth-model Intel/dpt-hybrid-midas --device cuda
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from annotator.controls import CONTROL_TYPES, get_control  # noqa: E402
from annotator.pairs import PairJob, PairSettings, make_pair  # noqa: E402
from bench.canny_workers import synthetic_photo  # noqa: E402

DEFAULT_PHOTOS = 48
DEFAULT_SIZE = (512, 384)
DEFAULT_BATCH = 8
TINY_DEPTH_SIDE = 64


def write_photos(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        path = folder / f"photo{index:04d}.jpg"
        Image.fromarray(synthetic_photo(*size, rng)).save(path, quality=90)
        paths.append(path)
    return paths


def write_tiny_depth_model(folder: Path) -> Path:
    """A randomly initialised DPT depth model in save_pretrained's format (no download)."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                       image_size=TINY_DEPTH_SIDE, patch_size=16, backbone_out_indices=[0, 1, 2, 3],
                       neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, reassemble_factors=[4, 2, 1, 0.5])
    DPTForDepthEstimation(config).eval().save_pretrained(folder)
    DPTImageProcessor(size={"height": TINY_DEPTH_SIDE, "width": TINY_DEPTH_SIDE}).save_pretrained(folder)
    return folder


def write_tiny_seg_model(folder: Path) -> Path:
    """A randomly initialised SegFormer with ADE20K's 150 classes (save_pretrained's format)."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    config = SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
                             num_attention_heads=[1, 1], decoder_hidden_size=16, num_labels=150)
    SegformerForSemanticSegmentation(config).save_pretrained(folder)
    SegformerImageProcessor(size={"height": TINY_DEPTH_SIDE, "width": TINY_DEPTH_SIDE}).save_pretrained(folder)
    return folder


def write_hed_weights(path: Path) -> Path:
    """Random weights in the released ControlNetHED.pth layout: the real network, so its cost is real."""
    import torch

    from annotator.hed import build_hed

    torch.save(build_hed().state_dict(), path)
    return path


def jobs_for(photos: list[Path], out: Path, name: str) -> list[PairJob]:
    (out / name).mkdir(parents=True, exist_ok=True)
    return [PairJob(path, path.name, out / name / f"{path.stem}.jpg", out / name / f"{path.stem}.png",
                    out / name / "scratch") for path in photos]


def time_type(name: str, photos: list[Path], out: Path, model: str | None, device: str, batch: int) -> float:
    """Seconds for the control stage of one type over all photos (the model load not included)."""
    control = get_control(name)
    settings = PairSettings(jpeg_quality=90, control=name,
                            options=None if name == "canny" else control.settings_from())
    jobs = jobs_for(photos, out, name)
    if not control.model_based:
        start = time.perf_counter()
        for job in jobs:
            assert make_pair(job, settings) is None
        return time.perf_counter() - start
    from annotator.models import load_annotator
    from annotator.pairs import prepare_photo, write_pair

    annotate = load_annotator(control, settings.options, model, device)
    start = time.perf_counter()
    for first in range(0, len(jobs), batch):
        chunk = jobs[first:first + batch]
        prepared = [prepare_photo(job, settings) for job in chunk]
        for job, (pixels, copy_file), image in zip(chunk, prepared, annotate([p[0] for p in prepared]),
                                                   strict=True):
            write_pair(job, pixels, copy_file, image, settings)
    return time.perf_counter() - start


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=DEFAULT_PHOTOS)
    parser.add_argument("--size", type=int, nargs=2, default=DEFAULT_SIZE, metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--types", nargs="+", default=list(CONTROL_TYPES), choices=list(CONTROL_TYPES))
    parser.add_argument("--depth-model", default=None, help="default: a tiny random DPT (no download)")
    parser.add_argument("--seg-model", default=None, help="default: a tiny random SegFormer (no download)")
    parser.add_argument("--hed-weights", default=None, help="default: random weights in the released layout")
    parser.add_argument("--device", default="cpu", help="the annotator models' device")
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="photos per depth-model call")
    args = parser.parse_args(argv)
    import cv2

    cv2.setNumThreads(1)  # one process, one core, as each build worker runs
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        (root / "photos").mkdir()
        photos = write_photos(root / "photos", args.photos, tuple(args.size))
        models = {"depth": args.depth_model or str(write_tiny_depth_model(root / "tiny-dpt")),
                  "seg": args.seg_model or str(write_tiny_seg_model(root / "tiny-seg")),
                  "softedge": args.hed_weights or str(write_hed_weights(root / "ControlNetHED.pth"))}
        models["normal"] = models["depth"]
        print(f"{args.photos} photos of {args.size[0]}x{args.size[1]}, one process; CPU: {cpu_model()}; on "
              f"{args.device}: depth {args.depth_model or 'a tiny random DPT (pipeline cost only)'}, seg "
              f"{args.seg_model or 'a tiny random SegFormer (pipeline cost only)'}, softedge "
              f"{'given HED weights' if args.hed_weights else 'the HED network with random weights (its real cost)'}")
        results = {name: args.photos / time_type(name, photos, root / "out", models.get(name), args.device,
                                                 args.batch) for name in args.types}
    canny = results.get("canny")
    for name, rate in results.items():
        relative = f"  {rate / canny:5.2f}x Canny" if canny else ""
        print(f"{name:>9}: {rate:8.1f} photos/s{relative}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
