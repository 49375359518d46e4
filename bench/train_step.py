"""Training-step benchmark: our ControlNet step vs diffusers' train_controlnet.py step, side by side.

    python -m bench.train_step --preset cpu          # mid-size model, 256 px, about a minute on 2 cores
    python -m bench.train_step --preset gpu          # SD 1.5 size, 256 and 512 px, bf16, + largest batch
    python -m bench.train_step --preset gpu --cache-compare   # ours: encoders every step vs cached latents

Ours is what the trainer does per step, without Lightning: ControlLDM.p_losses forward (latents given or
VAE-encoded, text context precomputed), backward, AdamW on the ControlNet only (sd_locked); the locked
UNet/VAE/text encoder stored in the autocast dtype, the ControlNet in fp32. The peer is diffusers'
UNet2DConditionModel + ControlNetModel.from_unet trained as examples/controlnet/train_controlnet.py does.
Each side runs in its own subprocess; the table gives the median step of each and ours/peer ratios.

--cache-compare times our step twice instead: with the VAE encoder and the text encoder running every step
(what training.py does by default) and from given latents and text contexts (training.py --cache-latents).
"""

from __future__ import annotations

import argparse
import gc
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from bench.configs import MODEL_SIZES, model_config
from bench.measure import (
    GIB,
    PRECISIONS,
    autocast,
    autocast_dtype,
    bf16_peak_tflops,
    device_name,
    format_table,
    peak_memory_bytes,
    positive_int,
    ratio,
    reset_peak_memory,
    run_interleaved,
    serve,
    synchronize,
)
from bench.models import Batch, build_ours, build_peer, make_batch, resolution_arg
from ldm.modules.attention import ATTENTION_KINDS

