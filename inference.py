"""Generate images with a ControlNet from a photo (Canny edges) or a ready edge map, with DDIM or UniPC.

    python inference.py --ckpt models/control_sd15_canny.pth --image photo.jpg --prompt "a bird"
    python inference.py --ckpt runs/x/checkpoints/last.ckpt --hint edges.png --prompt "a bird"
    python inference.py --ckpt control_only.safetensors --sd-ckpt v1-5-pruned.ckpt --image photo.jpg
    python inference.py --ckpt controlnet-canny/ --sd-ckpt v1-5-pruned.ckpt --image photo.jpg   # diffusers
    python inference.py --ckpt last.ckpt --image photo.jpg --sampler unipc   # as ControlNet++ evaluates

Defaults are those of the original's canny app (gradio_canny2image.py). Writes each sample, the control
image and a grid (control first) as PNG under --output. The notebook calls `main([...])`, or
`load_for_inference` + `generate` directly.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from annotator.canny import DEFAULT_HIGH_THRESHOLD, DEFAULT_LOW_THRESHOLD, CannyThresholds
from annotator.controls import DEFAULT_CONTROL, parse_control_record
from annotator.image_io import UnreadableImageError, read_image_rgb
from annotator.util import SIZE_MULTIPLE
from cldm.hint import control_from_map, control_from_photo, control_from_record, hint_tensor
from cldm.inference_loading import control_record_of, load_for_inference
from cldm.sampling import SAMPLERS, control_scales, sample_images
from common.cli import available_device, non_negative_float, positive_int
from dataset import MASKED_CONTROL
from ldm.checkpoint import CheckpointError

A_PROMPT = "best quality, extremely detailed"
N_PROMPT = ("longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, cropped, "
            "worst quality, low quality")
NUM_SAMPLES = 1
# Samples per sampling call: a larger --num-samples runs in batches of this many, each saved as it is done,
# so memory stays that of one batch (the original's app samples them all at once, up to 12).
BATCH_SIZE = 4
RESOLUTION = 512
# 4x SD 1.5's training size (well past it SD repeats its subject); a mistyped 100000 would otherwise be
# found out only when the sampler runs out of memory.
MAX_RESOLUTION = 2048
STEPS = 20
STRENGTH = 1.0
SCALE = 9.0
ETA = 0.0
SAMPLER = "ddim"
RANDOM_SEED = -1
MAX_RANDOM_SEED = 65535  # the original draws random.randint(0, 65535)
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GRID_COLUMNS = 4
GRID_MAX_SAMPLES = 63  # the grid shows the control and at most this many samples (16 rows of 4)


def resolve_seed(seed: int) -> int:
    """-1 -> a random seed in [0, 65535] as the original; any other value unchanged."""
    return random.randint(0, MAX_RANDOM_SEED) if seed == RANDOM_SEED else seed


def generate(model: torch.nn.Module, control: np.ndarray, prompt: str, *, num_samples: int = NUM_SAMPLES,
             batch_size: int = BATCH_SIZE, **options) -> list[Image.Image]:
    """Sample `num_samples` images guided by a control image, as the original canny app does; the options
    and the result are those of `generate_batches`, whose batches this joins into one list."""
    return [image for batch in generate_batches(model, control, prompt, num_samples=num_samples,
                                                batch_size=batch_size, **options) for image in batch]


@torch.no_grad()
def generate_batches(model: torch.nn.Module, control: np.ndarray, prompt: str, *, a_prompt: str = A_PROMPT,
                     n_prompt: str = N_PROMPT, num_samples: int = NUM_SAMPLES, batch_size: int = BATCH_SIZE,
                     steps: int = STEPS, guess_mode: bool = False, strength: float = STRENGTH,
                     scale: float = SCALE, seed: int = RANDOM_SEED, eta: float = ETA, precision: str = "fp32",
                     progress: bool = True, sampler: str = SAMPLER) -> Iterator[list[Image.Image]]:
    """Sample `num_samples` images guided by a control image, `batch_size` per sampling call, yielding
    each batch as it is done (so memory holds one batch, whatever `num_samples` is).

    model: a ControlLDM (e.g. from `load_for_inference`), on any device. control: HWC uint8 RGB, sides
    multiples of 64 (see cldm.hint); the samples have its size. The prompt is "prompt, a_prompt"; n_prompt
    is the unconditional (negative) prompt, weighted by the guidance `scale`. guess_mode: damp the
    shallow control residuals and drop the control from the unconditional branch, so the model guesses
    the content from the control alone. seed: -1 for random. precision: "fp32", or autocast "fp16"/"bf16".
    sampler: "ddim" (the original's; eta applies) or "unipc" (ControlNet++'s evaluation sampler; eta 0).
    One generator seeded once draws every batch's noise, so the first `batch_size` samples are the same
    whatever `num_samples` is. Yields lists of RGB PIL images.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be at least 1, got {num_samples} and {batch_size}")
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(resolve_seed(seed))
    full_prompt = f"{prompt}, {a_prompt}" if a_prompt else prompt
    scales = control_scales(model.control_model.num_controls, strength, guess_mode)
    for start in range(0, num_samples, batch_size):
        count = min(batch_size, num_samples - start)
        pixels = sample_images(
            model, hint_tensor(control, count, device), [full_prompt] * count, negative_prompt=n_prompt,
            steps=steps, eta=eta, guidance_scale=scale, generator=generator, control_scales=scales,
            guess_mode=guess_mode, precision=PRECISIONS[precision], progress=progress, sampler=sampler)
        yield [Image.fromarray(p) for p in pixels]


