"""The dataset build's inputs as an unlucky user has them: unreadable photos, caption files and folders
(reported, and tried again by the next run), linked folders, an --output inside the --input, a photo that
takes over the name of a removed one, two shards writing into one folder; and captions computed from the
decoded photo rather than from its re-encoded JPEG target.

Permission cases run the build in a child process without the capabilities that let root read anything
(setpriv), so they test what a normal user sees also when the suite runs as root."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from annotator import read_image_rgb
from annotator.util import resize_and_crop
from dataset import PROMPT_FILE
from dataset.build import BUILD_DIR, SKIPPED_FILE, BuildConfig, BuildError, build_dataset, pair_names
from dataset.build import journal as build_journal
from tests.image_cases import GOOD_FILES, caption_of, mean_captions, rgb_jpeg, write_input_tree

REPO = Path(__file__).resolve().parents[1]
CHILD_TIMEOUT_S = 120
# The capabilities that let root open any file and list any folder whatever its mode.
BYPASS_CAPABILITIES = "-dac_override,-dac_read_search"
# A build in a child process with the fake captioner; prints the summary.
CHILD_BUILD = """
import sys
from pathlib import Path
from dataset.build import BuildConfig, build_dataset
from tests.image_cases import mean_captions
summary = build_dataset(BuildConfig(input=sys.argv[1], output=Path(sys.argv[2]), workers=0,
                                    captions_from_txt=sys.argv[3] == "txt"), mean_captions)
print(summary.describe())
"""


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def as_normal_user() -> list[str]:
    """A command prefix under which file modes bind (root keeps its uid but loses the bypass)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot drop the capability that ignores file modes")
    return ["setpriv", f"--inh-caps={BYPASS_CAPABILITIES}", f"--bounding-set={BYPASS_CAPABILITIES}"]


def child_build(tree: Path, output: Path, captions: str = "model") -> subprocess.CompletedProcess:
    return subprocess.run([*as_normal_user(), sys.executable, "-c", CHILD_BUILD, str(tree), str(output), captions],
                          cwd=REPO, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)


def build(tree: Path, output: Path, **options):
    return build_dataset(BuildConfig(input=str(tree), output=output, workers=0, **options), mean_captions)


def prompts_by_target(output: Path) -> dict[str, str]:
    return {entry["target"]: entry["prompt"] for entry in read_jsonl(output / PROMPT_FILE)}


def small_tree(root: Path, count: int = 3) -> Path:
    for index in range(count):
        rgb_jpeg(root / f"photos/p{index}.jpg", 96, 80, seed=index)
    return root / "photos"


# ------------------------------------------------------------------------------- captions


@pytest.mark.parametrize("resolution", [None, 64])
def test_captions_are_of_the_decoded_photo_not_of_the_jpeg_target(tmp_path, resolution):
    tree = write_input_tree(tmp_path / "photos", captions=False)
    output = tmp_path / "dataset"
    build(tree, output, resolution=resolution)
    names = pair_names(sorted(GOOD_FILES))
    prompts = prompts_by_target(output)
    differs_from_target = 0
    for path in GOOD_FILES:
        pixels = read_image_rgb(tree / path).pixels
        if resolution is not None:
            pixels = resize_and_crop(pixels, resolution)
        target = f"target/{names[path]}.jpg"
        assert prompts[target] == mean_captions([Image.fromarray(pixels)])[0], path
        with Image.open(output / target) as image:
            differs_from_target += mean_captions([image.convert("RGB")])[0] != prompts[target]
    assert differs_from_target > 0  # re-encoded targets (PNG, CMYK, rotated ...) are not what was captioned


# --------------------------------------------------------------------------- permissions


