"""The control types a dataset can be built for: name -> settings (a frozen dataclass with defaults), the
function that turns a photo into its control image, and the metric that scores a generated image against it.

    control = get_control("tile")
    settings = control.settings_from({"level": 2})        # checked: unknown keys and bad values are refused
    image = control.annotate(photo, settings, key="a/x.jpg")   # RGB uint8 (H, W, 3) -> uint8 (H, W) or (H, W, 3)

Random choices (Canny's random thresholds, a scribble's stroke width, tile's noise) are drawn from
(settings.seed, key), `key` naming the photo, so a resumed or sharded build makes the same control image
whatever order the photos come in. The weight-free types import only numpy and OpenCV (they run in the
dataset build's worker processes); the model-based ones (`annotator.depth`) load transformers models and run
in the main process, in batches on the annotator's device.

The types follow ControlNet 1.1's preparation (docs/control_types.md has the facts and sources):
- canny: OpenCV Canny, fixed thresholds or random ones per photo (1.1 trained with random thresholds).
- scribble: thick, simplified strokes: the edges of a blurred copy, dilated by a random width of 1 to 24 px
  at 512 px (1.1's synthesized scribbles span that range).
- tile: the photo blurred and downsampled: `level` rounds of Gaussian noise and pyrDown, then pyrUp back
  with noise again (1.1's DownSampleDetector), so the ControlNet learns to add the detail.
- shuffle: the photo's content moved by a smooth random flow (1.1's content shuffle); its ControlNet needs
  global average pooling of the residuals and acts on the conditional half of guidance only (ControlLDM's
  `global_average_pooling`, models/cldm_v15_avg_pool.yaml).
- inpaint: the photo with random masks (rectangles and brush strokes), stored as an RGBA PNG with alpha 0
  where masked; its hint is the photo in [0, 1] with -1 where masked, ControlNet 1.1's inpaint convention.
- depth / normal: see annotator.depth; seg: annotator.segmentation; softedge: annotator.hed. Each runs a
  model (`annotator.models.load_annotator`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from annotator.canny import DEFAULT_HIGH_THRESHOLD, DEFAULT_LOW_THRESHOLD, CannyThresholds, canny, random_thresholds

DEFAULT_CONTROL = "canny"
# The key random settings draw from when a control image is made outside a dataset build (inference,
# evaluation of generated images).
INFERENCE_KEY = "inference"
# Scribble widths are given at this short side and scaled with the photo.
SCRIBBLE_REFERENCE_SIDE = 512


class ControlSettingsError(ValueError):
    """Settings a control type cannot use; the message names the type, the key and what is accepted."""


def key_rng(seed: int, key: str) -> np.random.Generator:
    """A generator that depends only on (seed, key): the same draws for a photo in any run or shard."""
    digest = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([seed, digest])


# ---- settings ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CannySettings:
    low: int = DEFAULT_LOW_THRESHOLD
    high: int = DEFAULT_HIGH_THRESHOLD
    random: bool = False  # random thresholds per photo, from (seed, key)
    seed: int = 0

    def __post_init__(self) -> None:
        CannyThresholds(self.low, self.high)


@dataclass(frozen=True)
class ScribbleSettings:
    min_width: int = 1  # stroke width range in pixels at a 512 px short side
    max_width: int = 24
    blur: float = 3.0  # Gaussian sigma (at 512 px) before the edges: fewer, longer strokes
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.min_width <= self.max_width:
            raise ValueError(f"needs 1 <= min_width <= max_width, got {self.min_width} and {self.max_width}")
        if not self.blur >= 0:
            raise ValueError(f"blur must be 0 or more, got {self.blur}")


@dataclass(frozen=True)
class TileSettings:
    level: int = 3  # pyrDown rounds: each halves the resolution
    noise: float = 16.0  # Gaussian noise sigma (uint8 scale) added at each round
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.level <= 6:
            raise ValueError(f"level must be from 1 to 6, got {self.level}")
        if not self.noise >= 0:
            raise ValueError(f"noise must be 0 or more, got {self.noise}")


@dataclass(frozen=True)
class InpaintSettings:
    max_shapes: int = 4  # each mask is 1 to max_shapes rectangles and brush strokes
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.max_shapes <= 16:
            raise ValueError(f"max_shapes must be from 1 to 16, got {self.max_shapes}")


@dataclass(frozen=True)
class ShuffleSettings:
    feature: int = 256  # the random flow's feature size in pixels at a 512 px short side (ControlNet 1.1: 256)
    seed: int = 0

    def __post_init__(self) -> None:
        if not 8 <= self.feature <= 1024:
            raise ValueError(f"feature must be from 8 to 1024, got {self.feature}")


# ---- weight-free annotators -------------------------------------------------------------------------------
def canny_control(photo: np.ndarray, settings: CannySettings, key: str) -> np.ndarray:
    thresholds = random_thresholds(settings.seed, key) if settings.random else CannyThresholds(settings.low,
                                                                                                settings.high)
    return canny(photo, thresholds)


def scribble_control(photo: np.ndarray, settings: ScribbleSettings, key: str) -> np.ndarray:
    """White strokes on black, HW uint8 in {0, 255}."""
    rng = key_rng(settings.seed, key)
    scale = min(photo.shape[:2]) / SCRIBBLE_REFERENCE_SIDE
    grey = cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY)
    if settings.blur > 0:
        grey = cv2.GaussianBlur(grey, (0, 0), max(settings.blur * scale, 0.5))
    edges = cv2.Canny(grey, DEFAULT_LOW_THRESHOLD // 2, DEFAULT_HIGH_THRESHOLD // 2)
    width = int(rng.integers(settings.min_width, settings.max_width, endpoint=True))
    width = max(1, round(width * scale))
    if width == 1:
        return edges
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (width, width))
    return cv2.dilate(edges, kernel)


def tile_control(photo: np.ndarray, settings: TileSettings, key: str) -> np.ndarray:
    """The photo degraded: HWC uint8, its size."""
    rng = key_rng(settings.seed, key)
    height, width = photo.shape[:2]
    image = photo.astype(np.float32)
    for _ in range(settings.level):
        image += settings.noise * rng.standard_normal(image.shape, dtype=np.float32)
        image = cv2.pyrDown(image)
    for _ in range(settings.level):
        image = cv2.pyrUp(image)
        image += settings.noise * rng.standard_normal(image.shape, dtype=np.float32)
    if image.shape[:2] != (height, width):  # odd sizes do not come back exactly
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def inpaint_mask(height: int, width: int, settings: InpaintSettings, key: str) -> np.ndarray:
    """HW bool, True where the photo is to be repainted: 1 to max_shapes random rectangles and thick brush
    strokes (ControlNet 1.1 trained on random masks and on optical-flow occlusion masks; only the first here)."""
    rng = key_rng(settings.seed, key)
    mask = np.zeros((height, width), dtype=np.uint8)
    side = min(height, width)
    for _ in range(int(rng.integers(1, settings.max_shapes, endpoint=True))):
        if rng.random() < 0.5:
            h, w = (int(rng.uniform(0.1, 0.5) * extent) + 1 for extent in (height, width))
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            mask[top:top + h, left:left + w] = 1
        else:
            points = np.stack([rng.uniform(0, width, 4), rng.uniform(0, height, 4)], axis=1).astype(np.int32)
            thickness = max(1, int(rng.uniform(0.04, 0.12) * side))
            cv2.polylines(mask, [points], False, 1, thickness=thickness)
    return mask.astype(bool)


def inpaint_control(photo: np.ndarray, settings: InpaintSettings, key: str) -> np.ndarray:
    """HWC4 uint8: the photo, with alpha 0 where it is masked (the pixels the ControlNet is told to fill).
    As a hint this becomes ControlNet 1.1's inpaint convention: the photo in [0, 1], -1 where masked
    (`hint_values`)."""
    alpha = np.where(inpaint_mask(*photo.shape[:2], settings, key), 0, 255).astype(np.uint8)
    return np.concatenate([photo, alpha[..., None]], axis=2)


def smooth_noise(rng: np.random.Generator, height: int, width: int, feature: int) -> np.ndarray:
    """HW float32 in [0, 1]: uniform noise on a grid of `feature` pixels, cubic-interpolated (ControlNet
    1.1's make_noise_disk)."""
    coarse = rng.uniform(0.0, 1.0, ((height // feature) + 2, (width // feature) + 2)).astype(np.float32)
    fine = cv2.resize(coarse, (width + 2 * feature, height + 2 * feature), interpolation=cv2.INTER_CUBIC)
    fine = fine[feature:feature + height, feature:feature + width]
    fine -= fine.min()
    top = fine.max()
    return fine / top if top > 0 else fine


def shuffle_control(photo: np.ndarray, settings: ShuffleSettings, key: str) -> np.ndarray:
    """The photo's content moved by a smooth random flow (ControlNet 1.1's content shuffle): HWC uint8."""
    rng = key_rng(settings.seed, key)
    height, width = photo.shape[:2]
    feature = max(1, round(settings.feature * min(height, width) / SCRIBBLE_REFERENCE_SIDE))
    flow_x = smooth_noise(rng, height, width, feature) * float(width - 1)
    flow_y = smooth_noise(rng, height, width, feature) * float(height - 1)
    return cv2.remap(photo, flow_x, flow_y, cv2.INTER_LINEAR)


def hint_values(control: np.ndarray) -> np.ndarray:
    """A control image -> the ControlNet's hint, float32 HWC3: RGB / 255 in [0, 1]; an RGBA control (inpaint)
    gives -1 where its alpha is below half (masked), as ControlNet 1.1's inpaint model reads it."""
    if control.ndim == 3 and control.shape[2] == 4:
        hint = control[..., :3].astype(np.float32) / 255.0
        hint[control[..., 3] < 128] = -1.0
        return hint
    if control.ndim == 2:
        control = np.repeat(control[..., None], 3, axis=2)
    return control.astype(np.float32) / 255.0


# ---- the registry -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Consistency:
    """A type's consistency reward (ControlNet++'s cycle consistency: the generated image's condition, extracted
    again, against the condition it was given). differentiable: annotator.consistency.build_consistency_loss
    builds it; description: one line of what it compares, or why the type has none."""

    differentiable: bool
    description: str


NO_CONSISTENCY = Consistency(False, "no reward defined")


@dataclass(frozen=True)
class ControlType:
    """One kind of control image.

    annotate: (photo RGB uint8 HWC, settings, key) -> control uint8 HW or HWC, for the weight-free types;
        model-based ones have none here and are built by `load_annotator` (annotator.depth).
    metric: what evaluate.py scores a generated image with against the control image.
    model: the default annotator model (a transformers hub id or folder) of a model-based type.
    model_options: ControlLDM parameters (the config's model.params) a ControlNet of this type needs.
    consistency: whether the type has ControlNet++'s differentiable cycle-consistency reward
        (annotator.consistency builds it) and what it compares, or why there is none.
    """

    def check_model_config(self, model_config: Mapping[str, Any], where: str) -> None:
        """ControlSettingsError when the model config (its `model` section) lacks what this type needs."""
        params = model_config.get("params", {})
        for key, value in self.model_options.items():
            if params.get(key, False) != value:
                raise ControlSettingsError(f"control {self.name!r} needs `{key}: {value}` in the model config "
                                           f"{where} (ControlNet 1.1's; models/cldm_v15_avg_pool.yaml has it)")

    name: str
    settings_type: type
    description: str
    metric: str
    annotate: Callable[[np.ndarray, Any, str], np.ndarray] | None = None
    model: str | None = None
    # ControlLDM parameters the type's ControlNet needs (shuffle: global_average_pooling, as ControlNet 1.1).
    model_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    consistency: Consistency = NO_CONSISTENCY

    @property
    def model_based(self) -> bool:
        return self.annotate is None

    def settings_from(self, values: Mapping[str, Any] | None = None) -> Any:
        """The settings dataclass from plain values (a record or the command line); unknown keys and
        values the type cannot use raise ControlSettingsError naming them."""
        values = dict(values or {})
        fields = {field.name: field for field in dataclasses.fields(self.settings_type)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ControlSettingsError(f"control {self.name!r} has no setting {', '.join(unknown)} (it has: "
                                       f"{', '.join(fields) or 'none'})")
        try:
            return self.settings_type(**values)
        except (TypeError, ValueError) as err:
            raise ControlSettingsError(f"control {self.name!r}: {err}") from err

    def record(self, settings: Any, model: str | None = None) -> dict[str, Any]:
        """What a dataset and a checkpoint keep of how their control images were made (plain JSON)."""
        return {"name": self.name, "settings": dataclasses.asdict(settings), "model": model}


def _model_type(name: str, settings_type: type, description: str, metric: str, model: str,
                consistency: Consistency) -> ControlType:
    return ControlType(name, settings_type, description, metric, None, model, consistency=consistency)


@dataclass(frozen=True)
class DepthSettings:
    """No choices: the depth model's own image processor sets the size it sees."""


@dataclass(frozen=True)
class NormalSettings:
    background: float = 0.1  # ControlNet 1.0's bg_th: normalised depth below it is flat background
    strength: float = float(np.pi * 2.0)  # ControlNet 1.0's `a`: the z component against the depth slopes

    def __post_init__(self) -> None:
        if not 0 <= self.background < 1:
            raise ValueError(f"background must be in [0, 1), got {self.background}")
        if not self.strength > 0:
            raise ValueError(f"strength must be above 0, got {self.strength}")


@dataclass(frozen=True)
class SegSettings:
    """No choices: the segmentation model's own image processor sets the size it sees."""


@dataclass(frozen=True)
class SoftEdgeSettings:
    safe: bool = False  # quantise to three levels (ControlNet 1.1's "safe" soft edges)


CONTROL_TYPES: dict[str, ControlType] = {
    control.name: control for control in (
        ControlType("canny", CannySettings, "Canny edges (white on black)", "canny-f1", canny_control,
                    consistency=Consistency(True, "MSE of Kornia Canny magnitudes (after non-maximum suppression) of "
                                                  "the generated image and the photo; differentiable")),
        ControlType("scribble", ScribbleSettings, "thick simplified strokes (white on black)", "scribble-f1",
                    scribble_control,
                    consistency=Consistency(False, "none: the strokes are thresholded (Canny) edges dilated by a "
                                                   "random width per photo; not differentiable")),
        ControlType("tile", TileSettings, "the photo blurred and downsampled", "ssim", tile_control,
                    consistency=Consistency(True, "MSE of the generated image degraded as the hint was (pyrDown / "
                                                  "pyrUp, noise-free) and the hint; differentiable")),
        ControlType("shuffle", ShuffleSettings, "the photo's content reshuffled by a smooth random flow",
                    "shuffle-colour", shuffle_control, model_options={"global_average_pooling": True},
                    consistency=Consistency(False, "none: the hint is the photo moved by a random flow the hint does "
                                                   "not record, so no pixel of it can be compared")),
        ControlType("inpaint", InpaintSettings, "the photo with random masked areas (transparent; -1 in the hint)",
                    "inpaint-ssim", inpaint_control,
                    consistency=Consistency(True, "MSE of the generated image and the hint on the unmasked pixels; "
                                                  "differentiable")),
        # Depth Anything V2 as the modern default; Intel/dpt-hybrid-midas is ControlNet 1.0's own.
        _model_type("depth", DepthSettings, "relative depth, near is bright (a transformers depth model)",
                    "depth-rmse", "depth-anything/Depth-Anything-V2-Small-hf",
                    Consistency(True, "MSE of the depth model's min-max normalised depth of the generated image and "
                                      "the hint's; differentiable")),
        # MiDaS: ControlNet 1.0's normal formula weighs its slopes against a constant tuned to MiDaS's scale.
        _model_type("normal", NormalSettings, "surface normals derived from depth, as ControlNet 1.0 made them",
                    "normal-angle", "Intel/dpt-hybrid-midas",
                    Consistency(True, "MSE of ControlNet 1.0's normals from the depth model on the generated image "
                                      "and the hint; differentiable (the background mask is held fixed)")),
        _model_type("seg", SegSettings, "ADE20K semantic segmentation in its class colours (a transformers model)",
                    "seg-miou", "openmmlab/upernet-convnext-small",
                    Consistency(True, "cross entropy of the segmentation model's logits on the generated image "
                                      "against the hint's classes (other colours ignored); differentiable")),
        _model_type("softedge", SoftEdgeSettings, "soft edges from ControlNet 1.1's HED (white on black)",
                    "softedge-ssim", "https://huggingface.co/lllyasviel/Annotators/resolve/main/ControlNetHED.pth",
                    Consistency(True, "MSE of HED's soft edges (before quantisation) of the generated image and the "
                                      "hint; differentiable")),
    )
}
# The types with a differentiable consistency reward, in registry order.
CONSISTENCY_TYPES: tuple[str, ...] = tuple(name for name, control in CONTROL_TYPES.items()
                                           if control.consistency.differentiable)


def get_control(name: str) -> ControlType:
    """The control type `name`; ControlSettingsError naming the known ones otherwise."""
    try:
        return CONTROL_TYPES[name]
    except KeyError:
        raise ControlSettingsError(f"unknown control type {name!r} (known: {', '.join(CONTROL_TYPES)})") from None


def parse_control_record(record: Mapping[str, Any] | None) -> tuple[ControlType, Any, str | None]:
    """(type, settings, model) from a dataset's or a checkpoint's control record; None (made before
    records existed) is Canny with its defaults."""
    if record is None:
        control = get_control(DEFAULT_CONTROL)
        return control, control.settings_from(), None
    control = get_control(record["name"])
    return control, control.settings_from(record.get("settings")), record.get("model")
