"""Evaluation metrics (SPEC section 10)."""

from .image import mse, psnr, ssim, summarize

__all__ = ["mse", "psnr", "ssim", "summarize"]
