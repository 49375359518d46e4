"""ControlNet++'s Canny evaluation (Li et al. 2024), built in: its protocol, not the project's.

ControlNet++ (liming-ai/ControlNet_Plus_Plus, eval/eval.py then eval/eval_edge.py) scores a Canny ControlNet
differently from `evaluation.fidelity` (OpenCV Canny 100/200, F1 pooled over the set):

- the condition is kornia's Canny (thresholds 0.1 / 0.2 on the photo as float [0, 1], its hysteresis edges)
  of the photo resized to 512 x 512 (bicubic), kept as an 8-bit 'L' image (0 / 255);
- each condition gets 4 images from one pipeline call (its prompt 4 times), seed 42, guidance 7.5 against
  the negative prompt "worst quality, low quality", 20 UniPC steps (DDIM with their --ddim), 512 px;
- each generated uint8 image / 255 goes through the same kornia Canny, kept as an 'L' image;
- the score of a condition is torchmetrics' BinaryF1Score of its 4 edge maps flattened together against the
  condition repeated 4 times (255 read as 1); the headline F1 is the mean over conditions. They also report
  MultiScaleSSIM and PSNR of the same edge maps (PSNR of identical maps, infinite, counted as 100), and
  CLIP score of the images against their prompts (eval/eval_clip.py).

The numbers of this protocol are comparable with ControlNet++'s table (ControlNet v1.1 Canny F1 34.65,
ControlNet++ 37.04 on MultiGen-20M, there in percent), never with the project's F1. Images come from
`cldm.sampling.sample_images`, the project's one generation path; the seed is theirs, the noise bits are
not (they draw from the CUDA generator in their pipeline's order, we draw each condition's noise in turn
from a CPU generator seeded with it), so two models scored here see the same noise. FID (their
eval/eval_fid.py) is not built: torchmetrics' FrechetInceptionDistance needs torch-fidelity and its
Inception weights, which this project does not ship.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from kornia.filters import canny as kornia_canny
from PIL import Image
from torchmetrics.classification import BinaryF1Score
from torchmetrics.image import MultiScaleStructuralSimilarityIndexMeasure, PeakSignalNoiseRatio
from tqdm.auto import tqdm

from cldm.sampling import latent_shape, sample_images

PROTOCOL = "controlnetpp"
LOW_THRESHOLD = 0.1
HIGH_THRESHOLD = 0.2
IMAGES_PER_PROMPT = 4
SEED = 42
GUIDANCE_SCALE = 7.5
STEPS = 20
SAMPLER = "unipc"
SAMPLERS = (SAMPLER, "ddim")  # theirs, and theirs with --ddim (both cldm.sampling samplers)
NEGATIVE_PROMPT = "worst quality, low quality"
RESOLUTION = 512
# Sides the project's models take (the VAE's 8x and the UNet's three halvings).
SIZE_MULTIPLE = 64
EDGE = 255  # an edge pixel of an 'L' edge map
# eval_edge.py counts an infinite PSNR (identical edge maps) as this.
PSNR_OF_IDENTICAL = 100.0
# torchmetrics' MultiScaleSSIM with its defaults (5 scales, kernel 11) needs sides above (11 - 1) * 2 ** 4.
MS_SSIM_MIN_SIDE = 161


@dataclass(frozen=True)
class ProtocolSettings:
    """The generation and edge settings of one run (their defaults are ControlNet++'s)."""

    resolution: int = RESOLUTION
    images_per_prompt: int = IMAGES_PER_PROMPT
    seed: int = SEED
    guidance_scale: float = GUIDANCE_SCALE
    steps: int = STEPS
    sampler: str = SAMPLER
    negative_prompt: str = NEGATIVE_PROMPT
    low_threshold: float = LOW_THRESHOLD
    high_threshold: float = HIGH_THRESHOLD

    def __post_init__(self) -> None:
        if self.resolution <= 0 or self.resolution % SIZE_MULTIPLE:
            raise ValueError(f"--resolution {self.resolution}: must be a positive multiple of {SIZE_MULTIPLE}")
        if self.images_per_prompt < 1:
            raise ValueError(f"--images-per-prompt {self.images_per_prompt}: must be at least 1")
        if self.steps < 1:
            raise ValueError(f"--steps {self.steps}: must be at least 1")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"--sampler {self.sampler!r}: must be one of {', '.join(SAMPLERS)}")

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def kornia_edges(images: np.ndarray, low_threshold: float = LOW_THRESHOLD,
                 high_threshold: float = HIGH_THRESHOLD) -> np.ndarray:
    """ControlNet++'s Canny: (B, H, W, 3) uint8 RGB -> (B, H, W) uint8 edge maps in {0, 255}.

    As their eval.py: the image / 255 as float (B, 3, H, W), kornia.filters.canny(low, high) (grey from RGB,
    Gaussian 5 x 5 sigma 1, hysteresis), its second output (edges 0 / 1) times 255 to 8 bits, as
    torchvision's to_pil_image(edges, 'L') stores it.
    """
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"kornia_edges takes (B, H, W, 3) uint8 images, got {images.dtype} {images.shape}")
    pixels = torch.tensor(images).permute(0, 3, 1, 2) / 255.0
    edges = kornia_canny(pixels, low_threshold, high_threshold)[1]
    return edges[:, 0].mul(255).to(torch.uint8).numpy()


