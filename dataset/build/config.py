"""What a build is asked to do (BuildConfig, its fields mirror prepare_dataset.py's options), where it keeps
its state, and the one error that stops a whole build."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from annotator.canny import DEFAULT_HIGH_THRESHOLD, DEFAULT_LOW_THRESHOLD, CannyThresholds
from annotator.controls import DEFAULT_CONTROL, ControlSettingsError, ControlType, get_control
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
    control: str = DEFAULT_CONTROL  # annotator.controls; canny takes the canny_* fields
    control_options: dict[str, Any] = field(default_factory=dict)  # the other types' settings
    annotator_model: str | None = None  # a model-based type's model (hub id or folder); None: its default

    def control_type(self) -> ControlType:
        """The control type, its options checked (BuildError naming what is wrong)."""
        try:
            control = get_control(self.control)
            if control.name == DEFAULT_CONTROL and self.control_options:
                raise ControlSettingsError("canny takes --canny-low/--canny-high/--canny-random/--seed, "
                                           "not --control-option")
            if not control.model_based and self.annotator_model is not None:
                raise ControlSettingsError(f"control {control.name!r} uses no model: leave out --annotator-model")
            control.settings_from(self._options())
        except ControlSettingsError as err:
            raise BuildError(str(err)) from err
        return control

    def _options(self) -> dict[str, Any]:
        if self.control == DEFAULT_CONTROL:
            return {"low": self.canny_low, "high": self.canny_high, "random": self.canny_random, "seed": self.seed}
        return dict(self.control_options)

    def control_record(self) -> dict[str, Any]:
        """What the dataset keeps of how its control images were made (dataset.CONTROL_FILE)."""
        control = self.control_type()
        model = (self.annotator_model or control.model) if control.model_based else None
        return control.record(control.settings_from(self._options()), model)

    def pair_settings(self) -> PairSettings:
        thresholds = None if self.canny_random else CannyThresholds(self.canny_low, self.canny_high)
        control = self.control_type()
        options = None if control.name == DEFAULT_CONTROL else control.settings_from(self._options())
        return PairSettings(self.resolution, thresholds, self.seed, self.min_side, self.max_pixels,
                            self.jpeg_quality, control.name, options)

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
            # Canny builds record no "control", so builds made before other types existed still resume.
            **({} if self.control == DEFAULT_CONTROL else {"control": self.control_record()}),
        }
