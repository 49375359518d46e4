"""The UniPC sampler (ldm.models.diffusion.unipc) against diffusers' UniPCMultistepScheduler built from SD 1.5's
scheduler config, as ControlNet++'s evaluation builds it, and its use through cldm.sampling and inference.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler
from PIL import Image

import inference
from cldm.inference_loading import load_for_inference
from cldm.sampling import SAMPLERS, sample_images
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.unipc import UniPCSampler, UniPCSchedule, unipc_timesteps
from tests.reference import TINY_CONFIG, TINY_WEIGHTS, tiny_weights

SIZE = 64
# SD 1.5's scheduler_config.json (the keys UniPC reads; the rest are DDIM/PNDM's and ignored by it).
SD15_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "steps_offset": 1, "prediction_type": "epsilon",
                  "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True}
STEP_COUNTS = (1, 2, 3, 5, 10, 20)
# Ours computes its coefficients in float64 from alpha_bar, diffusers in float32 from sigma = sqrt((1-a)/a), so
# they agree to float32 rounding of the coefficients: measured at most 2.1e-6 (float64 samples) and 3.8e-6
# (float32) on samples of size up to 7. Both bounds are far tighter than the DDIM golden test's DDIM_ATOL
# (5e-4), and dropping the corrector moves the samples by far more (see the test for it).
FLOAT64_ATOL = 1e-5
FLOAT32_ATOL = 2e-5


def _scheduler(prediction_type: str = "epsilon") -> UniPCMultistepScheduler:
    return UniPCMultistepScheduler.from_config({**SD15_SCHEDULER, "prediction_type": prediction_type})


class ToyDenoiser:
    """A deterministic model output for a 4-channel latent: the exact eps (or v) of data ~ N(0, 0.5^2 I) plus a
    fixed small conv net's nonlinear term, so the multistep history and the corrector both matter."""

    def __init__(self, alphas_cumprod: torch.Tensor, parameterization: str):
        generator = torch.Generator().manual_seed(0)
        self.weight = torch.randn(4, 4, 3, 3, generator=generator, dtype=torch.float64) * 0.2
        self.alphas_cumprod = alphas_cumprod.double()
        self.parameterization = parameterization

    def __call__(self, x: torch.Tensor, t: int) -> torch.Tensor:
        a = float(self.alphas_cumprod[t])
        eps = (1 - a) ** 0.5 * x / (a * 0.25 + 1 - a)
        eps = eps + 0.3 * torch.tanh(torch.nn.functional.conv2d(x, self.weight.to(x.dtype), padding=1))
        eps = eps * (1 + 0.2 * np.sin(t / 150))
        if self.parameterization == "eps":
            return eps
        x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
        return a**0.5 * eps - (1 - a) ** 0.5 * x0  # v


def _diffusers_states(denoiser: ToyDenoiser, steps: int, x_t: torch.Tensor, **config) -> list[torch.Tensor]:
    """x_T and the sample after each of diffusers' UniPC steps, driven by `denoiser`."""
    prediction_type = "epsilon" if denoiser.parameterization == "eps" else "v_prediction"
    scheduler = UniPCMultistepScheduler.from_config({**SD15_SCHEDULER, "prediction_type": prediction_type, **config})
    scheduler.set_timesteps(steps)
    states = [x_t.clone()]
    for t in scheduler.timesteps:
        states.append(scheduler.step(denoiser(states[-1], int(t)), t, states[-1]).prev_sample)
    return states


def _diffusers_loop(denoiser: ToyDenoiser, steps: int, x_t: torch.Tensor) -> torch.Tensor:
    return _diffusers_states(denoiser, steps, x_t)[-1]


class _FunctionModel(torch.nn.Module):
    """The toy denoiser as the `apply_model` model UniPCSampler drives (conditioning ignored)."""

    def __init__(self, denoiser: ToyDenoiser):
        super().__init__()
        self.denoiser = denoiser
        self.parameterization = denoiser.parameterization
        self.register_buffer("alphas_cumprod", denoiser.alphas_cumprod.float())
        self.calls: list[int] = []

    def apply_model(self, x, t, cond, **kwargs):
        self.calls.append(int(t[0]))
        return self.denoiser(x, int(t[0]))


@pytest.fixture(scope="module")
def tiny_model():
    model, _ = load_for_inference(TINY_WEIGHTS, TINY_CONFIG)
    return model


