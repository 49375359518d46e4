"""training.py and the Lightning training system on the tiny model (CPU): what trains, that it learns, that
an interrupted run resumes exactly, that a NaN loss keeps the last good checkpoint, and the checkpoint
contract with inference.py."""

from __future__ import annotations

import argparse
import inspect
import signal
import subprocess
import sys
from datetime import timedelta
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.utils.data import default_collate

import training
from dataset import ControlDataset
from ldm.checkpoint import CheckpointError, load_weights, read_state_dict
from ldm.util import instantiate_from_config
from tests.reference import TINY_CONFIG, tiny_vectors, tiny_weights
from tests.training_helpers import (
    IMAGE_SIZE,
    TINY_LR,
    AtStep,
    logged_losses,
    make_dataset,
    read_training_checkpoint,
    send,
    tool_add_control_init,
    train_args,
)
from trainer import checkpointing
from trainer.checkpointing import LAST, ResumableCheckpoint
from trainer.logger import ImageLogger
from trainer.module import ControlNetTrainer, load_initial_weights, training_model_config
from trainer.resumable_data import EpochOrder, ResumableDataLoader
from trainer.step_callback import EveryNSteps

REPO = Path(__file__).resolve().parent.parent


# ---- the model at initialisation and what trains ----------------------------------------------------
@torch.no_grad()
def test_control_changes_nothing_at_init():
    """Zero convs at zero: the ControlLDM's eps equals the plain UNet's, bit for bit."""
    ref = tiny_vectors()
    module = ControlNetTrainer(training_model_config(TINY_CONFIG))
    cond = {"c_crossattn": [ref["context"]], "c_concat": [ref["hint"]]}
    plain = {"c_crossattn": [ref["context"]], "c_concat": None}
    load_weights(module.model, tool_add_control_init())
    model = module.model.eval()
    assert torch.equal(model.apply_model(ref["x_t"], ref["t"], cond), model.apply_model(ref["x_t"], ref["t"], plain))
    # The comparison can fail: with non-zero zero convs (the reference weights) the control shows.
    load_weights(model, tiny_weights())
    assert not torch.allclose(model.apply_model(ref["x_t"], ref["t"], cond),
                              model.apply_model(ref["x_t"], ref["t"], plain))


@pytest.mark.parametrize("sd_locked", [True, False])
def test_only_the_intended_parameters_train(sd_locked):
    module = ControlNetTrainer(training_model_config(TINY_CONFIG), sd_locked=sd_locked)
    load_weights(module.model, tool_add_control_init())
    trainable_prefixes = ("control_model.",) if sd_locked else (
        "control_model.", "model.diffusion_model.output_blocks.", "model.diffusion_model.out.")
    names = {name for name, _ in module.model.named_parameters()}
    expected = {name for name in names if name.startswith(trainable_prefixes)}
    assert expected and expected != names
    assert {name for name, p in module.model.named_parameters() if p.requires_grad} == expected

    optimizer = module.configure_optimizers()
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for name, p in module.model.named_parameters() if name in expected}
    assert optimizer.defaults["lr"] == pytest.approx(1e-5)

    module.train()
    model = module.model
    assert model.control_model.training
    assert not model.first_stage_model.training and not model.cond_stage_model.training
    assert model.model.diffusion_model.training is (not sd_locked)

    # One backward pass: gradients reach exactly the trainable parameters.
    ref = tiny_vectors()
    cond = {"c_crossattn": [ref["context"]], "c_concat": [ref["hint"]]}
    loss, _ = model.p_losses(ref["z0"], cond, ref["t"], noise=ref["noise"])
    loss.backward()
    assert {name for name, p in model.named_parameters() if p.grad is not None} == expected


