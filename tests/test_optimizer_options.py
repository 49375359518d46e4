"""training.py --fused-adamw (default on) and --channels-last: the same training, faster kernels. Tiny model, CPU."""

from __future__ import annotations

import pytest
import torch

import training
from cldm.inference_loading import load_for_inference
from tests.reference import TINY_CONFIG
from tests.training_helpers import (
    logged_losses,
    read_training_checkpoint,
    train_args,
)
from trainer.module import ControlNetTrainer, training_model_config

STEPS = 4
# Kernel choice only (fused vs foreach AdamW, NHWC vs NCHW convolutions): float rounding, nothing more.
LOSS_ATOL = 1e-5
# AdamW divides each gradient by its running RMS, so where a gradient is near zero a rounding difference can
# move that element's update by up to the learning rate (3e-3): elements may differ by a fraction of it, while
# the updates as a whole agree closely.
WEIGHT_ATOL = 5e-4
UPDATE_RTOL = 1e-2


@pytest.mark.parametrize("fused", [True, False])
def test_the_optimizer_is_fused_adamw_when_asked(fused):
    module = ControlNetTrainer(training_model_config(TINY_CONFIG), optimizer="adamw-fused" if fused else "adamw")
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    assert bool(optimizer.defaults["fused"]) is fused
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {
        id(p) for p in module.model.control_model.parameters()}


def test_channels_last_puts_every_convolution_in_nhwc():
    module = ControlNetTrainer(training_model_config(TINY_CONFIG), channels_last=True)
    convs = [m for m in module.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    assert module.hparams["channels_last"] is True


def test_fused_adamw_and_channels_last_train_as_the_plain_run(tmp_path, init_path, four_pairs):
    runs = {}
    for name, flags in (("plain", ("--no-fused-adamw", "--no-channels-last")),
                        ("fast", ("--fused-adamw", "--channels-last"))):
        output = tmp_path / name
        argv = train_args(init_path, four_pairs, output, "--batch-size", "2", "--max-steps", str(STEPS), *flags)
        assert training.main(argv) == 0
        runs[name] = output
    plain, fast = (logged_losses(runs[name]) for name in ("plain", "fast"))
    assert sorted(plain) == sorted(fast) == list(range(STEPS))
    for step in plain:
        assert fast[step] == pytest.approx(plain[step], abs=LOSS_ATOL), step
    states = {name: read_training_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
              for name, run in runs.items()}
    control = [key for key in states["plain"] if key.startswith("control_model.")]
    changed = [key for key in control if not torch.equal(states["plain"][key], read_init(init_path)[key])]
    assert changed, "the ControlNet did not train"
    init = read_init(init_path)
    for key in control:
        torch.testing.assert_close(states["fast"][key].contiguous(), states["plain"][key], atol=WEIGHT_ATOL, rtol=0)
    updates = {name: torch.cat([(states[name][key] - init[key]).flatten() for key in control]) for name in states}
    assert (updates["fast"] - updates["plain"]).norm() < UPDATE_RTOL * updates["plain"].norm()
    # The NHWC checkpoint loads for inference like any other.
    model, _ = load_for_inference(runs["fast"] / "checkpoints" / "last.ckpt", None)
    assert torch.equal(model.state_dict()["control_model.zero_convs.0.0.weight"],
                       states["fast"]["control_model.zero_convs.0.0.weight"])


def read_init(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(path))