# The original ControlNet's learning rate; diffusers' script defaults for the rest of its AdamW.
LEARNING_RATE = 1e-5
PEER_ADAM = {"betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-8}
PEER_MAX_GRAD_NORM = 1.0
# SD 1.5 ControlNet training FLOPs per sample (estimates, TFLOP): (resolution, VAE encoding).
SD15_TFLOP_PER_SAMPLE = {(256, False): 0.78, (512, False): 2.3, (512, True): 3.4}
SIDES = ("ours", "peer")
# The prompt our step encodes when it runs the text encoder (--cache-compare): CLIP's cost does not depend on
# the words, all prompts are padded to 77 tokens.
BENCH_PROMPT = "a photo of a cat sitting on a wooden table, best quality, extremely detailed"
CACHE_SIDES = ("encoders per step", "cached")


@dataclass
class TrainSide:
    """One side of the comparison: `step_for(batch)` gives a function running one optimiser step."""

    step_for: Callable[[Batch], Callable[[], None]]
    trainable: torch.nn.Module
    frozen: torch.nn.Module


@dataclass
class Setting:
    """One comparison row: both sides run it."""

    resolution: int
    batch: int
    encode_images: bool = False
    search_max_batch: bool = False
    encode_text: bool = False  # ours only: run the text encoder every step (the peer's context is always given)


@dataclass
class Preset:
    size: str
    device: str
    precision: str
    attention: str
    checkpointing: bool
    settings: list[Setting]
    warmup: int
    steps: int
    memory_limit_gib: float = 16.0
    fused_adamw: bool = True
    channels_last: bool = False


PRESETS = {
    # fp32 (CPU autocast to bf16 is optional and slow on CPUs without AMX); no checkpointing: on CPU the
    # recomputation costs time and memory is not the limit. Channels-last: oneDNN's convolutions are
    # faster in NHWC (about 1.6x for a 3x3 conv forward + backward on the 2-core Xeon here).
    "cpu": Preset(size="midsize", device="cpu", precision="fp32", attention="sdpa", checkpointing=False,
                  settings=[Setting(256, 2, encode_images=True)], warmup=2, steps=7, channels_last=True),
    # What a 16 GB GPU should fit: batch >= 16 at 256 px and >= 8 at 512 px under 16 GiB.
    "gpu": Preset(size="sd15", device="cuda", precision="bf16", attention="sdpa", checkpointing=True,
                  settings=[Setting(256, 16, search_max_batch=True), Setting(512, 8, search_max_batch=True),
                            Setting(512, 8, encode_images=True)],
                  warmup=2, steps=6),
}


# ---- the two training steps ---------------------------------------------------------------------------
def ours_train_side(job: dict[str, Any], device: torch.device) -> TrainSide:
    """Our ControlLDM for `job`, trained like the trainer does."""
    ldm = build_ours(model_config(job["size"]), job["attention"], job["checkpointing"], device)
    if job["channels_last"]:  # oneDNN / cuDNN convolutions prefer NHWC; the UNet's 1x1 convs and
        # SpatialTransformer reshapes become free views in that layout
        ldm.to(memory_format=torch.channels_last)
    ldm.train()
    ldm.model.requires_grad_(False)  # sd_locked: only the ControlNet trains
    dtype = autocast_dtype(job["precision"])
    if dtype is not None:  # locked parts stored in half precision; the ControlNet keeps fp32 master weights
        for locked in (ldm.model, ldm.first_stage_model, ldm.cond_stage_model):
            locked.to(dtype)
    optimizer = torch.optim.AdamW(ldm.control_model.parameters(), lr=LEARNING_RATE,
                                  fused=job["fused_adamw"] or None)
    scaler = torch.amp.GradScaler(device.type, enabled=job["precision"] == "fp16")

    def step_for(batch: Batch) -> Callable[[], None]:
        prompts = [BENCH_PROMPT] * batch.size

        def step() -> None:
            with autocast(device, job["precision"]):
                if job["encode_images"]:
                    z0 = ldm.get_first_stage_encoding(ldm.encode_first_stage(batch.images))
                else:
                    z0 = batch.latents
                # Jobs written before encode_text existed give the context.
                contexts = ldm.get_learned_conditioning(prompts) if job.get("encode_text") else batch.contexts
                cond = {"c_crossattn": [contexts], "c_concat": [batch.hints]}
                t = torch.randint(0, ldm.num_timesteps, (batch.size,), device=device)
                loss, _ = ldm.p_losses(z0, cond, t)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

        return step

    return TrainSide(step_for, ldm.control_model, ldm.model)


def peer_train_side(job: dict[str, Any], device: torch.device) -> TrainSide:
    """diffusers' train_controlnet.py step: frozen UNet/VAE/text encoder cast to the weight dtype, the
    ControlNet in fp32 under autocast (accelerate wraps its forward and returns fp32 outputs), MSE loss,
    gradient clipping, AdamW, zero_grad without set_to_none (the script's default)."""
    from diffusers import DDPMScheduler

    peer = build_peer(model_config(job["size"]), device)
    weight_dtype = autocast_dtype(job["precision"]) or torch.float32
    for frozen in (peer.unet, peer.vae, peer.text_encoder):
        frozen.requires_grad_(False)
        frozen.to(dtype=weight_dtype)
    controlnet, unet, vae = peer.controlnet, peer.unet, peer.vae
    controlnet.train()
    if job["checkpointing"]:
        controlnet.enable_gradient_checkpointing()  # the script checkpoints the ControlNet only
    noise_scheduler = DDPMScheduler(**peer.scheduler_config)
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=LEARNING_RATE, **PEER_ADAM)
    scaler = torch.amp.GradScaler(device.type, enabled=job["precision"] == "fp16")
    mixed = weight_dtype != torch.float32

    def step_for(batch: Batch) -> Callable[[], None]:
        def step() -> None:
            if job["encode_images"]:
                latents = vae.encode(batch.images.to(weight_dtype)).latent_dist.sample() * vae.config.scaling_factor
            else:
                latents = batch.latents.to(weight_dtype)
            noise = torch.randn_like(latents)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch.size,), device=device)
            noisy = noise_scheduler.add_noise(latents, noise, t)
            context = batch.contexts.to(weight_dtype)
            with autocast(device, job["precision"]):
                down, mid = controlnet(noisy, t, encoder_hidden_states=context,
                                       controlnet_cond=batch.hints.to(weight_dtype), return_dict=False)
            if mixed:
                down, mid = [d.float() for d in down], mid.float()
            pred = unet(noisy, t, encoder_hidden_states=context,
                        down_block_additional_residuals=[d.to(weight_dtype) for d in down],
                        mid_block_additional_residual=mid.to(weight_dtype)).sample
            loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(controlnet.parameters(), PEER_MAX_GRAD_NORM)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=False)

        return step

    return TrainSide(step_for, controlnet, unet)


