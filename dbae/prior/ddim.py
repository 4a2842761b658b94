"""Discrete-time latent diffusion: the training loss and the DDIM sampler (SPEC 7).

Forward process on normalized latents x_0 (DDPM with a constant beta):

    abar_t = prod_{s=0..t} (1 - beta),  t = 0..T-1
    x_t    = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,  eps ~ N(0, I)

The network predicts eps; the loss is the L1 or L2 distance to the true eps, with t
uniform on 0..T-1. DDIM (Song et al.) walks S timesteps (spaced evenly over [0, T-1] with
both ends, or by DiffAE's rule for its imported priors: :mod:`dbae.spacing`) from x ~ N(0, I):

    x0_hat  = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)
    sigma   = eta sqrt((1 - abar_p) / (1 - abar_t)) sqrt(1 - abar_t / abar_p)
    x_p     = sqrt(abar_p) x0_hat + sqrt(1 - abar_p - sigma^2) eps_hat + sigma noise

where p is the next (smaller) timestep and abar_p = 1 after the last one (so the last
step returns x0_hat). ``eta = 0`` is the deterministic DDIM; ``eta = 1`` is DDPM-like.
Schedule scalars are computed in float64 on the host.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import ConfigError
from ..spacing import diffae_timesteps, even_timesteps
from .config import LatentDiffusionConfig

Tensor = torch.Tensor
#: eps_hat = eps_fn(x_t, t) for x_t (B, d) and integer timesteps t (B,)
EpsFn = Callable[[Tensor, Tensor], Tensor]


class LatentDiffusion:
    """The schedule of one :class:`LatentDiffusionConfig`, its loss and its sampler."""

    def __init__(self, config: LatentDiffusionConfig) -> None:
        self.config = config
        betas = torch.full((config.timesteps,), config.beta, dtype=torch.float64)
        #: abar_t for t = 0..T-1, float64
        self.alphas_bar = torch.cumprod(1.0 - betas, dim=0)

    @property
    def timesteps(self) -> int:
        return self.config.timesteps

    def q_sample(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps for integer timesteps t (B,)."""
        ab = self.alphas_bar.to(x0.device)[t].to(x0.dtype)[:, None]
        return ab.sqrt() * x0 + (1.0 - ab).sqrt() * eps

    def loss(self, eps_fn: EpsFn, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Mean L1/L2 noise-prediction loss of a batch of normalized latents x0 (B, d)."""
        B = x0.shape[0]
        t = torch.randint(0, self.timesteps, (B,), generator=generator, device=x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        err = eps_fn(self.q_sample(x0, t, eps), t) - eps
        return err.abs().mean() if self.config.loss == "l1" else err.square().mean()

    def ddim_timesteps(self, steps: int) -> list[int]:
        """``steps`` timesteps, largest first, spaced by the config's rule (:mod:`dbae.spacing`)."""
        if isinstance(steps, bool) or not isinstance(steps, int) or not (1 <= steps <= self.timesteps):
            raise ConfigError(f"prior steps must lie in [1, {self.timesteps}], got {steps}")
        rule = diffae_timesteps if self.config.spacing == "diffae" else even_timesteps
        return sorted(rule(self.timesteps, steps), reverse=True)

    @torch.no_grad()
    def sample(
        self,
        eps_fn: EpsFn,
        noise: Tensor,
        steps: int,
        *,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> Tensor:
        """Normalized latents (B, d) from the starting noise x ~ N(0, I) (B, d) with
        ``steps`` network evaluations (see the module docstring)."""
        if eta < 0:
            raise ConfigError(f"prior eta must be >= 0, got {eta}")
        ts = self.ddim_timesteps(steps)
        ab = self.alphas_bar.tolist()
        x = noise
        pairs = list(zip(ts, ts[1:] + [-1]))
        if progress:
            from tqdm.auto import tqdm

            pairs = tqdm(pairs, desc="prior DDIM", unit="step", leave=False, dynamic_ncols=True)
        for t, prev in pairs:
            a_t, a_p = ab[t], (ab[prev] if prev >= 0 else 1.0)
            tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            eps = eps_fn(x, tt).to(x.dtype)
            x0 = (x - (1.0 - a_t) ** 0.5 * eps) / a_t**0.5
            sigma = eta * ((1.0 - a_p) / (1.0 - a_t)) ** 0.5 * (1.0 - a_t / a_p) ** 0.5 if eta > 0 else 0.0
            x = a_p**0.5 * x0 + max(1.0 - a_p - sigma**2, 0.0) ** 0.5 * eps
            if sigma > 0:
                x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x
