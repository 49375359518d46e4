"""Each speed / memory option keeps the training loss and the ControlNet's gradients (tiny model).

The reference is the fp32 step with SDPA attention and no checkpointing, whose loss is the original
code's (golden `loss`). Checked against it: every attention backend with and without gradient
checkpointing, channels-last, bf16 autocast with the locked parts stored in bf16 (as the benchmark and
the trainer run it), and the in-place residual adds of ControlledUnetModel (against an out-of-place sum).
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from cldm.model import create_model
from ldm.checkpoint import load_weights
from tests.reference import FORWARD_TOL, TINY_CONFIG, tiny_vectors, tiny_weights

# fp32 variants differ only in float summation order.
FP32_GRAD_TOL = {"atol": 1e-6, "rtol": 1e-4}
# bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%). Measured here: loss 7.5e-4 relative, the
# ControlNet gradient 3.5% relative (L2) with cosine 0.9995 to fp32; the bounds leave a few times that.
BF16_LOSS_RTOL = 5e-3
BF16_MAX_GRAD_ERROR = 0.1
BF16_MIN_GRAD_COSINE = 0.995


def _model(attention: str = "sdpa", use_checkpoint: bool = False) -> torch.nn.Module:
    model = create_model(TINY_CONFIG, attention=attention, use_checkpoint=use_checkpoint)
    load_weights(model, tiny_weights())
    model.train()
    model.model.requires_grad_(False)  # sd_locked: the UNet is frozen, only the ControlNet trains
    return model


def _cond(ref):
    return {"c_crossattn": [ref["context"]], "c_concat": [ref["hint"]]}


def _loss_and_grads(model, ref, autocast=None, z0=None, hint=None):
    """One training forward/backward at the golden inputs: (loss, {name: ControlNet gradient})."""
    model.control_model.zero_grad(set_to_none=True)
    cond = _cond(ref)
    if hint is not None:
        cond["c_concat"] = [hint]
    with autocast or nullcontext():
        loss, _ = model.p_losses(ref["z0"] if z0 is None else z0, cond, ref["t"], noise=ref["noise"])
    loss.backward()
    return loss.detach().float(), {n: p.grad.float().clone() for n, p in model.control_model.named_parameters()}


@pytest.fixture(scope="module")
def ref():
    return tiny_vectors()


@pytest.fixture(scope="module")
def fp32(ref):
    return _loss_and_grads(_model(), ref)


def _assert_grads_close(grads, expected, **tol):
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], **tol, msg=lambda m, name=name: f"{name}: {m}")


def test_fp32_reference_is_the_original_loss(fp32, ref):
    loss, grads = fp32
    torch.testing.assert_close(loss, ref["loss"], **FORWARD_TOL)
    # Gradients reach every ControlNet parameter (the tiny weights have no zero convs left).
    assert all(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("use_checkpoint", [False, True])
@pytest.mark.parametrize("attention", ["sdpa", "sliced", "math"])
def test_attention_and_checkpointing_keep_loss_and_gradients(attention, use_checkpoint, fp32, ref):
    model = _model(attention, use_checkpoint)
    loss, grads = _loss_and_grads(model, ref)
    torch.testing.assert_close(loss, fp32[0], **FORWARD_TOL)
    _assert_grads_close(grads, fp32[1], **FP32_GRAD_TOL)


def test_checkpointing_really_recomputes(ref):
    """With use_checkpoint the ControlNet's ResBlocks and transformer blocks run again in backward."""
    model = _model(use_checkpoint=True)
    resblock, transformer = model.control_model.input_blocks[1]
    inner = (resblock.in_layers, transformer.transformer_blocks[0].attn1)  # called inside the checkpoints
    calls = []
    for module in inner:
        module.register_forward_hook(lambda *_: calls.append(1))
    _loss_and_grads(model, ref)
    assert len(calls) == 2 * len(inner)


def test_channels_last_keeps_loss_and_gradients(fp32, ref):
    model = _model().to(memory_format=torch.channels_last)
    hint = ref["hint"].contiguous(memory_format=torch.channels_last)
    z0 = ref["z0"].contiguous(memory_format=torch.channels_last)
    loss, grads = _loss_and_grads(model, ref, z0=z0, hint=hint)
    torch.testing.assert_close(loss, fp32[0], **FORWARD_TOL)
    _assert_grads_close(grads, fp32[1], **FP32_GRAD_TOL)


def test_bf16_autocast_with_bf16_locked_parts_stays_close(fp32, ref):
    model = _model()
    for locked in (model.model, model.first_stage_model, model.cond_stage_model):
        locked.to(torch.bfloat16)
    loss, grads = _loss_and_grads(model, ref, autocast=torch.autocast("cpu", dtype=torch.bfloat16))
    assert all(p.dtype == torch.float32 for p in model.control_model.parameters())  # fp32 master weights
    torch.testing.assert_close(loss, fp32[0], rtol=BF16_LOSS_RTOL, atol=0.0)
    flat = torch.cat([g.flatten() for g in grads.values()])
    expected = torch.cat([g.flatten() for g in fp32[1].values()])
    assert (flat - expected).norm() / expected.norm() < BF16_MAX_GRAD_ERROR
    assert F.cosine_similarity(flat, expected, dim=0) > BF16_MIN_GRAD_COSINE


def test_in_place_residual_adds_match_out_of_place_sum(fp32, ref):
    """ControlledUnetModel adds the control residuals in place into the no-grad encoder outputs; an
    out-of-place composition of the same modules gives the same loss and gradients."""
    model = _model()
    unet, control_model = model.model.diffusion_model, model.control_model
    context, t, noise = ref["context"], ref["t"], ref["noise"]
    x_noisy = model.q_sample(ref["z0"], t, noise)
    control = control_model(x=x_noisy, hint=ref["hint"], timesteps=t, context=context)
    with torch.no_grad():
        h, skips, emb = unet.encode(x_noisy, t, context)
    h = h + control[-1]
    skips = [skip + residual for skip, residual in zip(skips, control[:-1], strict=True)]
    eps = unet.decode(h, skips, emb, context)
    loss = F.mse_loss(eps, noise)
    loss.backward()
    grads = {n: p.grad for n, p in control_model.named_parameters()}
    torch.testing.assert_close(loss.detach(), fp32[0], **FORWARD_TOL)
    _assert_grads_close(grads, fp32[1], **FP32_GRAD_TOL)