def test_timesteps_are_diffusers_linspace_ones():
    scheduler = _scheduler()
    for steps in (*range(1, 61), 100, 250, 999, 1000):
        scheduler.set_timesteps(steps)
        assert torch.equal(unipc_timesteps(steps), scheduler.timesteps), steps
    assert unipc_timesteps(20)[:3].tolist() == [999, 949, 899]
    assert torch.equal(UniPCSchedule(scheduler.alphas_cumprod, 20).timesteps, unipc_timesteps(20))
    for bad in (0, 1001):
        with pytest.raises(ValueError, match="UniPC steps"):
            unipc_timesteps(bad)


@pytest.mark.parametrize("parameterization", ["eps", "v"])
@pytest.mark.parametrize("dtype, atol", [(torch.float64, FLOAT64_ATOL), (torch.float32, FLOAT32_ATOL)])
def test_sampler_matches_diffusers_unipc(parameterization, dtype, atol):
    """Same model function, same x_T: UniPCSampler's latents after every step (log_every_t=1) and its final
    ones are diffusers' at every step count, and the model is evaluated at diffusers' timesteps, once a step."""
    alphas_cumprod = _scheduler().alphas_cumprod
    denoiser = ToyDenoiser(alphas_cumprod, parameterization)
    model = _FunctionModel(denoiser)
    x_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    for steps in STEP_COUNTS:
        model.calls.clear()
        ours, inter = UniPCSampler(model).sample(steps, 2, (4, 8, 8), None, x_T=x_t, verbose=False, log_every_t=1)
        expected = _diffusers_states(denoiser, steps, x_t)
        assert ours.dtype == dtype
        torch.testing.assert_close(ours, expected[-1], atol=atol, rtol=0, msg=f"{steps} steps")
        torch.testing.assert_close(torch.stack(inter["x_inter"]), torch.stack(expected), atol=atol, rtol=0)
        assert model.calls == unipc_timesteps(steps).tolist()


def _hand_loop(denoiser: ToyDenoiser, schedule: UniPCSchedule, predictor: UniPCSchedule, x_t: torch.Tensor,
               corrector: bool) -> torch.Tensor:
    """UniPCSampler's loop written out over the schedule's steps, with the corrector optional and the predictor
    steps taken by another schedule (e.g. one of order 1)."""
    x, x_before, history = x_t, x_t, []
    for i in range(len(schedule)):
        pred_x0 = schedule.x0(denoiser(x, int(schedule.timesteps[i])), i, x)
        if i > 0 and corrector:
            x = schedule.update(x_before, i - 1, history, x0_next=pred_x0)
        history = [pred_x0, *history[:1]]
        x_before = x
        x = predictor.update(x, i, history)
    return x


def test_predictor_and_corrector_each_change_the_result():
    """The comparison with diffusers is sensitive to each part: without the corrector, or with a first-order
    predictor, the samples move far outside its tolerance (measured: 8e-3 and 7e-2 at 20 steps, 8e-2 and
    0.16 at 5), so a broken corrector or predictor fails it."""
    alphas_cumprod = _scheduler().alphas_cumprod
    denoiser = ToyDenoiser(alphas_cumprod, "eps")
    x_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for steps in (3, 5, 20):
        expected = _diffusers_loop(denoiser, steps, x_t)
        schedule = UniPCSchedule(alphas_cumprod, steps)
        first_order = UniPCSchedule(alphas_cumprod, steps, order=1)
        torch.testing.assert_close(_hand_loop(denoiser, schedule, schedule, x_t, True), expected,
                                   atol=FLOAT64_ATOL, rtol=0)
        assert (_hand_loop(denoiser, schedule, schedule, x_t, False) - expected).abs().max() > 50 * FLOAT32_ATOL
        assert (_hand_loop(denoiser, schedule, first_order, x_t, True) - expected).abs().max() > 50 * FLOAT32_ATOL


def test_higher_order_and_bh1_match_diffusers():
    """solver_order 3 (the Vandermonde solves) and 1, and B(h) = h ("bh1"), agree with diffusers configured
    alike. With bh1 diffusers' last step is NaN (B(h) = -inf times a zero sum when the final sigma is zero);
    ours returns the last x0 prediction there as with bh2, so bh1 is compared up to the last step."""
    alphas_cumprod = _scheduler().alphas_cumprod
    denoiser = ToyDenoiser(alphas_cumprod, "eps")
    model = _FunctionModel(denoiser)
    x_t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for order, solver_type in ((3, "bh2"), (1, "bh2"), (3, "bh1"), (2, "bh1")):
        expected = _diffusers_states(denoiser, 10, x_t, solver_order=order, solver_type=solver_type)
        ours, inter = UniPCSampler(model, order=order, solver_type=solver_type).sample(
            10, 1, (4, 8, 8), x_T=x_t, verbose=False, log_every_t=1)
        compared = len(expected) if solver_type == "bh2" else len(expected) - 1
        torch.testing.assert_close(torch.stack(inter["x_inter"][:compared]), torch.stack(expected[:compared]),
                                   atol=FLOAT64_ATOL, rtol=0, msg=f"order {order} {solver_type}")
        assert torch.equal(ours, inter["pred_x0"][-1])