def test_an_unreadable_caption_file_skips_its_photo_until_it_can_be_read(tmp_path):
    tree = write_input_tree(tmp_path / "photos", good=["top.jpg", "Images/n001-chihuahua/dog.jpg"])
    caption_file = tree / "top.txt"
    caption_file.chmod(0)
    output = tmp_path / "dataset"
    first = child_build(tree, output, "txt")
    assert first.returncode == 0, first.stderr
    assert "Traceback" not in first.stderr
    assert "the next run tries them again" in first.stdout
    report = {entry["path"]: entry for entry in read_jsonl(output / SKIPPED_FILE)}
    assert "top.txt" in report["top.jpg"]["reason"] and "Permission denied" in report["top.jpg"]["reason"]
    assert report["top.jpg"]["retried"] == "on the next run"
    assert "target/top.jpg" not in prompts_by_target(output)

    caption_file.chmod(0o644)
    second = child_build(tree, output, "txt")
    assert second.returncode == 0, second.stderr
    assert prompts_by_target(output)["target/top.jpg"] == caption_of("top.jpg")
    assert "top.jpg" not in {entry["path"] for entry in read_jsonl(output / SKIPPED_FILE)}


def test_an_unreadable_photo_and_folder_are_reported_and_tried_again(tmp_path):
    tree = small_tree(tmp_path)
    rgb_jpeg(tree / "locked/inside.jpg", 96, 80, seed=7)
    (tree / "p1.jpg").chmod(0)
    (tree / "locked").chmod(0)
    output = tmp_path / "dataset"
    try:
        first = child_build(tree, output)
    finally:
        (tree / "locked").chmod(0o755)
    assert first.returncode == 0, first.stderr
    assert "locked" in first.stderr and "listed again on the next run" in first.stderr
    report = {entry["path"]: entry for entry in read_jsonl(output / SKIPPED_FILE)}
    assert set(report) == {"p1.jpg", "locked/"}
    assert "Permission denied" in report["p1.jpg"]["reason"] and report["p1.jpg"]["retried"]
    assert "cannot read the folder" in report["locked/"]["reason"]
    assert set(prompts_by_target(output)) == {"target/p0.jpg", "target/p2.jpg"}

    (tree / "p1.jpg").chmod(0o644)
    second = child_build(tree, output)
    assert second.returncode == 0, second.stderr
    assert read_jsonl(output / SKIPPED_FILE) == []
    assert set(prompts_by_target(output)) == {f"target/{name}.jpg" for name in ("locked__inside", "p0", "p1", "p2")}


# --------------------------------------------------------------------------- the input tree


