"""DBAE.loss on the fused Triton path equals the reference loss on the same noise.

Without CUDA the Triton kernels run on the CPU through the interpreter (TRITON_INTERPRET=1,
set before triton is first imported, only then: under pytest-xdist every test module is
imported into each worker, and an interpreter switch set here would turn inductor's own
kernels in other tests into interpreted ones). With CUDA the test runs on the GPU.
``DBAE_KERNELS=triton`` forces the fused path, which ``auto`` only takes on CUDA.
"""

from __future__ import annotations

import os

import torch  # noqa: E402  (torch does not import triton)

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before dbae.kernels / triton are imported

import pytest  # noqa: E402

from dbae.config import get_preset  # noqa: E402
from dbae.model import DBAE, fused_training  # noqa: E402

pytest.importorskip("triton", reason="the fused training path needs triton")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _reference_loss(model: DBAE, x0: torch.Tensor, seed: int, eps: torch.Tensor) -> torch.Tensor:
    """The loss of SPEC 5 written out with the reference pieces and a given eps."""
    g = torch.Generator(x0.device).manual_seed(seed)
    z = model.encode(x0, sample=True, generator=g)
    x_T = model.endpoint(z)
    t = model.bridge.sample_t(x0.shape[0], generator=g, device=x0.device)
    x_t = model.bridge.marginal_sample(x0, x_T, t, eps)
    D = model.denoise(x_t, t, x_T, z)
    weight = model.bridge.loss_weight(t.to(torch.float64)).float()
    return (weight * ((D - x0) ** 2).flatten(1).mean(1)).mean()


def test_auto_never_uses_the_interpreter_on_cpu(monkeypatch):
    monkeypatch.setenv("DBAE_KERNELS", "auto")
    assert not fused_training(torch.device("cpu"))
    monkeypatch.setenv("DBAE_KERNELS", "reference")
    assert not fused_training(torch.device("cpu"))


def test_fused_loss_and_gradients_match_reference(monkeypatch, no_tf32):
    from dbae.kernels import bridge_noise

    # no_tf32: plain float32 convolutions on CUDA, TF32 would round the two paths' inputs differently
    torch.manual_seed(0)
    model = DBAE(get_preset("tiny16").model)
    for p in model.unet.out.parameters():  # give the zero-initialised output conv some weight
        torch.nn.init.normal_(p, std=0.05)
    model = model.to(DEVICE)
    x0 = (torch.rand(3, 3, 16, 16) * 2 - 1).to(DEVICE)
    seed, noise_seed = 7, 12345

    monkeypatch.setenv("DBAE_KERNELS", "triton")
    assert fused_training(x0.device)
    fused = model.loss(x0, generator=torch.Generator(DEVICE).manual_seed(seed), noise_seed=noise_seed).loss
    fused.backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    eps = bridge_noise(x0.shape, noise_seed, DEVICE)  # the kernels' own Philox noise

    monkeypatch.setenv("DBAE_KERNELS", "reference")
    expected = _reference_loss(model, x0, seed, eps)
    expected.backward()
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(fused_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    # The decoder is trained through x_T on the fused path too.
    assert all(fused_grads[n].abs().sum() > 0 for n in fused_grads if n.startswith("decoder."))
