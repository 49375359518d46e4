"""Checkpoints that survive damage: every checkpoint has a sha256 sidecar, `--resume last` falls back from a
damaged last.ckpt (cut off, empty, flipped bytes) to the newest intact step checkpoint and reproduces the
uninterrupted run; with none intact it stops with exit status 2. A resume with other settings says what
applies, and refuses what cannot (another --sd-locked)."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest
import torch

import training
from tests.training_helpers import AtStep, logged_losses, make_dataset, read_training_checkpoint, send, train_args
from trainer import checkpointing
from trainer.checkpointing import LAST

STEPS = 6
STOP_STEP = 3  # after step-00000002.ckpt; last.ckpt (step 3) is a file of its own, not a link to it
INTACT = "step-00000002.ckpt"


def run_args(init: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return train_args(init, data, output, "--batch-size", "1", "--max-steps", str(STEPS),
                      "--checkpoint-every", "2", "--keep-checkpoints", "2", *extra)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, init_path, four_pairs) -> Path:
    output = tmp_path_factory.mktemp("uninterrupted")
    assert training.main(run_args(init_path, four_pairs, output)) == 0
    return output


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, init_path, four_pairs) -> Path:
    """A run stopped by SIGTERM at step 3: checkpoints/ holds step-00000002.ckpt and last.ckpt (step 3)."""
    output = tmp_path_factory.mktemp("interrupted")
    status = training.main(run_args(init_path, four_pairs, output), callbacks=[AtStep(STOP_STEP, send(signal.SIGTERM))])
    assert status == 128 + signal.SIGTERM
    return output


@pytest.fixture
def run(tmp_path, interrupted) -> Path:
    """A copy of the interrupted run to damage."""
    output = tmp_path / "run"
    shutil.copytree(interrupted, output)
    return output


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def flip_bytes(path: Path) -> None:
    """Flip 16 bytes in the middle of the file (inside the tensor data, which loading alone never checks)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(byte ^ 0xFF for byte in data[middle:middle + 16])
    path.write_bytes(bytes(data))


def test_every_checkpoint_has_a_matching_checksum(interrupted):
    checkpoints = interrupted / "checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == sorted(
        [LAST, INTACT, LAST + ".sha256", INTACT + ".sha256"])
    for name in (LAST, INTACT):
        digest, named = (checkpoints / (name + ".sha256")).read_text().split()
        assert digest == checkpointing.file_sha256(checkpoints / name) and named == name
        assert checkpointing.checkpoint_damage(checkpoints / name) is None


@pytest.mark.slow
@pytest.mark.parametrize("damage", [truncate, empty, flip_bytes])
def test_a_damaged_last_checkpoint_falls_back_to_the_newest_intact_one(run, uninterrupted, init_path, four_pairs,
                                                                        capsys, damage):
    last = run / "checkpoints" / LAST
    damage(last)
    assert checkpointing.checkpoint_damage(last) is not None
    assert training.main(run_args(init_path, four_pairs, run, "--resume", "last")) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(last) in warnings[0] and INTACT in warnings[0]
    assert logged_losses(run) == logged_losses(uninterrupted)  # exactly, step by step
    final, reference = (read_training_checkpoint(output / "checkpoints" / LAST) for output in (run, uninterrupted))
    assert final["global_step"] == STEPS
    for key, value in reference["state_dict"].items():
        assert torch.equal(final["state_dict"][key], value), key


def test_a_checkpoint_without_checksum_is_verified_by_loading(run):
    """Checkpoints written before the sidecars still resume; a cut-off one is still recognised."""
    checkpoints = run / "checkpoints"
    for sidecar in checkpoints.glob("*.sha256"):
        sidecar.unlink()
    assert checkpointing.checkpoint_damage(checkpoints / INTACT) is None
    truncate(checkpoints / LAST)
    assert "does not load" in checkpointing.checkpoint_damage(checkpoints / LAST)
    assert checkpointing.pick_resume_checkpoint(checkpoints, warn=lambda line: None) == checkpoints / INTACT


def test_no_intact_checkpoint_stops_with_status_2(run, init_path, four_pairs, capsys):
    checkpoints = run / "checkpoints"
    empty(checkpoints / LAST)
    flip_bytes(checkpoints / INTACT)
    before = sorted(path.name for path in run.rglob("*"))
    assert training.main(run_args(init_path, four_pairs, run, "--resume", "last")) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no intact checkpoint" in errors[0] and INTACT in errors[0]
    assert sorted(path.name for path in run.rglob("*")) == before  # nothing written, the lock released


def test_a_damaged_resume_path_is_refused(run, init_path, four_pairs, capsys):
    path = run / "checkpoints" / INTACT
    flip_bytes(path)
    assert training.main(run_args(init_path, four_pairs, run, "--resume", str(path))) == 2
    assert "checksum mismatch" in capsys.readouterr().err


# ---- resuming with other settings -------------------------------------------------------------------
def test_setting_changes_say_what_applies():
    saved = {"learning_rate": 1e-5, "sd_locked": True, "batch_size": 4, "data": "a", "seed": 0}
    assert checkpointing.resume_setting_changes(saved, dict(saved)) == []
    lines = checkpointing.resume_setting_changes(saved, {**saved, "learning_rate": 2e-5, "batch_size": 8})
    assert lines == ["batch_size (--batch-size) 4 -> 8: applies from the resumed step (the current epoch goes "
                     "on at the same batch count)",
                     "learning_rate (--lr) 1e-05 -> 2e-05: applies from the resumed step (AdamW's moments are kept)"]
    [line] = checkpointing.resume_setting_changes({**saved, "init_control": "c.safetensors"}, saved)
    assert line.endswith("ignored: the weights come from the checkpoint")
    with pytest.raises(checkpointing.ResumeRefusedError, match=r"sd_locked \(--sd-locked\) True -> False: refused"):
        checkpointing.resume_setting_changes(saved, {**saved, "sd_locked": False})


@pytest.mark.slow
def test_another_learning_rate_applies_from_the_resumed_step(run, init_path, four_pairs, capsys):
    assert training.main(run_args(init_path, four_pairs, run, "--resume", "last", "--lr", "1e-3")) == 0
    assert "resume: learning_rate (--lr) 0.003 -> 0.001: applies" in capsys.readouterr().out
    final = read_training_checkpoint(run / "checkpoints" / LAST)
    assert [group["lr"] for group in final["optimizer_states"][0]["param_groups"]] == [1e-3]
    assert final["hyper_parameters"]["learning_rate"] == 1e-3


@pytest.mark.slow
def test_another_batch_size_and_dataset_apply(run, tmp_path, init_path, four_pairs, capsys):
    other = make_dataset(tmp_path / "other", 6, seed=1)
    assert training.main(run_args(init_path, four_pairs, run, "--resume", "last", "--batch-size", "2",
                                  "--data", str(other))) == 0
    out = capsys.readouterr().out
    assert "resume: batch_size (--batch-size) 1 -> 2: applies" in out
    assert f"resume: data (--data) {str(four_pairs)!r} -> {str(other)!r}: applies" in out
    assert read_training_checkpoint(run / "checkpoints" / LAST)["global_step"] == STEPS


def test_another_sd_locked_is_refused(run, init_path, four_pairs, capsys):
    before = sorted(path.name for path in run.rglob("*"))
    assert training.main(run_args(init_path, four_pairs, run, "--resume", "last", "--no-sd-locked")) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "sd_locked (--sd-locked) True -> False: refused" in errors[0]
    assert sorted(path.name for path in run.rglob("*")) == before
