"""prepare_dataset.py: bad input never stops a build, same-named files survive, a killed run resumes to the
same prompt.json, shards add up, archives and URLs work, and BLIP in both file formats gives one dataset."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from annotator import CannyThresholds, canny, read_image_rgb
from dataset import PROMPT_FILE, PromptEntry
from dataset.build import BUILD_DIR, SKIPPED_FILE, BuildConfig, build_dataset, list_input_files, pair_names
from prepare_dataset import main
from tests.image_cases import BAD_FILES, GOOD_FILES, caption_of, mean_captions, write_input_tree

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "prepare_dataset.py"
CLI_TIMEOUT_S = 300
GOOD, BAD = sorted(GOOD_FILES), sorted(BAD_FILES)
# Names of the inputs, as the module doc promises them.
EXPECTED_NAMES = {
    "Images/n001-chihuahua/dog.jpg": "Images__n001-chihuahua__dog",
    "Images/n002-terrier/rotated.jpg": "Images__n002-terrier__rotated",
    "Images/n003-beagle/deep/grey16.png": "Images__n003-beagle__deep__grey16",
    "top.jpg": "top",
}
# Two same-named photos in different folders and an EXIF-rotated one.
BLIP_TREE_GOOD_FILES = [
    "Images/n001-chihuahua/dog.jpg", "Images/n002-terrier/dog.jpg", "Images/n002-terrier/rotated.jpg",
]


def run_cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=CLI_TIMEOUT_S)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def build(tree: Path, output: Path, **options) -> None:
    """An in-process build with the fake captioner and no worker processes (fast)."""
    build_dataset(BuildConfig(input=str(tree), output=output, workers=0, **options), mean_captions)


def assert_same_dataset(first: Path, second: Path) -> None:
    for name in (PROMPT_FILE, SKIPPED_FILE):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    for folder in ("source", "target"):
        assert folder_bytes(first / folder) == folder_bytes(second / folder), folder


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return write_input_tree(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def uncaptioned_tree(tmp_path_factory) -> Path:
    return write_input_tree(tmp_path_factory.mktemp("photos"), captions=False)


@pytest.fixture(scope="module")
def reference_build(uncaptioned_tree, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("reference") / "dataset"
    build(uncaptioned_tree, output)
    return output


# ------------------------------------------------------------------------------------ naming


def test_workers_do_not_pay_for_torch():
    # Spawned Canny workers re-run the script's imports, then unpickle annotator.pairs' work (the note in
    # dataset/build/workers.py says why neither may bring torch).
    probe = "import sys, prepare_dataset, annotator.pairs; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr


def test_listing_is_sorted_and_leaves_out_caption_files(tree):
    files = list_input_files(tree)
    assert files == sorted(GOOD + BAD)  # the .txt beside each good image is not an input


def test_names_are_flat_unique_and_keep_the_folders():
    names = pair_names(sorted(GOOD + BAD))
    assert {path: names[path] for path in EXPECTED_NAMES} == EXPECTED_NAMES
    assert names["Images/n002-terrier/dog.jpg"] != names["Images/n002-terrier/dog.png"]
    assert names["Images/n002-terrier/dog.jpg"].startswith("Images__n002-terrier__dog-")
    assert len({name.casefold() for name in names.values()}) == len(names)
    clash = pair_names(["a__b/c.jpg", "a/b__c.jpg", "x/Y.jpg", "x/y.jpg", "x:y.jpg"])
    assert len({name.casefold() for name in clash.values()}) == 5
    assert clash["x:y.jpg"] == "x_y"


# --------------------------------------------------------------------- every image paired or reported


def test_cli_pairs_every_good_image_and_reports_every_bad_one(tree, tmp_path):
    output = tmp_path / "dataset"
    result = run_cli("--input", tree, "--output", output, "--captions-from-txt", "--workers", 2)
    assert result.returncode == 0, result.stderr
    assert f"{len(GOOD)} pairs written, {len(BAD)} files skipped" in result.stdout
    assert "images/s" in result.stdout

    names = pair_names(sorted(GOOD + BAD))
    expected = [json.loads(PromptEntry.for_name(names[path], caption_of(path)).to_json_line()) for path in GOOD]
    assert read_jsonl(output / PROMPT_FILE) == expected  # every good image, in input order, with its caption
    for path in GOOD:
        target = read_image_rgb(output / f"target/{names[path]}.jpg").pixels
        with Image.open(output / f"source/{names[path]}.png") as source:
            assert source.mode == "L"
            edges = np.asarray(source)
        upright = read_image_rgb(tree / path).pixels
        assert target.shape == upright.shape  # EXIF rotation applied, size kept
        assert np.array_equal(edges, canny(upright, CannyThresholds(100, 200)))

    skipped = read_jsonl(output / SKIPPED_FILE)
    assert [entry["path"] for entry in skipped] == BAD
    for entry in skipped:
        assert BAD_FILES[entry["path"]][1] in entry["reason"], entry


@pytest.mark.slow
def test_cli_with_tiny_blip_in_both_formats_gives_the_same_captions(tmp_path):
    from captioner import load_captioner
    from tests.tiny_blip import write_tiny_blip

    pth_path, hf_dir = write_tiny_blip(tmp_path / "blip")
    # Every bad case, and fewer good images than the full tree: the tiny BLIP still takes a while per caption.
    good = BLIP_TREE_GOOD_FILES
    uncaptioned_tree = write_input_tree(tmp_path / "photos", captions=False, good=good)
    outputs = {"pth": tmp_path / "from-pth", "transformers": tmp_path / "from-transformers"}
    runs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), "--input", str(uncaptioned_tree), "--output", str(outputs[kind]),
             "--caption-model", str(model), "--device", "cpu", "--workers", "2", "--batch-size", "4"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for kind, model in (("pth", pth_path), ("transformers", hf_dir))
    ]
    for run in runs:
        stdout, stderr = run.communicate(timeout=CLI_TIMEOUT_S)
        assert run.returncode == 0, stderr
    entries = read_jsonl(outputs["pth"] / PROMPT_FILE)
    assert entries == read_jsonl(outputs["transformers"] / PROMPT_FILE)
    assert len(entries) == len(good) and all(entry["prompt"] for entry in entries)
    assert len({entry["target"] for entry in entries}) == len(good)
    assert [entry["path"] for entry in read_jsonl(outputs["pth"] / SKIPPED_FILE)] == BAD
    # The prompts are the captions of the decoded photos (as the original captioned its input files; the
    # EXIF-rotated one's target is a re-encoded JPEG, which is not what is captioned), whatever the batching.
    captioner = load_captioner(pth_path, device="cpu")
    images = [Image.fromarray(read_image_rgb(uncaptioned_tree / path).pixels) for path in good[1:]]
    assert captioner.caption(images) == [entry["prompt"] for entry in entries[1:]]


# ----------------------------------------------------------------------------- killed and resumed

# A build in a child process, captioning slowly (batches of one) so that it can be killed part-way.
KILLABLE_BUILD = """
import sys
from pathlib import Path
from dataset.build import BuildConfig, build_dataset
from tests.image_cases import slow_mean_captions
build_dataset(BuildConfig(input=sys.argv[1], output=Path(sys.argv[2]), workers=2, batch_size=1), slow_mean_captions)
"""


def test_killed_run_resumes_to_the_same_dataset(uncaptioned_tree, reference_build, tmp_path):
    output = tmp_path / "dataset"
    journal = output / BUILD_DIR / "journal-0-of-1.jsonl"
    child = subprocess.Popen([sys.executable, "-c", KILLABLE_BUILD, str(uncaptioned_tree), str(output)], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + CLI_TIMEOUT_S
    while not (journal.is_file() and '"prompt"' in journal.read_text()) and time.monotonic() < deadline:
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL  # killed, not finished
    records = read_jsonl(journal)
    assert 0 < sum("prompt" in record for record in records) < len(GOOD)
    read_jsonl(output / PROMPT_FILE)  # valid JSON lines even now

    summary = build_dataset(BuildConfig(input=str(uncaptioned_tree), output=output, workers=0), mean_captions)
    assert summary.done_before == len(records)
    assert summary.written + summary.skipped + summary.done_before == len(GOOD) + len(BAD)
    assert_same_dataset(output, reference_build)


def test_a_journal_line_cut_by_a_kill_is_redone(uncaptioned_tree, reference_build, tmp_path):
    output = tmp_path / "dataset"
    build(uncaptioned_tree, output)
    journal = output / BUILD_DIR / "journal-0-of-1.jsonl"
    content = journal.read_bytes()
    journal.write_bytes(content[: content.rstrip(b"\n").rfind(b"\n") + 10])  # the last line half-written
    (output / PROMPT_FILE).unlink()
    summary = build_dataset(BuildConfig(input=str(uncaptioned_tree), output=output, workers=0), mean_captions)
    assert summary.written + summary.skipped == 1
    assert_same_dataset(output, reference_build)


def test_finished_pairs_are_reused_not_recomputed(uncaptioned_tree, tmp_path):
    output = tmp_path / "dataset"
    build(uncaptioned_tree, output)
    journal = output / BUILD_DIR / "journal-0-of-1.jsonl"
    journal.write_text("")  # as if killed after all pairs were written, before any was captioned
    marker = output / "target" / "top.jpg"
    Image.new("RGB", (64, 64), "red").save(marker)  # not what the input would give
    before = marker.read_bytes()
    build(uncaptioned_tree, output)
    assert marker.read_bytes() == before


def test_a_rerun_with_other_output_settings_is_refused(uncaptioned_tree, reference_build, capsys):
    status = main(["--input", str(uncaptioned_tree), "--output", str(reference_build), "--resolution", "64"])
    assert status == 2
    assert "resolution: None before, 64 now" in capsys.readouterr().err


# -------------------------------------------------------------------------------------- shards


def test_shards_add_up_to_the_whole_dataset(uncaptioned_tree, reference_build, tmp_path):
    shared = tmp_path / "shared"
    for index in range(2):
        build(uncaptioned_tree, shared, shard_index=index, shard_count=2)
    assert_same_dataset(shared, reference_build)

    separate = [tmp_path / f"shard{index}" for index in range(3)]
    for index, output in enumerate(separate):
        build(uncaptioned_tree, output, shard_index=index, shard_count=3)
    parts = [read_jsonl(output / PROMPT_FILE) for output in separate]
    assert all(parts)
    merged = sorted((entry for part in parts for entry in part), key=lambda entry: entry["target"])
    assert merged == sorted(read_jsonl(reference_build / PROMPT_FILE), key=lambda entry: entry["target"])


@pytest.mark.parametrize("text", ["2/2", "1", "a/b", "-1/2"])
def test_bad_shard_option_is_refused(text, tmp_path):
    with pytest.raises(SystemExit):
        main(["--input", str(tmp_path), "--output", str(tmp_path / "out"), "--shard", text])


# ------------------------------------------------------------------------------------ inputs


def test_archive_and_url_inputs_give_the_same_dataset(tree, tmp_path):
    folder_build = tmp_path / "from-folder"
    assert main(["--input", str(tree), "--output", str(folder_build), "--captions-from-txt", "--workers", "0"]) == 0
    archive = tmp_path / "photos.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname=".")
        escaping = tarfile.TarInfo("../escaped.jpg")
        escaping.size = 0
        tar.addfile(escaping)  # would land outside the extraction folder: left out
    for source in (str(archive), archive.as_uri()):
        output = tmp_path / ("from-url" if source.startswith("file:") else "from-archive")
        assert main(["--input", source, "--output", str(output), "--captions-from-txt", "--workers", "0"]) == 0
        assert_same_dataset(output, folder_build)
        assert not (output / BUILD_DIR / "escaped.jpg").exists()


def test_missing_or_unusable_input_is_an_error(tmp_path, capsys):
    assert main(["--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "a")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "photo.jpg").write_bytes(b"")
    assert main(["--input", str(tmp_path / "photo.jpg"), "--output", str(tmp_path / "b")]) == 2
    assert "neither a folder nor a tar archive" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ options


def test_resolution_crops_every_pair_to_a_square(uncaptioned_tree, tmp_path):
    output = tmp_path / "dataset"
    build(uncaptioned_tree, output, resolution=64)
    for entry in read_jsonl(output / PROMPT_FILE):
        for key in ("source", "target"):
            with Image.open(output / entry[key]) as image:
                assert image.size == (64, 64)


def test_random_thresholds_are_reproducible(uncaptioned_tree, reference_build, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    build(uncaptioned_tree, first, canny_random=True, seed=5)
    build(uncaptioned_tree, second, canny_random=True, seed=5)
    assert folder_bytes(first / "source") == folder_bytes(second / "source")
    assert folder_bytes(first / "source") != folder_bytes(reference_build / "source")


def test_txt_captions_where_present_the_captioner_for_the_rest(tmp_path):
    tree = write_input_tree(tmp_path / "photos")
    (tree / "top.txt").unlink()
    output = tmp_path / "dataset"
    build(tree, output, captions_from_txt=True)
    prompts = {entry["target"]: entry["prompt"] for entry in read_jsonl(output / PROMPT_FILE)}
    assert prompts.pop("target/top.jpg").startswith("mean ")
    assert all(prompt.startswith("a photo from ") for prompt in prompts.values())


def test_auto_workers_start_processes_only_for_large_inputs():
    from dataset.build import IMAGES_PER_WORKER, auto_workers
    from prepare_dataset import _workers
    assert auto_workers(96, cpu_count=8) == 1  # a small build: start-up would cost more than it saves
    assert auto_workers(3 * IMAGES_PER_WORKER, cpu_count=8) == 3
    assert auto_workers(20_000, cpu_count=8) == 8  # Stanford Dogs: every core
    assert auto_workers(0, cpu_count=8) == 1
    assert _workers("auto") is None and _workers("2") == 2
