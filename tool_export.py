"""Export a trained ControlNet for A1111 / ComfyUI, diffusers or the original ControlNet code.

    python tool_export.py runs/x/checkpoints/last.ckpt control_x.safetensors               # A1111, ComfyUI
    python tool_export.py runs/x/checkpoints/last.ckpt controlnet-x --format diffusers     # a folder
    python tool_export.py runs/x/checkpoints/last.ckpt control_x_full.ckpt --format original

CHECKPOINT is a training checkpoint (last.ckpt, step-N.ckpt; it carries its model config) or a full
ControlLDM file such as tool_add_control.py's output (give --config unless it is SD 1.5). See
cldm/export.py for what each format holds. Exit status 2 for a bad argument or a bad input file (one line
naming it; nothing is written), 1 when writing fails (e.g. a full disk; nothing is left behind).
"""

from __future__ import annotations

import argparse
import sys

from cldm.export import DEFAULT_DTYPES, DEFAULT_FORMAT, DTYPES, FORMATS, check_output, export, open_source
from ldm.checkpoint import CheckpointError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Export a trained ControlNet to the control-only file of "
                                                 "A1111/ComfyUI, a diffusers folder or the original layout.")
    parser.add_argument("checkpoint", help="training checkpoint (.ckpt) or a full ControlLDM file")
    parser.add_argument("output", help="control: NAME.safetensors; diffusers: a new folder; original: "
                                       ".safetensors or .ckpt (a plain dict of tensors). Must not exist")
    parser.add_argument("--format", choices=FORMATS, default=DEFAULT_FORMAT,
                        help="control (default): control_model.* only, for A1111/ComfyUI; diffusers: a "
                             "ControlNetModel folder (+ unet/ if the decoder was trained); original: the "
                             "whole ControlLDM, weights only")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="dtype of the floating tensors (default: "
                             + ", ".join(f"{fmt} {dtype}" for fmt, dtype in DEFAULT_DTYPES.items()) + ")")
    parser.add_argument("--config", default=None,
                        help="model config for a file without one (default models/cldm_v15.yaml); a training "
                             "checkpoint carries its own")
    parser.add_argument("--clip-position-ids", action="store_true",
                        help="original format: add CLIP's position_ids buffer, which the original code "
                             "expects with transformers <= 4.30 (off: newer transformers reject it)")
    parser.add_argument("--progress", action="store_true", help="show a progress bar per file")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.clip_position_ids and args.format != "original":
        parser.error("--clip-position-ids applies to --format original only")
    try:
        check_output(args.output, args.format)  # before the checkpoint is read
    except (ValueError, FileExistsError) as err:
        parser.error(str(err))
    try:
        with open_source(args.checkpoint, args.config) as source:
            lines = export(source, args.output, args.format, DTYPES[args.dtype] if args.dtype else None,
                           clip_position_ids=args.clip_position_ids, progress=args.progress)
    except (FileNotFoundError, FileExistsError, CheckpointError, ValueError, KeyError) as err:
        message = str(err) if not isinstance(err, KeyError) else f"{args.checkpoint}: {err}"
        print(f"error: {message}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. the disk filled up: the partial files are already removed
        print(f"error: writing {args.output}: {err}", file=sys.stderr)
        return 1
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
