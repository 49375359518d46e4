"""training.py --optimizer adamw | adamw-fused | adamw8bit (bitsandbytes, optional) and the --fused-adamw alias.
Tiny model, CPU: each option trains as plain AdamW within its rounding, and resumes exactly."""

from __future__ import annotations

import sys

import pytest
import torch

import training
from tests.reference import TINY_CONFIG
from tests.training_helpers import logged_losses, read_training_checkpoint, train_args
from trainer.module import OPTIMIZERS, ControlNetTrainer, training_model_config

STEPS = 4
# fused vs foreach AdamW: float rounding only.
FUSED_LOSS_ATOL = 1e-5
# 8-bit moments (block-wise quantised, 256 levels) change each update by a fraction of a per cent; over four
# steps of the tiny model the losses stay within 1e-4 of plain AdamW's (measured: 1.4e-5).
EIGHT_BIT_LOSS_ATOL = 1e-4



@pytest.fixture(scope="module")
def bitsandbytes():
    """--optimizer adamw8bit's package (optional at run time; requirements-dev.txt installs it for the tests)."""
    return pytest.importorskip("bitsandbytes")


def _optimizer(name: str) -> torch.optim.Optimizer:
    return ControlNetTrainer(training_model_config(TINY_CONFIG), optimizer=name).configure_optimizers()


def test_each_optimizer_option_builds_its_optimizer_over_the_controlnet(bitsandbytes):
    plain, fused, eight_bit = (_optimizer(name) for name in OPTIMIZERS)
    assert type(plain) is torch.optim.AdamW and not plain.defaults["fused"]
    assert type(fused) is torch.optim.AdamW and fused.defaults["fused"]
    assert isinstance(eight_bit, bitsandbytes.optim.AdamW8bit)
    for optimizer in (plain, fused, eight_bit):
        assert optimizer.defaults["lr"] == pytest.approx(1e-5)
        assert len([p for group in optimizer.param_groups for p in group["params"]]) == len(
            list(ControlNetTrainer(training_model_config(TINY_CONFIG)).model.control_model.parameters()))


def test_an_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="adamw, adamw-fused, adamw8bit"):
        ControlNetTrainer(training_model_config(TINY_CONFIG), optimizer="sgd")


@pytest.mark.parametrize(("flags", "expected"), [
    ((), "adamw-fused"), (("--no-fused-adamw",), "adamw"), (("--fused-adamw",), "adamw-fused"),
    (("--optimizer", "adamw8bit"), "adamw8bit"), (("--no-fused-adamw", "--optimizer", "adamw8bit"), "adamw8bit"),
    (("--optimizer", "adamw8bit", "--fused-adamw"), "adamw-fused")])
def test_fused_adamw_is_an_alias_of_optimizer_and_the_later_flag_wins(flags, expected):
    assert training.parse_args(["--data", "d", "--init", "i", *flags]).optimizer == expected


def test_a_missing_bitsandbytes_is_one_line_and_exit_status_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` does when not installed
    with pytest.raises(SystemExit) as stop:
        training.main(["--data", str(tmp_path), "--init", "i", "--output-dir", str(tmp_path / "run"),
                       "--optimizer", "adamw8bit"])
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.endswith("--optimizer adamw8bit needs the bitsandbytes package, which is not installed: "
                          "pip install bitsandbytes")
    assert not (tmp_path / "run").exists()


def _tensors(value) -> list[torch.Tensor]:
    """The tensors anywhere in nested dicts (bitsandbytes keeps its quantised moments one level down)."""
    if isinstance(value, dict):
        return [tensor for item in value.values() for tensor in _tensors(item)]
    return [value] if isinstance(value, torch.Tensor) else []


def _train(init, data, output, *flags) -> dict[int, float]:
    assert training.main(train_args(init, data, output, "--batch-size", "2", *flags)) == 0
    return logged_losses(output)


def test_every_optimizer_trains_as_plain_adamw_and_adamw8bit_resumes_exactly(tmp_path, init_path, four_pairs,
                                                                              bitsandbytes):
    steps = ("--max-steps", str(STEPS))
    plain = _train(init_path, four_pairs, tmp_path / "adamw", *steps, "--optimizer", "adamw")
    fused = _train(init_path, four_pairs, tmp_path / "fused", *steps, "--optimizer", "adamw-fused")
    eight_bit = _train(init_path, four_pairs, tmp_path / "8bit", *steps, "--optimizer", "adamw8bit")
    assert sorted(plain) == sorted(fused) == sorted(eight_bit) == list(range(STEPS))
    assert len(set(plain.values())) == STEPS  # the model trains: each step's loss differs
    for step in plain:
        assert fused[step] == pytest.approx(plain[step], abs=FUSED_LOSS_ATOL), step
        assert eight_bit[step] == pytest.approx(plain[step], abs=EIGHT_BIT_LOSS_ATOL), step
    # The 8-bit state is there (the tiny ControlNet has tensors of 4096+ elements) and is saved.
    saved = read_training_checkpoint(tmp_path / "8bit" / "checkpoints" / "last.ckpt")["optimizer_states"][0]
    assert torch.uint8 in {tensor.dtype for tensor in _tensors(saved["state"])}
    # Stopped after 2 steps and resumed: the same losses as the uninterrupted 8-bit run, exactly.
    resumed = tmp_path / "8bit-resumed"
    _train(init_path, four_pairs, resumed, "--max-steps", "2", "--optimizer", "adamw8bit")
    _train(init_path, four_pairs, resumed, *steps, "--optimizer", "adamw8bit", "--resume", "last")
    assert logged_losses(resumed) == eight_bit


def test_a_resume_cannot_switch_between_8bit_and_pytorch_adamw_state(tmp_path, init_path, four_pairs, capsys,
                                                                     bitsandbytes):
    output = tmp_path / "run"
    _train(init_path, four_pairs, output, "--max-steps", "1", "--optimizer", "adamw8bit")
    argv = train_args(init_path, four_pairs, output, "--batch-size", "2", "--max-steps", "2", "--resume", "last")
    assert training.main([*argv, "--optimizer", "adamw"]) == 2
    assert ("--optimizer adamw: the checkpoint holds adamw8bit's state (bitsandbytes 8-bit), which adamw cannot "
            "continue") in capsys.readouterr().err
    assert training.main([*argv, "--optimizer", "adamw8bit"]) == 0  # the same optimizer continues
