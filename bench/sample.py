"""Sampling benchmark: time per DDIM step, our DDIMSampler vs diffusers' StableDiffusionControlNetPipeline.

    python -m bench.sample --preset cpu      # mid-size model, 256 px
    python -m bench.sample --preset gpu      # SD 1.5 size, 512 px, fp16

Both sides: the same architecture with random weights (timing does not depend on the values; converting
our weights to diffusers' layout is not needed for that), classifier-free guidance with the conditional
and unconditional branches in one batch of 2B (ours: `DDIMSampler(batch_cfg=True)`), eta 0, text
embeddings given, output left in latent space (no VAE decode). A DDIM step's time is the interval
between two step callbacks; each run gives the median of its steps, the table the median over runs.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from bench.configs import LATENT_DOWNSAMPLING, MODEL_SIZES, model_config
from bench.measure import (
    GIB,
    PRECISIONS,
    autocast,
    autocast_dtype,
    device_name,
    format_table,
    median,
    peak_memory_bytes,
    positive_int,
    ratio,
    reset_peak_memory,
    run_interleaved,
    serve,
    synchronize,
)
from bench.models import Batch, build_ours, build_peer, latent_channels, make_batch, resolution_arg
from ldm.models.diffusion.ddim import DDIMSampler

GUIDANCE_SCALE = 9.0  # the original ControlNet demos' default
SIDES = ("ours", "peer")
# Steps at the start of a run left out of its median (the first calls warm caches and kernels).
SKIPPED_STEPS = 1


@dataclass
class SamplePreset:
    size: str
    device: str
    precision: str
    resolution: int
    batch: int
    ddim_steps: int
    warmup: int
    runs: int
    channels_last: bool = False


PRESETS = {
    "cpu": SamplePreset(size="midsize", device="cpu", precision="fp32", resolution=256, batch=1, ddim_steps=8,
                        warmup=1, runs=3, channels_last=True),
    # fp16 weights, as diffusers' pipelines are usually run (torch_dtype=torch.float16).
    "gpu": SamplePreset(size="sd15", device="cuda", precision="fp16", resolution=512, batch=4, ddim_steps=20,
                        warmup=1, runs=3),
}


class StepClock:
    """Collects the time between consecutive step callbacks of one sampling run."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stamps: list[float] = []

    def tick(self, *_: Any) -> None:
        synchronize(self.device)
        self.stamps.append(time.perf_counter())

    def median_step(self) -> float:
        intervals = [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)][SKIPPED_STEPS:]
        return median(intervals)


