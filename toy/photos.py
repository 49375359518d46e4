"""Write the toy domain as photo folders (NAME.png + NAME.txt caption), a train and a held-out split.

    python -m toy.photos --output outputs/toy_photos --train 1000 --heldout 32 --seed 0

gives outputs/toy_photos/{train,heldout}/toy_00000.png + toy_00000.txt, which
`prepare_dataset.py --input .../train --output ... --captions-from-txt` turns into a dataset folder.
Deterministic: the same seed writes the same bytes. The splits draw from separate streams, so the
held-out scenes do not depend on how many training scenes there are.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from toy.shapes import DEFAULT_RESOLUTION, Scene, render, sample_scene

SPLITS = ("train", "heldout")
NAME_FORMAT = "toy_{:05d}"


def scenes(count: int, seed: int, split: str) -> Iterator[Scene]:
    """The first `count` scenes of a split: a fixed sequence for each (seed, split)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    for _ in range(count):
        yield sample_scene(rng)


def write_photo_folder(folder: str | Path, count: int, seed: int, split: str,
                       resolution: int = DEFAULT_RESOLUTION, progress: bool = True) -> list[Scene]:
    """Write `count` scenes as folder/toy_NNNNN.png with the caption in folder/toy_NNNNN.txt.

    Returns the scenes in file order. Existing files of the same names are overwritten.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index, scene in enumerate(tqdm(scenes(count, seed, split), total=count, desc=f"toy {split}",
                                       disable=not progress)):
        name = NAME_FORMAT.format(index)
        Image.fromarray(render(scene, resolution)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(scene.caption + "\n", encoding="utf-8")
        written.append(scene)
    return written


def write_toy_photos(output: str | Path, train: int, heldout: int, seed: int = 0,
                     resolution: int = DEFAULT_RESOLUTION, progress: bool = True) -> dict[str, Path]:
    """Both splits under output/train and output/heldout; returns {split: folder}."""
    output = Path(output)
    folders = {}
    for split, count in zip(SPLITS, (train, heldout), strict=True):
        folders[split] = output / split
        write_photo_folder(folders[split], count, seed, split, resolution, progress)
    return folders


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Write the synthetic toy photos (coloured shapes with captions).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output", required=True, help="folder to hold train/ and heldout/")
    parser.add_argument("--train", type=int, default=1000, help="training photos")
    parser.add_argument("--heldout", type=int, default=32, help="held-out photos (evaluation)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=DEFAULT_RESOLUTION, help="image side in pixels")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.train < 0 or args.heldout < 0 or args.resolution < 8:
        print("error: --train/--heldout must be >= 0 and --resolution >= 8", file=sys.stderr)
        return 1
    folders = write_toy_photos(args.output, args.train, args.heldout, args.seed, args.resolution)
    for split, folder in folders.items():
        print(f"{split}: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
