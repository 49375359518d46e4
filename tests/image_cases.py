"""Image files of every kind a photo folder holds, good and bad, for the dataset-build tests.

Each writer makes one small file and returns its path. `write_input_tree` lays them out as a nested
folder like the Stanford Dogs archive, with same-named files in different folders.
"""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from annotator.image_io import EXIF_ORIENTATION_TAG

# EXIF orientation 6: the stored pixels must be turned 90 degrees clockwise to stand upright.
ROTATE_CLOCKWISE = 6
# Declared size of the decompression bomb: far above PIL's hard limit of 2 * MAX_IMAGE_PIXELS.
BOMB_SIDE = 40_000


def photo(width: int, height: int, seed: int) -> np.ndarray:
    """A photo-like RGB uint8 (height, width, 3): smooth colour gradients, mild noise, a bright rectangle
    whose outline any thresholds find, and a faint one (Sobel step about 180) that only thresholds with
    high < 180 find."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(40, 100, 3)
    image = base + 60 * np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1)
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    image[top : top + height // 3, left : left + width // 3] += 90
    image[height * 3 // 4 :, width * 3 // 4 :] += 45
    image += rng.normal(0, 2, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write(path: Path, image: Image.Image, **save_args) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save_args)
    return path


def rgb_jpeg(path: Path, width: int = 96, height: int = 72, seed: int = 0) -> Path:
    return write(path, Image.fromarray(photo(width, height, seed)), quality=95)


def exif_rotated_jpeg(path: Path, width: int = 96, height: int = 64, seed: int = 1) -> Path:
    """Stored width x height, to be shown turned clockwise: upright it is height x width (W x H)."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = ROTATE_CLOCKWISE
    return write(path, Image.fromarray(photo(width, height, seed)), exif=exif, quality=95)


def cmyk_jpeg(path: Path, seed: int = 2) -> Path:
    return write(path, Image.fromarray(photo(80, 80, seed)).convert("CMYK"), quality=95)


def grey_jpeg(path: Path, seed: int = 3) -> Path:
    return write(path, Image.fromarray(photo(80, 96, seed)).convert("L"), quality=95)


def palette_png(path: Path, seed: int = 4) -> Path:
    return write(path, Image.fromarray(photo(90, 70, seed)).convert("P", palette=Image.Palette.ADAPTIVE))


def rgba_png(path: Path, seed: int = 5) -> Path:
    rgba = np.dstack([photo(70, 90, seed), np.full((90, 70), 255, np.uint8)])
    rgba[:, :20, 3] = 0  # a fully transparent band: must come out white
    return write(path, Image.fromarray(rgba, "RGBA"))


def grey16_png(path: Path, seed: int = 6) -> Path:
    """16-bit grey using the full 0..65535 range."""
    grey = photo(72, 72, seed)[:, :, 0].astype(np.uint16) * 257
    return write(path, Image.fromarray(grey))


def bilevel_png(path: Path, seed: int = 7) -> Path:
    return write(path, Image.fromarray(photo(64, 80, seed)).convert("1"))


def empty_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def truncated_jpeg(path: Path, seed: int = 8) -> Path:
    buffer = io.BytesIO()
    Image.fromarray(photo(120, 90, seed)).save(buffer, format="JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def garbage_png(path: Path) -> Path:
    """Random bytes behind an image suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(9).integers(0, 256, 500, dtype=np.uint8).tobytes())
    return path


def text_file(path: Path, text: str = "not an image\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def tiny_png(path: Path) -> Path:
    return write(path, Image.fromarray(photo(12, 9, 10)))


def bomb_png(path: Path, side: int = BOMB_SIDE) -> Path:
    """A small PNG whose header claims side x side pixels (a decompression bomb)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    # IHDR starts after the 8-byte signature: length (4), type (4), width (4), height (4), 5 more bytes, CRC.
    ihdr_start = 8 + 4
    data[ihdr_start + 4 : ihdr_start + 12] = struct.pack(">II", side, side)
    crc = zlib.crc32(bytes(data[ihdr_start : ihdr_start + 4 + 13]))
    data[ihdr_start + 17 : ihdr_start + 21] = struct.pack(">I", crc)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


# Relative path -> writer, for the tree below. Good files get a caption .txt beside them.
GOOD_FILES = {
    "Images/n001-chihuahua/dog.jpg": lambda p: rgb_jpeg(p, seed=11),
    "Images/n002-terrier/dog.jpg": lambda p: rgb_jpeg(p, 80, 100, seed=12),  # same name, other folder
    "Images/n002-terrier/dog.png": rgba_png,  # same stem and folder, other suffix
    "Images/n002-terrier/rotated.jpg": exif_rotated_jpeg,
    "Images/n003-beagle/cmyk.jpg": cmyk_jpeg,
    "Images/n003-beagle/grey.jpg": grey_jpeg,
    "Images/n003-beagle/palette.png": palette_png,
    "Images/n003-beagle/deep/grey16.png": grey16_png,
    "Images/n003-beagle/deep/bilevel.png": bilevel_png,
    "top.jpg": lambda p: rgb_jpeg(p, 128, 96, seed=13),
}
# Relative path -> (writer, a word the skip reason must contain).
BAD_FILES = {
    "Images/n001-chihuahua/empty.jpg": (empty_file, "empty"),
    "Images/n001-chihuahua/truncated.jpg": (truncated_jpeg, "truncated"),
    "Images/n002-terrier/garbage.png": (garbage_png, "not an image"),
    "Images/n002-terrier/notes.md": (text_file, "not an image"),
    "Images/readme.txt": (text_file, "not an image"),  # a .txt beside no image is no caption
    "Images/n003-beagle/tiny.png": (tiny_png, "too small"),
    "Images/n003-beagle/bomb.png": (bomb_png, "too large"),
}


def caption_of(relative_path: str) -> str:
    """The caption the tree stores beside a good image (NAME.txt serves every NAME.* in its folder)."""
    return f"a photo from {relative_path.rsplit('.', 1)[0]}"


def write_input_tree(root: Path, captions: bool = True, good: list[str] | None = None) -> Path:
    """GOOD_FILES (or the listed ones of them) and all BAD_FILES under root."""
    for relative in GOOD_FILES if good is None else good:
        writer = GOOD_FILES[relative]
        writer(root / relative)
        if captions:
            text_file((root / relative).with_suffix(".txt"), caption_of(relative) + "\n")
    for relative, (writer, _) in BAD_FILES.items():
        writer(root / relative)
    return root


def mean_captions(images: list[Image.Image]) -> list[str]:
    """A fake captioner for tests: deterministic text from the pixels."""
    return [f"mean {np.asarray(image, dtype=np.float64).mean():.4f}" for image in images]


def slow_mean_captions(images: list[Image.Image], seconds_per_batch: float = 0.3) -> list[str]:
    """mean_captions, slowed down so that a test can kill a run part-way."""
    time.sleep(seconds_per_batch)
    return mean_captions(images)