def test_linked_folders_are_followed_each_real_folder_once(tmp_path):
    tree = small_tree(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    rgb_jpeg(elsewhere / "far.jpg", 96, 80, seed=9)
    (tree / "linked").symlink_to(elsewhere, target_is_directory=True)
    (tree / "loop").symlink_to(tree, target_is_directory=True)  # a link to an ancestor must not loop
    (tree / "dangling").symlink_to(tmp_path / "gone", target_is_directory=True)
    output = tmp_path / "dataset"
    build(tree, output)
    assert set(prompts_by_target(output)) == {f"target/{name}.jpg" for name in ("linked__far", "p0", "p1", "p2")}
    [dangling] = read_jsonl(output / SKIPPED_FILE)
    assert dangling["path"] == "dangling" and "a link to nothing" in dangling["reason"]


def test_an_output_inside_the_input_is_left_out(tmp_path, capsys):
    tree = small_tree(tmp_path)
    output = tree / "dataset"
    for _ in range(3):  # each run would otherwise read the previous run's outputs back as photos
        summary = build(tree, output)
        assert summary.dataset_entries == 3 and summary.report_entries == 0
    assert "it is this build's --output" in capsys.readouterr().err


def test_an_input_inside_the_output_is_refused(tmp_path):
    tree = small_tree(tmp_path)
    with pytest.raises(BuildError, match="contains --input"):
        build(tree, tmp_path)


def test_a_photo_taking_a_removed_photos_name_gets_its_own_pair_and_caption(tmp_path):
    tree = tmp_path / "photos"
    rgb_jpeg(tree / "a/x.jpg", 96, 80, seed=1)
    rgb_jpeg(tree / "b.jpg", 96, 80, seed=2)
    output = tmp_path / "dataset"
    build(tree, output)
    old_target = (output / "target/a__x.jpg").read_bytes()
    shutil.rmtree(tree / "a")
    rgb_jpeg(tree / "a__x.jpg", 96, 80, seed=3)  # flat name a__x, as a/x.jpg had
    build(tree, output)
    entries = read_jsonl(output / PROMPT_FILE)
    assert [entry["target"] for entry in entries] == ["target/a__x.jpg", "target/b.jpg"]
    assert (output / "target/a__x.jpg").read_bytes() == (tree / "a__x.jpg").read_bytes() != old_target
    new_photo = Image.fromarray(read_image_rgb(tree / "a__x.jpg").pixels)
    assert entries[0]["prompt"] == mean_captions([new_photo])[0]


def test_a_removed_photo_leaves_the_dataset(tmp_path):
    tree = small_tree(tmp_path)
    output = tmp_path / "dataset"
    build(tree, output)
    (tree / "p1.jpg").unlink()
    build(tree, output)
    assert set(prompts_by_target(output)) == {"target/p0.jpg", "target/p2.jpg"}


# ------------------------------------------------------------------------------------ shards


def test_a_second_process_on_one_shard_is_refused(tmp_path):
    output = tmp_path / "dataset"
    (output / BUILD_DIR).mkdir(parents=True)
    first = build_journal.Journal(output / BUILD_DIR / "journal-0-of-2.jsonl")
    try:
        with pytest.raises(BuildError, match="another process is building this shard"):
            build_journal.Journal(output / BUILD_DIR / "journal-0-of-2.jsonl")
        build_journal.Journal(output / BUILD_DIR / "journal-1-of-2.jsonl").close()  # another shard may run
    finally:
        first.close()


def test_two_shards_rewriting_the_outputs_at_once_lose_no_entry(tmp_path, monkeypatch):
    # Shard 0 reads the journals, then is slow to write; meanwhile shard 1 finishes a pair and rewrites the
    # outputs. Whoever writes last must have read what the other had journalled.
    output = tmp_path / "dataset"
    build_dir = output / BUILD_DIR
    build_dir.mkdir(parents=True)
    names = {"a.jpg": "a", "b.jpg": "b"}
    journals = [build_journal.Journal(build_dir / f"journal-{i}-of-2.jsonl") for i in range(2)]
    journals[0].append([{"input": "a.jpg", "name": "a", "prompt": "first"}])
    shard_zero_read, shard_one_done = threading.Event(), threading.Event()
    real_read = build_journal.read_journals

    def read_then_dawdle(folder):
        records = real_read(folder)
        if threading.current_thread().name == "shard-0":
            shard_zero_read.set()
            shard_one_done.wait(timeout=1.0)
        return records

    monkeypatch.setattr(build_journal, "read_journals", read_then_dawdle)
    slow = threading.Thread(target=build_journal.write_outputs, args=(output, names), name="shard-0")
    slow.start()
    assert shard_zero_read.wait(timeout=10)
    journals[1].append([{"input": "b.jpg", "name": "b", "prompt": "second"}])
    build_journal.write_outputs(output, names)
    shard_one_done.set()
    slow.join()
    for journal in journals:
        journal.close()
    assert [entry["prompt"] for entry in read_jsonl(output / PROMPT_FILE)] == ["first", "second"]


def test_two_shard_processes_into_one_folder_give_the_whole_dataset(tmp_path):
    tree = small_tree(tmp_path, count=8)
    for index in range(8):
        (tree / f"p{index}.txt").write_text(f"photo {index}\n", encoding="utf-8")
    output = tmp_path / "dataset"
    script = REPO / "prepare_dataset.py"
    runs = [subprocess.Popen([sys.executable, str(script), "--input", str(tree), "--output", str(output),
                              "--captions-from-txt", "--workers", "0", "--shard", f"{i}/2"],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)]
    for run in runs:
        _, stderr = run.communicate(timeout=CHILD_TIMEOUT_S)
        assert run.returncode == 0, stderr
    assert [entry["prompt"] for entry in read_jsonl(output / PROMPT_FILE)] == [f"photo {i}" for i in range(8)]
    assert np.all([(output / f"target/p{i}.jpg").is_file() for i in range(8)])
