"""dataset.py: the training contract dict(jpg in [-1, 1], txt, hint in [0, 1]), identical crops of target and
source, the pairs' own prompts, reproducible random crops, and validation of prompt.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from annotator.image_io import UnreadableImageError
from annotator.util import resize_and_crop
from dataset import (
    HINT_RANGE,
    PROMPT_FILE,
    TARGET_RANGE,
    ControlDataset,
    DatasetError,
    PromptEntry,
    read_prompt_file,
)
from dataset.build import BuildConfig, build_dataset
from tests.image_cases import mean_captions, photo, write_input_tree

PAIRS = 6
RESOLUTION = 32


def write_dataset(root: Path, sizes: list[tuple[int, int]]) -> Path:
    """Pairs whose source is the red channel of the target, both lossless PNG, so a test can check that
    they were resized and cropped alike; prompt i is 'prompt i'."""
    (root / "source").mkdir(parents=True)
    (root / "target").mkdir()
    lines = []
    for index, (width, height) in enumerate(sizes):
        target = photo(width, height, seed=index)
        Image.fromarray(target).save(root / f"target/{index}.png")
        Image.fromarray(target[:, :, 0]).save(root / f"source/{index}.png")
        lines.append(PromptEntry(f"source/{index}.png", f"target/{index}.png", f"prompt {index}").to_json_line())
    (root / PROMPT_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture
def root(tmp_path) -> Path:
    return write_dataset(tmp_path / "data", [(48 + 8 * i, 40 + 4 * i) for i in range(PAIRS)])


def write_prompt_lines(root: Path, lines: list[str]) -> None:
    (root / PROMPT_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")


# -------------------------------------------------------------------------------------- contract


def test_items_follow_the_contract(root):
    data = ControlDataset(root, resolution=RESOLUTION)
    assert len(data) == PAIRS
    item = data[2]
    assert set(item) == {"jpg", "txt", "hint"}
    assert item["txt"] == "prompt 2"
    for key, value_range in (("jpg", TARGET_RANGE), ("hint", HINT_RANGE)):
        value = item[key]
        assert value.dtype == np.float32 and value.shape == (RESOLUTION, RESOLUTION, 3)  # HWC
        assert value_range[0] <= value.min() and value.max() <= value_range[1]
    expected = resize_and_crop(photo(64, 48, seed=2), RESOLUTION)  # centre crop by default
    np.testing.assert_allclose(item["jpg"], expected / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_allclose(item["hint"][:, :, 1], expected[:, :, 0] / 255.0, atol=1e-6)


def test_indexing_is_a_sequence_of_its_pairs(root):
    data = ControlDataset(root, resolution=RESOLUTION)
    assert [item["txt"] for item in data] == [f"prompt {i}" for i in range(PAIRS)]  # iteration stops at the end
    assert data[-1]["txt"] == f"prompt {PAIRS - 1}"
    with pytest.raises(IndexError):
        data[PAIRS]


def test_the_ends_of_the_ranges_map_to_0_and_255(tmp_path):
    root = tmp_path / "data"
    (root / "target").mkdir(parents=True)
    (root / "source").mkdir()
    extremes = np.zeros((8, 8, 3), np.uint8)
    extremes[:, 4:] = 255
    Image.fromarray(extremes).save(root / "target/a.png")
    Image.fromarray(extremes).save(root / "source/a.png")
    write_prompt_lines(root, [PromptEntry("source/a.png", "target/a.png", "x").to_json_line()])
    item = ControlDataset(root, resolution=None)[0]
    assert item["jpg"].min() == -1.0 and item["jpg"].max() == 1.0
    assert item["hint"].min() == 0.0 and item["hint"].max() == 1.0


def test_random_crops_cut_target_and_source_alike(root):
    data = ControlDataset(root, resolution=RESOLUTION, random_crop=True, seed=0)
    windows = set()
    for epoch in range(4):
        data.set_epoch(epoch)
        for index in range(PAIRS):
            item = data[index]
            # source = red channel of target, so after identical crops: hint (any channel) == red of jpg.
            np.testing.assert_allclose(item["hint"][:, :, 0] * 255.0, (item["jpg"][:, :, 0] + 1.0) * 127.5,
                                       atol=1e-3)
            windows.add((index, item["jpg"].tobytes()))
    assert len(windows) > PAIRS  # the windows moved between epochs


@pytest.mark.parametrize("random_crop", [False, True])
def test_target_and_hint_alone_are_the_items_parts(root, tmp_path, random_crop):
    data = ControlDataset(root, resolution=RESOLUTION, random_crop=random_crop, seed=0)
    data.set_epoch(1)
    for index in range(PAIRS):
        item = data[index]
        np.testing.assert_array_equal(data.target(index), item["jpg"])
        np.testing.assert_array_equal(data.hint(index), item["hint"])
    first = data[0]
    # Each reads its own file only.
    (root / "source").rename(tmp_path / "source_away")
    np.testing.assert_array_equal(data.target(0), first["jpg"])
    with pytest.raises(UnreadableImageError, match="not a regular file"):
        data.hint(0)


def test_native_size_needs_one_size(root, tmp_path):
    with pytest.raises(DatasetError, match="sizes"):
        ControlDataset(root, resolution=None)
    same = write_dataset(tmp_path / "same", [(40, 24)] * 3)
    item = ControlDataset(same, resolution=None)[1]
    assert item["jpg"].shape == item["hint"].shape == (24, 40, 3)


def test_a_dataloader_batches_items(root):
    batch = next(iter(DataLoader(ControlDataset(root, resolution=RESOLUTION), batch_size=4)))
    assert batch["jpg"].shape == batch["hint"].shape == (4, RESOLUTION, RESOLUTION, 3)
    assert batch["jpg"].dtype == torch.float32 and batch["txt"] == [f"prompt {i}" for i in range(4)]


# ---------------------------------------------------------------------------------- prompts and seeds


def test_every_item_keeps_its_own_prompt(root):
    # Prompt dropout is the trainer's (ControlNetTrainer.prompt_dropout), also for cached batches.
    data = ControlDataset(root, resolution=RESOLUTION, random_crop=True, seed=1)
    for epoch in range(3):
        data.set_epoch(epoch)
        assert [data[i]["txt"] for i in range(PAIRS)] == [f"prompt {i}" for i in range(PAIRS)]


def crops(data: ControlDataset, order: range | reversed) -> dict[int, bytes]:
    return {i: data[i]["jpg"].tobytes() for i in order}


def test_a_seed_makes_draws_a_function_of_seed_epoch_and_index(root):
    def draws(seed: int, epoch: int, order=range(PAIRS)) -> dict[int, bytes]:
        data = ControlDataset(root, resolution=RESOLUTION, random_crop=True, seed=seed)
        data.set_epoch(epoch)
        return crops(data, order)

    assert draws(7, 0) == draws(7, 0, reversed(range(PAIRS)))  # not a stream: the order of reads is irrelevant
    assert draws(7, 0) != draws(7, 1)
    assert draws(7, 0) != draws(8, 0)


def test_without_a_seed_draws_come_from_torch(root):
    data = ControlDataset(root, resolution=RESOLUTION, random_crop=True)

    def draw(torch_seed: int) -> dict[int, bytes]:
        torch.manual_seed(torch_seed)
        return crops(data, range(PAIRS))

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def test_bad_options_are_refused(root):
    with pytest.raises(ValueError, match="resolution"):
        ControlDataset(root, resolution=0)


# ---------------------------------------------------------------------------------- validation


def test_malformed_lines_are_reported_with_their_number(root):
    good = PromptEntry("source/0.png", "target/0.png", "p").to_json_line()
    cases = {
        '{"source": "source/0.png", "target": ': "line 3: not valid JSON",
        '["source/0.png", "target/0.png", "p"]': "line 3: expected a JSON object",
        '{"source": "source/0.png", "target": "target/0.png"}': "line 3: key 'prompt' missing",
        '{"source": "source/0.png", "target": "target/0.png", "prompt": 5}': "line 3: key 'prompt' missing or not",
    }
    for bad, message in cases.items():
        write_prompt_lines(root, [good, good, bad, good])
        with pytest.raises(DatasetError, match=message):
            ControlDataset(root)


def test_missing_files_are_listed(root):
    lines = [PromptEntry(f"source/{i}.png", f"target/{i}.png", "p").to_json_line() for i in range(3)]
    (root / "source/1.png").unlink()
    (root / "target/2.png").unlink()
    write_prompt_lines(root, lines)
    with pytest.raises(DatasetError, match="2 file") as error:
        ControlDataset(root)
    assert "source/1.png" in str(error.value) and "target/2.png" in str(error.value)


def test_paths_outside_the_dataset_are_refused(root, tmp_path):
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    (root / "source/link.png").symlink_to(outside)
    for path in ("../outside.png", str(outside), "source/../../outside.png", "source/link.png"):
        write_prompt_lines(root, [json.dumps({"source": path, "target": "target/0.png", "prompt": "p"})])
        with pytest.raises(DatasetError, match="line 1: key 'source'"):
            ControlDataset(root)


def test_empty_or_absent_prompt_file_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        read_prompt_file(tmp_path)
    (tmp_path / PROMPT_FILE).write_text("\n")
    with pytest.raises(DatasetError, match="no entries"):
        read_prompt_file(tmp_path)


# ---------------------------------------------------------------------------------- end to end


def test_reads_what_prepare_dataset_writes(tmp_path):
    tree = write_input_tree(tmp_path / "photos", captions=False)
    output = tmp_path / "dataset"
    build_dataset(BuildConfig(input=str(tree), output=output, workers=0), mean_captions)
    data = ControlDataset(output, resolution=RESOLUTION)
    batch = next(iter(DataLoader(data, batch_size=len(data))))
    assert batch["hint"].shape == (len(data), RESOLUTION, RESOLUTION, 3)
    levels = torch.unique(batch["hint"])
    assert levels[0] == 0.0 and levels[-1] > 0.5 and len(levels) > 2  # edges, softened by the resize
    assert all(prompt.startswith("mean ") for prompt in batch["txt"])


@pytest.mark.parametrize("content, line, message", [
    ('{"source": "source/0.png", "target": "target/0.png", "prompt": "a\x00b"}\n', 1, "NUL byte at byte 66"),
    ("\n".join(['{"source": "source/0.png", "target": "target/0.png", "prompt": "p"}'] * 2)
     .encode("utf-16"), 1, "UTF-16"),
    ('{"source": "source/0.png", "target": "target/0.png", "prompt": "p"}\n'
     '{"source": "source/1.png", "target": "target/1.png", "prompt": "caf\xe9"}\n'.encode("latin-1"), 2,
     r"not UTF-8 \(byte 0xe9 at byte 68"),
])
def test_prompt_file_in_another_encoding_names_the_line(root, content, line, message):
    path = root / PROMPT_FILE
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    with pytest.raises(DatasetError, match=rf"{PROMPT_FILE} line {line}: .*{message}"):
        read_prompt_file(root)


def test_prompt_file_with_a_utf8_byte_order_mark_reads(root):
    path = root / PROMPT_FILE
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert [entry.prompt for entry in read_prompt_file(root)] == [f"prompt {i}" for i in range(PAIRS)]