def test_initial_weights_load_tensor_by_tensor_with_the_strict_check(tmp_path, init_path):
    config = training_model_config(TINY_CONFIG)
    module = ControlNetTrainer(config)
    report = load_initial_weights(module.model, config, init_path)
    assert report.loaded == len(tool_add_control_init())
    for key, value in tool_add_control_init().items():
        assert torch.equal(module.model.state_dict()[key], value), key
    # A plain SD file (no ControlNet yet) is refused with the cause, before anything is copied.
    sd_only = tmp_path / "sd_only.safetensors"
    save_file({k: v for k, v in tool_add_control_init().items() if not k.startswith("control_model.")}, str(sd_only))
    fresh = ControlNetTrainer(config)
    before = {key: value.clone() for key, value in fresh.model.state_dict().items()}
    with pytest.raises(CheckpointError, match="tool_add_control"):
        load_initial_weights(fresh.model, config, sd_only)
    assert all(torch.equal(fresh.model.state_dict()[key], value) for key, value in before.items())


# ---- learning ---------------------------------------------------------------------------------------
def fixed_loss(state_dict: dict[str, torch.Tensor], data: Path) -> float:
    """The loss over the dataset at fixed timesteps and noise: what training on it should lower."""
    module = ControlNetTrainer(training_model_config(TINY_CONFIG))
    load_weights(module.model, state_dict)
    model = module.model.eval()
    batch = default_collate(list(ControlDataset(data, resolution=IMAGE_SIZE)))
    losses = []
    with torch.no_grad():
        z0 = model.get_first_stage_encoding(model.encode_first_stage(batch["jpg"].permute(0, 3, 1, 2)).mode())
        cond = module.conditioning(batch, batch["txt"])
        for i, t in enumerate(range(50, 1000, 100)):
            noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(i))
            loss, _ = model.p_losses(z0, cond, torch.full((len(z0),), t), noise=noise)
            losses.append(float(loss))
    return sum(losses) / len(losses)


def test_thirty_steps_on_one_batch_lower_the_loss(tmp_path, init_path):
    data = make_dataset(tmp_path / "two_pairs", 2)
    output = tmp_path / "run"
    argv = train_args(init_path, data, output, "--batch-size", "2", "--max-steps", "30", "--prompt-dropout", "0")
    assert training.main(argv) == 0
    before = fixed_loss(load_file(str(init_path)), data)
    after = fixed_loss(read_training_checkpoint(output / "checkpoints" / LAST)["state_dict"], data)
    assert after < 0.75 * before, (before, after)
    assert sorted(logged_losses(output)) == list(range(30))


# ---- resuming ---------------------------------------------------------------------------------------
RESUME_STEPS = 6  # four pairs, batch 1: the interruptions fall inside an epoch and the runs cross one


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, init_path, four_pairs) -> Path:
    output = tmp_path_factory.mktemp("uninterrupted")
    assert training.main(train_args(init_path, four_pairs, output, "--batch-size", "1",
                                    "--max-steps", str(RESUME_STEPS))) == 0
    return output