def ours_sampler(job: dict[str, Any], device: torch.device, batch: Batch, uncond_context: torch.Tensor
                 ) -> Callable[[], float]:
    """One call = one sampling run of our DDIMSampler; returns its median step time."""
    model = model_config(job["size"])
    ldm = build_ours(model, "sdpa", False, device).eval()
    dtype = autocast_dtype(job["precision"])
    if dtype is not None:
        ldm.model.to(dtype)
        ldm.control_model.to(dtype)
    if job["channels_last"]:
        ldm.to(memory_format=torch.channels_last)
    sampler = DDIMSampler(ldm, batch_cfg=True)
    cond = {"c_concat": [batch.hints], "c_crossattn": [batch.contexts]}
    uncond = {"c_concat": [batch.hints], "c_crossattn": [uncond_context]}
    shape = (latent_channels(model), job["resolution"] // LATENT_DOWNSAMPLING, job["resolution"] // LATENT_DOWNSAMPLING)

    def run() -> float:
        clock = StepClock(device)
        clock.tick()
        with autocast(device, job["precision"]):
            sampler.sample(job["ddim_steps"], batch.size, shape, cond, callback=clock.tick, eta=0.0,
                           unconditional_guidance_scale=GUIDANCE_SCALE, unconditional_conditioning=uncond,
                           verbose=False)
        return clock.median_step()

    return run


def peer_sampler(job: dict[str, Any], device: torch.device, batch: Batch, uncond_context: torch.Tensor
                 ) -> Callable[[], float]:
    """One call = one StableDiffusionControlNetPipeline run with a DDIM scheduler configured like SD's
    (leading spacing, steps_offset 1, alpha_bar[0] for the last step); returns its median step time."""
    from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline

    peer = build_peer(model_config(job["size"]), device)
    scheduler = DDIMScheduler(**peer.scheduler_config, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionControlNetPipeline(
        vae=peer.vae, text_encoder=peer.text_encoder, tokenizer=peer.tokenizer, unet=peer.unet,
        controlnet=peer.controlnet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    dtype = autocast_dtype(job["precision"]) or torch.float32
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    size = job["resolution"]

    def run() -> float:
        clock = StepClock(device)
        clock.tick()

        def on_step_end(pipeline: Any, step: int, timestep: int, tensors: dict) -> dict:
            clock.tick()
            return tensors

        pipe(prompt_embeds=batch.contexts.to(dtype), negative_prompt_embeds=uncond_context.to(dtype),
             image=batch.hints, height=size, width=size, num_inference_steps=job["ddim_steps"],
             guidance_scale=GUIDANCE_SCALE, eta=0.0, output_type="latent", callback_on_step_end=on_step_end)
        return clock.median_step()

    return run


def run_job(job: dict[str, Any]) -> None:
    """Worker: build one side, serve sampling runs to the parent, then report peak memory."""
    device = torch.device(job["device"])
    torch.manual_seed(0)
    model = model_config(job["size"])
    batch = make_batch(model, job["batch"], job["resolution"], device)
    uncond_context = torch.randn(batch.contexts.shape, generator=torch.Generator().manual_seed(1)).to(device)
    factory = ours_sampler if job["side"] == "ours" else peer_sampler
    run = factory(job, device, batch, uncond_context)
    reset_peak_memory(device)
    serve(run, device, lambda: {"peak_gib": peak_memory_bytes(device) / GIB, "device": device_name(device)})


def run_preset(preset: SamplePreset, sides: Sequence[str] = SIDES) -> dict[str, dict[str, Any]]:
    jobs = {side: {**asdict(preset), "side": side} for side in sides}
    return run_interleaved("bench.sample", jobs, preset.warmup, preset.runs)


def report(preset: SamplePreset, results: dict[str, dict[str, Any]]) -> str:
    ours, peer = results.get("ours", {}), results.get("peer", {})
    ours_s, peer_s = ours.get("median_step_s"), peer.get("median_step_s")
    memory = "CUDA peak" if torch.device(preset.device).type == "cuda" else "peak RSS"
    headers = ["res", "batch", "DDIM steps", "ours s/step", "peer s/step", "speed ratio (peer/ours time)",
               f"ours {memory} GiB", f"peer {memory} GiB", "ratio"]
    row = [preset.resolution, preset.batch, preset.ddim_steps, ours_s, peer_s, ratio(peer_s, ours_s),
           ours.get("peak_gib"), peer.get("peak_gib"), ratio(ours.get("peak_gib"), peer.get("peak_gib"))]
    device = ours.get("device") or peer.get("device") or preset.device
    lines = [f"DDIM sampling, model {preset.size}, {preset.precision}, guidance {GUIDANCE_SCALE} (batched "
             f"cond/uncond), channels-last (ours) {'on' if preset.channels_last else 'off'}; device: {device}; "
             f"median over {preset.runs} runs after {preset.warmup} warm-up",
             format_table(headers, [row])]
    lines += [f"{side}: {r['error']}" for side, r in results.items() if "error" in r]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--size", choices=MODEL_SIZES)
    parser.add_argument("--device")
    parser.add_argument("--precision", choices=sorted(PRECISIONS))
    parser.add_argument("--resolution", type=resolution_arg)
    parser.add_argument("--batch", type=positive_int)
    parser.add_argument("--ddim-steps", type=positive_int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--runs", type=positive_int)
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.ddim_steps is not None and args.ddim_steps <= SKIPPED_STEPS:
        parser.error(f"--ddim-steps must be above {SKIPPED_STEPS} (the first step is not timed)")
    if args.worker:
        run_job(json.loads(args.worker))
        return
    overrides = {name: getattr(args, name) for name in ("size", "device", "precision", "resolution", "batch",
                                                        "ddim_steps", "warmup", "runs", "channels_last")
                 if getattr(args, name) is not None}
    preset = replace(PRESETS[args.preset], **overrides)
    print(report(preset, run_preset(preset, args.sides)))


if __name__ == "__main__":
    main()
