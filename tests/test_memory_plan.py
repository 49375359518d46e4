"""The memory planner (bench/memory.py), training.py --plan and --batch-size auto. Tiny model: the estimate
under FakeTensorMode against the same step on real CPU tensors; a GPU faked by monkeypatching torch.cuda."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from torch._subclasses.fake_tensor import FakeTensorMode

import training
from bench import memory
from bench.configs import TINY_CONFIG
from tests.training_helpers import read_training_checkpoint, train_args

REPO = Path(__file__).resolve().parent.parent
GIB = 2**30
REAL_TOLERANCE = 0.10
TINY = memory.TrainingStep(config=str(TINY_CONFIG), batch_size=2, resolution=64, precision="32")


@pytest.mark.parametrize(("resolution", "batch", "precision"), [(64, 2, "32"), (128, 1, "bf16-mixed")])
def test_the_estimate_matches_the_same_step_on_real_cpu_tensors(resolution, batch, precision):
    step = dataclasses.replace(TINY, resolution=resolution, batch_size=batch, precision=precision)
    fake, real = memory.run_step(step, fake=True), memory.run_step(step, fake=False)
    assert real.peak > real.weights + real.gradients + real.optimizer_state  # activations are counted too
    assert abs(fake.peak - real.peak) <= REAL_TOLERANCE * real.peak
    assert (fake.weights, fake.gradients, fake.optimizer_state) == (real.weights, real.gradients,
                                                                    real.optimizer_state)


@pytest.mark.slow  # the mid-size benchmark model for real on the CPU: about 25 s on 2 cores
def test_validate_holds_on_the_tiny_and_the_mid_size_model():
    results = memory.validate()
    assert {size for size, *_ in results} == {"tiny", "midsize"}
    for size, step, fake, real in results:
        assert abs(fake.peak - real.peak) <= REAL_TOLERANCE * real.peak, (size, step)


def _attention_peak(attention) -> int:
    """Peak bytes of one attention forward over (1, 2 heads, 1024 tokens, 16) fp32 queries, keys and values."""
    with FakeTensorMode(), memory.StorageTracker(fake_scalars=True) as tracker:
        q, k, v = (torch.randn(1, 2, 1024, 16) for _ in range(3))
        tracker.reset_peak()
        before = tracker.now
        out = attention(q, k, v)
        assert out.shape == q.shape
    return tracker.peak - before


def test_sdpa_is_counted_as_the_fused_kernels_output_and_logsumexp_not_the_score_matrix():
    out, logsumexp, scores = 2 * 1024 * 16 * 4, 2 * 1024 * 4, 2 * 1024 * 1024 * 4
    fused = _attention_peak(torch.nn.functional.scaled_dot_product_attention)
    assert out <= fused <= out + logsumexp + 2 * memory.CUDA_ALLOCATION_BLOCK
    math = _attention_peak(lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) / 4, -1) @ v)
    assert math >= 2 * scores  # the scores and their softmax


def test_the_estimate_follows_batch_precision_and_optimizer():
    plain = memory.estimate(TINY)
    assert memory.estimate(dataclasses.replace(TINY, batch_size=4)).peak > plain.peak
    half = memory.estimate(dataclasses.replace(TINY, precision="bf16-mixed"))
    assert half.weights < plain.weights and half.gradients == plain.gradients
    eight_bit = memory.estimate(dataclasses.replace(TINY, optimizer="adamw8bit"))
    assert eight_bit.optimizer_state < plain.optimizer_state / 2
    trained = sum(p.numel() for p in memory.build_module(TINY).trainable_parameters())
    assert plain.optimizer_state >= 2 * 4 * trained  # AdamW: two fp32 moments per trained weight
    assert plain.gradients >= 4 * trained


def test_largest_batch_is_the_largest_that_fits():
    three = memory.estimate(dataclasses.replace(TINY, batch_size=3)).peak
    four = memory.estimate(dataclasses.replace(TINY, batch_size=4)).peak
    assert memory.largest_batch(TINY, (three + four) // 2)[0] == 3
    assert memory.largest_batch(TINY, memory.estimate(dataclasses.replace(TINY, batch_size=1)).peak - 1)[0] == 0


def _plan_args(*extra: str) -> list[str]:
    return ["--config", str(TINY_CONFIG), "--data", "unused", "--resolution", "64", "--precision", "32", "--plan",
            *extra]


def test_plan_prints_the_estimate_and_writes_nothing(capsys, tmp_path):
    output = tmp_path / "run"
    assert training.main(_plan_args("--batch-size", "2", "--accelerator", "cpu", "--output-dir", str(output))) == 0
    printed = capsys.readouterr().out
    expected = memory.estimate(dataclasses.replace(TINY, precision="32"))
    assert "training step: batch 2, 64 px, precision 32" in printed
    assert f"estimated peak GPU memory: {expected.peak / GIB:.2f} GiB" in printed
    assert not output.exists()


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA GPU whose free memory the test sets: gpu.free = bytes."""
    gpu = SimpleNamespace(name="Fake GPU", total=80 * GIB, free=80 * GIB)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: True))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(name=gpu.name, total_memory=gpu.total))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (gpu.free, gpu.total))
    return gpu


def test_batch_size_auto_takes_the_largest_batch_that_fits_the_gpu(fake_gpu, capsys):
    three = memory.estimate(dataclasses.replace(TINY, batch_size=3, precision="32")).peak
    four = memory.estimate(dataclasses.replace(TINY, batch_size=4, precision="32")).peak
    # The free memory less the margin (1 GiB here) lies between the peaks of batch 3 and 4.
    fake_gpu.free = memory.AUTO_BATCH_MIN_MARGIN_BYTES + (three + four) // 2
    assert training.main(_plan_args("--batch-size", "auto", "--accelerator", "gpu")) == 0
    printed = capsys.readouterr().out
    assert "--batch-size auto: 3 (estimated peak" in printed and "on the Fake GPU" in printed
    assert "training step: batch 3, 64 px" in printed


def test_batch_size_auto_on_a_gpu_too_small_for_batch_1_is_one_error_line(fake_gpu, capsys):
    fake_gpu.free = memory.AUTO_BATCH_MIN_MARGIN_BYTES + 1024
    assert training.main(_plan_args("--batch-size", "auto", "--accelerator", "gpu")) == 2
    assert capsys.readouterr().err.strip().startswith("error: --batch-size auto: even batch 1 needs an estimated")


def test_batch_size_auto_keeps_the_default_on_the_cpu(tmp_path, init_path, four_pairs, capsys):
    output = tmp_path / "run"
    assert training.main(train_args(init_path, four_pairs, output, "--batch-size", "auto", "--max-steps", "1")) == 0
    assert f"--batch-size auto: {training.DEFAULT_BATCH_SIZE} (no CUDA GPU in use" in capsys.readouterr().out
    hyper = read_training_checkpoint(output / "checkpoints" / "last.ckpt")["hyper_parameters"]
    assert hyper["batch_size"] == training.DEFAULT_BATCH_SIZE


@pytest.mark.slow  # four tiny-model memory checks and two benchmark workers: about a minute on 2 cores
def test_the_gpu_check_script_runs_its_commands_on_the_cpu():
    result = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "GPU_CHECK_DRY_RUN": "1", "PYTHON": sys.executable})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    checks = [line for line in result.stdout.splitlines() if "estimate" in line and "measured" in line]
    assert len(checks) == len(memory.CHECK_STEPS), result.stdout
    assert "ours samples/s" in result.stdout