# ---- worker: one side, one setting ----------------------------------------------------------------------
def largest_batch(fits: Callable[[int], bool], guess: int, limit: int = 1024) -> int:
    """The largest batch b >= 1 with fits(b) (assumed monotone), probing outward from `guess` and then
    bisecting; 0 when even 1 does not fit."""
    guess = min(max(guess, 1), limit)
    if fits(guess):
        low, high, probe = guess, None, 1
        while high is None:
            b = low + probe
            if b > limit:
                return low
            if fits(b):
                low, probe = b, probe * 2
            else:
                high = b
    else:
        high, low, probe = guess, None, 1
        while low is None:
            b = high - probe
            if b < 1:
                low = 0
            elif fits(b):
                low = b
            else:
                high, probe = b, probe * 2
    while high - low > 1:
        mid = (low + high) // 2
        if fits(mid):
            low = mid
        else:
            high = mid
    return low


def _batch_peak(side: TrainSide, job: dict[str, Any], device: torch.device, batch_size: int) -> int | None:
    """CUDA peak of two steps at batch_size, None when out of memory."""
    gc.collect()
    torch.cuda.empty_cache()
    reset_peak_memory(device)
    out_of_memory = False
    try:
        batch = make_batch(model_config(job["size"]), batch_size, job["resolution"], device)
        step = side.step_for(batch)
        step()
        step()
        synchronize(device)
    except torch.OutOfMemoryError:
        out_of_memory = True
    batch = step = None
    if out_of_memory:  # a backward cut short leaves partial gradients behind
        side.trainable.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.empty_cache()
    return None if out_of_memory else peak_memory_bytes(device)


def run_job(job: dict[str, Any]) -> None:
    """Worker: build one side of one setting, serve its steps to the parent, then report peak memory
    and (optionally) the largest batch under the memory limit."""
    device = torch.device(job["device"])
    torch.manual_seed(0)
    factory = ours_train_side if job["side"] == "ours" else peer_train_side
    side = factory(job, device)
    batch = make_batch(model_config(job["size"]), job["batch"], job["resolution"], device)
    reset_peak_memory(device)

    def finish() -> dict[str, Any]:
        result = {"peak_gib": peak_memory_bytes(device) / GIB, "device": device_name(device)}
        if job["search_max_batch"] and device.type == "cuda":
            result["max_batch"] = search_max_batch(side, job, device)
        return result

    serve(side.step_for(batch), device, finish)


def search_max_batch(side: TrainSide, job: dict[str, Any], device: torch.device) -> int:
    """The largest batch whose CUDA peak stays under job["memory_limit_gib"]: a linear fit of the peaks
    at batch 1 and 2 gives the first guess, `largest_batch` the rest."""
    limit = job["memory_limit_gib"] * GIB

    def fits(batch_size: int) -> bool:
        peak = _batch_peak(side, job, device, batch_size)
        return peak is not None and peak <= limit

    peaks = {b: _batch_peak(side, job, device, b) for b in (1, 2)}
    if peaks[1] is None or peaks[1] > limit:
        return 0
    if peaks[2] is None or peaks[2] > limit:
        return 1
    guess = 1 + math.floor((limit - peaks[1]) / max(peaks[2] - peaks[1], 1))
    return largest_batch(fits, guess)


# ---- parent: run both sides, print the table -------------------------------------------------------------
@dataclass
class Row:
    setting: Setting
    results: dict[str, dict[str, Any]] = field(default_factory=dict)


def tflop_per_sample(size: str, setting: Setting) -> float | None:
    if size != "sd15":
        return None
    return SD15_TFLOP_PER_SAMPLE.get((setting.resolution, setting.encode_images))


