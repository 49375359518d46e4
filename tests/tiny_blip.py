"""Test helper: the tiny reference BLIP (tests/data/reference/blip_tiny) in both file formats the captioner loads."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from captioner.blip import BlipCaptioner
from captioner.loading import MED_CONFIG_FILE, VISION_CONFIG_FILE, VOCAB_FILE, load_original_checkpoint
from captioner.settings import CaptionSettings

# A tiny random BLIP in the original checkpoint layout, with captions the original BLIP code produced.
TINY_BLIP_REFERENCE = Path(__file__).resolve().parent / "data" / "reference" / "blip_tiny"
TINY_BLIP_CHECKPOINT = "model_tiny_capfilt.pth"


def write_tiny_blip(dest_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write the tiny reference BLIP as an original checkpoint and as a transformers directory.

    Returns (pth_path, hf_dir): dest_dir/original/model_tiny_capfilt.pth with its med_config.json,
    vision_config.json and vocab.txt beside it, and dest_dir/transformers/ written by save_pretrained from
    the converted model. Both load with `load_captioner` and give identical captions (float32, CPU).
    """
    if not (TINY_BLIP_REFERENCE / TINY_BLIP_CHECKPOINT).is_file():
        raise FileNotFoundError(f"tiny BLIP reference data missing: {TINY_BLIP_REFERENCE / TINY_BLIP_CHECKPOINT}")
    dest = Path(dest_dir)
    original_dir, hf_dir = dest / "original", dest / "transformers"
    original_dir.mkdir(parents=True, exist_ok=True)
    for name in (TINY_BLIP_CHECKPOINT, MED_CONFIG_FILE, VISION_CONFIG_FILE, VOCAB_FILE):
        shutil.copyfile(TINY_BLIP_REFERENCE / name, original_dir / name)
    pth_path = original_dir / TINY_BLIP_CHECKPOINT
    settings = CaptionSettings()
    model, tokenizer = load_original_checkpoint(pth_path, settings.image_size)
    BlipCaptioner(model, tokenizer, settings, device="cpu").save_pretrained(hf_dir)
    return pth_path, hf_dir
