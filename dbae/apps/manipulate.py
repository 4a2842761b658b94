"""Attribute manipulation with a linear classifier direction (SPEC 8, paper Section 4.6).

    z' = denorm(norm(z) + s * sqrt(d) * w_c / |w_c|)

Two modes (the paper's Figure 14):

- ``both``: the edited z' drives the endpoint x_T = Dec(z') and the U-Net condition;
- ``condition``: only the condition changes, the sampler still starts at the original
  endpoint x_T = Dec(z) (milder edits that keep more of the input).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..model import DBAE
from ..sampling import SamplerName
from .attributes import AttributeClassifier

Tensor = torch.Tensor

MODES = ("both", "condition")
MODE_TITLES = {"both": "endpoint+condition", "condition": "condition only"}


@dataclass(frozen=True)
class ManipulationResult:
    """Edits of ``B`` images at ``S`` scales; dictionaries are keyed by mode."""

    attribute: str
    scales: tuple[float, ...]
    z: Tensor  # (B, d) the inputs' latents
    z_edit: Tensor  # (S, B, d) edited latents
    x_T: dict[str, Tensor]  # mode -> (S, B, C, H, W) the endpoints the sampler started from
    images: dict[str, Tensor]  # mode -> (S, B, C, H, W) decoded images in [-1, 1]
    scores: dict[str, Tensor]  # mode -> (S, B) the classifier's prediction on the re-encoded images
    nfe: int


def shift_latents(z: Tensor, classifier: AttributeClassifier, attribute: str, scales: Sequence[float]) -> Tensor:
    """(S, B, d): z (B, d) moved along the attribute's unit direction by s * sqrt(d)
    standard deviations of normalized z, for each scale s."""
    w = classifier.direction(attribute).to(z)
    zn = classifier.normalize(z)
    s = torch.tensor(list(scales), dtype=z.dtype, device=z.device)[:, None, None]
    return classifier.denormalize(zn[None] + s * math.sqrt(z.shape[1]) * w)


@torch.no_grad()
def manipulate(
    model: DBAE,
    x: Tensor,
    classifier: AttributeClassifier,
    attribute: str,
    scales: Sequence[float],
    nfe: int = 10,
    *,
    modes: Sequence[str] = MODES,
    sampler: SamplerName = "euler",
    churn: float = 0.0,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
    sample_z: bool = False,
) -> ManipulationResult:
    """Edit images x (B, C, H, W) in [-1, 1] along ``attribute`` at each scale, in each
    mode; the S * B edits are decoded ``batch_size`` at a time. ``sample_z``: the inputs'
    latents are samples of the stochastic encoder, not its means."""
    classifier.check_model(model)
    classifier.index(attribute)  # unknown names fail before any work
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown manipulation mode {mode!r}; use one of {MODES}")
    z = model.encode(x, sample=sample_z, generator=generator)
    z_edit = shift_latents(z, classifier, attribute, scales)
    S, B, d = z_edit.shape
    flat = z_edit.reshape(S * B, d)
    original_x_T = model.endpoint(z).repeat(S, 1, 1, 1)
    col = classifier.index(attribute)
    endpoints, images, scores, used = {}, {}, {}, 0
    for mode in modes:
        starts, decoded, predicted = [], [], []
        for lo in range(0, S * B, batch_size):
            chunk = flat[lo:lo + batch_size]
            x_T = model.endpoint(chunk) if mode == "both" else original_x_T[lo:lo + batch_size]
            out = model.decode(chunk, nfe, sampler=sampler, churn=churn, x_T=x_T, generator=generator)
            used = out.nfe
            starts.append(x_T)
            decoded.append(out.images)
            predicted.append(classifier.predict(model.encode(out.images))[:, col])
        endpoints[mode] = torch.cat(starts).reshape(S, B, *x.shape[1:])
        images[mode] = torch.cat(decoded).reshape(S, B, *x.shape[1:])
        scores[mode] = torch.cat(predicted).reshape(S, B)
    return ManipulationResult(attribute, tuple(float(s) for s in scales), z, z_edit, endpoints, images, scores, used)
