"""Build a ControlNet training set from photos: control images (Canny edges by default; --control for the
other types of annotator.controls), BLIP prompts, prompt.json (the original's run_generation.py). The build
itself is `dataset.build`, whose doc says what is written, in which order, under which names, and how runs
resume and shard.

    python prepare_dataset.py --input PATH_OR_URL --output DIR [--control NAME [--control-option K=V ...]]
        [--caption-model PATH_OR_ID_OR_URL]
        [--captions-from-txt] [--resolution N] [--workers N] [--batch-size N] [--shard i/N]

The input is a folder tree, a .tar/.tar.gz archive, or the URL of one. The output is the folder that
ControlDataset reads (target/NAME.jpg, source/NAME.png, prompt.json) plus DIR/skipped.jsonl, one
{"path", "reason"} line per input file that could not be used. Nothing in the input stops the run; a
killed run continues when the same command runs again. --shard i/N takes every N-th input file starting
at i; shards may share one DIR.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from annotator.canny import CannyThresholds
from annotator.controls import CONTROL_TYPES
from common.cli import available_device
from common.disk import FULL_DISK_ERRNOS, free_bytes, human_size
from common.download import is_url

JPEG_MAX_QUALITY = 100  # Pillow's scale; above 95 it only grows the files

# The Canny workers are spawned processes, which re-run this script's top-level imports. The build
# (through the `dataset` package) brings torch, over a second and ~200 MB per worker that they never use,
# so it is imported inside the functions below, which run in this process only.


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--shard wants i/N, e.g. 0/4, got {text!r}") from err
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--shard i/N needs 0 <= i < N, got {text!r}")
    return index, count


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _jpeg_quality(text: str) -> int:
    value = int(text)
    if not 1 <= value <= JPEG_MAX_QUALITY:
        raise argparse.ArgumentTypeError(f"must be from 1 to {JPEG_MAX_QUALITY}, got {value}")
    return value


def _device(text: str) -> str:
    """A captioning device that this machine has (checked before any Canny work): cpu, cuda, cuda:N, mps."""
    available_device(text)
    return text


def _workers(text: str) -> int | None:
    """'auto' -> None (see dataset.build.auto_workers), else a count (0 or 1: no worker processes)."""
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--workers wants a count or 'auto', got {text!r}") from err
    if value < 0:
        raise argparse.ArgumentTypeError(f"--workers must be 0 or more, got {text!r}")
    return value


def _control_option(text: str) -> tuple[str, object]:
    """KEY=VALUE; VALUE read as JSON where it is JSON (2, 16.0, true), else as the text itself."""
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"--control-option wants KEY=VALUE, e.g. level=2, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    from dataset.build import IMAGES_PER_WORKER, BuildConfig

    defaults = BuildConfig(input="", output=Path())  # every default is BuildConfig's
    parser = argparse.ArgumentParser(
        description="Build a ControlNet training set (target/ photos, source/ control images, prompt.json) "
                    "from photos.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--input", required=True, help="folder, .tar/.tar.gz archive, or URL of an archive")
    parser.add_argument("--output", required=True, type=Path, help="dataset folder to create or continue")
    parser.add_argument("--control", choices=list(CONTROL_TYPES), default=defaults.control,
                        help="the control image to make: " + "; ".join(
                            f"{name}: {control.description}" for name, control in CONTROL_TYPES.items()))
    parser.add_argument("--control-option", type=_control_option, action="append", default=[], metavar="KEY=VALUE",
                        help="a setting of --control (repeatable), e.g. level=2 for tile; canny uses --canny-*")
    parser.add_argument("--annotator-model", default=None,
                        help="the model of a model-based --control (hub id, folder, file or URL): depth/normal a "
                             "transformers depth model (default Depth Anything V2 Small / DPT-hybrid MiDaS), "
                             "seg an ADE20K segmentation model (default openmmlab/upernet-convnext-small), "
                             "softedge the HED weights (default ControlNet 1.1's ControlNetHED.pth)")
    parser.add_argument("--caption-model", default=defaults.caption_model,
                        help="BLIP checkpoint (.pth path or URL), transformers folder or hub id")
    parser.add_argument("--captions-from-txt", action="store_true",
                        help="use NAME.txt beside an image as its prompt where it exists (BLIP for the rest)")
    parser.add_argument("--device", type=_device, default=None,
                        help="captioning and depth-model device (default: cuda if available)")
    parser.add_argument("--resolution", type=_positive, default=None,
                        help="scale the short side to N and centre-crop N x N (default: keep the size)")
    parser.add_argument("--workers", type=_workers, default=None,
                        help=f"Canny worker processes, or 'auto' (the default): one per {IMAGES_PER_WORKER} "
                             f"images, up to the CPU count (a worker takes seconds to start)")
    parser.add_argument("--batch-size", type=_positive, default=defaults.batch_size, help="captioning batch")
    parser.add_argument("--shard", type=_shard, default=(0, 1), help="i/N: process the i-th of N shares")
    parser.add_argument("--canny-low", type=int, default=defaults.canny_low)
    parser.add_argument("--canny-high", type=int, default=defaults.canny_high)
    parser.add_argument("--canny-random", action="store_true",
                        help="random thresholds per image, as ControlNet 1.1 trained (reproducible from --seed)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of --canny-random")
    parser.add_argument("--min-side", type=_positive, default=defaults.min_side,
                        help="skip images whose shorter side is below this many pixels")
    parser.add_argument("--max-pixels", type=_positive, default=defaults.max_pixels,
                        help="skip images with more pixels (decompression-bomb guard)")
    parser.add_argument("--jpeg-quality", type=_jpeg_quality, default=defaults.jpeg_quality,
                        help="quality of re-encoded targets (photos that need no change are copied)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 also when some files were skipped)."""
    from dataset.build import BuildConfig, BuildError, build_dataset
    from dataset.build.add_control import add_control, first_control

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        CannyThresholds(args.canny_low, args.canny_high)
    except ValueError as err:
        parser.error(str(err))
    # Before the build records its settings in --output: a mistyped path should leave nothing behind.
    if not is_url(args.input) and not Path(args.input).exists():
        print(f"prepare_dataset: error: --input {args.input} does not exist", file=sys.stderr)
        return 2
    if args.output.exists() and not args.output.is_dir():
        parser.error(f"--output {args.output} is a file, not a folder")
    config = BuildConfig(
        input=args.input, output=args.output, caption_model=args.caption_model,
        captions_from_txt=args.captions_from_txt, device=args.device, resolution=args.resolution,
        workers=args.workers, batch_size=args.batch_size, shard_index=args.shard[0], shard_count=args.shard[1],
        canny_low=args.canny_low, canny_high=args.canny_high, canny_random=args.canny_random, seed=args.seed,
        min_side=args.min_side, max_pixels=args.max_pixels, jpeg_quality=args.jpeg_quality,
        control=args.control, control_options=dict(args.control_option), annotator_model=args.annotator_model,
    )
    try:  # before the build records its settings in --output
        config.control_type()
    except BuildError as err:
        parser.error(str(err))
    first = first_control(args.output)
    if first is not None and first != args.control:
        # A finished dataset of another control type: add this type's images beside it.
        print(f"{args.output} holds a {first} dataset: adding {args.control} control images made from its "
              f"photos (--input is not read)")
        try:
            print(add_control(config).describe())
        except BuildError as err:
            print(f"prepare_dataset: error: {err}", file=sys.stderr)
            return 2
        return 0
    try:
        summary = build_dataset(config)
    except BuildError as err:
        print(f"prepare_dataset: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in FULL_DISK_ERRNOS:
            raise
        print(f"prepare_dataset: error: no space left on {args.output} ({human_size(free_bytes(args.output))} free): "
              f"the pairs made so far are kept; free some space and run the same command again to continue",
              file=sys.stderr)
        return 1
    print(summary.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
