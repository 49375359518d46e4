"""toy/: the synthetic domain is deterministic, captions name what is drawn, the photo folders build into
a dataset with prompt.json, and the classifier reads scenes back."""

from __future__ import annotations

import json

import numpy as np
import pytest

import prepare_dataset
from annotator import canny
from toy.classify import FRAME, MATCH_FRAME, MISS_FRAME, read_scene, shape_agreement, shape_grid, shape_hits
from toy.photos import main as photos_main
from toy.photos import scenes, write_photo_folder
from toy.shapes import BACKGROUNDS, COLOURS, SHAPES, Scene, all_captions, render, sample_scene


def test_scenes_are_deterministic_and_splits_differ():
    first = list(scenes(20, seed=3, split="train"))
    assert first == list(scenes(20, seed=3, split="train"))
    assert first[:5] == list(scenes(5, seed=3, split="train"))  # a prefix does not depend on the count
    assert first != list(scenes(20, seed=4, split="train"))
    assert first != list(scenes(20, seed=3, split="heldout"))
    with pytest.raises(ValueError, match="split"):
        list(scenes(1, 0, "test"))


def test_photo_folder_bytes_are_reproducible(tmp_path):
    write_photo_folder(tmp_path / "a", 6, seed=1, split="heldout", progress=False)
    write_photo_folder(tmp_path / "b", 6, seed=1, split="heldout", progress=False)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len(names) == 12 and names[:2] == ["toy_00000.png", "toy_00000.txt"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_captions_match_the_drawn_shapes():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = sample_scene(rng)
        reading = read_scene(render(scene))
        assert (reading.shape, reading.colour, reading.background) == (scene.shape, scene.colour, scene.background)
        assert scene.caption.split()[1:3] == [scene.colour, scene.shape]
        assert scene.caption.endswith(f"on a {scene.background} background")


def test_caption_grammar_and_vocabulary():
    assert Scene("circle", "orange", "black", 0.5, 0.5, 0.4).caption == "an orange circle on a black background"
    assert Scene("square", "red", "white", 0.5, 0.5, 0.4).caption == "a red square on a white background"
    assert len(set(all_captions())) == len(SHAPES) * len(COLOURS) * len(BACKGROUNDS)
    with pytest.raises(ValueError, match="colour"):
        Scene("circle", "teal", "white", 0.5, 0.5, 0.4)


def test_shapes_lie_inside_the_image_and_give_clean_edges():
    rng = np.random.default_rng(1)
    for _ in range(50):
        scene = sample_scene(rng)
        image = render(scene)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        edges = canny(image)
        assert edges.any()
        # The outline is inside the image: no edge pixel on the border.
        assert not (edges[0].any() or edges[-1].any() or edges[:, 0].any() or edges[:, -1].any())
        rows, cols = np.nonzero(edges)
        centre = np.array([rows.mean(), cols.mean()]) / 64
        assert np.abs(centre - [scene.centre_y, scene.centre_x]).max() < 0.1


def test_classifier_rejects_an_empty_image():
    reading = read_scene(np.full((64, 64, 3), 255, np.uint8))
    assert reading.shape is None and reading.colour is None and reading.background == "white"


def test_photos_build_into_a_dataset(tmp_path):
    assert photos_main(["--output", str(tmp_path / "photos"), "--train", "5", "--heldout", "3", "--seed", "2"]) == 0
    written = list(scenes(3, 2, "heldout"))
    assert prepare_dataset.main(["--input", str(tmp_path / "photos" / "heldout"), "--output", str(tmp_path / "data"),
                                 "--captions-from-txt", "--workers", "1"]) == 0
    entries = [json.loads(line) for line in (tmp_path / "data" / "prompt.json").read_text().splitlines()]
    assert [e["prompt"] for e in entries] == [scene.caption for scene in written]
    assert [e["source"] for e in entries] == [f"source/toy_{i:05d}.png" for i in range(3)]


def test_shape_agreement_reads_the_photo_and_the_generated_image():
    def scene(shape: str) -> np.ndarray:
        return render(Scene(shape, "red", "white", 0.5, 0.5, 0.5), 64)

    photos = np.stack([scene("square"), scene("circle"), scene("triangle")])
    # The right shapes, then one wrong and one without any shape.
    rate, made, wanted = shape_agreement(photos, photos)
    assert rate == 1.0 and made == wanted == ["square", "circle", "triangle"]
    generated = np.stack([scene("square"), scene("triangle"), np.full_like(photos[0], 255)])
    rate, made, wanted = shape_agreement(generated, photos)
    assert rate == pytest.approx(1 / 3) and made == ["square", "triangle", None]
    assert shape_hits(made, wanted) == [True, False, False]
    with pytest.raises(ValueError, match="as many"):
        shape_agreement(generated[:2], photos)


def test_shape_grid_frames_hits_green_and_misses_red():
    controls = np.zeros((3, 8, 8, 3), np.uint8)
    generated = [np.full((3, 8, 8, 3), 100, np.uint8)]
    grid = shape_grid(controls, generated, [[True, False, True]], blocks=2)
    cell = 8 + 2 * FRAME
    assert grid.shape == (2 * cell, 2 * (2 * cell + 2 * FRAME), 3)
    assert tuple(grid[0, cell]) == MATCH_FRAME  # pair 0: the generated image's frame
    assert tuple(grid[cell, cell]) == MISS_FRAME  # pair 1, below it
    assert tuple(grid[FRAME + 1, cell + FRAME + 1]) == (100, 100, 100)
