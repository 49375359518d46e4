"""A training pair that cannot be read (a truncated photo, a control image that is no image, a size
mismatch) is skipped with one warning and counted, without changing the order a resumed run sees; an
exception inside training leaves last.ckpt at the last finished step, from which the run resumes exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

import training
from dataset import ControlDataset, DatasetError
from tests.training_helpers import (
    IMAGE_SIZE,
    AtStep,
    logged_losses,
    make_dataset,
    read_training_checkpoint,
    train_args,
)
from trainer.checkpointing import LAST
from trainer.resumable_data import ResumableDataLoader

STEPS = 6  # four pairs, batch 1: the runs cross an epoch


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


@pytest.fixture
def pairs(tmp_path) -> Path:
    return make_dataset(tmp_path / "data", 4)


@pytest.mark.parametrize("damage, reason", [
    (lambda root: truncate(root / "target/1.png"), "target/1.png: truncated or corrupt"),
    (lambda root: (root / "source/1.png").write_text("not a picture"), "source/1.png: not an image"),
    (lambda root: Image.new("RGB", (IMAGE_SIZE, 32)).save(root / "source/1.png"), "is 64x32 but target/1.png"),
])
def test_an_unreadable_pair_is_replaced_by_the_next_readable_one(pairs, damage, reason):
    clean = ControlDataset(pairs, resolution=IMAGE_SIZE)
    damage(pairs)
    data = ControlDataset(pairs, resolution=IMAGE_SIZE)
    assert data[1]["txt"] == "pair 2"
    torch.testing.assert_close(torch.from_numpy(data[1]["jpg"]), torch.from_numpy(clean[2]["jpg"]))
    (skipped,) = data.take_skipped()
    assert skipped[0] == 1 and skipped[1].startswith("source/1.png + target/1.png: ") and reason in skipped[1]
    assert data[1]["txt"] == "pair 2" and data.take_skipped() == []  # recorded once per process
    assert data[0]["txt"] == "pair 0"


def test_no_readable_pair_is_one_error(pairs):
    for index in range(4):
        truncate(pairs / f"target/{index}.png")
    with pytest.raises(DatasetError, match=r"none of the 4 pairs of .*prompt.json can be read \(the first: "
                                           r"source/0.png \+ target/0.png: target/0.png: truncated"):
        ControlDataset(pairs, resolution=IMAGE_SIZE)[2]


@pytest.mark.parametrize("workers", [0, 1])
def test_the_loader_warns_once_per_pair_also_from_workers(pairs, capsys, workers):
    truncate(pairs / "target/3.png")
    loader = ResumableDataLoader(ControlDataset(pairs, resolution=IMAGE_SIZE), batch_size=2, seed=0,
                                 num_workers=workers)
    batches = [batch for _ in range(3) for batch in loader]  # three epochs: workers start anew each
    assert len(batches) == 6 and all(set(batch) == {"jpg", "txt", "hint"} for batch in batches)
    assert all("pair 3" not in batch["txt"] for batch in batches)
    assert list(loader.skipped_pairs) == [3]
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: skipped unreadable pair source/3.png + target/3.png: target/3.png: truncated "
                        "or corrupt: image file is truncated; using the next readable pair instead"]


def test_all_pairs_unreadable_in_a_worker_is_one_error(pairs):
    for index in range(4):
        truncate(pairs / f"target/{index}.png")
    loader = ResumableDataLoader(ControlDataset(pairs, resolution=IMAGE_SIZE), batch_size=2, seed=0,
                                 num_workers=1)
    with pytest.raises(DatasetError) as error:
        next(iter(loader))
    assert str(error.value).startswith("none of the 4 pairs") and "\n" not in str(error.value)


@pytest.mark.slow
def test_training_goes_on_past_a_truncated_photo(tmp_path, init_path, pairs, capsys):
    truncate(pairs / "target/1.png")
    output = tmp_path / "run"
    assert training.main(train_args(init_path, pairs, output, "--batch-size", "1", "--max-steps", str(STEPS),
                                    "--checkpoint-every", "3")) == 0
    out, err = capsys.readouterr()
    assert err.count("warning: skipped unreadable pair source/1.png + target/1.png: target/1.png: truncated") == 1
    assert "skipped 1 unreadable pair(s) of the dataset" in out
    assert read_training_checkpoint(output / "checkpoints" / LAST)["global_step"] == STEPS


def fail_with(error: Exception):
    def action(trainer, module):
        raise error
    return action


@pytest.mark.slow
def test_an_exception_leaves_last_ckpt_of_the_last_step_and_resume_is_exact(tmp_path, init_path, four_pairs,
                                                                            capsys):
    argv = train_args(init_path, four_pairs, tmp_path / "whole", "--batch-size", "1", "--max-steps", str(STEPS))
    assert training.main(argv) == 0
    output = tmp_path / "run"
    argv = train_args(init_path, four_pairs, output, "--batch-size", "1", "--max-steps", str(STEPS),
                      "--checkpoint-every", "3")
    # In step 5, after its batch was handed out: last.ckpt must say "after step 4", not "after batch 5".
    failure = AtStep(4, fail_with(OSError("the disk went away")), "on_train_batch_start")
    assert training.main(argv, callbacks=[failure]) == 1
    err = capsys.readouterr().err
    assert (f"error: the disk went away; saved the last finished step to {output / 'checkpoints' / LAST}: "
            f"continue with --resume last") in err
    assert "Traceback" not in err
    assert read_training_checkpoint(output / "checkpoints" / LAST)["global_step"] == 4
    assert training.main(argv + ["--resume", "last"]) == 0

    assert logged_losses(output) == logged_losses(tmp_path / "whole")
    final, reference = (read_training_checkpoint(run / "checkpoints" / LAST) for run in (output, tmp_path / "whole"))
    assert final["global_step"] == STEPS
    for key, value in reference["state_dict"].items():
        assert torch.equal(final["state_dict"][key], value), key


@pytest.mark.slow
def test_a_bug_saves_first_then_shows_its_traceback(tmp_path, init_path, four_pairs, capsys):
    output = tmp_path / "run"
    argv = train_args(init_path, four_pairs, output, "--batch-size", "1", "--max-steps", str(STEPS))
    with pytest.raises(ZeroDivisionError):
        training.main(argv, callbacks=[AtStep(2, fail_with(ZeroDivisionError("bug")), "on_train_batch_start")])
    assert "error: training stopped by an unexpected exception; saved the last finished step" in capsys.readouterr().err
    assert read_training_checkpoint(output / "checkpoints" / LAST)["global_step"] == 2


@pytest.mark.slow
def test_training_from_the_latent_cache_goes_on_past_a_truncated_photo(tmp_path, init_path, pairs, capsys):
    truncate(pairs / "target/1.png")
    output = tmp_path / "run"
    args = train_args(init_path, pairs, output, "--batch-size", "1", "--cache-latents")
    assert training.main([*args, "--max-steps", str(STEPS)]) == 0
    out, err = capsys.readouterr()
    assert "warning: latent cache: left out target/1.png: truncated" in out
    assert err.count("warning: skipped unreadable pair source/1.png + target/1.png: target/1.png: truncated") == 1
    assert "skipped 1 unreadable pair(s) of the dataset" in out
    assert read_training_checkpoint(output / "checkpoints" / LAST)["global_step"] == STEPS
    # The cache remembers the photo it could not read: a resumed run skips it without reading it again.
    assert training.main([*args, "--max-steps", str(STEPS + 2), "--resume", "last"]) == 0
    out, err = capsys.readouterr()
    assert "latent cache: reusing" in out and "skipped 1 unreadable pair(s)" in out
