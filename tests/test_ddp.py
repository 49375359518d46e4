"""training.py --accelerator cpu --devices 2 --strategy ddp (gloo): two processes train the tiny model through
the command line. Each epoch the ranks take disjoint shares that cover the dataset (trainer/resumable_data.py),
the latent cache is built once (rank 0) and read by both, rank 0 alone writes one set of checkpoints and logs,
`--resume last` continues exactly as the uninterrupted run, and SIGTERM to the launcher leaves a resumable
checkpoint. Each launch starts two interpreters (~8 s of imports each on 2 cores), hence slow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.ddp_probe import RECORD_VARIABLE
from tests.training_helpers import logged_losses, make_dataset, read_training_checkpoint, train_args

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
PAIRS = 8
BATCH = 2
WORLD = 2
BATCHES_PER_EPOCH = PAIRS // WORLD // BATCH  # 2 per rank
STEPS = 3 * BATCHES_PER_EPOCH
LAUNCH_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def eight_pairs(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("eight_pairs"), PAIRS)


def ddp_args(init: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return train_args(init, data, output, "--devices", str(WORLD), "--strategy", "ddp", "--batch-size", str(BATCH),
                      "--checkpoint-every", "2", "--cache-latents", *extra)


def environment(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra}


def probe(argv: list[str], record: Path) -> subprocess.CompletedProcess:
    """training.main under DDP with the batch record of tests/ddp_probe.py, as a program."""
    result = subprocess.run([sys.executable, "tests/ddp_probe.py", *argv], cwd=REPO, capture_output=True, text=True,
                            timeout=LAUNCH_TIMEOUT_S, env=environment(**{RECORD_VARIABLE: str(record)}))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def batches(record: Path) -> dict[tuple[int, int], dict]:
    """{(rank, step): that batch's record} from every rank's file."""
    lines = [json.loads(line) for path in sorted(record.parent.glob(f"{record.name}-rank*.jsonl"))
             for line in path.read_text().splitlines()]
    return {(line["rank"], line["step"]): line for line in lines}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, init_path, eight_pairs):
    root = tmp_path_factory.mktemp("ddp")
    result = probe(ddp_args(init_path, eight_pairs, root / "run", "--max-steps", str(STEPS)), root / "batches")
    return root / "run", batches(root / "batches"), result.stdout + result.stderr


def test_the_ranks_see_disjoint_shares_that_cover_the_dataset_each_epoch(uninterrupted):
    _, seen, _ = uninterrupted
    assert sorted(seen) == [(rank, step) for rank in range(WORLD) for step in range(STEPS)]
    assert {line["world_size"] for line in seen.values()} == {WORLD}
    everything = sorted(f"pair {i}" for i in range(PAIRS))
    orders = []
    for epoch in range(STEPS // BATCHES_PER_EPOCH):
        shares = [[prompt for line in seen.values() if line["rank"] == rank and line["epoch"] == epoch
                   for prompt in line["prompts"]] for rank in range(WORLD)]
        assert all(len(share) == PAIRS // WORLD for share in shares), epoch
        assert sorted(shares[0] + shares[1]) == everything, epoch  # disjoint and covering
        orders.append(shares)
    assert orders[0] != orders[1]  # reshuffled each epoch


def test_the_latent_cache_is_built_once_and_read_by_both_ranks(uninterrupted):
    output, seen, log = uninterrupted
    assert log.count("latent cache: building") == 1
    assert "latent cache: reusing" not in log
    assert all(line["cached"] for line in seen.values())
    assert sorted(path.name for path in (output / "latent_cache").iterdir()) == [
        "contexts.npy", "fingerprint.json", "posterior.npy", "prompt_rows.npy"]


def test_one_set_of_checkpoints_and_logs_is_written(uninterrupted):
    output, _, _ = uninterrupted
    names = sorted(path.name for path in (output / "checkpoints").iterdir())
    # --checkpoint-every 2, the newest 2 kept (default), each with its checksum file.
    assert names == ["last.ckpt", "last.ckpt.sha256", "step-00000004.ckpt", "step-00000004.ckpt.sha256",
                     "step-00000006.ckpt", "step-00000006.ckpt.sha256"]
    assert [path.parent.name for path in (output / "logs" / "csv").glob("*/metrics.csv")] == ["version_0"]
    checkpoint = read_training_checkpoint(output / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == STEPS
    assert sorted(logged_losses(output)) == list(range(STEPS))


def test_resume_last_under_ddp_reproduces_the_uninterrupted_run(tmp_path, init_path, eight_pairs, uninterrupted):
    full_output, full_batches, _ = uninterrupted
    output, record = tmp_path / "run", tmp_path / "batches"
    probe(ddp_args(init_path, eight_pairs, output, "--max-steps", "3"), record)  # stops inside epoch 1
    resumed = probe(ddp_args(init_path, eight_pairs, output, "--max-steps", str(STEPS), "--resume", "last"), record)
    assert "latent cache: reusing" in resumed.stdout
    assert batches(record) == full_batches  # every rank trained on the same batches at the same steps
    assert logged_losses(output) == logged_losses(full_output)  # exactly
    state = read_training_checkpoint(output / "checkpoints" / "last.ckpt")["state_dict"]
    expected = read_training_checkpoint(full_output / "checkpoints" / "last.ckpt")["state_dict"]
    assert all(torch.equal(state[key], expected[key]) for key in expected if key.startswith("control_model."))


def test_sigterm_to_the_launcher_leaves_a_resumable_checkpoint(tmp_path, init_path, eight_pairs):
    output = tmp_path / "run"
    argv = [sys.executable, "training.py", *ddp_args(init_path, eight_pairs, output, "--max-steps", "100000")]
    with open(tmp_path / "log", "w") as log:
        launcher = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=environment(),
                                    start_new_session=True)
        try:
            deadline = time.monotonic() + LAUNCH_TIMEOUT_S
            while not any((output / "checkpoints").glob("step-*.ckpt")):  # training is under way
                assert launcher.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()
                time.sleep(0.2)
            launcher.send_signal(signal.SIGTERM)  # the launcher (rank 0) alone, as a scheduler would
            assert launcher.wait(timeout=LAUNCH_TIMEOUT_S) == 128 + signal.SIGTERM
        finally:
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
    text = (tmp_path / "log").read_text()
    assert "stopped (SIGTERM) at step" in text
    stopped_at = read_training_checkpoint(output / "checkpoints" / "last.ckpt")["global_step"]
    assert stopped_at >= 2
    resumed = subprocess.run([*argv[:-1], str(stopped_at + 2), "--resume", "last"], cwd=REPO, capture_output=True,
                             text=True, timeout=LAUNCH_TIMEOUT_S, env=environment())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_training_checkpoint(output / "checkpoints" / "last.ckpt")["global_step"] == stopped_at + 2
    assert sorted(logged_losses(output))[-2:] == [stopped_at, stopped_at + 1]
