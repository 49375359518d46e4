"""training.py --compile: torch.compile of the UNet and the ControlNet trains as eager mode does, and its
checkpoints are the same files (original key layout, no `_orig_mod.` prefix), so they resume and load alone."""

from __future__ import annotations

import pytest
import torch

import training
from tests.reference import TINY_CONFIG
from tests.training_helpers import logged_losses, read_training_checkpoint, train_args
from trainer.module import ControlNetTrainer, training_model_config

STEPS = 3
# Inductor fuses and reorders float operations: rounding differences only (measured: 1.2e-7).
LOSS_ATOL = 1e-5


def test_compile_compiles_the_unet_and_the_controlnet_in_place():
    eager = ControlNetTrainer(training_model_config(TINY_CONFIG))
    compiled = ControlNetTrainer(training_model_config(TINY_CONFIG), compile=True)
    unet, control = compiled.model.model.diffusion_model, compiled.model.control_model
    assert all(getattr(network, "_compiled_call_impl", None) is not None for network in (unet, control))
    assert compiled.model.first_stage_model._compiled_call_impl is None
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert compiled.hparams["compile"] is True


@pytest.mark.slow  # compiling the tiny UNet and ControlNet (forward and backward): ~100 s on 2 cores (seconds
# once inductor's cache in /tmp holds the graphs)
def test_a_compiled_run_trains_as_eager_and_resumes_from_its_checkpoint(tmp_path, init_path, four_pairs):
    def run(output, *flags):
        assert training.main(train_args(init_path, four_pairs, output, "--batch-size", "2", *flags)) == 0
        return logged_losses(output)

    eager = run(tmp_path / "eager", "--max-steps", str(STEPS))
    compiled = tmp_path / "compiled"
    run(compiled, "--max-steps", "2", "--compile")
    first = read_training_checkpoint(compiled / "checkpoints" / "last.ckpt")
    assert list(first["state_dict"]) == list(read_training_checkpoint(
        tmp_path / "eager" / "checkpoints" / "last.ckpt")["state_dict"])
    assert not any("_orig_mod" in key for key in first["state_dict"])
    losses = run(compiled, "--max-steps", str(STEPS), "--compile", "--resume", "last")
    assert sorted(losses) == sorted(eager) == list(range(STEPS))
    for step in eager:
        assert losses[step] == pytest.approx(eager[step], abs=LOSS_ATOL), step
    final = read_training_checkpoint(compiled / "checkpoints" / "last.ckpt")["state_dict"]
    expected = read_training_checkpoint(tmp_path / "eager" / "checkpoints" / "last.ckpt")["state_dict"]
    for key in expected:
        torch.testing.assert_close(final[key], expected[key], atol=5e-4, rtol=0, msg=key)
