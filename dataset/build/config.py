"""What a build is asked to do (BuildConfig, its fields mirror prepare_dataset.py's options), where it keeps
its state, and the one error that stops a whole build."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from annotator.canny import DEFAULT_HIGH_THRESHOLD, DEFAULT_LOW_THRESHOLD, CannyThresholds
from annotator.pairs import DEFAULT_JPEG_QUALITY, PairSettings
from annotator.util import SIZE_MULTIPLE

# The original's captioning model (BLIP base, CapFilt-large).
DEFAULT_CAPTION_MODEL = (
    "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_base_capfilt_large.pth"
)
DEFAULT_BATCH_SIZE = 16
SKIPPED_FILE = "skipped.jsonl"
BUILD_DIR = ".build"  # journals, settings, downloads and extracted archives


class BuildError(RuntimeError):
    """A problem with the whole build (input missing, settings changed), as opposed to one bad image."""


@dataclass(frozen=True)
class BuildConfig:
    """Everything a build needs; the fields mirror the command-line options."""

    input: str
    output: Path
    caption_model: str = DEFAULT_CAPTION_MODEL
    captions_from_txt: bool = False
    device: str | None = None
    resolution: int | None = None
    workers: int | None = None  # None: auto_workers()
    batch_size: int = DEFAULT_BATCH_SIZE
    shard_index: int = 0
    shard_count: int = 1
    canny_low: int = DEFAULT_LOW_THRESHOLD
    canny_high: int = DEFAULT_HIGH_THRESHOLD
    canny_random: bool = False
    seed: int = 0
    min_side: int = SIZE_MULTIPLE
    max_pixels: int | None = Image.MAX_IMAGE_PIXELS
    jpeg_quality: int = DEFAULT_JPEG_QUALITY

    def pair_settings(self) -> PairSettings:
        thresholds = None if self.canny_random else CannyThresholds(self.canny_low, self.canny_high)
        return PairSettings(self.resolution, thresholds, self.seed, self.min_side, self.max_pixels,
                            self.jpeg_quality)

    def output_settings(self) -> dict:
        """The options that change what is written: a resumed run must use the same."""
        canny = {"random_seed": self.seed} if self.canny_random else {"low": self.canny_low, "high": self.canny_high}
        return {
            "resolution": self.resolution,
            "canny": canny,
            "min_side": self.min_side,
            "max_pixels": self.max_pixels,
            "jpeg_quality": self.jpeg_quality,
            "caption_model": self.caption_model,
            "captions_from_txt": self.captions_from_txt,
        }
