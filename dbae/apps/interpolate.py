"""Latent interpolation (SPEC 8, the paper's Section 4.5 / Figure 6a).

z_lambda = (1 - lambda) z_1 + lambda z_2 with z_i = Enc(x_i) (the encoder mean), the
endpoint x_T = Dec(z_lambda), then the bridge sampler from x_T conditioned on z_lambda.
No ODE inversion is needed anywhere: both the latent and the endpoint come from
feed-forward passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import DBAE
from ..sampling import SamplerName

Tensor = torch.Tensor


@dataclass(frozen=True)
class InterpolationResult:
    """One interpolation per pair of inputs, ``P`` pairs, ``L`` values of lambda."""

    lambdas: Tensor  # (L,) float64, from 0 (first image) to 1 (second image)
    z: Tensor  # (P, L, d) interpolated latents
    x_T: Tensor  # (P, L, C, H, W) endpoints Dec(z_lambda)
    images: Tensor  # (P, L, C, H, W) decoded images in [-1, 1]
    nfe: int  # U-Net evaluations per decoded image


def interpolate_latents(z1: Tensor, z2: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """(lambdas (L,), z (P, L, d)): linear interpolation between z1 and z2 (P, d) at
    ``steps`` equally spaced lambdas in [0, 1], both ends included."""
    if steps < 2:
        raise ValueError(f"interpolation needs at least 2 steps (both ends), got {steps}")
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be (P, d), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    lambdas = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    lam = lambdas.to(device=z1.device, dtype=z1.dtype)[None, :, None]
    return lambdas, (1.0 - lam) * z1[:, None, :] + lam * z2[:, None, :]


@torch.no_grad()
def interpolate(
    model: DBAE,
    x1: Tensor,
    x2: Tensor,
    steps: int = 8,
    nfe: int = 10,
    *,
    sampler: SamplerName = "euler",
    churn: float = 0.0,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
    sample_z: bool = False,
) -> InterpolationResult:
    """Interpolate between the images x1[p] and x2[p] (both (P, C, H, W) in [-1, 1]);
    ``sample_z``: their latents are samples of the stochastic encoder, not its means."""
    if x1.shape != x2.shape:
        raise ValueError(f"x1 and x2 must have the same shape, got {tuple(x1.shape)} and {tuple(x2.shape)}")
    z1 = model.encode(x1, sample=sample_z, generator=generator)
    z2 = model.encode(x2, sample=sample_z, generator=generator)
    lambdas, z = interpolate_latents(z1, z2, steps)
    P, L, d = z.shape
    flat = z.reshape(P * L, d)
    endpoints, images, used = [], [], 0
    for chunk in flat.split(batch_size):
        x_T = model.endpoint(chunk)
        out = model.decode(chunk, nfe, sampler=sampler, churn=churn, x_T=x_T, generator=generator)
        endpoints.append(x_T)
        images.append(out.images)
        used = out.nfe
    shape = (P, L, *x1.shape[1:])
    return InterpolationResult(
        lambdas, z, torch.cat(endpoints).reshape(shape), torch.cat(images).reshape(shape), used
    )
