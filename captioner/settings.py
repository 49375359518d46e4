"""Caption decoding settings, with BLIP's own defaults (BLIP's `blip_decoder` + `generate` as it called them)."""

from __future__ import annotations

from dataclasses import dataclass

# OpenAI CLIP's normalisation constants, which BLIP's caption transform uses.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class CaptionSettings:
    """How images are captioned.

    image_size: square side in pixels the image is bicubically resized to (the ViT input).
    num_beams: beam width; 1 means greedy decoding.
    max_length / min_length: decoder lengths in token ids, COUNTING the prompt ids ([DEC] + prompt words),
        exactly as the original BLIP passed them to transformers 4.15's generate().
    prompt: text the decoder is conditioned on; its first len(prompt) characters are cut from the output.
    mean / std: per-channel normalisation of the [0, 1] RGB pixels.
    """

    image_size: int = 384
    num_beams: int = 3
    max_length: int = 20
    min_length: int = 5
    prompt: str = "a picture of "
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if not 0 <= self.min_length <= self.max_length:
            raise ValueError(f"need 0 <= min_length <= max_length, got {self.min_length}, {self.max_length}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std need one value per RGB channel")