class FakeClock:
    """Stands in for time.monotonic in trainer.checkpointing: the test decides when time runs out."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


# Ctrl-C takes the same path as SIGTERM (see test_ctrl_c_keeps_the_newest_step_checkpoints).
@pytest.mark.parametrize("stop_step, how, expected_status", [
    (2, "sigterm", 128 + signal.SIGTERM),
    (3, "max-time", 0),
])
def test_interrupt_and_resume_last_reproduce_the_uninterrupted_run(
        tmp_path, monkeypatch, init_path, four_pairs, uninterrupted, stop_step, how, expected_status):
    output = tmp_path / "run"
    argv = train_args(init_path, four_pairs, output, "--batch-size", "1", "--max-steps", str(RESUME_STEPS))
    if how == "max-time":
        clock = FakeClock()
        monkeypatch.setattr(checkpointing, "time", clock)
        stop = AtStep(stop_step, lambda trainer, module: setattr(clock, "now", clock.now + 2 * 3600))
        first_run = training.main(argv + ["--max-time", "1 hour"], callbacks=[stop])
        monkeypatch.undo()
    else:
        stop = AtStep(stop_step, send(signal.SIGTERM))
        first_run = training.main(argv, callbacks=[stop])
    assert first_run == expected_status
    last = output / "checkpoints" / LAST
    assert read_training_checkpoint(last)["global_step"] == stop_step
    assert training.main(argv + ["--resume", "last"]) == 0

    expected = logged_losses(uninterrupted)
    assert sorted(expected) == list(range(RESUME_STEPS))
    assert logged_losses(output) == expected  # exactly, step by step
    final, reference = (read_training_checkpoint(run / "checkpoints" / LAST) for run in (output, uninterrupted))
    assert final["global_step"] == RESUME_STEPS
    for key, value in reference["state_dict"].items():
        assert torch.equal(final["state_dict"][key], value), key


def test_checkpoint_follows_the_contract(uninterrupted):
    """Plain values only (torch.load weights_only), the ControlLDM's keys, and enough to rebuild it."""
    path = uninterrupted / "checkpoints" / LAST
    checkpoint = read_training_checkpoint(path)
    hparams = checkpoint["hyper_parameters"]
    assert hparams["model_config"] == training_model_config(TINY_CONFIG)
    assert hparams["sd_locked"] is True and hparams["learning_rate"] == pytest.approx(float(TINY_LR))
    assert hparams["batch_size"] == 1 and hparams["resolution"] == IMAGE_SIZE
    model = instantiate_from_config(hparams["model_config"])
    assert set(checkpoint["state_dict"]) == set(model.state_dict())
    load_weights(model, read_state_dict(path))  # strict
    # --init accepts a training checkpoint too.
    again = ControlNetTrainer(hparams["model_config"])
    load_initial_weights(again.model, hparams["model_config"], path)
    assert all(torch.equal(again.model.state_dict()[key], value) for key, value in checkpoint["state_dict"].items())
    # The optimizer holds state for the ControlNet's parameters only.
    (optimizer_state,) = checkpoint["optimizer_states"]
    assert len(optimizer_state["state"]) == len(list(model.control_model.parameters()))


def test_ctrl_c_keeps_the_newest_step_checkpoints(tmp_path, init_path, four_pairs):
    output = tmp_path / "run"
    argv = train_args(init_path, four_pairs, output, "--batch-size", "2", "--max-steps", "20",
                      "--checkpoint-every", "1", "--keep-checkpoints", "2")
    assert training.main(argv, callbacks=[AtStep(3, send(signal.SIGINT))]) == 128 + signal.SIGINT
    checkpoints = output / "checkpoints"
    assert sorted(path.name for path in checkpoints.glob("*.ckpt")) == [
        LAST, "step-00000002.ckpt", "step-00000003.ckpt"]
    assert read_training_checkpoint(checkpoints / LAST)["global_step"] == 3
    # A new run refuses to mix with the old one's checkpoints.
    assert training.main(argv) == 1


# ---- a NaN loss -------------------------------------------------------------------------------------
def poison(trainer, module):
    with torch.no_grad():
        next(module.model.control_model.parameters()).fill_(float("nan"))


@pytest.mark.parametrize("hook, message", [
    # NaN weights before the forward pass: the loss of step 3 is NaN.
    ("on_train_batch_start", "the loss is nan in training step 3"),
    # NaN weights right after step 2, before its checkpoint: that checkpoint is refused.
    ("on_train_batch_end", "refusing to save a checkpoint at step 2"),
])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, init_path, four_pairs, capsys,
                                                                  hook, message):
    output = tmp_path / "run"
    argv = train_args(init_path, four_pairs, output, "--batch-size", "2", "--max-steps", "10",
                      "--checkpoint-every", "1", "--keep-checkpoints", "5")
    assert training.main(argv, callbacks=[AtStep(2, poison, hook)]) == 1
    assert message in capsys.readouterr().err
    checkpoints = output / "checkpoints"
    last = read_training_checkpoint(checkpoints / LAST)
    good_step = 2 if hook == "on_train_batch_start" else 1
    assert last["global_step"] == good_step
    assert sorted(path.name for path in checkpoints.glob("*.ckpt")) == [
        LAST, *(f"step-{step:08d}.ckpt" for step in range(1, good_step + 1))]
    assert all(torch.isfinite(value).all() for value in last["state_dict"].values())


