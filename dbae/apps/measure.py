"""Factor values measured directly on images of the built-in shapes data.

These do not trust any model: they read the picture. The background of a shapes image
is a uniform grey and the shape never touches the border, so the background colour is
the median of the border pixels, and every pixel's foreground weight is its colour
distance to that grey, divided by :data:`FOREGROUND_DISTANCE` and clipped to [0, 1]
(a soft mask: anti-aliased edges count partly).

Coordinates follow :mod:`dbae.data.shapes`: x to the right, y downwards, in units of
half the image width, so the image spans [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor

#: colour distance (RGB in [0, 1]) at which a pixel counts fully as foreground; the
#: palette colours are at least ~0.5 away from every background grey in [0, 0.5]
FOREGROUND_DISTANCE = 0.25


@dataclass(frozen=True)
class ShapeMeasurements:
    """Per-image measurements, each a float tensor (B,) or (B, 3)."""

    x: Tensor  # foreground centroid, half image widths right of the centre
    y: Tensor  # foreground centroid, half image widths below the centre
    area: Tensor  # foreground fraction of the image, in [0, 1]
    colour: Tensor  # (B, 3) mean RGB in [0, 1] of the foreground
    background: Tensor  # (B,) grey level in [0, 1] of the background


def measure_shapes(images: Tensor) -> ShapeMeasurements:
    """Measure centroid, area, foreground colour and background of images (B, 3, S, S)
    in [-1, 1]. An image without any foreground gets centroid 0 and colour = background."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images (B, 3, S, S), got {tuple(images.shape)}")
    x = ((images.detach().float().cpu().clamp(-1, 1)) + 1) / 2  # [0, 1]
    B, _, S, _ = x.shape
    border = torch.cat([x[:, :, 0, :], x[:, :, -1, :], x[:, :, 1:-1, 0], x[:, :, 1:-1, -1]], dim=2)
    bg = border.median(dim=2).values  # (B, 3)
    dist = (x - bg[:, :, None, None]).norm(dim=1)  # (B, S, S)
    w = (dist / FOREGROUND_DISTANCE).clamp(0, 1)
    mass = w.sum(dim=(1, 2))
    safe = mass.clamp(min=1e-6)
    coords = (torch.arange(S, dtype=torch.float32) + 0.5) * (2.0 / S) - 1.0
    cx = (w * coords[None, None, :]).sum(dim=(1, 2)) / safe
    cy = (w * coords[None, :, None]).sum(dim=(1, 2)) / safe
    # colour: weight pixels by how far they are from the background relative to the
    # image's farthest one (power 4), so anti-aliased edges mixed with grey count little
    core = w * (dist / dist.flatten(1).max(dim=1).values.clamp(min=1e-6)[:, None, None]) ** 4
    colour = (core[:, None] * x).sum(dim=(2, 3)) / core.sum(dim=(1, 2)).clamp(min=1e-6)[:, None]
    empty = mass < 1e-6
    colour = torch.where(empty[:, None], bg, colour)
    return ShapeMeasurements(
        x=torch.where(empty, 0.0, cx), y=torch.where(empty, 0.0, cy), area=mass / (S * S),
        colour=colour, background=bg.mean(dim=1),
    )