def _measure(preset: Preset, setting: Setting, variants: dict[str, tuple[Setting, str]]) -> Row:
    """One row: each named variant (its setting, and the side that runs it) in its own subprocess, the
    steps of all of them interleaved."""
    jobs = {}
    for name, (variant, side) in variants.items():
        jobs[name] = {**asdict(preset), **asdict(variant), "side": side}
        jobs[name].pop("settings")
    results = run_interleaved("bench.train_step", jobs, preset.warmup, preset.steps)
    for result in results.values():
        if "median_step_s" in result:
            result["samples_per_s"] = setting.batch / result["median_step_s"]
    return Row(setting, results)


def run_preset(preset: Preset, sides: Sequence[str] = SIDES) -> list[Row]:
    """Both sides of every setting, each in its own subprocess, their steps interleaved."""
    return [_measure(preset, setting, {side: (setting, side) for side in sides}) for setting in preset.settings]


def run_cache_comparison(preset: Preset) -> list[Row]:
    """Our step with the VAE encoder and text encoder every step against our step from cached latents and
    text contexts, for every setting (its encode_images is ignored), in two interleaved workers."""
    rows = []
    for setting in preset.settings:
        encoding = replace(setting, encode_images=True, encode_text=True, search_max_batch=False)
        cached = replace(setting, encode_images=False, encode_text=False, search_max_batch=False)
        rows.append(_measure(preset, setting, {CACHE_SIDES[0]: (encoding, "ours"), CACHE_SIDES[1]: (cached, "ours")}))
    return rows


def cache_report(preset: Preset, rows: Sequence[Row]) -> str:
    """The table of `run_cache_comparison`: samples/s and peak memory of both steps, and the speed-up."""
    memory = "CUDA peak" if torch.device(preset.device).type == "cuda" else "peak RSS"
    encoders, cached = CACHE_SIDES
    headers = ["res", "batch", f"{encoders} samples/s", f"{cached} samples/s", "speed-up",
               f"{encoders} {memory} GiB", f"{cached} {memory} GiB"]
    table, errors = [], []
    for row in rows:
        slow, fast = row.results.get(encoders, {}), row.results.get(cached, {})
        errors += [f"{name} {row.setting}: {r['error']}" for name, r in row.results.items() if "error" in r]
        table.append([row.setting.resolution, row.setting.batch, slow.get("samples_per_s"), fast.get("samples_per_s"),
                      ratio(fast.get("samples_per_s"), slow.get("samples_per_s")), slow.get("peak_gib"),
                      fast.get("peak_gib")])
    device = next((r["device"] for row in rows for r in row.results.values() if "device" in r), preset.device)
    header = (f"our train step: VAE encoder + text encoder every step vs cached latents and text contexts; preset "
              f"model {preset.size}, {preset.precision}, attention {preset.attention}, checkpointing "
              f"{'on' if preset.checkpointing else 'off'}; device: {device}; median of {preset.steps} interleaved "
              f"steps after {preset.warmup} warm-up")
    return "\n".join([header, format_table(headers, table), *errors])