# ---- the data order ---------------------------------------------------------------------------------
def test_epoch_order_is_a_seeded_permutation_split_across_ranks():
    orders = [list(EpochOrder(10, batch_size=2, seed=3, rank=rank, world_size=2)) for rank in range(2)]
    assert all(len(order) == 4 for order in orders)  # 10 // 2 ranks = 5 -> 2 full batches of 2 each
    assert not set(orders[0]) & set(orders[1])
    assert orders[0] == list(EpochOrder(10, batch_size=2, seed=3, rank=0, world_size=2))
    shifted = EpochOrder(10, batch_size=2, seed=3, rank=0, world_size=2)
    shifted.epoch = 1
    assert list(shifted) != orders[0]
    with pytest.raises(ValueError, match="fewer than one batch"):
        EpochOrder(3, batch_size=4, seed=0)


def test_loader_resumes_at_the_next_batch():
    dataset = list(range(7))
    uninterrupted = ResumableDataLoader(dataset, batch_size=2, seed=1)
    expected = [batch.tolist() for _ in range(3) for batch in uninterrupted]  # 3 epochs of 3 batches

    first = ResumableDataLoader(dataset, batch_size=2, seed=1)
    seen = [batch.tolist() for batch in first]
    seen += [batch.tolist() for batch in islice(first, 2)]  # stop inside epoch 1
    second = ResumableDataLoader(dataset, batch_size=2, seed=1)
    second.load_state_dict(first.state_dict())
    seen += [batch.tolist() for _ in range(2) for batch in second]
    assert seen == expected


# ---- the command line -------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("01:02:03:04", timedelta(days=1, hours=2, minutes=3, seconds=4)),
    ("1 day", timedelta(days=1)),
    ("11h 30m", timedelta(hours=11, minutes=30)),
    ("90 minutes", timedelta(minutes=90)),
])
def test_max_time_formats(text, expected):
    assert training.parse_duration(text) == expected


@pytest.mark.parametrize("text", ["tomorrow", "1 fortnight", "1:2:3", "0 days"])
def test_max_time_rejects_nonsense(text):
    with pytest.raises(argparse.ArgumentTypeError):
        training.parse_duration(text)


def test_bad_input_fails_clearly(tmp_path, init_path, four_pairs, capsys):
    assert training.main(train_args(init_path, tmp_path / "no_dataset", tmp_path / "run")) == 1
    assert "prompt.json" in capsys.readouterr().err
    assert training.main(train_args(tmp_path / "missing.ckpt", four_pairs, tmp_path / "run")) == 1
    assert "missing.ckpt" in capsys.readouterr().err
    assert training.main(train_args(init_path, four_pairs, tmp_path / "run", "--resume", "last")) == 1
    assert "last.ckpt not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        training.parse_args(train_args(init_path, four_pairs, tmp_path / "run", "--resolution", "100"))


def test_every_n_steps_acts_once_per_new_optimizer_step():
    """The guard of the image log, the fidelity callback and the checkpoints: after a resume at step 4,
    with two batches per optimizer step, every 2 steps means steps 6 and 8, once each."""
    class Record(EveryNSteps):
        def __init__(self):
            super().__init__(every_n_steps=2)
            self.steps: list[int] = []

        def on_every_n_steps(self, trainer, pl_module, batch, step):
            self.steps.append(step)

    trainer, record = SimpleNamespace(global_step=4), Record()
    record.on_train_start(trainer, None)
    for step in (4, 5, 5, 6, 6, 7, 7, 8, 8):
        trainer.global_step = step
        record.on_train_batch_end(trainer, None, None, None, 0)
    assert record.steps == [6, 8]
    with pytest.raises(ValueError, match="every_n_steps"):
        ImageLogger("unused", every_n_steps=0)


def test_the_command_line_takes_the_constructors_defaults():
    args = training.parse_args(["--init", "init.safetensors", "--data", "data"])

    def default(function, name):
        return inspect.signature(function).parameters[name].default

    assert args.lr == default(ControlNetTrainer, "learning_rate") == 1e-5
    assert args.prompt_dropout == default(ControlNetTrainer, "prompt_dropout") == 0.5
    assert args.logger_freq == default(ImageLogger, "every_n_steps") == 300
    assert args.sample_ddim_steps == default(ImageLogger, "ddim_steps") == 50
    assert args.checkpoint_every == default(ResumableCheckpoint, "every_n_steps") == 1000
    assert args.keep_checkpoints == default(ResumableCheckpoint, "keep") == 2
    assert Path(args.config) == REPO / "models" / "cldm_v15.yaml"


