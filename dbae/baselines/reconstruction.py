"""Reconstruction of images by DiffAE or PDAE, in batches, with either start point of the
deterministic DDIM decoder:

- ``inferred``: x_T from DDIM inversion of the image under z (``inversion_steps`` NFE), the
  baselines' usual autoencoding;
- ``random``: x_T ~ N(0, I), so the only inference is one encoder pass: the DBAE paper's
  "tractable inference" setting (Table 2), where DBAE uses x_T = Dec(z).

Used by ``dbae eval recon``, the post-training check of ``dbae train --method`` and the
paper-claims study.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import ConfigError
from .ddim import check_steps
from .ddim_autoencoder import DDIMAutoencoder
from .diffae import DEFAULT_DECODE_STEPS as DIFFAE_DECODE_STEPS
from .diffae import DEFAULT_INVERSION_STEPS as DIFFAE_INVERSION_STEPS
from .pdae import DEFAULT_DECODE_STEPS as PDAE_DECODE_STEPS
from .pdae import DEFAULT_INVERSION_STEPS as PDAE_INVERSION_STEPS
from .pdae import PDAE

Tensor = torch.Tensor
XTMode = Literal["inferred", "random"]
X_T_MODES: tuple[str, ...] = ("inferred", "random")


def default_steps(model: DDIMAutoencoder) -> tuple[int, int]:
    """(inversion steps, decode steps) the method's authors use: DiffAE 250 / 100, PDAE 100 / 100."""
    if isinstance(model, PDAE):
        return PDAE_INVERSION_STEPS, PDAE_DECODE_STEPS
    return DIFFAE_INVERSION_STEPS, DIFFAE_DECODE_STEPS


@dataclass(frozen=True)
class BaselineReconstruction:
    images: Tensor  # (N, C, S, S) in [-1, 1], on the CPU
    x_T: str  # "inferred" or "random"
    inversion_steps: int  # 0 with a random x_T
    decode_steps: int
    nfe: int  # sampler steps per image: inversion + decoding
    network_evals: int  # denoising-network forward passes per image (PDAE: eps_theta and G_psi, 2 per step)


@torch.no_grad()
def reconstruct_baseline(
    model: DDIMAutoencoder,
    x: Tensor,
    *,
    x_T: XTMode = "inferred",
    inversion_steps: int | None = None,
    decode_steps: int | None = None,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
) -> BaselineReconstruction:
    """Reconstruct images ``x`` (N, C, S, S) in [-1, 1] with ``model`` (module docstring);
    step counts default to :func:`default_steps`; a random x_T comes from ``generator``
    (on the model's device). All arguments are checked before any network runs."""
    if x_T not in X_T_MODES:
        raise ConfigError(f"x_T must be one of {', '.join(X_T_MODES)}, got {x_T!r}")
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    inv_default, dec_default = default_steps(model)
    timesteps = model.schedule.timesteps
    inv = 0 if x_T == "random" else check_steps(inv_default if inversion_steps is None else inversion_steps,
                                                timesteps, "inversion steps")
    dec = check_steps(dec_default if decode_steps is None else decode_steps, timesteps, "decode steps")
    model.check_images(x)
    device = next(model.parameters()).device
    out, nfe, evals = [], 0, 0
    for chunk in x.split(batch_size):
        rec = model.reconstruct(chunk.to(device), max(inv, 1), dec, random_x_T=x_T == "random", generator=generator)
        out.append(rec.images.float().cpu())
        nfe = int(rec.nfe)
        evals = int(getattr(rec, "network_evals", rec.nfe))
    return BaselineReconstruction(torch.cat(out), x_T, inv, dec, nfe, evals)


__all__ = ["BaselineReconstruction", "XTMode", "X_T_MODES", "default_steps", "reconstruct_baseline"]
