"""How much of the images a stochastic encoder's z = mu + sig eps carries."""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def posterior_snr(mu: Tensor, sig: Tensor) -> Tensor:
    """Per dimension of z (d,): the variance of ``mu`` over a batch of images (n, d) divided by
    the mean of ``sig^2``, i.e. how far apart the encoder keeps different images in units of its
    own noise. A dimension far below 1 is mostly noise: the networks that read z cannot tell the
    images apart through it (a Gaussian channel with this signal-to-noise ratio carries at most
    ``0.5 * log2(1 + snr)`` bits)."""
    if mu.dim() != 2 or mu.shape != sig.shape or mu.shape[0] < 2:
        raise ValueError(f"expected mu and sig of one shape (n >= 2, d), got {tuple(mu.shape)} and {tuple(sig.shape)}")
    return mu.double().var(0) / sig.double().square().mean(0)
