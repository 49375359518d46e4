"""Bad command-line values end in one line that names the value (exit 2 for arguments, 1 for files whose
content is bad), never a traceback, and nothing is written where the run would write.

Each case runs the script's `main(argv)` in this process; the base invocations are valid runs of the tiny
model (tests/training_helpers.py), so each case differs from a working command by its bad value alone.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import inference
import prepare_dataset
import tool_add_control
import tool_export
import training
from tests.reference import TINY_CONFIG
from tests.training_helpers import IMAGE_SIZE, train_args

SCRIPTS = {"training": training, "inference": inference, "prepare_dataset": prepare_dataset,
           "tool_add_control": tool_add_control, "tool_export": tool_export}
HUGE_BYTES = 2**62


class _Pickled:
    """Unpickles to a function call: what a checkpoint must never be allowed to run."""

    def __reduce__(self):
        return (os.getcwd, ())


@dataclass(frozen=True)
class Files:
    """The inputs of the cases: valid ones (init, data, hint) and hostile ones."""

    root: Path
    init: Path
    data: Path
    hint: Path
    a_file: Path
    bad_yaml: Path
    no_params: Path
    pickle: Path
    huge_tensor: Path
    huge_header: Path
    out: Path  # where a case's run would write: it must stay without files (one folder per case)


@pytest.fixture(scope="module")
def files(tmp_path_factory, init_path: Path, four_pairs: Path) -> Files:
    root = tmp_path_factory.mktemp("hostile")
    hint = root / "hint.png"
    Image.fromarray(np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)).save(hint)
    a_file = root / "a_file"
    a_file.write_text("not a folder\n")
    bad_yaml = root / "bad.yaml"
    bad_yaml.write_text("model:\n  target: [unclosed\n")
    no_params = root / "no_params.yaml"
    no_params.write_text("model:\n  target: cldm.cldm.ControlLDM\n")
    pickle = root / "code.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Pickled()}, pickle)
    # A header that is valid JSON whose one tensor claims 2^62 bytes, and a header length of 2^62.
    header = json.dumps({"w": {"dtype": "U8", "shape": [HUGE_BYTES], "data_offsets": [0, HUGE_BYTES]}}).encode()
    huge_tensor = root / "huge_tensor.safetensors"
    huge_tensor.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    huge_header = root / "huge_header.safetensors"
    huge_header.write_bytes(struct.pack("<Q", HUGE_BYTES) + b"{}")
    return Files(root, init_path, four_pairs, hint, a_file, bad_yaml, no_params, pickle, huge_tensor, huge_header,
                 root / "out")


def _train(f: Files, *extra: str, init: Path | None = None) -> list[str]:
    return train_args(init or f.init, f.data, f.out, "--max-steps", "1", *extra)


def _infer(f: Files, *extra: str, ckpt: Path | None = None, source: tuple[str, Path] | None = None) -> list[str]:
    flag, image = source or ("--hint", f.hint)
    return ["--ckpt", str(ckpt or f.init), "--config", str(TINY_CONFIG), flag, str(image), "--resolution",
            str(IMAGE_SIZE), "--steps", "1", "--output", str(f.out), *extra]


def _prepare(f: Files, *extra: str) -> list[str]:
    return ["--input", str(f.data / "target"), "--output", str(f.out), "--captions-from-txt", *extra]


def _add_control(f: Files, *extra: str, source: Path | None = None) -> list[str]:
    return [str(source or f.init), str(f.out / "control.safetensors"), "--config", str(TINY_CONFIG), "--quiet",
            *extra]


def _export(f: Files, *extra: str, source: Path | None = None, output: Path | None = None) -> list[str]:
    return [str(source or f.init), str(output or f.out / "control.safetensors"), "--config", str(TINY_CONFIG),
            *extra]


# (case id, script, argv from the files, exit status (or the statuses allowed), fragment of the error line)
CASES: list[tuple[str, str, Callable[[Files], list[str]], int | tuple[int, ...], str]] = [
    # training.py
    ("train-output-dir-file", "training", lambda f: train_args(f.init, f.data, f.a_file), 2,
     "is a file, not a folder"),
    ("train-batch-above-dataset", "training", lambda f: _train(f, "--batch-size", "100"), 2,
     "--batch-size 100: "),
    ("train-accelerator-unknown", "training", lambda f: _train(f, "--accelerator", "quantum"), 2,
     "--accelerator 'quantum': choose from"),
    ("train-devices-abc", "training", lambda f: _train(f, "--devices", "abc"), 2, "argument --devices:"),
    ("train-devices-list-on-cpu", "training", lambda f: _train(f, "--devices", "0,1"), 2,
     "on the CPU give a count"),
    ("train-max-steps-negative", "training", lambda f: _train(f, "--max-steps", "-5"), 2, "argument --max-steps:"),
    ("train-max-epochs-negative", "training", lambda f: _train(f, "--max-epochs", "-2"), 2,
     "argument --max-epochs:"),
    ("train-lr-negative", "training", lambda f: _train(f, "--lr", "-1"), 2, "argument --lr: must be a finite"),
    ("train-lr-nan", "training", lambda f: _train(f, "--lr", "nan"), 2, "argument --lr: must be a finite"),
    ("train-config-bad-yaml", "training", lambda f: _train(f, "--config", str(f.bad_yaml)), 2,
     "not valid YAML at line 3"),
    ("train-config-no-params", "training", lambda f: _train(f, "--config", str(f.no_params)), 2,
     "model.params lacks control_stage_config"),
    ("train-config-missing", "training", lambda f: _train(f, "--config", str(f.root / "none.yaml")), 2,
     "config not found"),
    ("train-strategy-unknown", "training", lambda f: _train(f, "--strategy", "warp"), 2,
     "--strategy 'warp': choose from"),
    ("train-cache-dir-file", "training", lambda f: _train(f, "--cache-latents", "--cache-dir", str(f.a_file)), 2,
     "--cache-dir"),
    # Refused by the checkpoint reader (1), or earlier by resume's check of the file (2): one line either way.
    ("train-resume-pickled-code", "training", lambda f: _train(f, "--resume", str(f.pickle)), (1, 2), "code.ckpt"),
    ("train-init-huge-tensor", "training", lambda f: _train(f, init=f.huge_tensor), 1, "huge_tensor.safetensors"),
    ("train-init-huge-header", "training", lambda f: _train(f, init=f.huge_header), 1, "huge_header.safetensors"),
    ("train-init-missing", "training", lambda f: _train(f, init=f.root / "none.ckpt"), 1, "none.ckpt"),
    ("train-resolution", "training", lambda f: _train(f, "--resolution", "100"), 2, "multiple of 64"),
    ("train-cache-random-crop", "training", lambda f: _train(f, "--cache-latents", "--random-crop"), 2,
     "--random-crop"),
    ("train-cache-dir-alone", "training", lambda f: _train(f, "--cache-dir", str(f.root / "c")), 2,
     "give --cache-latents too"),
    ("train-max-time", "training", lambda f: _train(f, "--max-time", "soon"), 2, "is not a duration"),
    ("train-prompt-dropout", "training", lambda f: _train(f, "--prompt-dropout", "2"), 2, "must be in [0, 1]"),
    ("train-batch-size-zero", "training", lambda f: _train(f, "--batch-size", "0"), 2, "must be at least 1"),
    ("train-data-missing", "training", lambda f: train_args(f.init, f.root / "none", f.out), 1, "none"),
    ("train-init-control-missing", "training", lambda f: _train(f, "--init-control", str(f.root / "none.pth")), 1,
     "none.pth"),
    ("train-init-control-pickled-code", "training", lambda f: _train(f, "--init-control", str(f.pickle)), 1,
     "code.ckpt: refused to load"),
    ("train-init-control-not-diffusers", "training", lambda f: _train(f, "--init-control", str(f.root)), 1,
     "a folder without config.json"),
    # inference.py
    ("infer-device-bogus", "inference", lambda f: _infer(f, "--device", "bogus"), 2, "argument --device:"),
    ("infer-scale-nan", "inference", lambda f: _infer(f, "--scale", "nan"), 2, "argument --scale:"),
    ("infer-strength-negative", "inference", lambda f: _infer(f, "--strength", "-5"), 2, "argument --strength:"),
    ("infer-eta-inf", "inference", lambda f: _infer(f, "--eta", "inf"), 2, "argument --eta:"),
    ("infer-num-samples-zero", "inference", lambda f: _infer(f, "--num-samples", "0"), 2, "--num-samples"),
    ("infer-batch-size-zero", "inference", lambda f: _infer(f, "--batch-size", "0"), 2, "--batch-size"),
    ("infer-steps-zero", "inference", lambda f: _infer(f, "--steps", "0"), 2, "--steps"),
    ("infer-resolution", "inference", lambda f: _infer(f, "--resolution", "100"), 2, "multiple of"),
    ("infer-resolution-huge", "inference", lambda f: _infer(f, "--resolution", "102400"), 2, "from 64 to 2048"),
    ("infer-canny-thresholds", "inference", lambda f: _infer(f, "--low-threshold", "300", "--high-threshold", "100",
                                                             source=("--image", f.hint)), 2, "threshold"),
    ("infer-huge-tensor", "inference", lambda f: _infer(f, ckpt=f.huge_tensor), 1, "huge_tensor.safetensors"),
    ("infer-huge-header", "inference", lambda f: _infer(f, ckpt=f.huge_header), 1, "huge_header.safetensors"),
    ("infer-ckpt-missing", "inference", lambda f: _infer(f, ckpt=f.root / "none.ckpt"), 1, "none.ckpt"),
    ("infer-hint-unreadable", "inference", lambda f: _infer(f, source=("--hint", f.a_file)), 1, "a_file"),
    ("infer-ckpt-folder-not-diffusers", "inference", lambda f: _infer(f, "--sd-ckpt", str(f.init), ckpt=f.root), 1,
     "a folder without config.json"),
    ("infer-sd-ckpt-for-a-full-model", "inference", lambda f: _infer(f, "--sd-ckpt", str(f.init)), 1,
     "--sd-ckpt is only for"),
    # prepare_dataset.py
    ("prepare-jpeg-quality", "prepare_dataset", lambda f: _prepare(f, "--jpeg-quality", "1000"), 2,
     "argument --jpeg-quality: must be from 1 to 100"),
    ("prepare-device-bogus", "prepare_dataset", lambda f: _prepare(f, "--device", "bogus"), 2,
     "argument --device:"),
    ("prepare-shard", "prepare_dataset", lambda f: _prepare(f, "--shard", "5/2"), 2, "0 <= i < N"),
    ("prepare-workers", "prepare_dataset", lambda f: _prepare(f, "--workers", "-1"), 2, "--workers"),
    ("prepare-canny", "prepare_dataset", lambda f: _prepare(f, "--canny-low", "300", "--canny-high", "100"), 2,
     "threshold"),
    ("prepare-input-missing", "prepare_dataset",
     lambda f: ["--input", str(f.root / "none"), "--output", str(f.out)], 2, "none"),
    # tool_add_control.py
    ("add-control-huge-tensor", "tool_add_control", lambda f: _add_control(f, source=f.huge_tensor), 1,
     "huge_tensor.safetensors"),
    ("add-control-huge-header", "tool_add_control", lambda f: _add_control(f, source=f.huge_header), 1,
     "huge_header.safetensors"),
    ("add-control-input-missing", "tool_add_control", lambda f: _add_control(f, source=f.root / "none.ckpt"), 1,
     "none.ckpt"),
    ("add-control-dtype", "tool_add_control", lambda f: _add_control(f, "--dtype", "fp8"), 2,
     "argument --dtype: invalid choice"),
    # tool_export.py
    ("export-format", "tool_export", lambda f: _export(f, "--format", "onnx"), 2, "argument --format: invalid choice"),
    ("export-dtype", "tool_export", lambda f: _export(f, "--dtype", "fp8"), 2, "argument --dtype: invalid choice"),
    ("export-input-missing", "tool_export", lambda f: _export(f, source=f.root / "none.ckpt"), 2, "none.ckpt"),
    ("export-pickled-code", "tool_export", lambda f: _export(f, source=f.pickle), 2, "code.ckpt: refused to load"),
    ("export-huge-tensor", "tool_export", lambda f: _export(f, source=f.huge_tensor), 2, "huge_tensor.safetensors"),
    ("export-huge-header", "tool_export", lambda f: _export(f, source=f.huge_header), 2, "huge_header.safetensors"),
    ("export-not-a-checkpoint", "tool_export", lambda f: _export(f, source=f.a_file), 2, "a_file"),
    ("export-config-missing", "tool_export", lambda f: _export(f, "--config", str(f.root / "none.yaml")), 2,
     "config not found"),
    ("export-output-a-folder", "tool_export", lambda f: _export(f, "--format", "diffusers", output=f.root), 2,
     "already exists (a folder)"),
    ("export-output-in-a-file", "tool_export", lambda f: _export(f, output=f.a_file / "c.safetensors"), 2,
     "is a file, not a folder"),
    ("export-control-suffix", "tool_export", lambda f: _export(f, output=f.out / "control.ckpt"), 2,
     "is a .safetensors file"),
    ("export-original-suffix", "tool_export", lambda f: _export(f, "--format", "original",
                                                                output=f.out / "full.bin"), 2, ".ckpt/.pth/.pt"),
    ("export-position-ids-control", "tool_export", lambda f: _export(f, "--clip-position-ids"), 2,
     "--clip-position-ids applies to --format original only"),
]

# What this machine lacks: a GPU (the CPU-only CI) or the deepspeed package.
if not torch.cuda.is_available():
    CASES += [
        ("train-gpu-without-gpu", "training", lambda f: _train(f, "--accelerator", "gpu"), 2,
         "--accelerator gpu: no cuda or mps device"),
        ("infer-cuda-without-gpu", "inference", lambda f: _infer(f, "--device", "cuda"), 2,
         "argument --device: cuda: this machine has 0 CUDA GPU(s)"),
        ("prepare-cuda-without-gpu", "prepare_dataset", lambda f: _prepare(f, "--device", "cuda"), 2,
         "argument --device: cuda: this machine has 0 CUDA GPU(s)"),
    ]
if importlib.util.find_spec("deepspeed") is None:
    CASES.append(("train-deepspeed-missing", "training", lambda f: _train(f, "--strategy", "deepspeed_stage_2"), 2,
                  "needs the deepspeed package"))


def _run(script: str, argv: list[str]) -> int:
    try:
        return SCRIPTS[script].main(argv)
    except SystemExit as exit_:
        return exit_.code


def _written(f: Files) -> list[Path]:
    return sorted(path for path in f.out.rglob("*") if path.is_file()) if f.out.exists() else []


@pytest.mark.parametrize(("script", "make_argv", "status", "fragment"),
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_value_gives_one_line_and_writes_nothing(files: Files, tmp_path: Path, capsys, script: str,
                                                     make_argv: Callable[[Files], list[str]],
                                                     status: int | tuple[int, ...], fragment: str):
    files = dataclasses.replace(files, out=tmp_path / "out")
    before = files.a_file.read_text()
    assert _run(script, make_argv(files)) in (status if isinstance(status, tuple) else (status,))
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(errors) == 1 and fragment in errors[0], captured.err
    assert _written(files) == []
    assert files.a_file.read_text() == before


def test_many_samples_run_in_batches_each_saved(files: Files, tmp_path: Path, monkeypatch, capsys):
    """--num-samples above --batch-size: sampling calls of at most --batch-size, every sample written."""
    sizes = []
    real = inference.sample_images

    def recording(model, hints, prompts, **options):
        sizes.append(len(prompts))
        return real(model, hints, prompts, **options)

    monkeypatch.setattr(inference, "sample_images", recording)
    output = tmp_path / "samples"
    argv = [*_infer(files), "--output", str(output), "--num-samples", "5", "--batch-size", "2", "--seed", "1",
            "--scale", "1"]
    assert inference.main(argv) == 0
    assert sizes == [2, 2, 1]
    assert sorted(path.name for path in output.glob("seed1_sample*.png")) == [f"seed1_sample{i}.png"
                                                                               for i in range(5)]
    assert Image.open(output / "seed1_grid.png").size == (4 * IMAGE_SIZE, 2 * IMAGE_SIZE)
