"""Helpers for the applications' picture grids."""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def enlarge(images: Tensor, factor: int) -> Tensor:
    """Images (B, C, H, W) enlarged ``factor`` times with nearest-neighbour pixels (for
    looking at tiny models' 16x16 outputs); factor 1 returns them unchanged."""
    if factor < 1:
        raise ValueError(f"the enlargement factor must be >= 1, got {factor}")
    return images if factor == 1 else F.interpolate(images, scale_factor=factor, mode="nearest")


def blank_like(image: Tensor, n: int) -> Tensor:
    """``n`` white tiles (n, C, H, W) shaped like one image (C, H, W) in [-1, 1]."""
    return torch.ones((n, *image.shape), dtype=image.dtype, device=image.device)
