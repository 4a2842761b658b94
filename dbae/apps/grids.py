"""Helpers for the applications' picture grids."""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def blank_like(image: Tensor, n: int) -> Tensor:
    """``n`` white tiles (n, C, H, W) shaped like one image (C, H, W) in [-1, 1]."""
    return torch.ones((n, *image.shape), dtype=image.dtype, device=image.device)
