"""training.py --lr-schedule: the cosine decay's rate at every step, the same after an interrupted run resumes,
and the refusals (no --max-steps; another schedule at a resume)."""

from __future__ import annotations

import signal

import lightning as L
import pytest
import torch

import training
from common.lr_schedule import cosine_factor
from tests.training_helpers import TINY_LR, AtStep, read_training_checkpoint, send, train_args
from trainer import checkpointing
from trainer.checkpointing import LAST, ResumeRefusedError

STEPS = 6


class RateLog(L.Callback):
    """The learning rate each optimizer step uses: {global step: rate}."""

    def __init__(self):
        self.rates: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rates[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


def test_cosine_factor_runs_from_one_to_zero():
    assert cosine_factor(0, 10) == 1.0
    assert cosine_factor(5, 10) == pytest.approx(0.5)
    assert cosine_factor(10, 10) == pytest.approx(0.0) and cosine_factor(12, 10) == pytest.approx(0.0)
    assert all(cosine_factor(s, 10) > cosine_factor(s + 1, 10) for s in range(10))
    with pytest.raises(ValueError, match="positive"):
        cosine_factor(0, 0)


@pytest.fixture(scope="module")
def cosine_run(tmp_path_factory, init_path, four_pairs):
    output = tmp_path_factory.mktemp("cosine")
    log = RateLog()
    argv = train_args(init_path, four_pairs, output, "--batch-size", "1", "--max-steps", str(STEPS),
                      "--lr-schedule", "cosine")
    assert training.main(argv, callbacks=[log]) == 0
    return output, log.rates


def test_cosine_schedule_sets_each_steps_rate(cosine_run):
    _, rates = cosine_run
    assert sorted(rates) == list(range(STEPS))
    for step, rate in rates.items():
        assert rate == pytest.approx(float(TINY_LR) * cosine_factor(step, STEPS), rel=1e-9), step
    assert rates[STEPS - 1] < 0.1 * float(TINY_LR)


def test_constant_schedule_keeps_the_rate(tmp_path, init_path, four_pairs):
    log = RateLog()
    assert training.main(train_args(init_path, four_pairs, tmp_path / "run", "--batch-size", "1",
                                    "--max-steps", "3"), callbacks=[log]) == 0
    assert list(log.rates.values()) == [float(TINY_LR)] * 3


def test_an_interrupted_cosine_run_resumes_on_its_schedule(tmp_path, init_path, four_pairs, cosine_run):
    reference, reference_rates = cosine_run
    output = tmp_path / "run"
    argv = train_args(init_path, four_pairs, output, "--batch-size", "1", "--max-steps", str(STEPS),
                      "--lr-schedule", "cosine")
    assert training.main(argv, callbacks=[AtStep(2, send(signal.SIGTERM))]) == 128 + signal.SIGTERM
    log = RateLog()
    assert training.main(argv + ["--resume", "last"], callbacks=[log]) == 0
    assert sorted(log.rates) == list(range(2, STEPS))
    for step, rate in log.rates.items():
        assert rate == pytest.approx(reference_rates[step], rel=1e-9), step
    final, expected = (read_training_checkpoint(run / "checkpoints" / LAST) for run in (output, reference))
    for key, value in expected["state_dict"].items():
        assert torch.equal(final["state_dict"][key], value), key


def test_cosine_needs_max_steps(tmp_path, init_path, four_pairs, capsys):
    with pytest.raises(SystemExit) as stop:
        training.parse_args(train_args(init_path, four_pairs, tmp_path / "run", "--lr-schedule", "cosine"))
    assert stop.value.code == 2
    assert "--lr-schedule cosine decays over --max-steps" in capsys.readouterr().err


def test_a_resume_keeps_the_schedule():
    saved = {"learning_rate": 1e-5}  # a checkpoint written before the schedule was a setting: constant
    assert checkpointing.resume_setting_changes(saved, {**saved, "lr_schedule": "constant"}) == []
    with pytest.raises(ResumeRefusedError, match="lr_schedule.*refused"):
        checkpointing.resume_setting_changes(saved, {**saved, "lr_schedule": "cosine"})