def photo_condition(photo: np.ndarray, resolution: int = RESOLUTION, low_threshold: float = LOW_THRESHOLD,
                    high_threshold: float = HIGH_THRESHOLD) -> np.ndarray:
    """The condition of a photo (H, W, 3) uint8: resized to resolution x resolution (bicubic, the aspect not
    kept, as their eval.py), then `kornia_edges`. Returns (resolution, resolution) uint8 in {0, 255}."""
    resized = np.asarray(Image.fromarray(photo).convert("RGB").resize((resolution, resolution),
                                                                       Image.Resampling.BICUBIC))
    return kornia_edges(resized[None], low_threshold, high_threshold)[0]


def _as_labels(edge_maps: np.ndarray) -> torch.Tensor:
    """8-bit edge maps as eval_edge.py reads them: 255 -> 1, anything else stays (0 for our maps)."""
    labels = torch.tensor(edge_maps)
    labels[labels == EDGE] = 1
    return labels


def condition_f1(generated_edges: np.ndarray, condition: np.ndarray) -> float:
    """ControlNet++'s F1 of one condition: BinaryF1Score of its generated edge maps (K, H, W) uint8 flattened
    together against the condition (H, W) uint8 repeated K times (0 when neither has an edge)."""
    predicted = _as_labels(generated_edges)
    target = _as_labels(condition)[None].repeat(len(generated_edges), 1, 1)
    return float(BinaryF1Score()(predicted.flatten(), target.flatten()))


def condition_ssim_psnr(generated_edges: np.ndarray, condition: np.ndarray) -> tuple[float | None, float]:
    """eval_edge.py's MultiScaleSSIM (None for sides below MS_SSIM_MIN_SIDE, where torchmetrics refuses) and
    PSNR (an infinite one counted as 100) of the edge maps / 255 against the condition repeated."""
    predicted = torch.tensor(generated_edges)[:, None].float() / 255.0
    target = torch.tensor(condition)[None, None].float().repeat(len(predicted), 1, 1, 1)
    target = target / 255.0
    psnr = float(PeakSignalNoiseRatio(data_range=1.0)(predicted, target))
    if np.isinf(psnr):
        psnr = PSNR_OF_IDENTICAL
    ssim = None
    if min(condition.shape) >= MS_SSIM_MIN_SIDE:
        ssim = float(MultiScaleStructuralSimilarityIndexMeasure(data_range=1.0)(predicted, target))
    return ssim, psnr


