"""The latent arithmetic of the studio: several attribute sliders and an interpolation.

The sliders combine in normalized-z space exactly as ``dbae manipulate`` moves one
attribute (:func:`dbae.apps.manipulate.shift_latents`)::

    z' = denorm(norm(z) + sqrt(d) * sum_i s_i * w_i / |w_i|)

with the classifier's own ``normalize`` / ``denormalize`` and its unit directions
(:meth:`dbae.apps.attributes.AttributeClassifier.direction`). With one non-zero slider this
is ``shift_latents`` itself (tested). The interpolation is ``dbae interpolate``'s linear
path in z (:func:`dbae.apps.interpolate.interpolate_latents`); since the edit is a shift
of the normalized latent, editing the interpolated latent equals interpolating the
edited ones.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..apps.attributes import AttributeClassifier
from ..apps.interpolate import interpolate_latents
from ..errors import DataError

Tensor = torch.Tensor


def attribute_directions(classifier: AttributeClassifier, names: Sequence[str] | None = None) -> tuple[tuple[str, ...], Tensor]:
    """(names, unit directions (k, d) in normalized-z space) of the classifier's attributes
    (default: all of them; attributes whose classifier learned nothing are left out)."""
    chosen, rows = [], []
    for name in names if names is not None else classifier.names:
        try:
            rows.append(classifier.direction(name).float())
        except DataError:
            if names is not None:  # asked for by name: say so
                raise
            continue
        chosen.append(name)
    d = classifier.z_dim
    return tuple(chosen), torch.stack(rows) if rows else torch.zeros(0, d)


def edit_latents(z: Tensor, classifier: AttributeClassifier, directions: Tensor, scales: Tensor | Sequence[float]) -> Tensor:
    """z (B, d) moved by ``scales`` (k,) or (B, k) along ``directions`` (k, d), in units of
    sqrt(d) standard deviations of normalized z, as :func:`~dbae.apps.manipulate.shift_latents`."""
    s = torch.as_tensor(scales, dtype=z.dtype, device=z.device)
    if s.dim() == 1:
        s = s.expand(z.shape[0], -1)
    if s.shape != (z.shape[0], directions.shape[0]):
        raise ValueError(f"scales must have {directions.shape[0]} values per latent, got shape {tuple(s.shape)}")
    if not bool((s != 0).any()):
        return z  # nothing moved: exactly the input (no round trip through normalize)
    zn = classifier.normalize(z)
    return classifier.denormalize(zn + math.sqrt(z.shape[1]) * (s @ directions.to(z)))


def mix_latents(z1: Tensor, z2: Tensor, alpha: float) -> Tensor:
    """The point ``alpha`` in [0, 1] of the linear path from z1 to z2 (both (B, d)), with
    ``interpolate_latents``' formula (1 - alpha) z1 + alpha z2."""
    if alpha == 0.0:
        return z1
    return (1.0 - alpha) * z1 + alpha * z2


def path_latents(z1: Tensor, z2: Tensor, steps: int) -> Tensor:
    """(steps, d): ``steps`` equally spaced latents from z1 to z2 ((1, d) each), both ends
    included (:func:`~dbae.apps.interpolate.interpolate_latents`)."""
    return interpolate_latents(z1, z2, steps)[1][0]
