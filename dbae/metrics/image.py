"""Per-image reconstruction metrics for images in [0, 1] of shape (B, C, H, W).

All metrics are computed in float64 and return a float64 tensor (B,), one value per image.

SSIM follows Wang et al. (2004) as implemented by scikit-image's
``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``:
an 11-tap Gaussian window (sigma 1.5, normalised), K1 = 0.01, K2 = 0.03, local statistics
only where the whole window fits inside the image ("valid" positions), the SSIM map
averaged over positions and then over channels. Images smaller than 11 pixels on a side
use the largest odd window that fits (same sigma, truncated and renormalised); there
scikit-image refuses, and the values are not comparable with full-window SSIM.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

WINDOW = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03


def _pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(
            f"expected two image batches (B, C, H, W) of one shape, got {tuple(x.shape)} "
            f"and {tuple(y.shape)}"
        )
    return x.double(), y.double()


def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each image pair, (B,)."""
    x, y = _pair(x, y)
    return (x - y).square().flatten(1).mean(dim=1)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, (B,); ``inf`` for identical images."""
    return 10.0 * torch.log10(data_range**2 / mse(x, y))


def _gaussian(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    offsets = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    weights = torch.exp(-0.5 * (offsets / SIGMA) ** 2)
    return weights / weights.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity of each image pair, (B,) (see the module notes)."""
    x, y = _pair(x, y)
    batch, channels, height, width = x.shape
    size = min(WINDOW, height, width)
    if size % 2 == 0:  # keep it odd, so the window has a centre pixel
        size -= 1
    w = _gaussian(size, x.dtype, x.device)

    def local_mean(a: torch.Tensor) -> torch.Tensor:  # valid separable Gaussian filter
        a = F.conv2d(a, w.view(1, 1, size, 1))
        return F.conv2d(a, w.view(1, 1, 1, size))

    planes = torch.cat([x, y, x * x, y * y, x * y]).reshape(-1, 1, height, width)
    mx, my, mxx, myy, mxy = local_mean(planes).reshape(5, batch, channels, -1)
    vx, vy, cxy = mxx - mx * mx, myy - my * my, mxy - mx * my
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    ssim_map = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return ssim_map.mean(dim=(1, 2))


def summarize(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> dict[str, float]:
    """Means over the batch: ``{"mse", "psnr", "ssim"}``. The PSNR mean skips images
    with infinite PSNR (exact reconstructions); it is ``inf`` only when all are exact."""
    psnr_values = psnr(x, y, data_range)
    finite = psnr_values[torch.isfinite(psnr_values)]
    return {
        "mse": mse(x, y).mean().item(),
        "psnr": finite.mean().item() if finite.numel() else math.inf,
        "ssim": ssim(x, y, data_range).mean().item(),
    }
