"""transformers' BLIP text decoder as an `IncrementalDecoder`: cached rows cross-attending to images."""

from __future__ import annotations

import torch
from transformers import DynamicCache, EncoderDecoderCache
from transformers.models.blip.modeling_blip_text import BlipTextLMHeadModel


class CachedBlipTextDecoder:
    """Runs `BlipTextLMHeadModel` one step at a time over a key/value cache.

    Rows start as one per image. The cross-attention keys/values depend only on a row's image, so they are
    computed once per image on the first call and re-indexed only when the set of images changes (rows
    repeated into beams, or finished images dropped); beam reordering touches the self-attention cache only.
    """

    def __init__(self, text_decoder: BlipTextLMHeadModel, image_embeds: torch.Tensor):
        """image_embeds: (B, N, C) vision encoder output, C = the decoder's encoder_hidden_size."""
        self.text_decoder = text_decoder
        self.device = image_embeds.device
        self._image_embeds = image_embeds
        self._row_images = torch.arange(image_embeds.shape[0], device=self.device)
        self._row_embeds = image_embeds  # (rows, N, C), image_embeds[_row_images]
        config = text_decoder.config
        self._cache = EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: (rows, t) new ids. Returns (rows, vocab) logits of the last position."""
        output = self.text_decoder(
            input_ids=input_ids,
            encoder_hidden_states=self._row_embeds,
            cache=self._cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return output.logits[:, -1]

    def select_rows(self, rows: torch.Tensor) -> None:
        """New row i continues old row rows[i]; rows: (new_rows,) int64."""
        self._cache.self_attention_cache.reorder_cache(rows)
        row_images = self._row_images[rows]
        if not torch.equal(row_images, self._row_images):
            self._cache.cross_attention_cache.reorder_cache(rows)
            self._row_embeds = self._image_embeds[row_images]
            self._row_images = row_images