def test_guidance_and_control_scales_reach_the_model_as_in_ddim(tiny_model):
    """One UniPC step evaluates the model once at t = 999: its x0 prediction is that of the guided output
    uncond + 5 (cond - uncond), both branches with the call's control_scales. Two calls (batch_cfg=False) are
    the reference's own calls; one batch of 2 agrees to float rounding, which x0 = (x - sqrt(1 - a) eps) /
    sqrt(a) amplifies 15-fold at t = 999 (sqrt(a) = 0.068)."""
    generator = torch.Generator().manual_seed(3)
    hints = torch.rand(1, 3, SIZE, SIZE, generator=generator)
    x_t = torch.randn(1, 4, 8, 8, generator=generator)
    cond = {"c_concat": [hints], "c_crossattn": [tiny_model.get_learned_conditioning(["a bird"])]}
    uncond = {"c_concat": [hints], "c_crossattn": [tiny_model.get_learned_conditioning([""])]}
    t = torch.tensor([999])
    out_c = tiny_model.apply_model(x_t, t, cond, control_scales=0.5)
    out_u = tiny_model.apply_model(x_t, t, uncond, control_scales=0.5)
    expected = tiny_model.predict_start(x_t, t, out_u + 5.0 * (out_c - out_u))
    for batch_cfg, atol in ((False, 1e-5), (True, 3e-4)):
        seen = []
        UniPCSampler(tiny_model, batch_cfg=batch_cfg).sample(
            1, 1, (4, 8, 8), cond, x_T=x_t, unconditional_guidance_scale=5.0, unconditional_conditioning=uncond,
            control_scales=0.5, verbose=False, img_callback=lambda pred_x0, i, seen=seen: seen.append(pred_x0))
        torch.testing.assert_close(seen[0], expected, atol=atol, rtol=1e-5)
    seen = []
    UniPCSampler(tiny_model, batch_cfg=False).sample(
        1, 1, (4, 8, 8), cond, x_T=x_t, unconditional_guidance_scale=5.0, unconditional_conditioning=uncond,
        control_scales=1.0, verbose=False, img_callback=lambda pred_x0, i: seen.append(pred_x0))
    assert (seen[0] - expected).abs().max() > 1e-3  # another control strength is another output


def test_sample_images_with_unipc(tiny_model):
    """sampler="unipc" on the tiny ControlLDM: deterministic for fixed noise, control strength honoured (0 vs
    1), guidance changes the images, and it samples differently from DDIM."""
    generator = torch.Generator().manual_seed(4)
    hints = torch.rand(1, 3, SIZE, SIZE, generator=generator)
    noise = torch.randn(1, 4, 8, 8, generator=generator)
    common = {"noise": noise, "steps": 3, "sampler": "unipc", "guidance_scale": 5.0}
    full = sample_images(tiny_model, hints, ["a"], control_scales=1.0, **common)
    assert full.shape == (1, SIZE, SIZE, 3) and full.dtype == np.uint8
    assert np.array_equal(full, sample_images(tiny_model, hints, ["a"], control_scales=1.0, **common))
    assert not np.array_equal(full, sample_images(tiny_model, hints, ["a"], control_scales=0.0, **common))
    unguided = sample_images(tiny_model, hints, ["a"], control_scales=1.0, **{**common, "guidance_scale": 1.0})
    assert not np.array_equal(unguided, full)
    ddim = sample_images(tiny_model, hints, ["a"], control_scales=1.0, **{**common, "sampler": "ddim"})
    assert not np.array_equal(ddim, full)


def test_sample_images_unipc_latents_are_the_samplers(tiny_model, monkeypatch):
    """sample_images(sampler="unipc") decodes exactly what UniPCSampler.sample returns for its arguments."""
    captured = {}
    real = UniPCSampler.sample

    def recording(self, *args, **kwargs):
        captured["latents"], inter = real(self, *args, **kwargs)
        captured["kwargs"] = kwargs
        return captured["latents"], inter

    monkeypatch.setattr(UniPCSampler, "sample", recording)
    monkeypatch.setattr(DDIMSampler, "sample", lambda *a, **k: pytest.fail("DDIM ran for sampler='unipc'"))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    hints = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(6))
    images = sample_images(tiny_model, hints, ["a"], noise=noise, steps=3, guidance_scale=3.0, sampler="unipc")
    assert captured["kwargs"]["unconditional_guidance_scale"] == 3.0 and captured["kwargs"]["eta"] == 0
    decoded = tiny_model.decode_first_stage(captured["latents"])
    assert np.array_equal(images, (decoded * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8)
                          .permute(0, 2, 3, 1).numpy())


