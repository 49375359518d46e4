"""The attention backends compute the same function; gradient checkpointing changes no gradient."""

from __future__ import annotations

import pytest
import torch

from ldm.modules.attention import ATTENTION_KINDS, SpatialTransformer, attention


@pytest.mark.parametrize("slice_size", [1, 3, 16])
def test_backends_agree(slice_size):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 8, generator=gen) for n in (10, 7, 7))
    reference = attention(q, k, v, "math")
    for kind in ATTENTION_KINDS:
        torch.testing.assert_close(attention(q, k, v, kind, slice_size=slice_size), reference, atol=1e-6, rtol=1e-5)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="attention must be one of"):
        SpatialTransformer(32, 4, 8, context_dim=16, attention="flash")


@pytest.mark.parametrize("use_linear", [False, True])
def test_gradient_checkpointing_keeps_gradients(use_linear):
    torch.manual_seed(0)
    plain = SpatialTransformer(32, 4, 8, context_dim=16, use_linear=use_linear)
    for p in plain.proj_out.parameters():  # zero-initialised: give it values so gradients flow everywhere
        torch.nn.init.normal_(p, std=0.1)
    checkpointed = SpatialTransformer(32, 4, 8, context_dim=16, use_linear=use_linear, use_checkpoint=True)
    checkpointed.load_state_dict(plain.state_dict())
    x, context = torch.randn(2, 32, 4, 4), torch.randn(2, 5, 16)
    grads = []
    for module in (plain, checkpointed):
        module.zero_grad()
        module(x, context).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in module.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)
