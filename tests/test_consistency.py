"""ControlNet++'s consistency reward per control type (annotator.consistency): for every type with one, the loss is
(B,) float32 and finite, about 0 for the image its label was made from and larger for another image, its gradient
reaches the images, and autocast (bf16) changes nothing; the extractors match what made the control images
(Kornia's Canny, cv2's pyramid, the image processors, the annotators' own models); types without a reward are
refused by name. Model-based types use tiny random models in the released formats."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from annotator.consistency import (
    CONSISTENCY_TYPES,
    build_consistency_loss,
    canny_magnitude,
    hint_classes,
    palette_lookup,
    processor_inputs,
    seg_loss,
    segmentation_logits,
    tile_degrade,
)
from annotator.controls import CONTROL_TYPES, ControlSettingsError, TileSettings, get_control, hint_values
from annotator.models import load_annotator
from annotator.segmentation import ADE20K_PALETTE, classes_of, colour_classes
from bench.control_types import write_hed_weights, write_tiny_depth_model, write_tiny_seg_model
from tests.image_cases import photo

SIDE = 64
SEG_CONFIDENCE = 1000.0  # the classifier's weights are scaled so that its argmax has probability ~1


def _reinitialise(network: torch.nn.Module, seed: int) -> None:
    """Kaiming weights, zero biases: the tiny models' default initialisation predicts depths of about 1e-9, which
    no normalisation can tell apart; these give DPT-like ranges (hundreds)."""
    torch.manual_seed(seed)
    for module in network.modules():
        if isinstance(module, torch.nn.Conv2d | torch.nn.ConvTranspose2d | torch.nn.Linear):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)


@pytest.fixture(scope="module")
def depth_model(tmp_path_factory) -> Path:
    from transformers import DPTForDepthEstimation

    folder = write_tiny_depth_model(tmp_path_factory.mktemp("dpt"))
    network = DPTForDepthEstimation.from_pretrained(folder)
    _reinitialise(network, seed=0)
    network.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def seg_model(tmp_path_factory) -> Path:
    from transformers import SegformerForSemanticSegmentation

    folder = write_tiny_seg_model(tmp_path_factory.mktemp("segformer"))
    network = SegformerForSemanticSegmentation.from_pretrained(folder)
    _reinitialise(network, seed=1)
    with torch.no_grad():
        network.decode_head.classifier.weight.mul_(SEG_CONFIDENCE)
    network.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hed_weights(tmp_path_factory) -> Path:
    torch.manual_seed(2)
    return write_hed_weights(tmp_path_factory.mktemp("hed") / "ControlNetHED.pth")


@pytest.fixture(scope="module")
def models(depth_model, seg_model, hed_weights) -> dict[str, str | None]:
    return {"depth": str(depth_model), "normal": str(depth_model), "seg": str(seg_model),
            "softedge": str(hed_weights)}


def _tensor(images: list[np.ndarray]) -> torch.Tensor:
    """Control images or photos -> (B, 3, H, W) float32, as the ControlNet's hints are made (hint_values)."""
    return torch.stack([torch.from_numpy(hint_values(image)).permute(2, 0, 1) for image in images])


def _hints(name: str, photos: list[np.ndarray], model: str | None) -> torch.Tensor:
    """The control images of `photos`, made by the type's own annotator, as hints."""
    control = get_control(name)
    settings = TileSettings(noise=0.0) if name == "tile" else control.settings_from()
    if control.model_based:
        return _tensor(load_annotator(control, settings, model)(photos))
    return _tensor([control.annotate(image, settings, f"photo{index}") for index, image in enumerate(photos)])


PHOTOS = [photo(SIDE, SIDE, seed=seed) for seed in range(4)]


def test_the_registry_says_which_types_have_a_reward():
    assert set(CONSISTENCY_TYPES) == {"canny", "tile", "inpaint", "depth", "normal", "seg", "softedge"}
    for control in CONTROL_TYPES.values():
        assert control.consistency.description and "\n" not in control.consistency.description
        assert control.consistency.differentiable == (control.name in CONSISTENCY_TYPES)


@pytest.mark.parametrize("name", [name for name in CONTROL_TYPES if name not in CONSISTENCY_TYPES])
def test_a_type_without_a_reward_is_refused_naming_those_with_one(name):
    control = get_control(name)
    with pytest.raises(ControlSettingsError, match=rf"control '{name}' has no differentiable consistency reward") \
            as caught:
        build_consistency_loss(control, control.settings_from(), None, "cpu")
    assert f"the types with one: {', '.join(CONSISTENCY_TYPES)}" in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("name", CONSISTENCY_TYPES)
