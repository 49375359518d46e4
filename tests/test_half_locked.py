"""--precision auto and the locked parts in half precision (--half-locked), on the tiny model (CPU, bf16-mixed):
what is stored in which dtype, that training stays close to fp32, that checkpoints keep fp32 tensors in the
original layout and load in inference, that a run resumes exactly, and that the latent cache works with it."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

import training
from cldm.inference_loading import load_for_inference
from tests.reference import TINY_CONFIG
from tests.training_helpers import (
    AtStep,
    logged_losses,
    read_training_checkpoint,
    send,
    tool_add_control_init,
    train_args,
)
from trainer.fidelity_callback import FidelityCallback
from trainer.module import training_model_config

STEPS = 4
BF16 = ("--precision", "bf16-mixed")
# The whole step under bf16 autocast with bf16 locked weights: 8 mantissa bits (relative step 2^-8). Measured
# over four steps: the losses differ from the fp32 run's by at most 6.4e-4 relative (as in
# tests/test_precision.py), and the cached bf16 run's from the uncached one's by at most 7e-4.
BF16_LOSS_RTOL = 5e-3


# ---- picking the precision ----------------------------------------------------------------------------
@pytest.mark.parametrize("device_type, capability, expected", [
    ("cuda", (9, 0), "bf16-mixed"),  # H100
    ("cuda", (8, 0), "bf16-mixed"),  # A100
    ("cuda", (8, 9), "bf16-mixed"),  # L4
    ("cuda", (7, 5), "16-mixed"),  # T4
    ("cuda", (7, 0), "16-mixed"),  # V100
    ("cpu", None, "32"),
    ("mps", None, "32"),
])
def test_pick_precision(device_type, capability, expected):
    assert training.pick_precision(device_type, capability) == expected


def test_pick_precision_needs_the_capability_of_a_gpu():
    with pytest.raises(ValueError, match="compute capability"):
        training.pick_precision("cuda")


def test_auto_precision_looks_at_every_visible_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: [(8, 6), (7, 5)][i])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Some GPU")
    assert training.auto_precision("auto") == ("16-mixed", "Some GPU, compute capability 7.5")
    assert training.auto_precision("cpu")[0] == "32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training.auto_precision("auto") == ("32", "no CUDA GPU in use")


# ---- what is stored in which dtype ----------------------------------------------------------------------
def dtypes(module) -> dict[str, set[torch.dtype]]:
    model, unet = module.model, module.model.model.diffusion_model
    parts = {"control": model.control_model, "vae": model.first_stage_model, "text": model.cond_stage_model,
             "unet encoder": unet.input_blocks, "unet middle": unet.middle_block, "unet decoder": unet.output_blocks}
    return {name: {p.dtype for p in part.parameters()} for name, part in parts.items()}


@pytest.mark.parametrize("precision, extra, locked", [
    ("bf16-mixed", [], torch.bfloat16),
    ("16-mixed", [], torch.float16),
    ("32-true", [], torch.float32),
    ("bf16-mixed", ["--no-half-locked"], torch.float32),
])
def test_locked_parts_take_the_mixed_precision_dtype(tmp_path, precision, extra, locked):
    args = training.parse_args(train_args(tmp_path / "init.ckpt", tmp_path, tmp_path / "run", *extra))
    module = training.build_module(args, load_init=False, precision=precision)
    assert dtypes(module) == {"control": {torch.float32}, "vae": {locked}, "text": {locked},
                              "unet encoder": {locked}, "unet middle": {locked}, "unet decoder": {locked}}
    assert all(value.dtype == torch.float32 for value in module.state_dict().values() if value.is_floating_point())


def test_an_unlocked_unet_decoder_keeps_fp32(tmp_path):
    args = training.parse_args(train_args(tmp_path / "init.ckpt", tmp_path, tmp_path / "run", "--no-sd-locked"))
    module = training.build_module(args, load_init=False, precision="bf16-mixed")
    found = dtypes(module)
    assert found["unet decoder"] == found["control"] == {torch.float32}
    assert found["unet encoder"] == found["unet middle"] == found["vae"] == {torch.bfloat16}


# ---- training runs --------------------------------------------------------------------------------------
class CheckDtypes(L.Callback):
    """Records the dtypes of the module's parts while it trains."""

    def on_train_start(self, trainer, module):
        self.seen = dtypes(module)


