"""cldm.sampling (the one image-generation path) and the DDIM sampler's contract: per-call control
strength, the v step, the original's arguments that are refused rather than ignored."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

import inference
from cldm.hint import hint_tensor
from cldm.inference_loading import load_for_inference
from cldm.sampling import latent_shape, sample_images
from evaluation.fidelity import control_fidelity
from ldm.models.diffusion.ddim import DDIMSampler, DDIMSchedule
from tests.reference import TINY_CONFIG, TINY_WEIGHTS

REPO = Path(__file__).resolve().parent.parent
SIZE = 64
# Where the control_scales attribute may be written: the model that owns it.
OWNER = Path("cldm/cldm.py")
NOT_LIBRARY = {"tests", "notebooks", "docs", "models"}


@pytest.fixture(scope="module")
def tiny_model():
    model, _ = load_for_inference(TINY_WEIGHTS, TINY_CONFIG)
    return model


@pytest.fixture(scope="module")
def edges() -> np.ndarray:
    edge_map = np.zeros((SIZE, SIZE, 3), np.uint8)
    edge_map[16, 8:56] = edge_map[48, 8:56] = edge_map[16:49, 8] = 255
    return edge_map


def test_v_step_equals_the_models_conversion(tiny_model):
    """The schedule's own v -> (eps, x0) gives the step the sampler took with the model's conversion."""
    generator = torch.Generator().manual_seed(0)
    schedule = DDIMSchedule(tiny_model.alphas_cumprod, 4, eta=0.5)
    x, v, z = (torch.randn(2, 4, 8, 8, generator=generator) for _ in range(3))
    for index in range(len(schedule)):
        t = torch.full((2,), int(schedule.timesteps[index]), dtype=torch.long)
        eps = tiny_model.predict_eps_from_z_and_v(x, t, v)
        x0 = tiny_model.predict_start_from_z_and_v(x, t, v)
        a_prev, sigma = float(schedule.alphas_prev[index]), float(schedule.sigmas[index])
        expected = a_prev**0.5 * x0 + (1 - a_prev - sigma**2) ** 0.5 * eps + sigma * z
        x_prev, pred_x0 = schedule.step(v, index, x, "v", noise=z)
        torch.testing.assert_close(pred_x0, x0, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x_prev, expected, atol=1e-5, rtol=1e-5)
        # eps and x0 parameterisations of the same prediction take the same step
        torch.testing.assert_close(schedule.step(eps, index, x, "eps", noise=z)[0], expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(schedule.step(x0, index, x, "x0", noise=z)[0], expected, atol=1e-4, rtol=1e-4)


def test_the_originals_unsupported_arguments_are_refused(tiny_model):
    sampler = DDIMSampler(tiny_model)
    cond = {"c_crossattn": [tiny_model.get_learned_conditioning(["a"])], "c_concat": [torch.zeros(1, 3, SIZE, SIZE)]}
    latent = (4, SIZE // 8, SIZE // 8)
    for name, value in (("mask", torch.ones(1, 1, 8, 8)), ("x0", torch.zeros(1, *latent)), ("temperature", 0.5),
                        ("noise_dropout", 0.1), ("quantize_x0", True), ("dynamic_threshold", 0.9)):
        with pytest.raises(NotImplementedError, match=name):
            sampler.sample(1, 1, latent, cond, verbose=False, **{name: value})
    with pytest.raises(TypeError):
        sampler.sample(1, 1, latent, cond, verbose=False, inpaint=True)
    with pytest.raises(NotImplementedError, match="schedule"):
        DDIMSampler(tiny_model, schedule="cosine")
    with pytest.raises(TypeError):
        DDIMSampler(tiny_model, device="cuda")
    # the defaults, given explicitly as the original's scripts do, sample
    seen = []
    samples, _ = sampler.sample(2, 1, latent, cond, verbose=False, mask=None, x0=None, temperature=1.0,
                                noise_dropout=0.0, quantize_x0=False, img_callback=lambda x0, i: seen.append(i))
    assert samples.shape == (1, *latent) and seen == [0, 1]


def test_inference_and_fidelity_write_the_same_pixels(tiny_model, edges):
    """Same noise (seed), prompt and hint: inference.generate and control_fidelity share one path."""
    generated = inference.generate(tiny_model, edges, "a box", a_prompt="", n_prompt="", num_samples=1, steps=2,
                                   scale=3.0, seed=5, progress=False)
    report = control_fidelity(tiny_model, [(edges, "a box")], ddim_steps=2, guidance_scale=3.0, seed=5,
                              progress=False)
    assert np.array_equal(np.asarray(generated[0]), report.generated[0])


def test_per_call_control_scales_equal_the_attribute_and_leave_it(tiny_model, edges):
    hints = hint_tensor(edges, 2)
    noise = torch.randn((2, *latent_shape(tiny_model, SIZE, SIZE)), generator=torch.Generator().manual_seed(1))
    common = dict(steps=2, guidance_scale=3.0, noise=noise)
    default = sample_images(tiny_model, hints, ["a", "b"], **common)
    per_call = sample_images(tiny_model, hints, ["a", "b"], control_scales=0.3, **common)
    assert tiny_model.control_scales == [1.0] * tiny_model.control_model.num_controls
    try:
        tiny_model.control_scales = [0.3] * tiny_model.control_model.num_controls  # the original's way
        by_attribute = sample_images(tiny_model, hints, ["a", "b"], **common)
    finally:
        tiny_model.control_scales = [1.0] * tiny_model.control_model.num_controls
    assert np.array_equal(per_call, by_attribute)
    assert not np.array_equal(per_call, default)
    # precomputed text contexts (a latent cache's) give what the prompts give
    contexts = tiny_model.get_learned_conditioning(["a", "b"])
    empty = tiny_model.get_learned_conditioning(["", ""])
    assert np.array_equal(sample_images(tiny_model, hints, contexts, negative_prompt=empty, **common), default)


def control_scales_assignments(source: str) -> list[int]:
    """Lines of `source` that assign an attribute named control_scales (=, +=, annotated, setattr)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr"
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)):
            if node.args[1].value == "control_scales":
                lines.append(node.lineno)
        for target in targets:
            for part in ast.walk(target):
                if isinstance(part, ast.Attribute) and part.attr == "control_scales":
                    lines.append(node.lineno)
    return lines


def test_the_scan_finds_assignments():
    source = ("m.control_scales = [1]\na, m.control_scales = 1, 2\nm.control_scales += [0]\n"
              "setattr(m, 'control_scales', 1)\n")
    assert control_scales_assignments(source) == [1, 2, 3, 4]
    assert control_scales_assignments("x = m.control_scales\nf(control_scales=0.5)\n") == []


def test_control_strength_is_never_model_state():
    """Only the model that owns it writes `control_scales`: everyone else passes strength per call."""
    files = [path for path in REPO.rglob("*.py")
             if not any(part.startswith(".") for part in path.relative_to(REPO).parts)
             and path.relative_to(REPO).parts[0] not in NOT_LIBRARY and path.relative_to(REPO) != OWNER]
    assert len(files) > 20 and REPO / "inference.py" in files
    offenders = [f"{path.relative_to(REPO)}:{line}" for path in files
                 for line in control_scales_assignments(path.read_text(encoding="utf-8"))]
    assert not offenders, f"control_scales assigned outside {OWNER}: {offenders}"
