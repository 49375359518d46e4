"""Peak memory of tool_add_control.py on a full-size SD 1.5 checkpoint, against the original approach.

    .venv/bin/python -m bench.tool_add_control_memory [--workdir DIR] [--formats safetensors ckpt]

Writes a random fp32 SD 1.5 checkpoint in the real layout (keys and shapes from
tests/data/reference/sd15_state_dict.json, plus CLIP's legacy position_ids like the released files),
then runs, each in its own process under `/usr/bin/time -v` (or, without it, a wrapper process that
reads `getrusage(RUSAGE_CHILDREN).ru_maxrss`):
- ours: `tool_add_control.py INPUT OUTPUT` for each input and output format;
- original: what the original tool did (build the full fp32 ControlLDM, `torch.load` the whole input,
  clone every entry into a target dict, `load_state_dict`, `torch.save`), on the .ckpt input.
Prints peak RSS and wall time of each. The files (about 4.3 GB per input, 5.7 GB per output) are
deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

from ldm.lazy_checkpoint import TensorSpec, write_safetensors

REPO = Path(__file__).resolve().parent.parent
SD15_MANIFEST = REPO / "tests" / "data" / "reference" / "sd15_state_dict.json"
CONFIG = REPO / "models" / "cldm_v15.yaml"
GIB = 2**30
KIB = 1024
LIMIT_GIB = 8.0  # room to spare on free Colab's 12 GB of RAM
POSITION_IDS_KEY = "cond_stage_model.transformer.text_model.embeddings.position_ids"
CONTEXT_LENGTH = 77
WEIGHT_STD = 0.02
TIME_BINARY = Path("/usr/bin/time")
# Reads the peak RSS of its child command (ru_maxrss is in KiB on Linux) when /usr/bin/time is missing.
RUSAGE_WRAPPER = ("import json, resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
                  "print(json.dumps({'maxrss_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
                  "'rc': rc}), file=sys.stderr); sys.exit(rc)")


def sd15_specs() -> dict[str, TensorSpec]:
    """{key: TensorSpec} of an fp32 SD 1.5 checkpoint as released (with CLIP's legacy position_ids)."""
    specs = {k: TensorSpec(tuple(s), torch.float32) for k, s, _ in json.loads(SD15_MANIFEST.read_text())}
    specs[POSITION_IDS_KEY] = TensorSpec((1, CONTEXT_LENGTH), torch.int64)
    return specs


def random_tensor(key: str, spec: TensorSpec) -> torch.Tensor:
    """Random weights for `key`, the same in every format (seeded by the key)."""
    if key == POSITION_IDS_KEY:
        return torch.arange(CONTEXT_LENGTH)[None]
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return torch.randn(spec.shape, generator=generator) * WEIGHT_STD


def write_inputs(workdir: Path, formats: list[str]) -> dict[str, Path]:
    """The random SD 1.5 checkpoint in each format: {"safetensors": path, "ckpt": path}."""
    specs = sd15_specs()
    paths = {}
    if "safetensors" in formats:
        paths["safetensors"] = workdir / "sd15_random.safetensors"
        write_safetensors(paths["safetensors"], specs, lambda key: random_tensor(key, specs[key]), progress=False)
    if "ckpt" in formats:
        paths["ckpt"] = workdir / "sd15_random.ckpt"
        state_dict = {key: random_tensor(key, spec) for key, spec in specs.items()}
        torch.save({"state_dict": state_dict, "global_step": 0}, paths["ckpt"])
    return paths


def run_original(input_path: str, output_path: str) -> None:
    """The original tool_add_control.py's steps, with this repo's model and safe loading."""
    from cldm.model import create_model

    model = create_model(CONFIG)
    pretrained = torch.load(input_path, map_location="cpu", weights_only=True)
    pretrained = pretrained.get("state_dict", pretrained)
    scratch = model.state_dict()
    target = {}
    for key in scratch:
        source = "model.diffusion_" + key[len("control_"):] if key.startswith("control_") else key
        target[key] = (pretrained[source] if source in pretrained else scratch[key]).clone()
    model.load_state_dict(target, strict=True)
    torch.save(model.state_dict(), output_path)


def measure(command: list[str]) -> dict:
    """Run `command`; return peak RSS (GiB), wall time (s) and how RSS was measured."""
    start = time.perf_counter()
    if TIME_BINARY.exists():
        done = subprocess.run([str(TIME_BINARY), "-v", *command], capture_output=True, text=True, cwd=REPO)
        match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
        maxrss_kib, method = (int(match.group(1)) if match else -1), "/usr/bin/time -v"
    else:
        done = subprocess.run([sys.executable, "-c", RUSAGE_WRAPPER, *command], capture_output=True, text=True,
                              cwd=REPO)
        maxrss_kib, method = json.loads(done.stderr.strip().splitlines()[-1])["maxrss_kib"], "getrusage"
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return {"peak_rss_gib": maxrss_kib * KIB / GIB, "wall_s": wall, "method": method}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where the ~20 GB of files go (default: a "
                                                                   "temporary folder)")
    parser.add_argument("--formats", nargs="+", choices=["safetensors", "ckpt"], default=["safetensors", "ckpt"])
    parser.add_argument("--skip-original", action="store_true", help="do not run the original approach "
                                                                     "(needs about 16 GB of RAM)")
    parser.add_argument("--keep", action="store_true", help="keep the files")
    parser.add_argument("--worker-original", nargs=2, metavar=("INPUT", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_original:
        run_original(*args.worker_original)
        return 0

    workdir = Path(tempfile.mkdtemp(prefix="tool_add_control_bench_", dir=args.workdir))
    rows = []
    try:
        start = time.perf_counter()
        inputs = write_inputs(workdir, args.formats)
        print(f"wrote the random SD 1.5 input(s) in {time.perf_counter() - start:.0f} s: "
              + ", ".join(f"{p.name} {p.stat().st_size / GIB:.2f} GiB" for p in inputs.values()))
        for in_format, in_path in inputs.items():
            for out_format in args.formats:
                out_path = workdir / f"control_init.{out_format}"
                result = measure([sys.executable, "tool_add_control.py", str(in_path), str(out_path),
                                  "--config", str(CONFIG), "--quiet"])
                result.update(approach="ours", input=in_format, output=out_format,
                              output_gib=out_path.stat().st_size / GIB)
                rows.append(result)
                print(json.dumps(result))
                out_path.unlink()
        if not args.skip_original and "ckpt" in inputs:
            out_path = workdir / "control_init_original.ckpt"
            result = measure([sys.executable, "-m", "bench.tool_add_control_memory", "--worker-original",
                              str(inputs["ckpt"]), str(out_path)])
            result.update(approach="original", input="ckpt", output="ckpt", output_gib=out_path.stat().st_size / GIB)
            rows.append(result)
            print(json.dumps(result))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    print("\n| approach | input | output | peak RSS (GiB) | wall (s) |\n|---|---|---|---:|---:|")
    for row in rows:
        print(f"| {row['approach']} | .{row['input']} | .{row['output']} | {row['peak_rss_gib']:.2f} | "
              f"{row['wall_s']:.0f} |")
    worst = max((r["peak_rss_gib"] for r in rows if r["approach"] == "ours"), default=0.0)
    print(f"\nours: worst peak {worst:.2f} GiB, limit {LIMIT_GIB} GiB -> {'OK' if worst < LIMIT_GIB else 'OVER'}")
    return 0 if worst < LIMIT_GIB else 1


if __name__ == "__main__":
    sys.exit(main())
