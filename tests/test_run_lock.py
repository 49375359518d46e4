"""One run per output folder (trainer.run_lock): a second training.py run into a folder in use refuses with
exit status 2 and names the holder; the lock of a run that died is taken over; the lock goes with the run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import training
from tests.training_helpers import train_args
from trainer.run_lock import LOCK_NAME, RunLock, RunLockError


def write_lock(output: Path, pid: int, host: str | None = None) -> Path:
    output.mkdir(parents=True, exist_ok=True)
    path = output / LOCK_NAME
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname()}))
    return path


@pytest.fixture
def other_run():
    """A live process of this host that stands for another training run."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield process
    process.kill()
    process.wait()


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_second_run_into_a_folder_in_use_refuses(tmp_path, init_path, four_pairs, other_run, capsys):
    output = tmp_path / "run"
    lock = write_lock(output, other_run.pid)
    assert training.main(train_args(init_path, four_pairs, output, "--max-steps", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"pid {other_run.pid}" in err[0] and "in use by another run" in err[0]
    assert json.loads(lock.read_text())["pid"] == other_run.pid  # the holder's lock is left alone
    assert sorted(path.name for path in output.iterdir()) == [LOCK_NAME]  # nothing written


def test_a_stale_lock_is_taken_over_and_the_lock_goes_with_the_run(tmp_path, init_path, capsys):
    output = tmp_path / "run"
    pid = dead_pid()
    write_lock(output, pid)
    # Past the lock the run goes on to its next check (here: no dataset, status 1 rather than 2) and
    # releases the lock on the way out, as after a finished run.
    assert training.main(train_args(init_path, tmp_path / "no_dataset", output)) == 1
    err = capsys.readouterr().err.splitlines()
    warnings = [line for line in err if "stale lock" in line]
    assert len(warnings) == 1 and f"pid {pid}" in warnings[0] and "prompt.json" in err[-1]
    assert not (output / LOCK_NAME).exists()


def test_the_lock_holds_pid_and_host_and_refuses_a_second_holder(tmp_path):
    lock = RunLock.acquire(tmp_path)
    assert json.loads((tmp_path / LOCK_NAME).read_text()) == {"pid": os.getpid(), "host": socket.gethostname()}
    with pytest.raises(RunLockError, match=f"pid {os.getpid()}"):
        RunLock.acquire(tmp_path)  # this process is alive: no takeover
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
    RunLock.acquire(tmp_path).release()


def test_a_lock_of_another_host_or_unreadable_is_never_taken_over(tmp_path):
    write_lock(tmp_path, dead_pid(), host="elsewhere")
    with pytest.raises(RunLockError, match="on elsewhere"):
        RunLock.acquire(tmp_path)
    (tmp_path / LOCK_NAME).write_text("{")
    with pytest.raises(RunLockError, match="unreadable lock"):
        RunLock.acquire(tmp_path)


def test_ranks_other_than_0_join_the_run_of_rank_0(tmp_path, monkeypatch, other_run):
    write_lock(tmp_path, other_run.pid)
    monkeypatch.setenv("LOCAL_RANK", "1")
    RunLock.acquire(tmp_path).release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == other_run.pid
