"""The memory planner: the peak GPU memory of one training step of this project, estimated without a GPU.

    python -m bench.memory [--config models/cldm_v15.yaml] [--batch-size 4] [--resolution 512]
                           [--precision bf16-mixed] [--optimizer adamw-fused] [--no-gradient-checkpointing] ...
    python -m bench.memory --table          # the README table: ours vs diffusers' settings, SD 1.5
    python -m bench.memory --validate       # estimate vs the same step on real CPU tensors, small models
    python -m bench.memory --check-device cuda   # estimate vs the CUDA allocator's peak (bench/gpu_check.sh)

It runs the real step of `trainer.module.ControlNetTrainer` (the same module, config, precision, half-locked
parts, gradient checkpointing, attention kernel and optimizer that training.py builds): the model is built,
the batch made, `batch_loss` run under the precision's autocast, backward, the optimizer step and
`zero_grad(set_to_none=True)` (Lightning's), twice (the first step creates the optimizer state). Everything
runs under `FakeTensorMode`, so a full-size SD 1.5 costs no real memory: tensors carry shapes and dtypes
only. A `TorchDispatchMode` (`StorageTracker`) sees every tensor that every operator creates, forward and
backward, and counts each storage while it lives (a weakref finalizer drops it); the peak of that count is
the estimate, each allocation rounded up to 512 bytes as PyTorch's CUDA caching allocator does.

What differs from a GPU, and why the figure is still that of one:
- Attention: SDPA dispatches on the CPU to its fused flash kernel (`_scaled_dot_product_flash_attention_for_cpu`),
  which, as CUDA's flash and memory-efficient kernels, keeps the output and the log-sum-exp (B, heads, L) for
  backward, never the (L x L) score matrix; the math and sliced kernels create their scores as on a GPU.
- Mixed precision runs under the CPU's autocast (the same casts for convolutions, matmuls and linear layers
  as CUDA's autocast lists). fp16's loss scaler (a few scalars) is left out.
- Not counted: the CUDA context and cuDNN/cuBLAS workspaces (about 0.3-1 GiB, outside PyTorch's allocator:
  `--batch-size auto` keeps `AUTO_BATCH_MARGIN` free for them) and allocator fragmentation (the caching
  allocator's reserved memory is often 5-15% above the allocated peak that this estimates).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import sys
import time
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from bench.configs import SD15_CONFIG, TINY_CONFIG, config_file, model_config
from trainer.module import (
    DEFAULT_OPTIMIZER,
    HALF_LOCKED_DTYPES,
    OPTIMIZERS,
    ControlNetTrainer,
    training_model_config,
)

GIB = 2**30
# PyTorch's CUDA caching allocator hands out multiples of 512 bytes.
CUDA_ALLOCATION_BLOCK = 512
# Room that --batch-size auto leaves beside the estimated peak: the CUDA context, cuDNN/cuBLAS workspaces and
# allocator fragmentation, none of which the estimate counts.
AUTO_BATCH_MARGIN = 0.15
AUTO_BATCH_MIN_MARGIN_BYTES = 1 * GIB
AUTO_BATCH_LIMIT = 256
PRECISIONS = ("32", "16-mixed", "bf16-mixed")
AUTOCAST_DTYPES = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}
# The step runs twice: the first creates the optimizer state, the second is the steady state.
STEPS = 2
TABLE_BATCHES = (1, 4, 8, 16)
TABLE_RESOLUTIONS = (256, 512)
TABLE_BUDGETS_GIB = (12, 16, 24, 40)
# Steps whose estimate --validate checks against real CPU tensors: (model size, resolution, batch, options).
VALIDATION_STEPS = (("tiny", 64, 4, {"precision": "32"}), ("tiny", 128, 2, {"precision": "bf16-mixed"}),
                    ("tiny", 128, 2, {"precision": "32", "gradient_checkpointing": False, "attention": "math"}),
                    ("midsize", 128, 2, {"precision": "32", "gradient_checkpointing": False}),
                    ("midsize", 256, 1, {"precision": "bf16-mixed", "optimizer": "adamw"}))


@dataclasses.dataclass(frozen=True)
class TrainingStep:
    """What decides a training step's memory: the training.py options of the same names."""

    config: str = str(SD15_CONFIG)
    batch_size: int = 4
    resolution: int = 512
    precision: str = "bf16-mixed"
    half_locked: bool = True
    gradient_checkpointing: bool | None = None  # None: the config's (True in cldm_v15.yaml)
    attention: str | None = None  # None: the config's, else sdpa
    optimizer: str = DEFAULT_OPTIMIZER
    sd_locked: bool = True
    only_mid_control: bool = False
    cache_latents: bool = False
    # ControlNet++'s consistency reward (training.py --consistency-weight): planned for the worst step, every
    # sample of the batch at a rewarded timestep (decoded with gradients, Canny magnitudes).
    consistency_weight: float = 0.0
    # Lightning frees the gradients after each optimizer step; diffusers' script zeroes them in place unless
    # given --set_grads_to_none, so they also occupy memory during the next forward and backward.
    grads_to_none: bool = True

    def describe(self, size: bool = True) -> str:
        """The options in words; size: begin with the batch and the resolution."""
        checkpointing = {None: "config's", True: "on", False: "off"}[self.gradient_checkpointing]
        return ((f"batch {self.batch_size}, {self.resolution} px, " if size else "") + f"precision {self.precision}"
                f"{', half-locked' if self.half_locked and self.precision != '32' else ''}, gradient checkpointing "
                f"{checkpointing}, attention {self.attention or 'config'}, {self.optimizer}"
                f"{'' if self.sd_locked else ', decoder unlocked'}{', latent cache' if self.cache_latents else ''}"
                f"{', consistency reward' if self.consistency_weight else ''}"
                f"{'' if self.grads_to_none else ', gradients zeroed, not freed'}")


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes: the model's weights (all of the ControlLDM on the GPU), the trained weights' gradients and
    optimizer state, and the peak of the whole step."""

    step: TrainingStep
    weights: int
    gradients: int
    optimizer_state: int
    peak: int
    fake: bool = True

    def lines(self) -> list[str]:
        what = "estimated peak GPU memory" if self.fake else "peak memory, real CPU tensors"
        return [f"training step: {self.step.describe()}",
                f"  weights {self.weights / GIB:.2f} GiB, gradients {self.gradients / GIB:.2f} GiB, optimizer state "
                f"{self.optimizer_state / GIB:.2f} GiB",
                f"  {what}: {self.peak / GIB:.2f} GiB (allocated by PyTorch; plus the CUDA context and "
                f"fragmentation)"]


def _block(nbytes: int) -> int:
    return -(-nbytes // CUDA_ALLOCATION_BLOCK) * CUDA_ALLOCATION_BLOCK


class StorageTracker(TorchDispatchMode):
    """Counts the bytes of every live tensor storage created while active (views and in-place results share
    their storage and count once). `now` and `peak` are bytes; `reset_peak()` starts a new peak at `now`.

    With `fake_scalars`, reading a fake tensor's value (`.item()`, `.tolist()`, `bool(t)`) gives True for a
    bool and 1 otherwise: under FakeTensorMode there is no value; the step's such reads (prompt dropout,
    AdamW's step count, the timesteps that get the consistency reward, Kornia's argument checks) change no
    tensor's size, except that every timestep reads as 1, so the reward is planned for the whole batch."""

    def __init__(self, fake_scalars: bool = False):
        super().__init__()
        self.fake_scalars = fake_scalars
        self.live: dict[int, int] = {}
        self.now = 0
        self.peak = 0

    def reset_peak(self) -> None:
        self.peak = self.now

    def _count(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self.live:
            return
        nbytes = _block(storage.nbytes())
        self.live[key] = nbytes
        self.now += nbytes
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.fake_scalars and func is torch.ops.aten._local_scalar_dense.default:
            dtype = args[0].dtype
            return True if dtype == torch.bool else 1.0 if dtype.is_floating_point else 1
        result = func(*args, **(kwargs or {}))
        for item in tree_flatten(result)[0]:
            if isinstance(item, torch.Tensor):
                self._count(item)
        return result


def _storage_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(_block(t.untyped_storage().nbytes()) for t in {id(t.untyped_storage()): t for t in tensors}.values())


def build_module(step: TrainingStep) -> ControlNetTrainer:
    """The ControlNetTrainer that training.py builds for these options (random weights; on the meta device
    when built inside `torch.device("meta")`)."""
    if step.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {step.precision!r}")
    model_config = training_model_config(step.config, step.attention, step.gradient_checkpointing,
                                         step.only_mid_control)
    locked_dtype = HALF_LOCKED_DTYPES.get(step.precision) if step.half_locked else None
    return ControlNetTrainer(model_config, sd_locked=step.sd_locked, locked_dtype=locked_dtype,
                             optimizer=step.optimizer, consistency_weight=step.consistency_weight)


def make_batch(module: ControlNetTrainer, step: TrainingStep) -> dict[str, Any]:
    """A batch as the DataLoader hands it to the step (see trainer/module.py): images, or cached latents."""
    b, size = step.batch_size, step.resolution
    batch: dict[str, Any] = {"txt": [f"a prompt {i}" for i in range(b)], "hint": torch.rand(b, size, size, 3)}
    if not step.cache_latents:
        batch["jpg"] = torch.rand(b, size, size, 3) * 2 - 1
        return batch
    with torch.no_grad():
        latent_channels = module.model.first_stage_model.embed_dim
        batch["posterior"] = torch.randn(b, 2 * latent_channels, size // 8, size // 8)
        context = module.model.get_learned_conditioning([""])
        batch["context"] = context.float().expand(b, -1, -1).clone()
        batch["empty_context"] = batch["context"].clone()
    return batch


def _fake_module(step: TrainingStep, mode: FakeTensorMode) -> ControlNetTrainer:
    """The module built on the meta device (no memory; its constructor's casts of the locked parts run as
    they do on real tensors), its parameters and buffers then made fake CPU tensors of `mode`."""
    with torch.device("meta"):
        module = build_module(step)
    converter = mode.fake_tensor_converter
    cpu = torch.device("cpu")
    for part in module.modules():
        for name, parameter in part._parameters.items():
            if parameter is not None:
                fake = converter.from_meta_and_device(mode, parameter.detach(), cpu)
                part._parameters[name] = torch.nn.Parameter(fake, requires_grad=parameter.requires_grad)
        for name, buffer in part._buffers.items():
            if buffer is not None:
                part._buffers[name] = converter.from_meta_and_device(mode, buffer, cpu)
    module._device = cpu  # what LightningModule.to() records as `device`; the step makes its tensors there
    return module


def run_step(step: TrainingStep, fake: bool = True) -> MemoryPlan:
    """Build the module and run `STEPS` training steps, counting storages (see the module doc). fake: under
    FakeTensorMode (no real memory, any size); False: real CPU tensors (to validate the fake run)."""
    autocast_dtype = AUTOCAST_DTYPES.get(step.precision)
    mode = FakeTensorMode() if fake else None
    module = _fake_module(step, mode) if fake else build_module(step)
    # The module as Lightning moves it to the GPU (the half-locked parts already cast), there all along.
    weights = _storage_bytes([*module.parameters(), *module.buffers()])
    tracker = StorageTracker(fake_scalars=fake)
    tracker.now = tracker.peak = weights
    with mode or contextlib.nullcontext(), tracker:
        optimizer = module.configure_optimizers()
        for group in optimizer.param_groups:
            if group.get("foreach") is None and not group.get("fused"):
                group["foreach"] = True  # PyTorch's default on CUDA (one kernel per op over all tensors)
        trained = list(module.trainable_parameters())
        gradients = optimizer_state = 0
        for index in range(STEPS):
            batch = make_batch(module, step)
            autocast = (torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype is not None
                        else contextlib.nullcontext())
            with autocast:
                loss, logs = module.batch_loss(batch, index)
            loss.backward()
            gradients = _storage_bytes([p.grad for p in trained if p.grad is not None])
            optimizer.step()
            optimizer.zero_grad(set_to_none=step.grads_to_none)
            del batch, loss, logs
        optimizer_state = _storage_bytes([value for state in optimizer.state.values()
                                          for value in _state_tensors(state)])
        peak = tracker.peak
        del module, optimizer, trained
    return MemoryPlan(step, weights, gradients, optimizer_state, peak, fake)


def measure_cuda(step: TrainingStep, device: str = "cuda") -> int:
    """The CUDA caching allocator's peak allocated bytes over the same `STEPS` steps as `run_step`, the
    module built on the CPU and moved, as Lightning does (what `estimate` is checked against on a GPU)."""
    autocast_dtype = AUTOCAST_DTYPES.get(step.precision)
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    module = build_module(step).to(device)
    optimizer = module.configure_optimizers()
    for index in range(STEPS):
        with torch.device(device):
            batch = make_batch(module, step)
        with torch.autocast("cuda", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss, logs = module.batch_loss(batch, index)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=step.grads_to_none)
        del batch, loss, logs
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - baseline
    del module, optimizer
    torch.cuda.empty_cache()
    return peak


# --check-device: a few SD 1.5 steps, estimated and measured (bench/gpu_check.sh), within a few minutes.
CHECK_STEPS = (TrainingStep(batch_size=8, resolution=256), TrainingStep(), TrainingStep(optimizer="adamw8bit"),
               TrainingStep(batch_size=1, precision="32", half_locked=False, gradient_checkpointing=False,
                            attention="sdpa", optimizer="adamw"))


def check_device(device: str, config: str | None = None, resolution: int | None = None) -> int:
    """Print the estimate of each of CHECK_STEPS beside the measured peak on `device` ("cuda": the allocator's
    figure; "cpu": a dry run, real CPU tensors counted by StorageTracker). `config` and `resolution` replace
    the steps' (a small model for the dry run). Returns the exit status (1 when a measurement fails)."""
    status = 0
    for step in CHECK_STEPS:
        step = dataclasses.replace(step, **{key: value for key, value in (("config", config),
                                                                          ("resolution", resolution)) if value})
        try:
            planned = estimate(step).peak
            measured = measure_cuda(step, device) if device.startswith("cuda") else run_step(step, fake=False).peak
        except (RuntimeError, ImportError) as err:  # out of memory, a missing package
            print(f"{step.describe()}: failed ({str(err)[:200]})", flush=True)
            status = 1
            continue
        print(f"{step.describe()}: estimate {planned / GIB:.2f} GiB, measured {measured / GIB:.2f} GiB on {device} "
              f"({planned / measured - 1:+.1%})", flush=True)
    return status


def _state_tensors(state: Any) -> Iterator[torch.Tensor]:
    if isinstance(state, dict):
        for value in state.values():
            yield from _state_tensors(value)
    elif isinstance(state, torch.Tensor):
        yield state


@functools.lru_cache(maxsize=256)
def estimate(step: TrainingStep) -> MemoryPlan:
    """The estimated peak GPU memory of `step` (FakeTensorMode: seconds, no real memory; remembered)."""
    return run_step(step, fake=True)


def largest_batch(step: TrainingStep, budget_bytes: int, limit: int = AUTO_BATCH_LIMIT) -> tuple[int, MemoryPlan]:
    """The largest batch size (at most `limit`) whose estimated peak fits in `budget_bytes`, and its plan;
    (0, the plan at batch 1) when not even batch 1 fits. The peak grows with the batch, by nearly the same
    activations per sample once they outweigh the optimizer step: the line through batches 8 and 16 gives a
    first guess, a step or two from it settles the answer, and bisection takes over where it does not
    (each estimate is remembered)."""
    def peak(batch: int) -> int:
        return estimate(dataclasses.replace(step, batch_size=batch)).peak

    if peak(1) > budget_bytes:
        return 0, estimate(dataclasses.replace(step, batch_size=1))
    small, large = min(8, limit), min(16, limit)
    per_sample = (peak(large) - peak(small)) / (large - small) if large > small else 0
    guess = large + math.floor((budget_bytes - peak(large)) / per_sample) if per_sample > 0 else limit
    fits, too_big = 1, limit + 1  # batches known to fit / known not to (limit + 1: none above the limit)
    walked = 0
    while too_big - fits > 1:
        batch = min(max(guess, fits + 1), too_big - 1)
        if peak(batch) <= budget_bytes:
            fits, guess = batch, batch + 1
        else:
            too_big, guess = batch, batch - 1
        walked += 1
        if walked > 2:
            guess = (fits + too_big) // 2
    return fits, estimate(dataclasses.replace(step, batch_size=fits))


def gpu_memory() -> tuple[str, int, int] | None:
    """(name, free bytes, total bytes) of CUDA device 0, or None without CUDA. Free: what other processes
    (and this one's CUDA context) leave."""
    if not torch.cuda.is_available():
        return None
    properties = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info(0)
    return properties.name, int(free), int(total)


def auto_batch_budget(free_bytes: int) -> int:
    """The part of a GPU's free memory that --batch-size auto lets the estimated peak use."""
    return int(free_bytes - max(free_bytes * AUTO_BATCH_MARGIN, AUTO_BATCH_MIN_MARGIN_BYTES))


# diffusers' examples/controlnet/train_controlnet.py as its README runs it: fp32 everywhere, no gradient
# checkpointing, torch AdamW, SDPA attention (AttnProcessor2_0), gradients zeroed in place, the VAE and text
# encoder run in every step, 512 px. Its README: ~38 GB at batch 4; ~20 GB at batch 1 (with gradient
# accumulation); 16 GB at batch 1 with gradient checkpointing and 8-bit Adam. Those figures predate PyTorch 2's
# SDPA, when diffusers' attention built the full score matrix (our "math" kernel): --table shows both.
DIFFUSERS_SETTINGS = TrainingStep(precision="32", half_locked=False, gradient_checkpointing=False,
                                  attention="sdpa", optimizer="adamw", grads_to_none=False)
DIFFUSERS_PUBLISHED = (
    ("batch 4", DIFFUSERS_SETTINGS, "~38 GB"),
    ("batch 1", dataclasses.replace(DIFFUSERS_SETTINGS, batch_size=1), "~20 GB"),
    ("batch 1, gradient checkpointing, 8-bit Adam",
     dataclasses.replace(DIFFUSERS_SETTINGS, batch_size=1, gradient_checkpointing=True, optimizer="adamw8bit"),
     "16 GB GPU"),
)
# This project's defaults on a bf16 GPU (training.py: --precision auto, --half-locked, the config's gradient
# checkpointing, sdpa, adamw-fused).
OUR_SETTINGS = TrainingStep()


def print_table() -> None:
    """The README table: estimated peak at TABLE_BATCHES x TABLE_RESOLUTIONS and the largest batch under
    TABLE_BUDGETS_GIB, for our settings and diffusers'."""
    for name, settings in (("ours", OUR_SETTINGS), ("diffusers' train_controlnet", DIFFUSERS_SETTINGS)):
        print(f"\n{name}: {settings.describe(size=False)}")
        print("| resolution | " + " | ".join(f"batch {b}" for b in TABLE_BATCHES) + " | "
              + " | ".join(f"largest batch in {g} GiB" for g in TABLE_BUDGETS_GIB) + " |")
        print("|---" * (1 + len(TABLE_BATCHES) + len(TABLE_BUDGETS_GIB)) + "|")
        for resolution in TABLE_RESOLUTIONS:
            step = dataclasses.replace(settings, resolution=resolution)
            peaks = [estimate(dataclasses.replace(step, batch_size=b)).peak for b in TABLE_BATCHES]
            fits = [largest_batch(step, g * GIB)[0] for g in TABLE_BUDGETS_GIB]
            print(f"| {resolution} px | " + " | ".join(f"{p / GIB:.1f} GiB" for p in peaks) + " | "
                  + " | ".join(f"{f}+" if f == AUTO_BATCH_LIMIT else str(f) for f in fits) + " |", flush=True)
    print("\ndiffusers' train_controlnet settings against its README's figures (estimated allocated peak):")
    for label, settings, published in DIFFUSERS_PUBLISHED:
        for attention in ("sdpa", "math"):
            try:
                plan = estimate(dataclasses.replace(settings, attention=attention))
            except ImportError as err:  # adamw8bit without bitsandbytes
                print(f"- {label}, {attention} attention: {err}")
                continue
            print(f"- {label}, {attention} attention: {plan.peak / GIB:.1f} GiB ({plan.peak / 1e9:.1f} GB); "
                  f"README: {published}", flush=True)


def validate() -> list[tuple[str, TrainingStep, MemoryPlan, MemoryPlan]]:
    """(model size, step, estimate, real) for VALIDATION_STEPS: the fake run against the same step on real CPU tensors,
    counted the same way, on the tiny test model and the benchmarks' mid-size model."""
    results = []
    with config_file(model_config("midsize")) as midsize:
        for size, resolution, batch, options in VALIDATION_STEPS:
            config = str(TINY_CONFIG) if size == "tiny" else str(midsize)
            step = TrainingStep(config=config, batch_size=batch, resolution=resolution, **options)
            results.append((size, step, estimate(step), run_step(step, fake=False)))
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Estimate the peak GPU memory of a training step (no GPU needed).")
    defaults = TrainingStep()
    parser.add_argument("--config", help=f"default: {defaults.config}")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--resolution", type=int, help=f"default: {defaults.resolution}")
    parser.add_argument("--precision", choices=PRECISIONS, default=defaults.precision)
    parser.add_argument("--half-locked", action=argparse.BooleanOptionalAction, default=defaults.half_locked)
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--attention", default=None)
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer)
    parser.add_argument("--sd-locked", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--cache-latents", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--budget-gib", type=float, default=None, help="also print the largest batch under this")
    parser.add_argument("--table", action="store_true", help="print the README table (SD 1.5, ours vs diffusers)")
    parser.add_argument("--validate", action="store_true",
                        help="estimate vs the same step on real CPU tensors, tiny and mid-size models")
    parser.add_argument("--check-device", metavar="DEVICE",
                        help="estimate vs measured peak of a few SD 1.5 steps on DEVICE (cuda; cpu: a dry run, give "
                             "a small --config and --resolution)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.table:
        print_table()
        return 0
    if args.validate:
        for size, step, fake, real in validate():
            print(f"{size} model, {step.describe()}: estimate "
                  f"{fake.peak / 2**20:.1f} MiB, real {real.peak / 2**20:.1f} MiB ({fake.peak / real.peak - 1:+.1%})",
                  flush=True)
        return 0
    if args.check_device:
        return check_device(args.check_device, args.config, args.resolution)
    defaults = TrainingStep()
    step = TrainingStep(args.config or defaults.config, args.batch_size, args.resolution or defaults.resolution,
                        args.precision, args.half_locked,
                        args.gradient_checkpointing, args.attention, args.optimizer, args.sd_locked,
                        cache_latents=args.cache_latents)
    started = time.perf_counter()
    plan = estimate(step)
    print("\n".join(plan.lines()) + f"\n  ({time.perf_counter() - started:.0f} s under FakeTensorMode)")
    if args.budget_gib is not None:
        batch, _ = largest_batch(step, int(args.budget_gib * GIB))
        print(f"  largest batch under {args.budget_gib:g} GiB: {batch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