def test_the_loss_is_zero_for_its_own_image_and_larger_for_another(name, models):
    control = get_control(name)
    settings = TileSettings(noise=0.0) if name == "tile" else control.settings_from()
    loss = build_consistency_loss(control, settings, models.get(name), "cpu")
    source, other = _tensor(PHOTOS[:2]), _tensor(PHOTOS[2:])
    hints = _hints(name, PHOTOS[:2], models.get(name))
    images = source.clone().requires_grad_(True)
    own = loss(images, hints, source)
    assert own.shape == (2,) and own.dtype == torch.float32 and torch.isfinite(own).all()
    different = loss(other, hints, source)
    if name == "seg":  # a cross entropy: the hint's classes are the argmax, the lowest loss the hint allows
        assert (own < different).all(), (own, different)
    else:  # an MSE; what is left is the control image's rounding to uint8
        assert (own < 2e-5).all(), own
        assert (different > 10 * own + 1e-4).all(), (own, different)

    perturbed = (source + 0.05 * torch.randn_like(source, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    images = perturbed.requires_grad_(True)
    loss(images, hints, source).sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


@pytest.mark.parametrize("name", CONSISTENCY_TYPES)
def test_autocast_changes_nothing_and_bf16_images_get_finite_gradients(name, models):
    control = get_control(name)
    loss = build_consistency_loss(control, control.settings_from(), models.get(name), "cpu")
    source, other = _tensor(PHOTOS[:2]), _tensor(PHOTOS[2:])
    hints = _hints(name, PHOTOS[:2], models.get(name))
    plain = loss(other, hints, source)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = loss(other, hints, source)
        images = other.to(torch.bfloat16).requires_grad_(True)
        half = loss(images, hints.to(torch.bfloat16), source.to(torch.bfloat16))
    assert autocast.dtype == torch.float32 and torch.equal(autocast, plain)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    half.sum().backward()
    assert images.grad.dtype == torch.bfloat16 and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ canny


def test_canny_compares_kornia_magnitudes_of_the_images_and_the_photo():
    import kornia

    images, references = _tensor(PHOTOS[:2]), _tensor(PHOTOS[2:])
    magnitude = kornia.filters.canny(images, 0.1, 0.2)[0]
    assert torch.allclose(canny_magnitude(images), magnitude, atol=1e-6, rtol=0)
    expected = (magnitude - kornia.filters.canny(references, 0.1, 0.2)[0]).square().mean(dim=(1, 2, 3))
    loss = build_consistency_loss(get_control("canny"), None, None, "cpu")
    hints = _hints("canny", PHOTOS[:2], None)
    assert torch.allclose(loss(images, hints, references), expected, atol=1e-6, rtol=0)
    assert torch.equal(loss(images, hints, references), loss(images, torch.zeros_like(hints), references))


# ------------------------------------------------------------------------------------------ tile and inpaint


@pytest.mark.parametrize("level,size", [(1, (64, 64)), (3, (70, 53)), (6, (64, 96))])
def test_tile_degradation_is_opencvs_pyramid(level, size):
    image = np.random.default_rng(level).random((*size, 3), dtype=np.float32)
    expected = image
    for _ in range(level):
        expected = cv2.pyrDown(expected)
    for _ in range(level):
        expected = cv2.pyrUp(expected)
    expected = cv2.resize(expected, size[::-1], interpolation=cv2.INTER_LINEAR)
    got = tile_degrade(torch.from_numpy(image).permute(2, 0, 1)[None], TileSettings(level=level))
    assert np.abs(got[0].permute(1, 2, 0).numpy() - expected).max() < 1e-5


def test_a_noisy_tile_hint_costs_only_a_constant():
    """The hint's noise is left out of the degradation: for the source image the loss is the noise's own
    mean square (what the noisy hint differs from the noise-free one by), and other images score higher."""
    loss = build_consistency_loss(get_control("tile"), TileSettings(), None, "cpu")
    control = get_control("tile")
    noisy, clean = (_tensor([control.annotate(image, TileSettings(noise=noise), f"p{index}")
                             for index, image in enumerate(PHOTOS[:2])]) for noise in (16.0, 0.0))
    source, other = _tensor(PHOTOS[:2]), _tensor(PHOTOS[2:])
    own = loss(source, noisy, source)
    assert torch.allclose(own, (noisy - clean).square().mean(dim=(1, 2, 3)), rtol=0.05, atol=0)
    assert (own < loss(other, noisy, source)).all()


def test_inpaint_scores_only_the_unmasked_pixels():
    loss = build_consistency_loss(get_control("inpaint"), None, None, "cpu")
    source = _tensor(PHOTOS[:2])
    hints = _hints("inpaint", PHOTOS[:2], None)
    masked = (hints == -1).all(dim=1, keepdim=True)
    assert masked.any() and not masked.all()
    repainted = torch.where(masked, torch.rand_like(source), source)
    assert (loss(repainted, hints, source) < 2e-5).all()
    assert (loss(1 - source, hints, source) > 0.01).all()
    assert torch.equal(loss(source, torch.full_like(hints, -1.0), source), torch.zeros(2))


# ------------------------------------------------------------------------------------------ model-based


@pytest.mark.parametrize("processor_kind", ["segformer", "dpt-square", "depth-anything"])
def test_the_image_processor_is_reproduced_in_torch(processor_kind, seg_model, depth_model):
    from transformers import AutoImageProcessor, DPTImageProcessor

    if processor_kind == "depth-anything":  # Depth Anything V2's processor: aspect kept, multiples of 14
        processor = DPTImageProcessor(size={"height": 70, "width": 70}, keep_aspect_ratio=True, ensure_multiple_of=14,
                                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    else:
        processor = AutoImageProcessor.from_pretrained(seg_model if processor_kind == "segformer" else depth_model)
    photos = [photo(96, 64, seed=5), photo(96, 64, seed=6)]
    expected = processor(images=[Image.fromarray(image) for image in photos], return_tensors="pt")["pixel_values"]
    got = processor_inputs(processor, _tensor(photos))
    assert got.shape == expected.shape
    # the processor resizes the uint8 photo and rounds; ours resizes floats
    assert (got - expected).abs().max() < 0.05


def test_seg_reads_the_hint_colours_back_to_classes():
    classes = np.arange(150).reshape(10, 15)
    colours = colour_classes(classes)
    colours[0, 0] = (1, 2, 3)  # not in the palette
    colours[0, 1] = (ADE20K_PALETTE[3].astype(int) + ADE20K_PALETTE[4]) // 2  # a blend from resizing
    got = hint_classes(_tensor([colours]), palette_lookup(torch.device("cpu")))[0].numpy()
    assert np.array_equal(got, classes_of(colours))
    assert got[0, 0] == -1 and got[0, 1] == -1
    assert got.flat[48] == 6  # ADE20K's classes 6 and 48 share one grey: it reads as the first


class _FixedLogits(torch.nn.Module):
    """A stand-in segmentation model: logits as given, whatever the image (plus the image's mean, so that the
    gradient has a path)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.logits + 0 * pixel_values.mean())


def test_seg_scores_a_shared_colour_by_both_classes_and_ignores_unknown_colours():
    no_processing = SimpleNamespace(do_resize=False, do_rescale=False, do_normalize=False)
    logits = torch.full((1, 150, 4, 4), -50.0)
    logits[:, 6] = logits[:, 48] = 10.0  # half the probability each
    grey = np.broadcast_to(ADE20K_PALETTE[6], (4, 4, 3)).copy()
    grey[0, 0] = (1, 2, 3)  # ignored
    images = torch.rand(1, 3, 4, 4)
    lookup = palette_lookup(torch.device("cpu"))
    loss = seg_loss(no_processing, _FixedLogits(logits), lookup, images, _tensor([grey]), images)
    assert loss.item() < 1e-6  # log(2) if the grey stood for class 6 alone
    logits[:, 48] = -50.0
    loss = seg_loss(no_processing, _FixedLogits(logits), lookup, images, _tensor([grey]), images)
    assert loss.item() < 1e-6
    logits[:, 6], logits[:, 7] = -50.0, 10.0
    loss = seg_loss(no_processing, _FixedLogits(logits), lookup, images, _tensor([grey]), images)
    assert abs(loss.item() - (60.0 - math.log(2))) < 1e-3  # -log p(6 or 48), both at -50 against 10
    unlabelled = np.full((4, 4, 3), 3, dtype=np.uint8)
    assert seg_loss(no_processing, _FixedLogits(logits), lookup, images, _tensor([unlabelled]), images).item() == 0


def test_seg_is_zero_where_the_hint_is_the_models_own_argmax(seg_model):
    from annotator.segmentation import load_segmentation_model

    loss = build_consistency_loss(get_control("seg"), None, str(seg_model), "cpu")
    processor, network = load_segmentation_model(str(seg_model))
    images, other = _tensor(PHOTOS[:2]), _tensor(PHOTOS[2:])
    with torch.no_grad():
        logits = segmentation_logits(processor, network, images)
    factor = SIDE // logits.shape[-1]
    classes = logits.argmax(dim=1).repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2).numpy()
    assert len(np.unique(classes)) > 3  # the tiny model does not paint one class everywhere
    hints = _tensor([colour_classes(c) for c in classes])
    own, different = loss(images, hints, images), loss(other, hints, images)
    # what is left: the few pixels where the two likeliest classes are close even for the scaled classifier
    assert (own < 0.02).all() and (different > 50 * own).all(), (own, different)


def test_a_model_that_cannot_load_is_one_clear_error(tmp_path):
    for name in ("depth", "seg", "softedge"):
        with pytest.raises(ControlSettingsError) as caught:
            build_consistency_loss(get_control(name), None, str(tmp_path / "missing"), "cpu")
        assert "\n" not in str(caught.value) and "missing" in str(caught.value)
