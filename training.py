"""Train a ControlNet on a dataset folder (prompt.json + source/ + target/), as the original's
tutorial_train.py, with every option a flag.

    python tool_add_control.py v1-5-pruned.ckpt control_sd15_ini.ckpt
    python training.py --init control_sd15_ini.ckpt --data training/fill50k --output-dir runs/fill50k
    python training.py ... --resume last          # continue after Ctrl-C, SIGTERM or --max-time

OUTPUT_DIR/checkpoints  step-XXXXXXXX.ckpt (every --checkpoint-every steps, the newest --keep-checkpoints)
                        and last.ckpt (also written when the run stops); inference.py reads them alone.
OUTPUT_DIR/samples      step-XXXXXXXX.png image grids (reconstruction, control, DDIM samples) + prompts
OUTPUT_DIR/logs         csv/version_N/metrics.csv and tensorboard/version_N (one version per invocation)
OUTPUT_DIR/latent_cache with --cache-latents: the targets' VAE encodings and the prompts' text encodings
                        (trainer/latent_cache.py), reused while data and model are unchanged

Exit status: 0 when training ended (step/epoch/time limit), 1 on an error (e.g. a NaN loss; last.ckpt
then holds the last finished step), 128 + signal number after Ctrl-C (130) or SIGTERM (143) with last.ckpt saved.
2 also when OUTPUT_DIR is in use by another run (OUTPUT_DIR/run.lock), when no checkpoint to resume from is
intact (--resume last otherwise falls back to the newest intact one) or a resume changes --sd-locked.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import re
import signal
import sys
import warnings
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.accelerators import AcceleratorRegistry
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import StrategyRegistry
from omegaconf.errors import OmegaConfBaseException

from annotator.consistency import require_consistency
from annotator.controls import ControlSettingsError, parse_control_record
from cldm.inference_loading import DEFAULT_CONFIG, load_base_and_control
from cldm.model import load_config
from common.cli import DefaultsHelpFormatter, non_negative_float, non_negative_int, positive_float, positive_int
from dataset import ControlDataset, DatasetError, read_control_record
from ldm.checkpoint import CheckpointError
from ldm.lazy_checkpoint import open_lazy
from ldm.modules.attention import ATTENTION_KINDS
from ldm.util import get_obj_from_str
from trainer import checkpointing
from trainer import logger as image_logger
from trainer.checkpointing import FileCheckpointIO, ResumableCheckpoint, ignore_interrupts_in_worker
from trainer.latent_cache import LatentCacheDataModule, LatentCacheError
from trainer.logger import ImageLogger
from trainer.module import (
    DEFAULT_CONSISTENCY_MAX_T,
    DEFAULT_LEARNING_RATE,
    DEFAULT_LR_SCHEDULE,
    DEFAULT_OPTIMIZER,
    DEFAULT_PROMPT_DROPOUT,
    HALF_LOCKED_DTYPES,
    LR_SCHEDULES,
    OPTIMIZERS,
    ControlNetTrainer,
    MissingPackageError,
    NonFiniteLossError,
    check_optimizer_resume,
    import_bitsandbytes,
    load_initial_weights,
    training_model_config,
)
from trainer.resumable_data import ResumableDataModule
from trainer.run_lock import RunLock, RunLockError

# Defaults of the original (tutorial_train.py, docs/train.md) unless noted. The defaults of what the
# constructors take (learning rate, prompt dropout, sample grids, checkpoints) are the constructors' own,
# read from their modules; the ones here are the command line's alone.
# The original's tutorial uses 4 (on a 40 GB GPU). For 16 GB at 512 px, fp32, with the config's gradient
# checkpointing: ~10 GB of weights, gradients and AdamW state (1.43 B parameters, 361 M of them trained)
# leave room for the activations of about 4 (an estimate; no GPU measured it here). The Stanford Dogs recipe
# (README.md) used 11 with sliced attention; for a larger effective batch keep 4 and raise --accumulate-grad-batches.
DEFAULT_BATCH_SIZE = 4
# --batch-size auto: the largest batch that the memory planner (bench/memory.py) fits in the GPU.
AUTO_BATCH_SIZE = "auto"
DEFAULT_RESOLUTION = 512
RESOLUTION_MULTIPLE = 64
PRECISIONS = ("32", "16-mixed", "bf16-mixed")
AUTO_PRECISION = "auto"
# Native bf16 arithmetic on NVIDIA GPUs starts with compute capability 8.0 (Ampere: A100, RTX 30xx, L4, ...);
# older ones (T4, V100) have fp16 tensor cores only.
BF16_MIN_CAPABILITY = (8, 0)
LATENT_CACHE_DIR = "latent_cache"
TIME_UNITS = {"d": "days", "day": "days", "days": "days", "h": "hours", "hour": "hours", "hours": "hours",
              "m": "minutes", "min": "minutes", "minute": "minutes", "minutes": "minutes",
              "s": "seconds", "sec": "seconds", "second": "seconds", "seconds": "seconds"}
SIGNAL_EXIT_BASE = 128


def parse_duration(text: str) -> timedelta:
    """"DD:HH:MM:SS" (Lightning's max_time string) or amounts with units: "1 day", "12h", "1d 6h 30m"."""
    parts = text.strip().split(":")
    if len(parts) == 4 and all(part.strip().isdigit() for part in parts):
        days, hours, minutes, seconds = (int(part) for part in parts)
        return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    amounts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-zA-Z]+)", text)
    rest = re.sub(r"(\d+(?:\.\d+)?)\s*([a-zA-Z]+)|[\s,]|and", "", text)
    if not amounts or rest or any(unit.lower() not in TIME_UNITS for _, unit in amounts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: use DD:HH:MM:SS or e.g. '1 day', '11h 30m'")
    duration = timedelta()
    for amount, unit in amounts:
        duration += timedelta(**{TIME_UNITS[unit.lower()]: float(amount)})
    if duration <= timedelta():
        raise argparse.ArgumentTypeError(f"{text!r}: the time limit must be positive")
    return duration


def pick_precision(device_type: str, cuda_capability: tuple[int, int] | None = None) -> str:
    """--precision auto: "bf16-mixed" on a CUDA GPU of compute capability 8.0 or newer, "16-mixed" on an
    older CUDA GPU, "32" on anything else (CPU, MPS)."""
    if device_type != "cuda":
        return "32"
    if cuda_capability is None:
        raise ValueError("a CUDA device needs its compute capability to pick a precision")
    return "bf16-mixed" if tuple(cuda_capability) >= BF16_MIN_CAPABILITY else "16-mixed"


def auto_precision(accelerator: str) -> tuple[str, str]:
    """(precision, what it was picked for) for the device that `--accelerator` gives on this machine."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        capability = min(torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count()))
        return pick_precision("cuda", capability), (f"{torch.cuda.get_device_name(0)}, compute capability "
                                                    f"{capability[0]}.{capability[1]}")
    return pick_precision("cpu"), "no CUDA GPU in use"


def _limit(text: str) -> int:
    """A step or epoch count: 0 or more, or -1 for no limit (Lightning's convention)."""
    value = int(text)
    if value < -1:
        raise argparse.ArgumentTypeError(f"must be 0 or more, or -1 for no limit, got {value}")
    return value


def _devices(text: str) -> str:
    """Lightning's --devices string: 'auto', a count, -1 (all), or a comma-separated list of indices."""
    text = text.strip()
    if text in ("auto", "-1") or text.isdigit() and int(text) > 0:
        return text
    indices = [part.strip() for part in text.split(",")]
    if len(indices) > 1 and all(part.isdigit() for part in indices if part) and any(indices):
        return text
    raise argparse.ArgumentTypeError(f"want 'auto', a count (2), -1 (all) or a list of indices (0,1), got {text!r}")


def _batch_size(text: str) -> int | str:
    return AUTO_BATCH_SIZE if text.strip() == AUTO_BATCH_SIZE else positive_int(text)


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


class _FusedAdamWAlias(argparse.BooleanOptionalAction):
    """--fused-adamw / --no-fused-adamw, the flags from before --optimizer: --optimizer adamw-fused / adamw
    (the later of these flags wins)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object):
        super().__init__(option_strings, dest="optimizer", default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, "adamw" if option_string.startswith("--no-") else "adamw-fused")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a ControlNet (Lightning) on a prompt.json dataset folder.",
        formatter_class=DefaultsHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--config", default=DEFAULT_CONFIG, help="model config (cldm_v15.yaml / cldm_v21.yaml)")
    model.add_argument("--init", help="initial weights: the tool_add_control.py output or a training "
                                      "checkpoint (required unless --resume)")
    model.add_argument("--init-control", default=None,
                       help="ControlNet weights to start from instead of --init's: a diffusers ControlNet folder or "
                            "a control-only file (e.g. control_v11p_sd15_canny.pth, a tool_export.py control file), "
                            "with --init the SD checkpoint; fine-tunes a released ControlNet")
    model.add_argument("--sd-locked", action=argparse.BooleanOptionalAction, default=True,
                       help="keep the SD UNet locked; --no-sd-locked also trains its decoder (output blocks)")
    model.add_argument("--only-mid-control", action=argparse.BooleanOptionalAction, default=False,
                       help="add only the middle-block control residual")
    model.add_argument("--attention", choices=ATTENTION_KINDS, default=None,
                       help="attention kernel (default: the config's, else sdpa); sliced saves memory")
    model.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                       help="recompute activations in backward to save memory (default: the config's)")

    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, help="dataset folder with prompt.json, source/ and target/")
    data.add_argument("--control", default=None,
                      help="which of the dataset's control types to train on (prepare_dataset.py --control adds "
                           "more to a dataset; default: the one it was built with)")
    data.add_argument("--resolution", type=positive_int, default=DEFAULT_RESOLUTION,
                      help="short side scaled to this, then centre-cropped square (multiple of 64)")
    data.add_argument("--random-crop", action=argparse.BooleanOptionalAction, default=False,
                      help="crop a random window instead of the centre")
    data.add_argument("--cache-latents", action=argparse.BooleanOptionalAction, default=False,
                      help="before training, VAE-encode every target once and text-encode every distinct prompt "
                           "once, then train from that cache (same results; the photos are not read again and "
                           "neither encoder runs per step). On disk: 128 KiB per image at 512 px plus 231 KiB per "
                           "distinct prompt (SD 1.5; 308 KiB for SD 2.x). Not with --random-crop")
    data.add_argument("--cache-dir", default=None,
                      help="where --cache-latents keeps its cache (default: OUTPUT_DIR/latent_cache); rebuilt "
                           "when the data, resolution, VAE, text encoder or precision change")
    data.add_argument("--prompt-dropout", type=_probability, default=DEFAULT_PROMPT_DROPOUT,
                      help="probability of training on the empty prompt (the paper: 0.5; the original "
                           "tutorial: 0)")
    data.add_argument("--batch-size", type=_batch_size, default=DEFAULT_BATCH_SIZE,
                      help="per device; 4 as the original's tutorial, meant for a 16 GB GPU at 512 px (the Stanford "
                           "Dogs recipe used 11 with sliced attention); auto: the largest batch whose estimated "
                           "peak memory (--plan) fits in the GPU's free memory with a margin (on the CPU: 4)")
    data.add_argument("--num-workers", type=non_negative_int, default=0, help="DataLoader worker processes")

    train = parser.add_argument_group("training")
    train.add_argument("--output-dir", default="runs/controlnet", help="checkpoints/, samples/ and logs/ go here")
    train.add_argument("--lr", type=positive_float, default=DEFAULT_LEARNING_RATE, help="AdamW learning rate")
    train.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=DEFAULT_LR_SCHEDULE,
                       help="constant: --lr throughout (the original's); cosine: from --lr at the first step down to 0 "
                            "at --max-steps (needs --max-steps; a resumed run keeps its schedule and decays over "
                            "the --max-steps it is given)")
    train.add_argument("--precision", choices=(AUTO_PRECISION, *PRECISIONS), default=AUTO_PRECISION,
                       help="auto: bf16-mixed on CUDA GPUs with bf16 (compute capability 8.0+: A100, L4, RTX 30xx "
                            "and newer), 16-mixed on older ones (T4, V100), 32 (the original's) on CPU and MPS")
    train.add_argument("--half-locked", action=argparse.BooleanOptionalAction, default=True,
                       help="under bf16-mixed / 16-mixed, store the locked UNet, VAE and text encoder in that dtype "
                            "(the ControlNet keeps fp32 weights; checkpoints hold fp32); --no-half-locked keeps "
                            "them fp32")
    train.add_argument("--optimizer", choices=OPTIMIZERS, default=DEFAULT_OPTIMIZER,
                       help="AdamW of the trained weights: adamw (PyTorch's default kernel), adamw-fused (its fused "
                            "kernel on CUDA and CPU: the same update, fewer kernel launches), adamw8bit (8-bit "
                            "moments, 2 instead of 8 bytes of state per trained weight; needs the bitsandbytes "
                            "package)")
    train.add_argument("--fused-adamw", action=_FusedAdamWAlias,
                       help="the same as --optimizer adamw-fused; --no-fused-adamw: --optimizer adamw")
    train.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                       help="torch.compile the UNet and the ControlNet (the first steps take longer while it "
                            "compiles; checkpoints are the same)")
    train.add_argument("--plan", action="store_true",
                       help="print the estimated peak GPU memory of this training step (bench/memory.py: the same "
                            "model, precision, batch and options, run under FakeTensorMode, no GPU needed) and exit")
    train.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                       help="keep the model in NHWC memory format: faster convolutions on CPUs (oneDNN; "
                            "bench/train_step.py's cpu preset) and often on GPUs with mixed precision (cuDNN)")
    train.add_argument("--accumulate-grad-batches", type=positive_int, default=1,
                       help="batches per optimizer step")
    train.add_argument("--max-steps", type=_limit, default=-1, help="optimizer steps in total (-1: no limit)")
    train.add_argument("--max-epochs", type=_limit, default=None,
                       help="epochs in total (default: no limit when --max-steps is not given either)")
    train.add_argument("--max-time", type=parse_duration, default=None,
                       help="wall-clock limit of this invocation, DD:HH:MM:SS or e.g. '1 day' (the Stanford Dogs "
                            "recipe's), "
                            "'11h 30m'; ends with last.ckpt")
    train.add_argument("--seed", type=non_negative_int, default=0,
                       help="seeds data order, noise, timesteps, prompt dropout and the logged samples")
    train.add_argument("--consistency-weight", type=non_negative_float, default=0.0, metavar="W",
                       help="add ControlNet++'s cycle-consistency reward (Li et al. 2024) with weight W: at timesteps "
                            "up to --consistency-max-t, the one-step x0 prediction is decoded by the VAE (gradients "
                            "through the frozen decoder) and the control type's differentiable extractor compares it "
                            "with the condition (Canny: MSE of kornia magnitude maps); loss = diffusion + W x reward. "
                            "ControlNet++ fine-tunes a trained ControlNet this way (--init-control) with W 1 (Canny). "
                            "0: off")
    train.add_argument("--consistency-max-t", type=non_negative_int, default=DEFAULT_CONSISTENCY_MAX_T, metavar="T",
                       help="largest timestep that gets the consistency reward (ControlNet++: 200 of 1000)")
    train.add_argument("--resume", metavar="{PATH,last}", default=None,
                       help="continue a run at the same step with the same optimizer state; 'last' is "
                            "OUTPUT_DIR/checkpoints/last.ckpt")

    logging = parser.add_argument_group("logging and checkpoints")
    logging.add_argument("--logger-freq", type=positive_int, default=image_logger.DEFAULT_EVERY_N_STEPS,
                         help="steps between sample grids")
    logging.add_argument("--sample-ddim-steps", type=positive_int, default=image_logger.DEFAULT_DDIM_STEPS,
                         help=f"DDIM steps of the logged samples (guidance "
                              f"{image_logger.DEFAULT_GUIDANCE_SCALE:g} against the empty prompt)")
    logging.add_argument("--log-every-n-steps", type=positive_int, default=50, help="steps between scalar logs")
    logging.add_argument("--checkpoint-every", type=positive_int, default=checkpointing.DEFAULT_EVERY_N_STEPS,
                         help="steps between checkpoints")
    logging.add_argument("--keep-checkpoints", type=non_negative_int, default=checkpointing.DEFAULT_KEEP,
                         help="step checkpoints to keep (the newest); last.ckpt is always kept")

    hardware = parser.add_argument_group("hardware")
    hardware.add_argument("--accelerator", default="auto", help="auto, gpu, cpu, mps, ... (Lightning)")
    hardware.add_argument("--devices", type=_devices, default="auto",
                          help="auto, a count (2) or a list (0,1) (Lightning)")
    hardware.add_argument("--strategy", default="auto",
                          help="auto, ddp, deepspeed_stage_2, ... (Lightning; deepspeed needs the deepspeed "
                               "package and writes checkpoint folders)")
    return parser


def _check_folder(parser: argparse.ArgumentParser, flag: str, folder: str) -> None:
    """A folder to create or reuse: neither it nor any folder above it may be a file."""
    for path in (Path(folder), *Path(folder).parents):
        if path.exists():
            if not path.is_dir():
                where = "" if path == Path(folder) else f": {path} is a file"
                parser.error(f"{flag} {folder}{where or ' is a file'}, not a folder")
            return


def _required_parameters(cls: type) -> list[str]:
    """The arguments without defaults of `cls` and of the bases that its **kwargs pass on to."""
    required = []
    for base in cls.__mro__:
        if "__init__" not in vars(base) or base is object:
            continue
        parameters = list(inspect.signature(base.__init__).parameters.values())[1:]
        required += [p.name for p in parameters if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                                                       p.KEYWORD_ONLY)]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return required


def _check_config(parser: argparse.ArgumentParser, config: str) -> None:
    """The model config parses and gives its model class every argument it needs (before any model loads)."""
    try:
        model = load_config(config)["model"]
        target = get_obj_from_str(model["target"])
    except yaml.MarkedYAMLError as err:
        line = f" at line {err.problem_mark.line + 1}" if err.problem_mark else ""
        parser.error(f"--config {config}: not valid YAML{line} ({err.problem or err.context})")
    except (OSError, KeyError, TypeError, ImportError, AttributeError, ValueError, yaml.YAMLError,
            OmegaConfBaseException) as err:
        parser.error(f"--config {config}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
    params = model.get("params")
    missing = [name for name in _required_parameters(target) if not isinstance(params, dict) or name not in params]
    if missing:
        parser.error(f"--config {config}: model.params lacks {', '.join(missing)} (needed by {model['target']})")


def _check_hardware(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--accelerator, --devices and --strategy name something that this machine has (Lightning would
    otherwise stop with a traceback)."""
    accelerators = sorted({"auto", "gpu", *AcceleratorRegistry.available_accelerators()})
    if args.accelerator not in accelerators:
        parser.error(f"--accelerator {args.accelerator!r}: choose from {', '.join(accelerators)}")
    names = {"gpu": ("cuda", "mps"), "auto": ("cuda", "mps", "cpu")}.get(args.accelerator, (args.accelerator,))
    found = [name for name in names if AcceleratorRegistry[name]["accelerator"].is_available()]
    if not found:
        parser.error(f"--accelerator {args.accelerator}: no {' or '.join(names)} device on this machine "
                     f"(use --accelerator cpu)")
    if found[0] == "cpu" and args.devices != "auto" and not args.devices.isdigit():
        parser.error(f"--devices {args.devices}: on the CPU give a count of processes (e.g. 1)")
    if found[0] == "cuda" and args.devices.isdigit() and int(args.devices) > torch.cuda.device_count():
        parser.error(f"--devices {args.devices}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    strategies = sorted({"auto", *StrategyRegistry.available_strategies()})
    if args.strategy not in strategies:
        parser.error(f"--strategy {args.strategy!r}: choose from {', '.join(strategies)}")
    if "deepspeed" in args.strategy and importlib.util.find_spec("deepspeed") is None:
        parser.error(f"--strategy {args.strategy} needs the deepspeed package (pip install deepspeed)")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_folder(parser, "--output-dir", args.output_dir)
    if args.cache_dir is not None:
        _check_folder(parser, "--cache-dir", args.cache_dir)
    _check_config(parser, args.config)
    _check_hardware(parser, args)
    if args.resolution % RESOLUTION_MULTIPLE:
        parser.error(f"--resolution must be a multiple of {RESOLUTION_MULTIPLE} (the VAE and the UNet downsample "
                     f"by 64 in all), got {args.resolution}")
    if args.lr_schedule != DEFAULT_LR_SCHEDULE and args.max_steps <= 0 and not args.plan:
        parser.error(f"--lr-schedule {args.lr_schedule} decays over --max-steps: give --max-steps")
    if args.cache_latents and args.random_crop:
        parser.error("--cache-latents holds one (centre) crop of each target: it cannot train on --random-crop")
    if args.cache_dir is not None and not args.cache_latents:
        parser.error("--cache-dir is where --cache-latents keeps its cache: give --cache-latents too")
    if args.optimizer == "adamw8bit":
        try:
            import_bitsandbytes()
        except MissingPackageError as err:
            parser.error(str(err))
    if args.init_control is not None and args.init is None:
        parser.error("--init-control needs --init, the Stable Diffusion checkpoint the ControlNet goes with")
    if args.resume is None and args.init is None and not args.plan:
        parser.error("--init is required for a new run (the tool_add_control.py output); "
                     "or continue a run with --resume")
    return args


def resolve_resume(resume: str | None, checkpoint_dir: Path) -> Path | None:
    """The checkpoint to continue from: a path, 'last' -> checkpoint_dir/last.ckpt, or None for a new run
    (which must not mix its checkpoints with an earlier run's)."""
    if resume is None:
        if checkpoint_dir.is_dir() and any(checkpoint_dir.glob("*.ckpt")):
            raise FileExistsError(f"{checkpoint_dir} already holds checkpoints: continue that run with --resume "
                                  f"last, or choose another --output-dir")
        return None
    if resume == "last":  # the newest intact checkpoint, last.ckpt unless it is damaged
        return checkpointing.pick_resume_checkpoint(checkpoint_dir, warn=lambda line: print(line, file=sys.stderr))
    path = Path(resume)
    checkpointing.verify_resume_checkpoint(path)
    return path


def build_module(args: argparse.Namespace, load_init: bool, precision: str) -> ControlNetTrainer:
    """The training system with the --init weights (unless the resumed checkpoint will provide them), its
    locked parts in half precision when `precision` (the trainer's) is mixed and --half-locked."""
    model_config = training_model_config(args.config, args.attention, args.gradient_checkpointing,
                                         args.only_mid_control)
    module = ControlNetTrainer(
        model_config, learning_rate=args.lr, sd_locked=args.sd_locked, prompt_dropout=args.prompt_dropout,
        seed=args.seed, locked_dtype=HALF_LOCKED_DTYPES.get(precision) if args.half_locked else None,
        optimizer=args.optimizer, channels_last=args.channels_last, compile=args.compile,
        consistency_weight=args.consistency_weight, consistency_max_t=args.consistency_max_t,
        lr_schedule=args.lr_schedule, config=str(args.config),
        init=args.init,
        init_control=args.init_control, data=str(args.data), control=read_control_record(args.data, args.control),
        resolution=args.resolution,
        batch_size=args.batch_size, precision=precision, accumulate_grad_batches=args.accumulate_grad_batches,
        cache_latents=args.cache_latents)
    if load_init and args.init_control is not None:
        for line in load_base_and_control(module.model, model_config, args.init, args.init_control):
            print(line)
    elif load_init:
        report = load_initial_weights(module.model, model_config, args.init)
        print(f"{args.init}: {report}")
    return module


def build_trainer(args: argparse.Namespace, checkpoint: ResumableCheckpoint,
                  callbacks: Sequence[Callback]) -> L.Trainer:
    output_dir = Path(args.output_dir)
    samples = ImageLogger(output_dir / "samples", args.logger_freq, ddim_steps=args.sample_ddim_steps,
                          seed=args.seed)
    strategy = args.strategy
    if strategy == "ddp" and args.only_mid_control:
        # The skip-connection zero convs get no gradient then, which plain DDP treats as an error.
        strategy = "ddp_find_unused_parameters_true"
    no_epoch_limit = args.max_epochs is None and args.max_steps == -1
    return L.Trainer(
        accelerator=args.accelerator, devices=args.devices, strategy=strategy, precision=args.precision,
        max_steps=args.max_steps, max_epochs=-1 if no_epoch_limit else args.max_epochs,
        accumulate_grad_batches=args.accumulate_grad_batches, log_every_n_steps=args.log_every_n_steps,
        callbacks=[samples, TQDMProgressBar(), *callbacks, checkpoint], default_root_dir=output_dir,
        logger=[CSVLogger(output_dir / "logs", name="csv"),
                TensorBoardLogger(output_dir / "logs", name="tensorboard", default_hp_metric=False)],
        # DeepSpeed writes and reads its own checkpoint folders.
        plugins=None if "deepspeed" in strategy else [FileCheckpointIO()],
        use_distributed_sampler=False, num_sanity_val_steps=0)


def _checkpoint_note(checkpoint: ResumableCheckpoint) -> str:
    """Where a run stopped by an exception can continue from (see ResumableCheckpoint.on_exception)."""
    if checkpoint.exception_checkpoint is not None:
        return f"; saved the last finished step to {checkpoint.exception_checkpoint}: continue with --resume last"
    if checkpoint.last_path.exists():
        return f"; the last checkpoint stays: {checkpoint.last_path}"
    return ""


def _report_skipped_pairs(data: ResumableDataModule) -> None:
    if data.skipped_pairs:
        print(f"skipped {len(data.skipped_pairs)} unreadable pair(s) of the dataset (each named in a warning above)")


def main(argv: Sequence[str] | None = None, callbacks: Sequence[Callback] = ()) -> int:
    """Run training as the command line says; `callbacks` adds Lightning callbacks (notebooks, tests).

    Returns the exit status (see the module doc).
    """
    args = parse_args(argv)
    if args.plan:
        return print_plan(args)
    try:  # one run per output folder: a second one would replace the first one's checkpoints
        lock = RunLock.acquire(args.output_dir, warn=lambda line: print(line, file=sys.stderr))
    except RunLockError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        return run_training(args, callbacks)
    finally:
        lock.release()


def _planned_step(args: argparse.Namespace, batch_size: int) -> Any:
    """The memory planner's description of this run's training step (bench.memory.TrainingStep)."""
    from bench.memory import TrainingStep

    return TrainingStep(config=str(args.config), batch_size=batch_size, resolution=args.resolution,
                        precision=args.precision, half_locked=args.half_locked,
                        gradient_checkpointing=args.gradient_checkpointing, attention=args.attention,
                        optimizer=args.optimizer, sd_locked=args.sd_locked, only_mid_control=args.only_mid_control,
                        cache_latents=args.cache_latents, consistency_weight=args.consistency_weight)


def _resolve_precision(args: argparse.Namespace) -> None:
    if args.precision == AUTO_PRECISION:
        args.precision, reason = auto_precision(args.accelerator)
        print(f"--precision auto: {args.precision} ({reason})")


def _resolve_batch_size(args: argparse.Namespace) -> str | None:
    """--batch-size auto -> a number (printed with why); an error line when not even batch 1 fits."""
    if args.batch_size != AUTO_BATCH_SIZE:
        return None
    from bench.memory import GIB, auto_batch_budget, gpu_memory, largest_batch

    gpu = gpu_memory() if args.accelerator in ("auto", "gpu", "cuda") else None
    if gpu is None:
        args.batch_size = DEFAULT_BATCH_SIZE
        print(f"--batch-size auto: {DEFAULT_BATCH_SIZE} (no CUDA GPU in use: the default)")
        return None
    name, free, total = gpu
    budget = auto_batch_budget(free)
    batch, plan = largest_batch(_planned_step(args, 1), budget)
    if batch == 0:
        return (f"--batch-size auto: even batch 1 needs an estimated {plan.peak / GIB:.1f} GiB, more than the "
                f"{budget / GIB:.1f} GiB usable of the {free / GIB:.1f} GiB free on the {name}: try "
                f"--gradient-checkpointing, --attention sliced, a lower --resolution or --optimizer adamw8bit")
    args.batch_size = batch
    print(f"--batch-size auto: {batch} (estimated peak {plan.peak / GIB:.1f} GiB of the {free / GIB:.1f} GiB free "
          f"on the {name}, {total / GIB:.1f} GiB in all; the rest is left for the CUDA context and fragmentation)")
    return None


def print_plan(args: argparse.Namespace) -> int:
    """--plan: the estimated peak GPU memory of this run's step (see bench/memory.py); nothing is written."""
    from bench.memory import estimate

    _resolve_precision(args)
    error = _resolve_batch_size(args)
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(estimate(_planned_step(args, args.batch_size)).lines()))
    return 0


def run_training(args: argparse.Namespace, callbacks: Sequence[Callback] = ()) -> int:
    """main's work once the output folder is locked for this run."""
    L.seed_everything(args.seed, verbose=False)
    _resolve_precision(args)
    error = _resolve_batch_size(args)
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 2
    checkpoint = ResumableCheckpoint(Path(args.output_dir) / "checkpoints", args.checkpoint_every,
                                     args.keep_checkpoints, args.max_time)
    # Before the model: the precision Lightning really runs (16-mixed becomes bf16-mixed on CPU) decides
    # the dtype of the locked parts.
    trainer = build_trainer(args, checkpoint, callbacks)
    try:
        resume = resolve_resume(args.resume, Path(args.output_dir) / "checkpoints")
        # The dataset first: a bad prompt.json should not wait for a 1.4 B-parameter model to load.
        dataset = ControlDataset(args.data, resolution=args.resolution, random_crop=args.random_crop,
                                 seed=args.seed, control=args.control)
        control, _, _ = parse_control_record(dataset.control_record)
        control.check_model_config(load_config(args.config)["model"], str(args.config))
        if args.consistency_weight > 0:
            require_consistency(control)
        if len(dataset) < args.batch_size * trainer.world_size:
            print(f"error: --batch-size {args.batch_size}: {args.data} has {len(dataset)} pairs, fewer than one "
                  f"batch for each of {trainer.world_size} device(s)", file=sys.stderr)
            return 2
        if resume is not None and resume.is_file():
            open_lazy(resume).close()  # a refused or unreadable file: one line naming it, before the model loads
        if resume is not None:  # before the model loads, as the checks above
            check_optimizer_resume(checkpointing.saved_hyperparameters(resume), args.optimizer)
        module = build_module(args, load_init=resume is None, precision=str(trainer.precision))
        if resume is not None:
            for line in checkpointing.resume_setting_changes(checkpointing.saved_hyperparameters(resume),
                                                             module.hparams):
                print(f"resume: {line}")
    except (checkpointing.DamagedCheckpointError, checkpointing.ResumeRefusedError, ControlSettingsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (CheckpointError, DatasetError, FileExistsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    loader_options = dict(num_workers=args.num_workers, pin_memory=torch.cuda.is_available(),
                          worker_init_fn=ignore_interrupts_in_worker)
    if args.cache_latents:
        cache_dir = Path(args.cache_dir) if args.cache_dir else Path(args.output_dir) / LATENT_CACHE_DIR
        data = LatentCacheDataModule(dataset, cache_dir, args.batch_size, args.seed, resume_checkpoint=resume,
                                     **loader_options)
    else:
        data = ResumableDataModule(dataset, args.batch_size, args.seed, **loader_options)
    try:
        with warnings.catch_warnings():
            # The frozen VAE, text encoder and locked UNet are in eval mode on purpose.
            warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")
            trainer.fit(module, datamodule=data, ckpt_path=resume, weights_only=True)
    except (NonFiniteLossError, CheckpointError, LatentCacheError, DatasetError, OSError) as err:
        _report_skipped_pairs(data)
        print(f"error: {err}{_checkpoint_note(checkpoint)}", file=sys.stderr)
        return 1
    except Exception:
        # A bug: its traceback follows, after the line that says where the run can continue from.
        print(f"error: training stopped by an unexpected exception{_checkpoint_note(checkpoint)}", file=sys.stderr)
        raise
    _report_skipped_pairs(data)
    reason = checkpoint.stop_reason
    if reason is not None:
        print(f"stopped ({reason}) at step {trainer.global_step}; continue with --resume last", file=sys.stderr)
    if reason in ("SIGINT", "SIGTERM"):
        return SIGNAL_EXIT_BASE + int(getattr(signal, reason))
    return 0


if __name__ == "__main__":
    sys.exit(main())