def test_unknown_samplers_and_unipc_eta_are_refused(tiny_model):
    assert SAMPLERS == ("ddim", "unipc")
    noise = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="sampler must be one of ddim, unipc, got 'euler'"):
        sample_images(tiny_model, None, ["a"], noise=noise, sampler="euler")
    with pytest.raises(ValueError, match="eta=0.5 is DDIM's"):
        sample_images(tiny_model, None, ["a"], noise=noise, sampler="unipc", eta=0.5)
    with pytest.raises(ValueError, match="eta must be 0"):
        UniPCSampler(tiny_model).sample(2, 1, (4, 8, 8), eta=0.1, verbose=False)
    with pytest.raises(NotImplementedError, match="UniPCSampler.sample: mask="):
        UniPCSampler(tiny_model).sample(2, 1, (4, 8, 8), mask=torch.ones(1, 1, 8, 8), verbose=False)
    with pytest.raises(ValueError, match="solver_type"):
        UniPCSampler(tiny_model, solver_type="bh3")
    with pytest.raises(ValueError, match="3 scales for 2 UniPC steps"):
        UniPCSampler(tiny_model).sample(2, 1, (4, 8, 8), ucg_schedule=[1.0, 2.0, 3.0], verbose=False)


def test_intermediates_and_callbacks_follow_ddims_contract():
    steps = []
    model = _FunctionModel(ToyDenoiser(_scheduler().alphas_cumprod, "eps"))
    samples, inter = UniPCSampler(model).sample(5, 1, (4, 8, 8), None, x_T=torch.ones(1, 4, 8, 8), verbose=False,
                                                log_every_t=2, callback=steps.append)
    assert steps == list(range(5))
    # x_T, then after step 0 and every step whose countdown index (4, 2, 0) is a multiple of 2
    assert len(inter["x_inter"]) == len(inter["pred_x0"]) == 1 + 3
    assert torch.equal(inter["x_inter"][-1], samples)
    # the last step lands on the final x0 prediction (diffusers' final sigma "zero")
    assert torch.equal(inter["pred_x0"][-1], samples)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("unipc_inference")
    edges = np.zeros((SIZE, SIZE), np.uint8)
    edges[16, 8:56] = edges[48, 8:56] = edges[16:49, 8] = 255
    Image.fromarray(edges).save(root / "edges.png")
    from cldm.model import load_config

    ckpt = root / "last.ckpt"
    torch.save({"state_dict": tiny_weights(), "global_step": 1, "epoch": 0,
                "hyper_parameters": {"model_config": load_config(TINY_CONFIG)["model"]}}, ckpt)
    return ckpt, root / "edges.png"


def test_inference_writes_unipc_images(checkpoint, tmp_path):
    ckpt, edges = checkpoint
    common = ["--ckpt", str(ckpt), "--hint", str(edges), "--resolution", str(SIZE), "--steps", "3", "--seed", "7",
              "--device", "cpu"]
    assert inference.main([*common, "--sampler", "unipc", "--output", str(tmp_path / "unipc")]) == 0
    assert inference.main([*common, "--output", str(tmp_path / "ddim")]) == 0
    unipc = np.asarray(Image.open(tmp_path / "unipc" / "seed7_sample0.png"))
    ddim = np.asarray(Image.open(tmp_path / "ddim" / "seed7_sample0.png"))
    assert unipc.shape == (SIZE, SIZE, 3) and (tmp_path / "unipc" / "seed7_grid.png").is_file()
    assert not np.array_equal(unipc, ddim)


@pytest.mark.parametrize("argv, fragment", [
    (["--sampler", "euler"], "invalid choice: 'euler'"),
    (["--sampler", "unipc", "--eta", "0.5"], "--eta 0.5 is DDIM's"),
])
def test_inference_refuses_bad_sampler_arguments(checkpoint, tmp_path, capsys, argv, fragment):
    ckpt, edges = checkpoint
    with pytest.raises(SystemExit) as exit_info:
        inference.main(["--ckpt", str(ckpt), "--hint", str(edges), "--output", str(tmp_path / "out"), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()

