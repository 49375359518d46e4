"""Make the initial ControlNet checkpoint from a Stable Diffusion checkpoint.

    python tool_add_control.py ./models/v1-5-pruned.ckpt ./models/control_sd15_ini.ckpt

Every `control_model.*` weight is copied from the matching `model.diffusion_model.*` weight; the hint
block, the zero convs and `middle_block_out` are new (zero convs start at zero, so the result behaves
exactly like the SD model until trained). See cldm/add_control.py for the rules and the memory design.
"""

from __future__ import annotations

import argparse
import sys

import torch

from cldm.add_control import DEFAULT_SEED, add_control
from cldm.inference_loading import DEFAULT_CONFIG
from ldm.checkpoint import CheckpointError

DTYPES = {"keep": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Add a ControlNet (a copy of the UNet encoder plus new zero-initialised layers) to a "
                    "Stable Diffusion checkpoint, giving the initial weights for training.py --init.")
    parser.add_argument("input", help="SD checkpoint: .ckpt, .pth or .safetensors")
    parser.add_argument("output", help="new checkpoint: .safetensors, or .ckpt/.pth ({'state_dict': ...}); "
                                       "must not exist")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="ControlLDM config (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help="seed of the fresh hint-block weights (default: %(default)s)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="keep",
                        help="store every tensor in this dtype; 'keep' (default) keeps the input's dtypes "
                             "(the original wrote fp32)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = add_control(args.input, args.output, args.config, seed=args.seed, dtype=DTYPES[args.dtype],
                           progress=not args.quiet)
    except (FileNotFoundError, FileExistsError, CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for line in plan.summary():
        print(line)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