@torch.no_grad()
def test_prompt_dropout_replaces_prompts_by_the_empty_one(monkeypatch):
    """ControlNetTrainer.training_step conditions on "" with probability prompt_dropout, per pair."""
    ref = tiny_vectors()
    batch = {"jpg": ref["x"].permute(0, 2, 3, 1), "hint": ref["hint"].permute(0, 2, 3, 1), "txt": ["a cat", "a bird"]}

    class Conditioned(Exception):
        pass

    module = ControlNetTrainer(training_model_config(TINY_CONFIG))
    assert module.prompt_dropout == 0.5

    def record(batch, prompts):
        seen.extend(prompts)
        raise Conditioned  # the prompts are all this test needs from the step

    monkeypatch.setattr(module, "conditioning", record)
    posterior = module.target_posterior(batch)
    monkeypatch.setattr(module, "target_posterior", lambda batch: posterior)  # encode once, not per step
    seen: list[str] = []

    def prompts_of(dropout: float, batches: int) -> list[str]:
        module.prompt_dropout = dropout
        seen.clear()
        for batch_idx in range(batches):
            with pytest.raises(Conditioned):
                module.training_step(batch, batch_idx)
        return list(seen)

    assert prompts_of(0.0, 3) == ["a cat", "a bird"] * 3
    assert prompts_of(1.0, 3) == [""] * 6
    half = prompts_of(0.5, 10)
    assert 0.25 < half.count("") / len(half) < 0.75
    assert {prompt for prompt in half if prompt} == {"a cat", "a bird"}


def test_image_logger_writes_a_grid_and_restores_train_mode(tmp_path):
    module = ControlNetTrainer(training_model_config(TINY_CONFIG))
    load_weights(module.model, tool_add_control_init())
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    ref = tiny_vectors()
    batch = {"jpg": ref["x"].permute(0, 2, 3, 1), "hint": ref["hint"].permute(0, 2, 3, 1), "txt": ["a cat", "a bird"]}
    ImageLogger(tmp_path, every_n_steps=5, ddim_steps=2).log_grid(trainer, module, batch, step=5)
    with Image.open(tmp_path / "step-00000005.png") as grid:
        assert grid.size == (2 + 2 * (IMAGE_SIZE + 2), 2 + 3 * (IMAGE_SIZE + 2))  # 2 pairs x 3 rows
    assert "0: a cat" in (tmp_path / "step-00000005.txt").read_text()
    assert module.training and module.model.control_model.training
    assert not module.model.first_stage_model.training and not module.model.model.diffusion_model.training


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "training.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_help(capsys):
    # In process: the script as a program is the (slow) smoke test's business.
    with pytest.raises(SystemExit) as exit_info:
        training.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--init", "--resume", "--max-time", "--prompt-dropout", "--sd-locked", "--strategy"):
        assert flag in out


@pytest.mark.slow
def test_training_script_smoke(tmp_path, init_path, four_pairs):
    """training.py as a user runs it: checkpoints, a sample grid and the CSV log appear."""
    output = tmp_path / "run"
    result = run_script(*train_args(init_path, four_pairs, output, "--batch-size", "2", "--max-steps", "2",
                                    "--accumulate-grad-batches", "2", "--logger-freq", "2",
                                    "--sample-ddim-steps", "2", "--checkpoint-every", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (output / "checkpoints" / LAST).is_file() and (output / "checkpoints" / "step-00000002.ckpt").is_file()
    # One grid, after optimizer step 2 (none while the first step accumulates).
    assert sorted(path.name for path in (output / "samples").iterdir()) == ["step-00000002.png",
                                                                             "step-00000002.txt"]
    assert sorted(logged_losses(output)) == [0, 1]
    assert list((output / "logs" / "tensorboard").glob("version_0/events.out.tfevents.*"))
    assert "loss=" in result.stdout  # the progress bar shows the loss