def image_grid(images: Sequence[Image.Image], columns: int = GRID_COLUMNS) -> Image.Image:
    """Images of one size tiled row by row, `columns` per row."""
    width, height = images[0].size
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def _device(text: str) -> torch.device:
    """'auto' (cuda if available, else cpu) or a device this machine has: cpu, cuda, cuda:1, mps."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return available_device(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Generate images with a ControlNet (DDIM or UniPC sampling).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="training checkpoint, full ControlNet checkpoint "
                        "(.ckpt/.pth/.safetensors), or a ControlNet alone (with --sd-ckpt): a control-only file "
                        "(tool_export.py's, or a released one such as control_v11p_sd15_canny.pth) or a diffusers "
                        "ControlNetModel folder")
    parser.add_argument("--config", default=None, help="model config for full / control-only files and diffusers "
                        "folders (default: the one a tool_export.py control file carries, else models/cldm_v15.yaml; "
                        "training checkpoints carry their own)")
    parser.add_argument("--sd-ckpt", default=None, help="Stable Diffusion checkpoint for a --ckpt that holds only "
                        "a ControlNet")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="a photo: its Canny edges are the control")
    source.add_argument("--hint", help="a ready control image (e.g. an edge map, white edges on black)")
    parser.add_argument("--prompt", default="", help="what to draw")
    parser.add_argument("--a-prompt", default=A_PROMPT, help="added to the prompt")
    parser.add_argument("--n-prompt", default=N_PROMPT, help="negative prompt")
    parser.add_argument("--num-samples", type=positive_int, default=NUM_SAMPLES)
    parser.add_argument("--batch-size", type=positive_int, default=BATCH_SIZE,
                        help="samples per sampling call (a larger --num-samples runs in batches)")
    parser.add_argument("--resolution", type=int, default=RESOLUTION,
                        help=f"short side of the output, a multiple of {SIZE_MULTIPLE} up to {MAX_RESOLUTION}")
    parser.add_argument("--steps", type=positive_int, default=STEPS, help="sampling steps (model evaluations)")
    parser.add_argument("--sampler", choices=SAMPLERS, default=SAMPLER, help="ddim: the original ControlNet's "
                        "sampler; unipc: UniPC (bh2, order 2), the sampler ControlNet++'s evaluation uses "
                        "(diffusers' UniPCMultistepScheduler on SD 1.5's config, 20 steps)")
    parser.add_argument("--scale", type=non_negative_float, default=SCALE, help="classifier-free guidance scale")
    parser.add_argument("--strength", type=non_negative_float, default=STRENGTH, help="control strength")
    parser.add_argument("--guess-mode", action="store_true", help="let the model guess the content from the "
                        "control (use with an empty prompt)")
    parser.add_argument("--eta", type=non_negative_float, default=ETA, help="DDIM eta (0 = deterministic; "
                        "--sampler unipc takes only 0)")
    parser.add_argument("--seed", type=int, default=RANDOM_SEED, help="-1 = random")
    parser.add_argument("--low-threshold", type=int, default=None,
                        help=f"Canny, with --image (default: the training data's, else {DEFAULT_LOW_THRESHOLD})")
    parser.add_argument("--high-threshold", type=int, default=None,
                        help=f"Canny, with --image (default: the training data's, else {DEFAULT_HIGH_THRESHOLD})")
    parser.add_argument("--output", default="outputs", help="folder for the PNGs")
    parser.add_argument("--device", type=_device, default="auto",
                        help="auto (cuda if available), cpu, cuda, cuda:1, mps")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                        help="fp16/bf16: autocast (faster on a GPU)")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.sampler != "ddim" and args.eta != 0:
        parser.error(f"--eta {args.eta} is DDIM's; --sampler {args.sampler} is deterministic (leave --eta at 0)")
    if not 0 < args.resolution <= MAX_RESOLUTION or args.resolution % SIZE_MULTIPLE:
        parser.error(f"--resolution must be a multiple of {SIZE_MULTIPLE} from {SIZE_MULTIPLE} to {MAX_RESOLUTION}, "
                     f"got {args.resolution}")
    if args.image:
        try:
            CannyThresholds(_given(args.low_threshold, DEFAULT_LOW_THRESHOLD),
                            _given(args.high_threshold, DEFAULT_HIGH_THRESHOLD))
        except ValueError as err:
            parser.error(str(err))
    # Before the model loads and samples: a folder that cannot be made would lose them all.
    for path in (Path(args.output), *Path(args.output).parents):
        if path.exists():
            if not path.is_dir():
                where = " is a file" if path == Path(args.output) else f": {path} is a file"
                parser.error(f"--output {args.output}{where}, not a folder")
            break


def _given(value: int | None, default: int) -> int:
    return default if value is None else value


def control_for_photo(parser: argparse.ArgumentParser, args: argparse.Namespace, photo: np.ndarray) -> np.ndarray:
    """--image's control image, made as the checkpoint's training data were (its control record: type,
    settings, annotator model); Canny 100/200 for checkpoints from before records, or --low/--high-threshold."""
    control, settings, model = parse_control_record(control_record_of(args.ckpt))
    thresholds_given = args.low_threshold is not None or args.high_threshold is not None
    if control.name != DEFAULT_CONTROL:
        if thresholds_given:
            parser.error(f"--low-threshold/--high-threshold are Canny's; {args.ckpt} was trained on {control.name} "
                         f"control images")
        print(f"control: {control.name} ({control.description}), as the checkpoint's training data")
        return control_from_record(photo, args.resolution, control, settings, model, args.device)
    trained = CannyThresholds() if settings.random else CannyThresholds(settings.low, settings.high)
    thresholds = CannyThresholds(_given(args.low_threshold, trained.low), _given(args.high_threshold, trained.high))
    return control_from_photo(photo, args.resolution, thresholds)


def control_for_map(args: argparse.Namespace, pixels: np.ndarray) -> np.ndarray:
    """--hint's control image; for an inpaint checkpoint an RGBA file keeps its mask (transparent = to fill)."""
    record = control_record_of(args.ckpt)
    if record is not None and record.get("name") == MASKED_CONTROL:
        with Image.open(args.hint) as image:
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                return control_from_map(np.asarray(image.convert("RGBA")), args.resolution, keep_alpha=True)
    return control_from_map(pixels, args.resolution)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    try:
        source = args.image or args.hint
        pixels = read_image_rgb(source).pixels
        if args.image:
            control = control_for_photo(parser, args, pixels)
        else:
            control = control_for_map(args, pixels)
        model, lines = load_for_inference(args.ckpt, args.config, args.sd_ckpt)
    except UnreadableImageError as err:
        print(f"error: {source}: {err}", file=sys.stderr)
        return 1
    except (FileNotFoundError, CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for line in lines:
        print(line)
    model.to(args.device)
    seed = resolve_seed(args.seed)
    print(f"sampling {args.num_samples} x {control.shape[1]}x{control.shape[0]} on {args.device}, seed {seed}")
    batches = generate_batches(model, control, args.prompt, a_prompt=args.a_prompt, n_prompt=args.n_prompt,
                               num_samples=args.num_samples, batch_size=args.batch_size, steps=args.steps,
                               guess_mode=args.guess_mode, strength=args.strength, scale=args.scale, seed=seed,
                               eta=args.eta, precision=args.precision, sampler=args.sampler)
    write_outputs(Path(args.output), seed, Image.fromarray(control), batches)
    return 0


def write_outputs(output: Path, seed: int, control: Image.Image, batches: Iterator[list[Image.Image]]) -> None:
    """Save the control image, each sample as its batch is done, and a grid of the control and the first
    GRID_MAX_SAMPLES samples, as OUTPUT/seedS_{control,sampleI,grid}.png."""
    output.mkdir(parents=True, exist_ok=True)
    control.save(output / f"seed{seed}_control.png")
    shown, count = [control], 0
    for batch in batches:
        for sample in batch:
            sample.save(output / f"seed{seed}_sample{count}.png")
            count += 1
            if len(shown) <= GRID_MAX_SAMPLES:
                shown.append(sample)
    image_grid(shown).save(output / f"seed{seed}_grid.png")
    print(f"wrote {count} samples, the control image and a grid to {output}/seed{seed}_*.png")


if __name__ == "__main__":
    sys.exit(main())
