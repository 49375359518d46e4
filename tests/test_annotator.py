"""annotator/: the original's HWC3 / resize_image, Canny with its defaults and random thresholds, robust
image reading, and the one-file pair maker the dataset build runs in its workers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from annotator import (
    DEFAULT_HIGH_THRESHOLD,
    DEFAULT_LOW_THRESHOLD,
    HWC3,
    CannyDetector,
    CannyThresholds,
    UnreadableImageError,
    canny,
    random_thresholds,
    read_image_rgb,
    resize_image,
)
from annotator.canny import RANDOM_HIGH_RANGE, RANDOM_LOW_RANGE
from annotator.pairs import PairJob, PairSettings, make_canny_pair
from annotator.util import resize_and_crop
from tests import image_cases

# --------------------------------------------------------------------------------------- util


def test_hwc3_grey_is_replicated_and_rgb_passes_through():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for image in (grey, grey[:, :, None]):
        out = HWC3(image)
        assert out.shape == (3, 4, 3)
        assert all(np.array_equal(out[:, :, c], grey) for c in range(3))
    rgb = np.zeros((2, 2, 3), np.uint8)
    assert HWC3(rgb) is rgb


def test_hwc3_composites_alpha_onto_white():
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, :, :3] = 40
    rgba[0, :, 3] = [0, 255, 51]  # transparent, opaque, 20 % opaque
    out = HWC3(rgba)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [40, 40, 40]
    assert out[0, 2].tolist() == [212, 212, 212]  # 40 * 0.2 + 255 * 0.8


def test_hwc3_rejects_what_it_cannot_convert():
    with pytest.raises(TypeError, match="uint8"):
        HWC3(np.zeros((2, 2, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        HWC3(np.zeros((2, 2, 2), np.uint8))


@pytest.mark.parametrize(
    ("shape", "resolution", "expected"),
    [
        ((120, 250, 3), 64, (64, 128, 3)),  # shrink: 250 * 64/120 = 133 -> 128
        ((50, 70, 3), 128, (128, 192, 3)),  # enlarge: 70 * 128/50 = 179 -> 192
        ((512, 512, 3), 512, (512, 512, 3)),
    ],
)
def test_resize_image_snaps_to_multiples_of_64(shape, resolution, expected):
    assert resize_image(np.zeros(shape, np.uint8), resolution).shape == expected


def test_resize_and_crop_cuts_the_requested_window():
    columns = np.tile(np.arange(100, dtype=np.uint8), (64, 1))  # value = column index
    assert resize_and_crop(columns, 64, (0.5, 0.0))[0, 0] == 0
    assert resize_and_crop(columns, 64, (0.5, 1.0))[0, -1] == 99
    centre = resize_and_crop(columns, 64)
    assert centre.shape == (64, 64) and centre[0, 0] == 18  # (100 - 64) / 2
    photo = image_cases.photo(150, 100, seed=0)
    assert resize_and_crop(photo, 50).shape == (50, 50, 3)
    assert resize_and_crop(photo, 200).shape == (200, 200, 3)


# -------------------------------------------------------------------------------------- canny


def test_canny_defaults_are_the_originals():
    """The original's canny app: cv2.Canny(image, 100, 200). Separate squares of rising contrast have
    outlines on both sides of the thresholds, so other defaults would mark other squares."""
    import cv2

    image = np.zeros((24, 128, 3), np.uint8)
    for i, level in enumerate((15, 20, 25, 30, 40, 50, 60, 80)):
        image[8:16, 16 * i + 4:16 * i + 12] = level
    expected = cv2.Canny(image, 100, 200)
    assert expected.any()
    assert not np.array_equal(expected, cv2.Canny(image, 50, 100))
    assert not np.array_equal(expected, cv2.Canny(image, 100, 250))
    np.testing.assert_array_equal(canny(image), expected)
    np.testing.assert_array_equal(CannyDetector()(image), expected)
    assert (DEFAULT_LOW_THRESHOLD, DEFAULT_HIGH_THRESHOLD) == (CannyThresholds().low, CannyThresholds().high)


def test_canny_finds_the_outline_of_a_square():
    image = np.zeros((64, 64, 3), np.uint8)
    image[16:48, 16:48] = 255
    edges = canny(image)
    assert edges.shape == (64, 64) and edges.dtype == np.uint8
    assert set(np.unique(edges).tolist()) == {0, 255}
    rows, cols = np.nonzero(edges)
    assert rows.min() >= 14 and rows.max() <= 49 and cols.min() >= 14 and cols.max() <= 49
    assert not edges[20:44, 20:44].any()  # nothing inside the flat square
    assert np.array_equal(CannyDetector()(image, 100, 200), edges)


def test_canny_thresholds_decide_which_edges_survive():
    # A step of 30 grey levels: Sobel L1 gradient 4 * 30 = 120, between the default low and high, so with
    # the defaults it has no strong seed to hang on and vanishes; with lower thresholds it is an edge.
    image = np.full((32, 32), 100, np.uint8)
    image[:, 16:] = 130
    assert not canny(image).any()
    assert canny(image, CannyThresholds(50, 100))[:, 15:17].any()


def test_canny_thresholds_are_checked():
    with pytest.raises(ValueError, match="low < high"):
        CannyThresholds(200, 100)


def test_random_thresholds_are_reproducible_in_range_and_vary():
    keys = [f"folder/image{i}.jpg" for i in range(30)]
    drawn = [random_thresholds(0, key) for key in keys]
    assert drawn == [random_thresholds(0, key) for key in keys]
    assert all(RANDOM_LOW_RANGE[0] <= t.low <= RANDOM_LOW_RANGE[1] < t.high <= RANDOM_HIGH_RANGE[1] for t in drawn)
    assert len({(t.low, t.high) for t in drawn}) > 20
    assert [random_thresholds(1, key) for key in keys] != drawn


# ----------------------------------------------------------------------------------- image io


@pytest.mark.parametrize(
    ("writer", "size"),
    [
        (image_cases.rgb_jpeg, (96, 72)),
        (image_cases.cmyk_jpeg, (80, 80)),
        (image_cases.grey_jpeg, (80, 96)),
        (image_cases.palette_png, (90, 70)),
        (image_cases.rgba_png, (70, 90)),
        (image_cases.grey16_png, (72, 72)),
        (image_cases.bilevel_png, (64, 80)),
        (image_cases.exif_rotated_jpeg, (64, 96)),  # stored 96 x 64, upright 64 x 96
    ],
)
def test_every_image_mode_reads_as_upright_rgb(tmp_path, writer, size):
    suffix = ".jpg" if writer.__name__.endswith("jpeg") else ".png"
    decoded = read_image_rgb(writer(tmp_path / f"image{suffix}"))
    width, height = size
    assert decoded.pixels.shape == (height, width, 3) and decoded.pixels.dtype == np.uint8
    assert decoded.file_is_rgb_jpeg == (writer is image_cases.rgb_jpeg)


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.array([[0, 257 * 100, 65535]], np.uint16)).save(path)
    assert read_image_rgb(path).pixels[0, :, 0].tolist() == [0, 100, 255]


def test_transparent_pixels_become_white(tmp_path):
    pixels = read_image_rgb(image_cases.rgba_png(tmp_path / "rgba.png")).pixels
    assert (pixels[:, :20] == 255).all()
    assert not (pixels[:, 20:] == 255).all()


def test_exif_rotation_turns_the_pixels(tmp_path):
    path = image_cases.exif_rotated_jpeg(tmp_path / "rotated.jpg")
    with Image.open(path) as stored:
        stored_pixels = np.asarray(stored.convert("RGB")).astype(int)
    upright = read_image_rgb(path).pixels.astype(int)
    # Orientation 6: upright = stored turned clockwise, i.e. np.rot90 with k=-1.
    assert np.abs(upright - np.rot90(stored_pixels, k=-1)).max() == 0


@pytest.mark.parametrize(("relative", "case"), sorted(image_cases.BAD_FILES.items()))
def test_bad_files_raise_with_a_reason(tmp_path, relative, case):
    writer, word = case
    path = writer(tmp_path / Path(relative).name)
    if word == "too small":
        read_image_rgb(path)  # readable: being too small is the dataset build's rule, see below
        return
    with pytest.raises(UnreadableImageError, match=word):
        read_image_rgb(path)


def test_pixel_limit_refuses_before_decoding(tmp_path):
    path = image_cases.rgb_jpeg(tmp_path / "photo.jpg", 100, 80)
    with pytest.raises(UnreadableImageError, match="too large: 100x80"):
        read_image_rgb(path, max_pixels=100 * 80 - 1)
    assert read_image_rgb(path, max_pixels=100 * 80).pixels.shape == (80, 100, 3)


def test_between_pils_limit_and_twice_it_is_refused_too(tmp_path):
    # PIL only warns there; the reader treats the warning as a refusal.
    side = int((Image.MAX_IMAGE_PIXELS * 1.5) ** 0.5)
    with pytest.raises(UnreadableImageError, match="too large"):
        read_image_rgb(image_cases.bomb_png(tmp_path / "bomb.png", side), max_pixels=None)


def test_non_regular_files_are_refused(tmp_path):
    with pytest.raises(UnreadableImageError, match="not a regular file"):
        read_image_rgb(tmp_path)
    os.mkfifo(tmp_path / "pipe.jpg")
    with pytest.raises(UnreadableImageError, match="not a regular file"):
        read_image_rgb(tmp_path / "pipe.jpg")


# ---------------------------------------------------------------------------------------- pairs


def _job(tmp_path: Path, image_path: Path) -> PairJob:
    (tmp_path / "out").mkdir(exist_ok=True)
    return PairJob(image_path, image_path.name, tmp_path / "out" / "x.jpg", tmp_path / "out" / "x.png",
                   tmp_path / "scratch")


def test_pair_is_a_photo_and_its_edges_of_the_same_size(tmp_path):
    job = _job(tmp_path, image_cases.cmyk_jpeg(tmp_path / "cmyk.jpg"))
    assert make_canny_pair(job, PairSettings()) is None
    with Image.open(job.target_path) as target, Image.open(job.source_path) as source:
        assert (target.format, target.mode, target.size) == ("JPEG", "RGB", (80, 80))
        assert (source.format, source.mode, source.size) == ("PNG", "L", (80, 80))
        edges = np.asarray(source)
    assert np.array_equal(edges, canny(read_image_rgb(job.image_path).pixels))
    assert not any((tmp_path / "scratch").iterdir())


def test_upright_rgb_jpeg_is_copied_byte_for_byte(tmp_path):
    job = _job(tmp_path, image_cases.rgb_jpeg(tmp_path / "photo.jpg"))
    assert make_canny_pair(job, PairSettings()) is None
    assert job.target_path.read_bytes() == job.image_path.read_bytes()


def test_pair_at_a_training_resolution(tmp_path):
    job = _job(tmp_path, image_cases.rgb_jpeg(tmp_path / "photo.jpg", 150, 100))
    assert make_canny_pair(job, PairSettings(resolution=64)) is None
    for path in (job.target_path, job.source_path):
        with Image.open(path) as image:
            assert image.size == (64, 64)


def test_pair_with_random_thresholds_uses_the_key(tmp_path):
    job = _job(tmp_path, image_cases.rgb_jpeg(tmp_path / "photo.jpg", 128, 128))
    assert make_canny_pair(job, PairSettings(thresholds=None, random_seed=3)) is None
    expected = canny(read_image_rgb(job.image_path).pixels, random_thresholds(3, job.key))
    assert np.array_equal(np.asarray(Image.open(job.source_path)), expected)


def test_pair_skips_with_a_reason(tmp_path):
    small = make_canny_pair(_job(tmp_path, image_cases.tiny_png(tmp_path / "t.png")), PairSettings())
    empty = make_canny_pair(_job(tmp_path, image_cases.empty_file(tmp_path / "e.jpg")), PairSettings())
    assert "too small" in small.reason and "empty" in empty.reason
    assert not small.transient and not empty.transient  # the files themselves are unusable
    assert not (tmp_path / "out" / "x.jpg").exists()
