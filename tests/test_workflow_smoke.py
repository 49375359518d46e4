"""The ControlNet workflow as a user runs it, each step a subprocess: tool_add_control.py on a plain SD
checkpoint, training.py on a dataset folder, inference.py on the training checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.reference import TINY_CONFIG, tiny_weights

REPO = Path(__file__).parent.parent


def _run(*args: object) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{args[0]} failed:\n{done.stdout}\n{done.stderr}"
    return done


def _dataset(root: Path) -> Path:
    rng = np.random.default_rng(0)
    (root / "source").mkdir(parents=True)
    (root / "target").mkdir()
    lines = []
    for i in range(2):
        edges = np.zeros((64, 64, 3), np.uint8)
        edges[10 + 20 * i, 8:56] = 255
        Image.fromarray(edges).save(root / "source" / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "target" / f"{i}.png")
        lines.append(json.dumps({"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": f"line {i}"}))
    (root / "prompt.json").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.slow
def test_add_control_then_train_then_infer(tmp_path):
    sd = tmp_path / "sd.ckpt"
    torch.save({"state_dict": {k: v for k, v in tiny_weights().items() if not k.startswith("control_model.")}}, sd)
    init = tmp_path / "control_init.safetensors"
    _run("tool_add_control.py", sd, init, "--config", TINY_CONFIG, "--quiet")

    data, run = _dataset(tmp_path / "data"), tmp_path / "run"
    _run("training.py", "--config", TINY_CONFIG, "--init", init, "--data", data, "--output-dir", run,
         "--resolution", 64, "--batch-size", 2, "--max-steps", 3, "--logger-freq", 2, "--sample-ddim-steps", 2,
         "--checkpoint-every", 2)
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file()
    assert list((run / "samples").glob("*.png")), "no sample grid was written"

    out = tmp_path / "out"
    _run("inference.py", "--ckpt", last, "--hint", data / "source" / "0.png", "--prompt", "line 0",
         "--resolution", 64, "--steps", 3, "--num-samples", 2, "--seed", 1, "--output", out)
    samples = sorted(out.glob("*sample*.png"))
    assert len(samples) == 2
    assert all(Image.open(p).size == (64, 64) for p in samples)
    assert list(out.glob("*grid*.png"))
