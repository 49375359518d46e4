"""Benchmark: what ControlNet++'s consistency reward (training.py --consistency-weight) costs per training step,
against plain training of the same model in the same run.

    .venv/bin/python -m bench.consistency                 # the toy model (64 px) and the mid-size model (256 px)
    .venv/bin/python -m bench.consistency --steps 3       # a quick look

For each model the same ControlNetTrainer step (trainer.module: batch_loss, backward, AdamW, the decoder
unlocked for the toy as the quickstart trains it, locked for the mid-size model) runs three ways, interleaved
step by step so that the machine's drift falls on all of them alike:
- plain: the diffusion loss only;
- reward, t <= 200: --consistency-weight 1 with ControlNet++'s --consistency-max-t 200, as a run trains (about a
  fifth of each batch gets the reward: decoded with gradients, Kornia Canny magnitudes);
- reward, every sample: --consistency-max-t 999, the worst step (every sample decoded).
Time: the median step, seconds, on this machine's CPU (named in the output). Memory: the memory planner's
estimate of the peak (bench/memory.py, FakeTensorMode: what the GPU's allocator would hold), which plans the
reward for the worst step, every sample; its plain and reward figures come from the same planner.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.configs import TINY_CONFIG, config_file, model_config
from bench.measure import format_table, positive_int
from bench.memory import GIB, TrainingStep, estimate
from trainer.module import ControlNetTrainer, training_model_config

REPO = Path(__file__).resolve().parents[1]
TOY_CONFIG = REPO / "models" / "cldm_toy.yaml"
# (name, config, resolution, batch, sd_locked): the quickstart's model and batch, and the mid-size CPU preset.
MODELS = (("toy", "toy", 64, 64, False), ("mid-size", "midsize", 256, 2, True))
# (name, consistency weight, largest rewarded timestep)
VARIANTS = (("plain", 0.0, 200), ("reward, t <= 200", 1.0, 200), ("reward, every sample", 1.0, 999))
DEFAULT_STEPS = 8
WARMUP = 2


@dataclass
class Row:
    model: str
    variant: str
    seconds: float
    planned_peak: int


def cpu_name() -> str:
    """The CPU's model name (figures vary by CPU: every table names it)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def make_batch(batch: int, resolution: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"jpg": torch.rand(batch, resolution, resolution, 3, generator=generator) * 2 - 1,
            "hint": (torch.rand(batch, resolution, resolution, 3, generator=generator) > 0.9).float(),
            "txt": [f"a red square on a white background {i}" for i in range(batch)]}


def build(config: str, weight: float, max_t: int, sd_locked: bool) -> tuple[ControlNetTrainer, torch.optim.Optimizer]:
    torch.manual_seed(0)
    module = ControlNetTrainer(training_model_config(config), sd_locked=sd_locked, consistency_weight=weight,
                               consistency_max_t=max_t)
    return module, module.configure_optimizers()


def one_step(module: ControlNetTrainer, optimizer: torch.optim.Optimizer, batch: dict, index: int) -> float:
    started = time.perf_counter()
    loss, _ = module.batch_loss(batch, index)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def measure(name: str, config: str, resolution: int, batch: int, sd_locked: bool, steps: int) -> list[Row]:
    """The three variants of one model, their steps interleaved (same batches, same timesteps per step index)."""
    systems = {variant: build(config, weight, max_t, sd_locked) for variant, weight, max_t in VARIANTS}
    times: dict[str, list[float]] = {variant: [] for variant in systems}
    for index in range(WARMUP + steps):
        data = make_batch(batch, resolution, index)
        for variant, (module, optimizer) in systems.items():
            seconds = one_step(module, optimizer, data, index)
            if index >= WARMUP:
                times[variant].append(seconds)
    rows = []
    for variant, weight, _ in VARIANTS:
        plan = estimate(TrainingStep(config=config, batch_size=batch, resolution=resolution, precision="32",
                                     sd_locked=sd_locked, consistency_weight=weight))
        rows.append(Row(name, variant, statistics.median(times[variant]), plan.peak))
    return rows


def table(rows: Sequence[Row]) -> str:
    plain = {row.model: row for row in rows if row.variant == VARIANTS[0][0]}
    body = []
    for row in rows:
        base = plain[row.model]
        body.append([row.model, row.variant, f"{row.seconds:.3f}", f"{row.seconds / base.seconds:.2f}x",
                     f"{row.planned_peak / GIB:.3f}", f"{row.planned_peak / base.planned_peak:.2f}x"])
    return format_table(["model", "step", "s/step", "vs plain", "planned peak GiB", "vs plain"], body)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS, help="timed steps per variant")
    parser.add_argument("--models", nargs="+", choices=[name for name, *_ in MODELS],
                        default=[name for name, *_ in MODELS])
    parser.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    rows: list[Row] = []
    with config_file(model_config("midsize")) as midsize:
        configs = {"toy": str(TOY_CONFIG), "midsize": str(midsize), "tiny": str(TINY_CONFIG)}
        for name, size, resolution, batch, sd_locked in MODELS:
            if name in args.models:
                print(f"{name}: {resolution} px, batch {batch}, {args.steps} steps per variant ...", flush=True)
                rows += measure(name, configs[size], resolution, batch, sd_locked, args.steps)
    print(f"\nconsistency reward vs plain training, fp32 on {cpu_name()}, {args.threads} threads, median step:")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
