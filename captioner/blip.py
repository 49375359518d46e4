"""BlipCaptioner: images -> captions with a transformers BLIP model, decoded exactly as the original BLIP."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from PIL import Image, ImageOps
from tqdm import tqdm
from transformers import BlipForConditionalGeneration, BlipImageProcessor, PreTrainedTokenizerBase

from captioner.decoder import CachedBlipTextDecoder
from captioner.preprocess import pixel_values
from captioner.search import beam_search, greedy_search
from captioner.settings import CaptionSettings
from captioner.text import decode_caption, decoder_prompt_ids


def default_device() -> torch.device:
    """cuda if available, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """float16 on GPU (BLIP captions in half precision there), float32 on CPU."""
    return torch.float16 if device.type == "cuda" else torch.float32


class BlipCaptioner:
    """Captions batches of images with BLIP's prompt, beam search and text clean-up.

    model: transformers BLIP captioning model; tokenizer: its BERT tokenizer (with [DEC]);
    settings: decoding settings (defaults: BLIP's own). device/dtype default to cuda+fp16, else cpu+fp32.
    Batching does not change the captions: each image runs its own beams.
    """

    def __init__(
        self,
        model: BlipForConditionalGeneration,
        tokenizer: PreTrainedTokenizerBase,
        settings: CaptionSettings | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        self.settings = settings or CaptionSettings()
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype or default_dtype(self.device)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.tokenizer = tokenizer
        text_config = model.config.text_config
        self.eos_token_id = text_config.sep_token_id  # BLIP ends captions with [SEP]
        self.prompt_ids = decoder_prompt_ids(tokenizer, self.settings.prompt, text_config.bos_token_id)
        self._skip_ids = {text_config.bos_token_id, text_config.sep_token_id, text_config.pad_token_id}
        # Another resolution than the model's: interpolate its position embeddings on the fly.
        self._interpolate_positions = self.settings.image_size != model.config.vision_config.image_size

    @torch.no_grad()
    def generate_ids(self, pixels: torch.Tensor) -> list[list[int]]:
        """pixels: (B, 3, S, S) normalised images. Returns per image the decoder ids (prompt ids first)."""
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        image_embeds = self.model.vision_model(
            pixel_values=pixels, interpolate_pos_encoding=self._interpolate_positions
        ).last_hidden_state  # (B, 1 + patches, vision width)
        decoder = CachedBlipTextDecoder(self.model.text_decoder, image_embeds)
        s = self.settings
        if s.num_beams == 1:
            return greedy_search(decoder, self.prompt_ids, len(pixels), s.max_length, s.min_length, self.eos_token_id)
        return beam_search(
            decoder, self.prompt_ids, len(pixels), s.num_beams, s.max_length, s.min_length, self.eos_token_id
        )

    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        """Captions for one batch of PIL images (any mode; converted to RGB), in order."""
        if not images:
            return []
        s = self.settings
        ids = self.generate_ids(pixel_values(images, s.image_size, s.mean, s.std))
        return [decode_caption(self.tokenizer, row, s.prompt, self._skip_ids) for row in ids]

    def caption_paths(
        self, paths: Sequence[str | os.PathLike], batch_size: int = 16, progress: bool = True
    ) -> list[str]:
        """Captions for image files, batch_size at a time, with a progress bar.

        Images are turned upright by their EXIF orientation. An unreadable file raises ValueError naming it.
        """
        captions: list[str] = []
        with tqdm(total=len(paths), desc="captioning", unit="img", disable=not progress) as bar:
            for start in range(0, len(paths), batch_size):
                batch = [_open_upright(path) for path in paths[start : start + batch_size]]
                captions += self.caption(batch)
                bar.update(len(batch))
        return captions

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write a transformers model directory: model weights/config, tokenizer and image processor files,
        loadable by `load_captioner(directory)` and by transformers' Auto classes."""
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        s = self.settings
        size = {"height": s.image_size, "width": s.image_size}
        BlipImageProcessor(size=size, image_mean=list(s.mean), image_std=list(s.std)).save_pretrained(directory)


def _open_upright(path: str | os.PathLike) -> Image.Image:
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error
