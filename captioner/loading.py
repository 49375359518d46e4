"""load_captioner: a BlipCaptioner from an original BLIP checkpoint (path or URL), a transformers model
directory, or a hub id."""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, BlipForConditionalGeneration, PreTrainedTokenizerBase

from captioner.architecture import blip_config_from_checkpoint
from captioner.blip import BlipCaptioner
from captioner.convert import convert_blip_state_dict
from captioner.settings import CaptionSettings
from captioner.text import blip_tokenizer
from common.download import DownloadError, cached_download, is_url
from common.torch_quirks import settle_device_constructors
from ldm.checkpoint import CheckpointError

# Files an original checkpoint may have beside it (the reference tiny model does; BLIP base needs none).
MED_CONFIG_FILE = "med_config.json"
VISION_CONFIG_FILE = "vision_config.json"
VOCAB_FILE = "vocab.txt"
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
# The vocabulary BLIP's init_tokenizer starts from.
BLIP_BASE_TOKENIZER = "bert-base-uncased"


def read_original_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of an original BLIP checkpoint: `torch.load(path)["model"]` (or a bare state dict),
    loaded with weights_only=True so no pickled code runs."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"cannot read BLIP checkpoint {path}: {error}") from error
    state_dict = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path}: expected {{'model': state_dict}} of tensors, got {type(checkpoint).__name__}")
    return dict(state_dict)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from error


def load_original_checkpoint(
    path: str | os.PathLike, image_size: int
) -> tuple[BlipForConditionalGeneration, PreTrainedTokenizerBase]:
    """transformers BLIP model (float32, CPU) and tokenizer from an original BLIP `.pth`.

    med_config.json, vision_config.json and vocab.txt are read from the checkpoint's folder when present;
    otherwise BLIP base's head counts and the bert-base-uncased vocabulary (downloaded by transformers) are
    used. The vision model is built for image_size pixels, interpolating the position embeddings.
    """
    path = Path(path)
    state_dict = read_original_state_dict(path)
    folder = path.parent
    tokenizer_source = folder if (folder / VOCAB_FILE).is_file() else BLIP_BASE_TOKENIZER
    try:
        tokenizer = blip_tokenizer(tokenizer_source)
    except (OSError, ValueError) as error:
        raise CheckpointError(
            f"{path}: no {VOCAB_FILE} beside it and cannot load {tokenizer_source}: {error}"
        ) from error
    token_ids = {"bos": tokenizer.bos_token_id, "sep": tokenizer.sep_token_id, "pad": tokenizer.pad_token_id}
    try:
        config = blip_config_from_checkpoint(
            state_dict,
            image_size,
            token_ids,
            med_config=_read_json(folder / MED_CONFIG_FILE),
            vision_config=_read_json(folder / VISION_CONFIG_FILE),
        )
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from error
    vocab_size = config.text_config.vocab_size
    if len(tokenizer) != vocab_size:
        raise CheckpointError(f"{path}: tokenizer has {len(tokenizer)} tokens, the decoder vocabulary {vocab_size}")
    model = BlipForConditionalGeneration(config)
    model.load_state_dict(convert_blip_state_dict(state_dict, model.state_dict(), source=str(path)), strict=True)
    return model, tokenizer


def load_transformers_model(
    name_or_dir: str | os.PathLike,
) -> tuple[BlipForConditionalGeneration, PreTrainedTokenizerBase]:
    """transformers BLIP captioning model and tokenizer from a save_pretrained directory or a hub id."""
    settle_device_constructors()
    try:
        model = BlipForConditionalGeneration.from_pretrained(str(name_or_dir), dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_dir))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot load transformers BLIP model {name_or_dir}: {error}") from error
    return model, tokenizer


def _looks_like_hub_id(text: str) -> bool:
    """An "owner/name" string with no checkpoint-file suffix, e.g. Salesforce/blip-image-captioning-base."""
    return re.fullmatch(r"[\w.-]+/[\w.-]+", text) is not None and Path(text).suffix not in CHECKPOINT_SUFFIXES


def load_captioner(
    model: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    settings: CaptionSettings | None = None,
) -> BlipCaptioner:
    """A BlipCaptioner from any of:

    - an original BLIP checkpoint file (`.pth`, `{"model": state_dict}`, e.g. model_base_capfilt_large.pth),
    - a URL to one (downloaded once into ~/.cache/controlnet-trainer/ with a progress bar),
    - a transformers model directory (BlipForConditionalGeneration.save_pretrained + tokenizer files),
    - a hub id such as "Salesforce/blip-image-captioning-large" (resolved by transformers).

    device: default cuda if available else cpu; dtype: default float16 on cuda, float32 on cpu.
    settings: decoding settings, default BLIP's (CaptionSettings()).
    """
    settings = settings or CaptionSettings()
    source = str(model)
    if is_url(source):
        try:
            source = str(cached_download(source))
        except DownloadError as error:
            raise CheckpointError(str(error)) from error
    path = Path(source)
    if path.is_file():
        blip, tokenizer = load_original_checkpoint(path, settings.image_size)
    elif path.is_dir() or _looks_like_hub_id(source):
        blip, tokenizer = load_transformers_model(source)
    else:
        raise CheckpointError(f"caption model {source!r}: no such file or directory (nor a URL or hub id)")
    return BlipCaptioner(blip, tokenizer, settings=settings, device=device, dtype=dtype)