def report(preset: Preset, rows: Sequence[Row], peak_tflops: float | None) -> str:
    """The comparison table (and, for SD 1.5, achieved TFLOP/s and the fraction of the bf16 peak)."""
    memory = "CUDA peak" if torch.device(preset.device).type == "cuda" else "peak RSS"
    headers = ["res", "batch", "VAE", "ours samples/s", "peer samples/s", "ratio", f"ours {memory} GiB",
               f"peer {memory} GiB", "ratio"]
    with_flops = preset.size == "sd15"
    if with_flops:
        headers += ["ours TFLOP/s", "peer TFLOP/s", "ours % peak", "peer % peak"]
    if any(r.setting.search_max_batch for r in rows):
        headers += [f"ours max batch <={preset.memory_limit_gib:g} GiB", "peer max batch"]
    table, errors = [], []
    for row in rows:
        ours, peer = row.results.get("ours", {}), row.results.get("peer", {})
        for side, result in row.results.items():
            if "error" in result:
                errors.append(f"{side} {row.setting}: {result['error']}")
        s = row.setting
        line = [s.resolution, s.batch, "yes" if s.encode_images else "no",
                ours.get("samples_per_s"), peer.get("samples_per_s"),
                ratio(ours.get("samples_per_s"), peer.get("samples_per_s")),
                ours.get("peak_gib"), peer.get("peak_gib"), ratio(ours.get("peak_gib"), peer.get("peak_gib"))]
        if with_flops:
            flop = tflop_per_sample(preset.size, s)
            achieved = [None if flop is None or r.get("samples_per_s") is None else flop * r["samples_per_s"]
                        for r in (ours, peer)]
            line += achieved + [None if a is None or not peak_tflops else 100 * a / peak_tflops for a in achieved]
        if any(r.setting.search_max_batch for r in rows):
            line += [ours.get("max_batch"), peer.get("max_batch")] if s.search_max_batch else [None, None]
        table.append(line)
    device = next((r["device"] for row in rows for r in row.results.values() if "device" in r), preset.device)
    header = (f"train step, preset model {preset.size}, {preset.precision}, attention {preset.attention}, "
              f"checkpointing {'on' if preset.checkpointing else 'off'}; ours: fused AdamW "
              f"{'on' if preset.fused_adamw else 'off'}, channels-last {'on' if preset.channels_last else 'off'}; "
              f"device: {device}; median of {preset.steps} interleaved steps after {preset.warmup} warm-up")
    if with_flops:
        header += f"; bf16 peak {peak_tflops or 'unknown'} TFLOP/s"
    return "\n".join([header, format_table(headers, table), *errors])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--size", choices=MODEL_SIZES, help="model size (default: the preset's)")
    parser.add_argument("--device", help="cpu / cuda (default: the preset's)")
    parser.add_argument("--resolution", type=resolution_arg, nargs="+",
                        help="image sizes in px (replace the preset's rows)")
    parser.add_argument("--batch", type=positive_int, help="batch size of every row")
    parser.add_argument("--encode-images", action=argparse.BooleanOptionalAction, default=None,
                        help="VAE-encode the targets every step (else latents are given)")
    parser.add_argument("--precision", choices=sorted(PRECISIONS))
    parser.add_argument("--attention", choices=ATTENTION_KINDS, help="our attention kernel (the peer uses SDPA)")
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--fused-adamw", action=argparse.BooleanOptionalAction, default=None,
                        help="fused AdamW for ours (the peer keeps the script's plain AdamW)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="ours in channels-last memory format (the peer stays NCHW, as the script)")
    parser.add_argument("--max-batch", action=argparse.BooleanOptionalAction, default=None,
                        help="also search the largest batch under --memory-limit-gib (CUDA only)")
    parser.add_argument("--memory-limit-gib", type=float)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--steps", type=positive_int)
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--cache-compare", action="store_true",
                        help="time our step with the VAE and text encoders every step against our step from "
                             "cached latents and text contexts (training.py --cache-latents), instead of ours vs peer")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's bf16 peak (default: looked up by name)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def preset_from_args(args: argparse.Namespace) -> Preset:
    """The chosen preset with the command line's overrides applied."""
    preset = PRESETS[args.preset]
    overrides = {name: getattr(args, name) for name in ("size", "device", "precision", "attention", "checkpointing",
                                                        "fused_adamw", "channels_last", "memory_limit_gib", "warmup",
                                                        "steps")
                 if getattr(args, name) is not None}
    preset = replace(preset, **overrides)
    settings = preset.settings
    if args.resolution:
        template = settings[0]
        settings = [replace(template, resolution=r) for r in args.resolution]
    setting_overrides = {name: value for name, value in (("batch", args.batch), ("encode_images", args.encode_images),
                                                         ("search_max_batch", args.max_batch)) if value is not None}
    return replace(preset, settings=[replace(s, **setting_overrides) for s in settings])


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.worker:
        import json

        run_job(json.loads(args.worker))
        return
    preset = preset_from_args(args)
    if args.cache_compare:
        print(cache_report(preset, run_cache_comparison(preset)))
        return
    rows = run_preset(preset, args.sides)
    peak = args.peak_tflops or bf16_peak_tflops(torch.device(preset.device))
    print(report(preset, rows, peak))


if __name__ == "__main__":
    main()
