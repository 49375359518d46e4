"""Benchmark: the dataset build's Canny stage in N worker processes vs one process, on the same images.

The stage is what prepare_dataset.py (dataset.build) runs per image: decode the photo, Canny at the default thresholds,
write the target JPEG and the edge PNG. Times include starting the worker processes, as a real run pays
it. Prints images/s for both and the ratio.

    .venv/bin/python bench/canny_workers.py                       # 96 photos of 640x480, all CPU cores
    .venv/bin/python bench/canny_workers.py --images 400 --workers 8
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from annotator.pairs import PairJob, PairSettings  # noqa: E402

DEFAULT_IMAGES = 96
DEFAULT_SIZE = (640, 480)  # (width, height): a Stanford Dogs photo is about 500x375
JPEG_QUALITY = 90
SHAPES_PER_IMAGE = 12


def synthetic_photo(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """RGB uint8 (height, width, 3): a colour gradient with random rectangles and noise, so Canny has
    edges of every strength to trace, as in a photo."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = rng.uniform(30, 120, 3) + 80 * np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1)
    for _ in range(SHAPES_PER_IMAGE):
        top, left = rng.integers(0, height), rng.integers(0, width)
        image[top : top + rng.integers(8, height // 2), left : left + rng.integers(8, width // 2)] += rng.uniform(
            -80, 80, 3
        )
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children."""
    return sum(
        usage.ru_utime + usage.ru_stime
        for usage in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )


def time_stage(photos: list[Path], workers: int, folder: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) to make every pair with `workers` processes (1: in this process)."""
    # Imported here: spawned workers re-run this script's top-level imports, and the build's package
    # brings torch, which would add its start-up to every worker (dataset/build/workers.py).
    from dataset.build import make_pairs

    output = folder / f"pairs-{workers}"
    output.mkdir()
    jobs = [PairJob(photo, photo.name, output / f"{photo.stem}.jpg", output / f"{photo.stem}.png",
                    output / "scratch") for photo in photos]
    start, start_cpu = time.perf_counter(), cpu_seconds()
    reasons = [reason for _, reason in make_pairs(jobs, PairSettings(), workers)]
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - start_cpu
    if any(reasons):
        raise RuntimeError(f"benchmark images were skipped: {set(reasons)}")
    return seconds, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=DEFAULT_IMAGES)
    parser.add_argument("--width", type=int, default=DEFAULT_SIZE[0])
    parser.add_argument("--height", type=int, default=DEFAULT_SIZE[1])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder_name:
        folder = Path(folder_name)
        photos = []
        for index in range(args.images):
            path = folder / f"photo{index:04d}.jpg"
            Image.fromarray(synthetic_photo(args.width, args.height, rng)).save(path, quality=JPEG_QUALITY)
            photos.append(path)
        single, single_cpu = time_stage(photos, 1, folder)
        parallel, parallel_cpu = time_stage(photos, args.workers, folder)
    # Other work on the machine takes cores from the workers: the load average says how much there was,
    # and the CPU seconds show the work itself (the workers' extra is their start-up).
    load = os.getloadavg()[0]
    print(f"Canny stage, {args.images} photos of {args.width}x{args.height}, {os.cpu_count()} CPU cores, "
          f"load average {load:.1f}")
    print(f"  {'1 process:':<13}{args.images / single:7.1f} images/s ({single:.2f} s, {single_cpu:.2f} CPU-s)")
    print(f"  {f'{args.workers} workers:':<13}{args.images / parallel:7.1f} images/s ({parallel:.2f} s, "
          f"{parallel_cpu:.2f} CPU-s, including process start-up)")
    print(f"  ratio: {single / parallel:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
