"""bench/train_step.py --cache-compare on the tiny model: our step with the VAE and text encoders every step
against our step from cached latents and text contexts (what training.py --cache-latents saves)."""

from __future__ import annotations

import pytest
import torch

from bench import train_step
from bench.configs import model_config
from bench.models import make_batch
from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.encoders.modules import FrozenCLIPEmbedder

CPU = torch.device("cpu")
TINY_RESOLUTION = 64


def _counting(encode, name: str, calls: list[str]):
    """`encode`, appending `name` to `calls` at each call."""
    def counted(self, x):
        calls.append(name)
        return encode(self, x)
    return counted


@pytest.mark.parametrize("encode", [True, False])
def test_the_encoders_run_every_step_only_when_asked(monkeypatch, encode):
    calls = []
    for cls in (AutoencoderKL, FrozenCLIPEmbedder):
        monkeypatch.setattr(cls, "encode", _counting(cls.encode, cls.__name__, calls))
    job = {"side": "ours", "size": "tiny", "device": "cpu", "precision": "fp32", "attention": "sdpa",
           "checkpointing": False, "fused_adamw": True, "channels_last": False, "resolution": TINY_RESOLUTION,
           "batch": 2, "encode_images": encode, "encode_text": encode}
    side = train_step.ours_train_side(job, CPU)
    step = side.step_for(make_batch(model_config("tiny"), 2, TINY_RESOLUTION, CPU))
    step()
    step()
    assert calls == (["AutoencoderKL", "FrozenCLIPEmbedder"] * 2 if encode else [])


@pytest.mark.slow
def test_cache_compare_cli_prints_both_steps_and_the_speed_up(capsys):
    train_step.main(["--preset", "cpu", "--size", "tiny", "--resolution", str(TINY_RESOLUTION), "--batch", "1",
                     "--warmup", "0", "--steps", "2", "--cache-compare"])
    out = capsys.readouterr().out
    assert "VAE encoder + text encoder every step vs cached" in out
    row = next(line for line in out.splitlines() if line.startswith(f"| {TINY_RESOLUTION} "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    encoders, cached, speed_up, encoders_memory, cached_memory = (float(c) for c in cells[2:7])
    assert encoders > 0 and cached > 0 and encoders_memory > 0 and cached_memory > 0
    assert speed_up == pytest.approx(cached / encoders, rel=0.05)
