"""The fused sampler (C++ steps of dbae.fused_step) against the reference sampler."""

from __future__ import annotations

import pytest
import torch

from dbae.config import get_preset
from dbae.model import DBAE
from dbae.sampling import steps_for_nfe


@pytest.fixture(scope="module")
def model() -> DBAE:
    torch.manual_seed(0)
    m = DBAE(get_preset("tiny16").model).eval()
    for p in m.unet.out.parameters():  # a non-zero network output, so D depends on F
        torch.nn.init.normal_(p, std=0.3)
    return m


def _both(model: DBAE, x: torch.Tensor, sampler: str, nfe: int, churn: float = 0.0, seed: int = 0):
    z = model.encode(x)
    x_T = model.endpoint(z)
    steps = steps_for_nfe(nfe, sampler, churn)

    def denoise(xt, t):
        return model.denoise(xt, t, x_T, z).clamp(-1, 1)

    def network(xt, t):
        return model.network_output(xt, t, x_T, z)

    gen = torch.Generator().manual_seed(seed)
    ref = model.sampler.sample(denoise, x_T, steps=steps, sampler=sampler, churn=churn, generator=gen)
    fused = model.sampler.sample_fused(network, x_T, steps=steps, sampler=sampler, churn=churn, seed=seed)
    return ref, fused


@pytest.mark.parametrize("sampler,nfe", [("euler", 1), ("euler", 6), ("heun", 1), ("heun", 7)])
@torch.no_grad()
def test_fused_ode_sampler_matches_reference(model, sampler, nfe):
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    ref, fused = _both(model, x, sampler, nfe)
    assert fused.nfe == ref.nfe == nfe
    # float32 everywhere; the first step near T has drift scalars of order 1e3-1e4 whose
    # cancellation costs a few float32 ulps of x per step.
    torch.testing.assert_close(fused.images, ref.images, rtol=0, atol=2e-4)
    assert (fused.images - ref.images).abs().max() < 2e-4


@torch.no_grad()
def test_fused_churn_is_seeded_and_counts_nfe(model):
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    _, a = _both(model, x, "heun", 8, churn=0.3, seed=1)
    _, b = _both(model, x, "heun", 8, churn=0.3, seed=1)
    _, c = _both(model, x, "heun", 8, churn=0.3, seed=2)
    assert a.nfe == 8
    assert torch.equal(a.images, b.images)
    assert not torch.allclose(a.images, c.images)


@torch.no_grad()
def test_decode_uses_fused_path_and_agrees(model):
    z = torch.randn(2, 16)
    out = model.decode(z, nfe=5)
    x_T = model.endpoint(z)
    ref = model.sampler.sample(lambda xt, t: model.denoise(xt, t, x_T, z).clamp(-1, 1), x_T, steps=5)
    assert out.nfe == 5
    torch.testing.assert_close(out.images, ref.images.clamp(-1, 1), rtol=0, atol=2e-4)


@torch.no_grad()
def test_decode_without_clamp_agrees(model):
    z = torch.randn(2, 16)
    out = model.decode(z, nfe=4, clamp=False)
    x_T = model.endpoint(z)
    ref = model.sampler.sample(lambda xt, t: model.denoise(xt, t, x_T, z), x_T, steps=4)
    torch.testing.assert_close(out.images, ref.images, rtol=0, atol=2e-4)
