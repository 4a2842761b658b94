"""Unconditional generation (the paper's Algorithm 4): z ~ prior (DDIM), x_T = Dec(z),
then the bridge sampler of SPEC 6 (ODE, or SDE with ``churn > 0``). A DiffAE autoencoder with
its latent DPM (the authors' latent presets, imported) generates as their ``sample()`` does:
z ~ prior, x_T ~ N(0, I), then ``nfe`` steps of its DDIM."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import CheckpointError, DataError
from ..baselines.ddim_autoencoder import DDIMAutoencoder
from ..model import DBAE
from ..sampling import SamplerName
from .checkpoint import LoadedPrior
from .identity import AutoencoderRef, check_same_autoencoder


@dataclass(frozen=True)
class Generation:
    """Generated ``images`` (n, C, H, W) in [-1, 1], their latents ``z`` (n, d) and
    endpoints ``x_T`` = Dec(z); ``nfe``: U-Net evaluations per image; ``prior_steps``:
    prior network evaluations per image."""

    images: torch.Tensor
    z: torch.Tensor
    x_T: torch.Tensor
    nfe: int
    prior_steps: int


def check_prior_fits(prior: LoadedPrior, model: DBAE | DDIMAutoencoder, autoencoder: AutoencoderRef) -> None:
    """Raise :class:`CheckpointError` unless ``prior`` was trained on latents of this
    autoencoder checkpoint (same file hash and weights) with a matching z dimension."""
    check_same_autoencoder(prior.autoencoder, autoencoder, "the prior", prior.path)
    if prior.z_dim != model.config.z_dim:
        raise CheckpointError(
            f"the prior {prior.path} models {prior.z_dim}-dimensional latents but the autoencoder has "
            f"z_dim {model.config.z_dim}"
        )


@torch.no_grad()
def generate(
    model: DBAE | DDIMAutoencoder,
    prior: LoadedPrior,
    n: int,
    *,
    nfe: int = 10,
    prior_steps: int = 100,
    sampler: SamplerName = "euler",
    churn: float = 0.0,
    eta: float = 0.0,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Generation:
    """``n`` new images, drawn batch by batch (the draws depend on ``batch_size``)."""
    if n < 1:
        raise DataError(f"the number of images must be at least 1, got {n}")
    if batch_size < 1:
        raise DataError(f"the batch size must be at least 1, got {batch_size}")
    images, zs, ends = [], [], []
    used_nfe = 0
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="generate", unit="batch", dynamic_ncols=True)
    for start in starts:
        b = min(batch_size, n - start)
        z = prior.sample(b, prior_steps, eta=eta, generator=generator)
        if isinstance(model, DBAE):
            x_T = model.endpoint(z)
            out = model.decode(z, nfe, sampler=sampler, churn=churn, x_T=x_T, generator=generator)
        else:  # DiffAE: from x_T ~ N(0, I)
            out = model.decode(z.to(next(model.parameters()).dtype), None, nfe, generator=generator)
            x_T = out.x_T
        images.append(out.images.cpu())
        zs.append(z.cpu())
        ends.append(x_T.cpu())
        used_nfe = out.nfe
    return Generation(torch.cat(images), torch.cat(zs), torch.cat(ends), used_nfe, prior_steps)