def run_args(init: Path, data: Path, output: Path, *extra: str) -> list[str]:
    # A sample grid (log_images under the trainer's autocast) and a checkpoint at step 2.
    return train_args(init, data, output, "--batch-size", "2", "--max-steps", str(STEPS), "--logger-freq", "2",
                      "--sample-ddim-steps", "2", "--checkpoint-every", "2", *extra)


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory, init_path, four_pairs) -> Path:
    output = tmp_path_factory.mktemp("fp32")
    assert training.main(run_args(init_path, four_pairs, output, "--precision", "32")) == 0
    return output


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, init_path, four_pairs) -> tuple[Path, CheckDtypes, FidelityCallback]:
    output = tmp_path_factory.mktemp("bf16")
    check = CheckDtypes()
    edges = np.zeros((64, 64, 3), np.uint8)
    edges[20:44, 32] = 255
    fidelity = FidelityCallback([(edges, "a line")], every_n_steps=2, ddim_steps=2)
    assert training.main(run_args(init_path, four_pairs, output, *BF16), callbacks=[check, fidelity]) == 0
    return output, check, fidelity


def test_bf16_training_stores_the_locked_parts_in_bf16_and_stays_close_to_fp32(bf16_run, fp32_run):
    output, check, fidelity = bf16_run
    assert check.seen == {"control": {torch.float32}, "vae": {torch.bfloat16}, "text": {torch.bfloat16},
                          "unet encoder": {torch.bfloat16}, "unet middle": {torch.bfloat16},
                          "unet decoder": {torch.bfloat16}}
    losses, expected = logged_losses(output), logged_losses(fp32_run)
    assert sorted(losses) == sorted(expected) == list(range(STEPS))
    for step, loss in expected.items():
        assert losses[step] == pytest.approx(loss, rel=BF16_LOSS_RTOL), step
    # The sample grid and the fidelity callback sampled the half-precision model (under the trainer's autocast).
    assert (output / "samples" / "step-00000002.png").is_file()
    assert [step for step, *_ in fidelity.history] == [2, 4]


def test_bf16_checkpoint_is_fp32_in_the_original_layout_and_loads_for_inference(bf16_run, init_path):
    output = bf16_run[0]
    path = output / "checkpoints" / "last.ckpt"
    checkpoint = read_training_checkpoint(path)
    state = checkpoint["state_dict"]
    initial = tool_add_control_init()
    assert set(state) == set(initial)
    assert all(value.dtype == torch.float32 for value in state.values() if value.is_floating_point())
    # The locked weights are the initial ones as bf16 stored them; the ControlNet trained in fp32.
    for key in ("first_stage_model.encoder.conv_in.weight", "model.diffusion_model.out.2.weight",
                "cond_stage_model.transformer.text_model.final_layer_norm.weight"):
        assert torch.equal(state[key], initial[key].to(torch.bfloat16).float()), key
    control = [key for key in state if key.startswith("control_model.")]
    assert any(not torch.equal(state[key], initial[key].to(torch.bfloat16).float()) for key in control)
    model, lines = load_for_inference(path)
    # AdamW holds fp32 state for exactly the ControlNet's parameters.
    (optimizer,) = checkpoint["optimizer_states"]
    assert len(optimizer["state"]) == len(list(model.control_model.parameters()))
    assert all(value.dtype == torch.float32 for entry in optimizer["state"].values()
               for name, value in entry.items() if name != "step")
    assert "training checkpoint" in lines[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(model.state_dict()["control_model.zero_convs.0.0.weight"],
                       state["control_model.zero_convs.0.0.weight"])
    assert checkpoint["hyper_parameters"]["locked_dtype"] == "bfloat16"
    assert checkpoint["hyper_parameters"]["model_config"] == training_model_config(TINY_CONFIG)


def test_bf16_run_resumes_exactly(tmp_path, init_path, four_pairs, bf16_run):
    reference = bf16_run[0]
    output = tmp_path / "run"
    argv = run_args(init_path, four_pairs, output, *BF16)
    assert training.main(argv, callbacks=[AtStep(1, send(signal.SIGTERM))]) == 128 + signal.SIGTERM
    assert training.main(argv + ["--resume", "last"]) == 0
    assert logged_losses(output) == logged_losses(reference)
    final, expected = (read_training_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
                       for run in (output, reference))
    assert all(torch.equal(final[key], value) for key, value in expected.items())


def test_latent_cache_under_bf16(tmp_path, init_path, four_pairs, bf16_run):
    """The cache is built under the run's autocast with the bf16 encoders, so training from it stays with
    the bf16 run without it (their batches differ in composition, hence in bf16 rounding of the encoders)."""
    reference = bf16_run[0]
    output = tmp_path / "run"
    assert training.main(run_args(init_path, four_pairs, output, *BF16, "--cache-latents")) == 0
    fingerprint = json.loads((output / "latent_cache" / "fingerprint.json").read_text())
    assert fingerprint["precision"] == "bf16-mixed"
    expected = logged_losses(reference)
    for step, loss in logged_losses(output).items():
        assert loss == pytest.approx(expected[step], rel=BF16_LOSS_RTOL), step