class _ClipFeatures(torch.nn.Module):
    """A transformers CLIPModel as torchmetrics' CLIPScore calls it: get_image_features / get_text_features
    giving the projected embeddings as tensors (transformers 5 returns them in an output object's
    pooler_output, which torchmetrics 1.9 does not unwrap)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(output) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def _clip_loader(folder: str | os.PathLike):
    """torchmetrics' CLIPScore accepts a callable giving (model, processor): a local CLIP folder read by
    transformers (CLIPScore itself only takes hub names)."""
    from transformers import CLIPModel, CLIPProcessor

    def load():
        return _ClipFeatures(CLIPModel.from_pretrained(folder).eval()), CLIPProcessor.from_pretrained(folder)

    return load


@torch.no_grad()
def clip_score(images: np.ndarray, prompts: Sequence[str], clip_model: str | os.PathLike,
               progress: bool = False) -> float:
    """Their eval_clip.py: torchmetrics' CLIPScore (100 x the cosine of image and prompt embeddings) summed
    over every generated image with its prompt, divided by the number of images. images: (N, K, H, W, 3)
    uint8, prompts: N (each condition's K images share its prompt). clip_model: a local CLIP folder
    (config, weights, tokenizer and image processor files, e.g. openai/clip-vit-base-patch16 saved)."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    metric = CLIPScore(model_name_or_path=_clip_loader(clip_model))
    for group, prompt in tqdm(zip(images, prompts, strict=True), total=len(prompts), desc="CLIP score",
                              disable=not progress, leave=False):
        metric.update(torch.tensor(group).permute(0, 3, 1, 2), [prompt] * len(group))
    return float(metric.score / metric.n_samples)


@dataclass
class ControlNetPPReport:
    """The scores of one run of ControlNet++'s protocol, and what they were computed from.

    f1: the mean over conditions of `f1s` (one per condition, in `names` order); ssim / psnr: means of
    eval_edge.py's MultiScaleSSIM (None below 161 px) and PSNR; clip: CLIP score (None without a CLIP
    model). conditions (N, H, W), generated (N, K, H, W, 3), generated_edges (N, K, H, W): uint8.
    """

    f1: float
    f1s: list[float]
    ssim: float | None
    psnr: float
    settings: ProtocolSettings
    names: list[str]
    prompts: list[str]
    conditions: np.ndarray = field(repr=False)
    generated: np.ndarray = field(repr=False)
    generated_edges: np.ndarray = field(repr=False)
    clip: float | None = None
    protocol: str = PROTOCOL

    @property
    def sampler(self) -> str:
        return self.settings.sampler

    def summary(self) -> str:
        extras = f", edge PSNR {self.psnr:.2f}"
        if self.ssim is not None:
            extras += f", edge MS-SSIM {self.ssim:.3f}"
        if self.clip is not None:
            extras += f", CLIP score {self.clip:.2f}"
        return (f"ControlNet++ protocol ({self.protocol}): Canny F1 {self.f1:.4f} (kornia "
                f"{self.settings.low_threshold}/{self.settings.high_threshold}, mean over {len(self.f1s)} "
                f"conditions x {self.settings.images_per_prompt} images, {self.sampler} {self.settings.steps} "
                f"steps, guidance {self.settings.guidance_scale}){extras}; not comparable with the project "
                f"protocol's F1")

    def to_dict(self) -> dict:
        return {"protocol": self.protocol, "f1": self.f1, "sampler": self.sampler, "conditions": len(self.f1s),
                "f1_per_condition": dict(zip(self.names, self.f1s, strict=True)), "ssim": self.ssim,
                "psnr": self.psnr, "clip_score": self.clip, "settings": self.settings.to_dict()}


@torch.no_grad()
def generate(model: torch.nn.Module, conditions: np.ndarray, prompts: Sequence[str],
             settings: ProtocolSettings = ProtocolSettings(), progress: bool = True) -> np.ndarray:
    """`settings.images_per_prompt` images per condition from one `sample_images` call, as their eval.py's
    pipeline call: the prompt K times, the negative prompt, guidance, the control in both branches.
    conditions: (N, H, W) uint8 {0, 255}. Each condition's noise (K latents) is drawn in turn from one
    generator seeded with `settings.seed`. Returns (N, K, H, W, 3) uint8."""
    if len(conditions) != len(prompts):
        raise ValueError(f"{len(conditions)} conditions but {len(prompts)} prompts")
    count = settings.images_per_prompt
    height, width = conditions.shape[1:3]
    generator = torch.Generator().manual_seed(settings.seed)
    shape = (count, *latent_shape(model, height, width))
    generated = []
    for condition, prompt in tqdm(zip(conditions, prompts, strict=True), total=len(prompts), desc=PROTOCOL,
                                  unit="condition", disable=not progress):
        noise = torch.randn(shape, generator=generator)
        hint = torch.tensor(condition).float().div(255.0)[None, None].repeat(count, 3, 1, 1)
        generated.append(sample_images(model, hint, [prompt] * count, negative_prompt=settings.negative_prompt,
                                       steps=settings.steps, guidance_scale=settings.guidance_scale,
                                       noise=noise, sampler=settings.sampler))
    return np.stack(generated)



def score(conditions: np.ndarray, generated: np.ndarray, names: Sequence[str], prompts: Sequence[str],
          settings: ProtocolSettings = ProtocolSettings(), clip_model: str | os.PathLike | None = None,
          progress: bool = False) -> ControlNetPPReport:
    """Score generated images (N, K, H, W, 3) uint8 against their conditions (N, H, W) uint8 as ControlNet++
    does (edges with `kornia_edges`, `condition_f1` per condition, the mean)."""
    if generated.ndim != 5 or generated.shape[:1] + generated.shape[2:4] != conditions.shape:
        raise ValueError(f"generated images {generated.shape} do not match conditions {conditions.shape}")
    edges = np.stack([kornia_edges(group, settings.low_threshold, settings.high_threshold) for group in generated])
    f1s = [condition_f1(group, condition) for group, condition in zip(edges, conditions, strict=True)]
    ssims, psnrs = zip(*(condition_ssim_psnr(group, condition) for group, condition in
                         zip(edges, conditions, strict=True)), strict=True)
    ssim = None if ssims[0] is None else float(np.mean(ssims))
    clip = None if clip_model is None else clip_score(generated, prompts, clip_model, progress)
    return ControlNetPPReport(f1=float(np.mean(f1s)), f1s=f1s, ssim=ssim, psnr=float(np.mean(psnrs)),
                              settings=settings, names=list(names), prompts=list(prompts), conditions=conditions,
                              generated=generated, generated_edges=edges, clip=clip)


def evaluate_controlnetpp(model: torch.nn.Module, conditions: np.ndarray, prompts: Sequence[str],
                          names: Sequence[str] | None = None, settings: ProtocolSettings = ProtocolSettings(),
                          clip_model: str | os.PathLike | None = None, progress: bool = True) -> ControlNetPPReport:
    """Run ControlNet++'s Canny protocol on a ControlLDM: generate (`generate`) and score (`score`).
    conditions: (N, resolution, resolution) uint8 {0, 255} (e.g. `photo_condition` of held-out photos)."""
    if not len(conditions):
        raise ValueError("the ControlNet++ protocol needs at least one condition")
    if conditions.shape[1:] != (settings.resolution, settings.resolution):
        raise ValueError(f"conditions are {conditions.shape[1:]}, the settings' resolution is {settings.resolution}")
    names = [f"{index:05d}" for index in range(len(conditions))] if names is None else list(names)
    generated = generate(model, conditions, prompts, settings, progress)
    return score(conditions, generated, names, prompts, settings, clip_model, progress)
