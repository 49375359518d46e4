"""Smoke runs of the benchmark scripts (bench/) on the tiny model, so that they cannot rot.

What they check beyond "it runs": both sides are the same architecture (parameter counts per
component, up to SD 1.5 size), a step trains the ControlNet and nothing else, the worker protocol
produces a table with ratios, and the GPU report (TFLOP/s, fraction of peak, largest batch) is
computed right from given figures.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from bench import sample, train_step
from bench.configs import model_config
from bench.models import build_ours, build_peer, make_batch
from bench.train_step import PRESETS, Row, Setting, largest_batch, preset_from_args, report

CPU = torch.device("cpu")
TINY_RESOLUTION = 64


def _parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("size", ["sd15", "midsize", "tiny"])
def test_peer_has_our_architecture(size):
    model = model_config(size)
    ours, peer = build_ours(model, "sdpa", False, torch.device("meta")), build_peer(model, torch.device("meta"))
    assert _parameter_count(ours.model) == _parameter_count(peer.unet)
    assert _parameter_count(ours.control_model) == _parameter_count(peer.controlnet)
    assert _parameter_count(ours.cond_stage_model) == _parameter_count(peer.text_encoder)
    # diffusers' VAE cannot express a first level wider than conv_in (the tiny VAE's ch_mult [2, ...]).
    if model["params"]["first_stage_config"]["params"]["ddconfig"]["ch_mult"][0] == 1:
        assert _parameter_count(ours.first_stage_model) == _parameter_count(peer.vae)


def _tiny_job(side: str, **overrides) -> dict:
    job = {"side": side, "size": "tiny", "device": "cpu", "precision": "fp32", "attention": "sdpa",
           "checkpointing": False, "fused_adamw": True, "channels_last": False, "encode_images": True,
           "resolution": TINY_RESOLUTION, "batch": 2}
    job.update(overrides)
    return job


@pytest.mark.parametrize("factory", [train_step.ours_train_side, train_step.peer_train_side])
def test_a_step_trains_the_controlnet_only(factory):
    side = factory(_tiny_job("x"), CPU)
    trainable = {n: p.detach().clone() for n, p in side.trainable.named_parameters()}
    frozen = {n: p.detach().clone() for n, p in side.frozen.named_parameters()}
    side.step_for(make_batch(model_config("tiny"), 2, TINY_RESOLUTION, CPU))()
    assert all(not torch.equal(p, trainable[n]) for n, p in side.trainable.named_parameters())
    assert all(torch.equal(p, frozen[n]) for n, p in side.frozen.named_parameters())


@pytest.mark.slow
def test_train_step_cli_prints_both_sides_and_ratios(capsys):
    train_step.main(["--preset", "cpu", "--size", "tiny", "--resolution", str(TINY_RESOLUTION), "--batch", "1",
                     "--warmup", "0", "--steps", "2", "--channels-last"])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith(f"| {TINY_RESOLUTION} "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    ours, peer, speed_ratio, ours_mem, peer_mem, memory_ratio = (float(c) for c in cells[3:9])
    assert ours > 0 and peer > 0 and ours_mem > 0 and peer_mem > 0
    assert speed_ratio == pytest.approx(ours / peer, rel=0.05)
    assert memory_ratio == pytest.approx(ours_mem / peer_mem, rel=0.05)


@pytest.mark.parametrize("factory", [sample.ours_sampler, sample.peer_sampler])
def test_samplers_time_every_ddim_step(factory, monkeypatch):
    clocks = []

    class RecordingClock(sample.StepClock):
        def __init__(self, device):
            super().__init__(device)
            clocks.append(self)

    monkeypatch.setattr(sample, "StepClock", RecordingClock)
    model = model_config("tiny")
    batch = make_batch(model, 1, TINY_RESOLUTION, CPU)
    job = {"size": "tiny", "precision": "fp32", "resolution": TINY_RESOLUTION, "ddim_steps": 3,
           "channels_last": False}
    seconds = factory(job, CPU, batch, torch.zeros_like(batch.contexts))()
    (clock,) = clocks
    assert len(clock.stamps) == job["ddim_steps"] + 1  # the start, then one tick after each DDIM step
    intervals = [later - earlier for earlier, later in zip(clock.stamps, clock.stamps[1:], strict=False)]
    assert seconds == pytest.approx(statistics.median(intervals[sample.SKIPPED_STEPS:])) and seconds > 0


@pytest.mark.parametrize("limit", [0, 1, 5, 16, 17, 100])
@pytest.mark.parametrize("guess", [1, 4, 16, 40])
def test_largest_batch_search(limit, guess):
    probes = []

    def fits(b):
        probes.append(b)
        return b <= limit

    assert largest_batch(fits, guess) == limit
    assert len(probes) <= 16


def test_gpu_preset_report_from_given_figures(monkeypatch):
    """The GPU path cannot run here: check its settings and the arithmetic of its report (with a FLOP count
    per sample made up for the test, so that the figures follow from the given ones alone)."""
    monkeypatch.setitem(train_step.SD15_TFLOP_PER_SAMPLE, (256, False), 2.0)
    preset = preset_from_args(train_step.build_parser().parse_args(["--preset", "gpu"]))
    assert preset.size == "sd15" and preset.device == "cuda" and preset.precision == "bf16"
    assert [(s.resolution, s.batch, s.encode_images) for s in preset.settings] == [
        (256, 16, False), (512, 8, False), (512, 8, True)]
    rows = [Row(Setting(256, 16, search_max_batch=True),
                {"ours": {"samples_per_s": 20.0, "peak_gib": 10.0, "max_batch": 30},
                 "peer": {"samples_per_s": 10.0, "peak_gib": 20.0, "max_batch": 12}})]
    text = report(PRESETS["gpu"], rows, peak_tflops=1000.0)
    cells = [c.strip() for c in text.splitlines()[-1].strip("|").split("|")]
    # res, batch, VAE, ours/peer samples/s, ratio, ours/peer GiB, ratio, TFLOP/s x2, % peak x2, max batch x2
    assert cells[5] == "2" and cells[8] == "0.5"
    assert float(cells[9]) == pytest.approx(2.0 * 20) and float(cells[10]) == pytest.approx(2.0 * 10)
    assert float(cells[11]) == pytest.approx(100 * 2.0 * 20 / 1000)
    assert cells[13:15] == ["30", "12"]


def test_control_types_bench_reports_every_type_against_canny(capsys):
    from bench import control_types

    assert control_types.main(["--photos", "2", "--size", "128", "96"]) == 0
    out = capsys.readouterr().out
    rows = {line.split(":")[0].strip(): line for line in out.splitlines() if "photos/s" in line and ":" in line}
    assert set(rows) >= set(control_types.CONTROL_TYPES)
    assert "1.00x Canny" in rows["canny"] and "tiny random DPT" in out


def test_consistency_bench_times_plain_and_reward_steps(monkeypatch, capsys):
    from bench import consistency

    monkeypatch.setattr(consistency, "MODELS", (("tiny", "tiny", 64, 2, True),))
    monkeypatch.setattr(consistency, "WARMUP", 0)
    assert consistency.main(["--steps", "1", "--models", "tiny"]) == 0
    out = capsys.readouterr().out
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| tiny")]
    assert [row[1] for row in rows] == [variant for variant, _, _ in consistency.VARIANTS], out
    assert "vs plain" in out and consistency.cpu_name() in out
    # The planner plans the reward for every sample: more memory than the plain step.
    planned = [float(row[4]) for row in rows]
    assert planned[1] == planned[2] > planned[0], out
