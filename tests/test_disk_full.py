"""A full disk: a checkpoint or a latent cache that does not fit stops the run with "no space left on DIR:
... needs about N" (never torch's 'iostream error' or a SIGBUS), leaves no cut-off temporary file and keeps
the last good checkpoint; a resumed run holds no mapping of its resume file, so replacing it frees its space.

The small disks are real tmpfs mounts where this process may mount (root); the same paths are also driven by
an injected failure, which runs everywhere."""

from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import training
from common import disk
from tests.training_helpers import AtStep, train_args
from trainer import checkpointing
from trainer.checkpointing import LAST, FileCheckpointIO, checkpoint_damage

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20


@contextmanager
def small_disk(path: Path, size: int):
    """A tmpfs of `size` bytes mounted at `path` (skips where mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()}); the injected cases cover the code")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def no_temporary_files(folder: Path) -> bool:
    return not [path for path in folder.rglob("*") if path.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------- checkpoints


def test_a_write_that_fails_on_a_full_disk_is_named_and_leaves_no_file(tmp_path, monkeypatch):
    # torch.save reports a full disk only as 'basic_ios::clear: iostream error', after writing part of it.
    def cut_off_save(checkpoint, path):
        Path(path).write_bytes(b"PK\x03\x04 partial")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 38: basic_ios::clear: "
                           "iostream error")

    monkeypatch.setattr(checkpointing.torch, "save", cut_off_save)
    checkpoint = {"state_dict": {"w": torch.zeros(4 * MiB, dtype=torch.uint8)}}
    free = {"bytes": 10 * MiB}  # enough to start, then the disk fills up during the write
    monkeypatch.setattr(disk, "free_bytes", lambda folder: free["bytes"])
    original_check = checkpointing.check_free_space

    def check_then_fill(folder, needed, what):
        original_check(folder, needed, what)
        free["bytes"] = 1 * MiB

    monkeypatch.setattr(checkpointing, "check_free_space", check_then_fill)
    path = tmp_path / "last.ckpt.tmp"
    with pytest.raises(disk.DiskFullError, match=rf"no space left on {tmp_path}: a checkpoint needs about 5\.2 MB, "
                                                 r"1\.0 MB free"):
        FileCheckpointIO().save_checkpoint(checkpoint, path)
    assert not path.exists()


def test_a_checkpoint_that_cannot_fit_is_refused_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(disk, "free_bytes", lambda folder: 3 * MiB)
    with pytest.raises(disk.DiskFullError, match="a checkpoint needs about 5.2 MB, 3.1 MB free"):
        FileCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(4 * MiB, dtype=torch.uint8)}},
                                           tmp_path / "x.ckpt.tmp")
    assert list(tmp_path.iterdir()) == []


def test_a_run_whose_first_checkpoint_cannot_fit_does_not_start(tmp_path, init_path, four_pairs, monkeypatch, capsys):
    monkeypatch.setattr(disk, "free_bytes", lambda folder: 5 * MiB)
    status = training.main(train_args(init_path, four_pairs, tmp_path / "run", "--max-steps", "2"))
    assert status == 1
    err = capsys.readouterr().err
    assert f"no space left on {tmp_path / 'run' / 'checkpoints'}: a checkpoint needs about" in err
    assert "Traceback" not in err


def test_a_disk_that_fills_up_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, init_path, four_pairs, capsys):
    # Room for two checkpoints of the tiny model (~24 MB each), not three: steps 2 and 4 fit, step 6 does not.
    with small_disk(tmp_path / "disk", 60 * MiB) as folder:
        output = folder / "run"
        status = training.main(train_args(init_path, four_pairs, output, "--batch-size", "1", "--max-steps", "6",
                                          "--checkpoint-every", "2", "--keep-checkpoints", "2"))
        err = capsys.readouterr().err
        assert status == 1
        assert f"no space left on {output / 'checkpoints'}: a checkpoint needs about" in err
        assert "iostream" not in err and "Traceback" not in err
        assert no_temporary_files(output)
        assert checkpoint_damage(output / "checkpoints" / LAST) is None
        assert torch.load(output / "checkpoints" / LAST, weights_only=True, mmap=True)["global_step"] == 4


# ------------------------------------------------------------------------------------- latent cache

def test_a_full_cache_dir_is_named_not_a_sigbus(tmp_path, init_path, four_pairs):
    with small_disk(tmp_path / "cache", 4096) as cache_dir:  # one page: the prompt rows, not the posterior
        result = subprocess.run(
            [sys.executable, "training.py", *train_args(init_path, four_pairs, tmp_path / "run", "--max-steps", "1",
                                                        "--cache-latents", "--cache-dir", str(cache_dir))],
            cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 1, result.stderr[-2000:]
        assert f"no space left on {cache_dir}: the latent cache's posterior.npy needs about" in result.stderr
        assert "Traceback" not in result.stderr
        assert no_temporary_files(cache_dir) and not (cache_dir / "posterior.npy").exists()


def test_a_cache_that_cannot_fit_is_refused(tmp_path, init_path, four_pairs, monkeypatch, capsys):
    real_free = disk.free_bytes
    cache_dir = tmp_path / "cache"
    monkeypatch.setattr(disk, "free_bytes",
                        lambda folder: 100 if Path(folder) == cache_dir else real_free(folder))
    status = training.main(train_args(init_path, four_pairs, tmp_path / "run", "--max-steps", "1",
                                      "--cache-latents", "--cache-dir", str(cache_dir)))
    assert status == 1
    assert f"no space left on {cache_dir}: the latent cache's posterior.npy needs about" in capsys.readouterr().err
    assert not (cache_dir / "posterior.npy").exists()


# ------------------------------------------------------------------------------------- resume mappings


def mapped_checkpoints() -> list[str]:
    with open("/proc/self/maps") as maps:
        return [line.strip() for line in maps if ".ckpt" in line]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux) to list the mappings")
def test_a_resumed_run_keeps_no_mapping_of_its_checkpoint(tmp_path, init_path, four_pairs):
    output = tmp_path / "run"
    args = train_args(init_path, four_pairs, output, "--batch-size", "1", "--checkpoint-every", "2")
    assert training.main([*args, "--max-steps", "2"]) == 0
    seen: list[list[str]] = []
    probe = AtStep(3, lambda trainer, module: seen.append(mapped_checkpoints()))
    assert training.main([*args, "--max-steps", "4", "--resume", "last"], callbacks=[probe]) == 0
    assert seen == [[]]  # AdamW's moments are not views of the file that step 4 replaces


# ------------------------------------------------------------------------------------- dataset build


def test_a_dataset_build_on_a_full_disk_stops_cleanly_and_continues_after(tmp_path):
    from tests.image_cases import rgb_jpeg

    photos = tmp_path / "photos"
    for index in range(12):
        rgb_jpeg(photos / f"p{index:02d}.jpg", 96, 80, seed=index)
        (photos / f"p{index:02d}.txt").write_text(f"photo {index}\n", encoding="utf-8")
    command = [sys.executable, "prepare_dataset.py", "--input", str(photos), "--captions-from-txt", "--workers", "0"]
    with small_disk(tmp_path / "disk", 40 * 1024) as folder:
        output = folder / "dataset"
        full = subprocess.run([*command, "--output", str(output)], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
        assert full.returncode == 1, full.stderr[-2000:]
        assert f"prepare_dataset: error: no space left on {output}" in full.stderr
        assert "Traceback" not in full.stderr
        assert no_temporary_files(output)
        subprocess.run(["mount", "-o", "remount,size=4m", str(folder)], check=True)
        again = subprocess.run([*command, "--output", str(output)], cwd=REPO, capture_output=True, text=True,
                               timeout=120)
        assert again.returncode == 0, again.stderr[-2000:]
        prompts = [line for line in (output / "prompt.json").read_text(encoding="utf-8").splitlines()]
        done_before = int(again.stdout.split(" done by an earlier run")[0].rsplit(" ", 1)[1])
        assert len(prompts) == 12 and done_before > 0  # what the first run finished was kept
