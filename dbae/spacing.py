"""Timestep spacings of DDIM over a discrete DDPM schedule of T steps: which timesteps a K-step
sampler evaluates the network at. Three rules are in use:

- :func:`even_timesteps`: K timesteps spread evenly over [0, T - 1], both ends included
  (this package's latent prior);
- :func:`diffae_timesteps`: DiffAE's "ddimK": 0, s, 2s, ... for the first integer stride s
  that gives exactly K of them (DiffAE's image and latent samplers);
- :func:`pdae_timesteps`: PDAE's "ddimK": the K + 1 points int(linspace(0, T - 1, K + 1)).
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError


def _check(steps: int, timesteps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= timesteps:
        raise ConfigError(f"DDIM steps must be an integer in [1, {timesteps}], got {steps!r}")


def even_timesteps(timesteps: int, steps: int) -> list[int]:
    """``steps`` timesteps, increasing, evenly spaced over [0, T - 1] with both ends
    (``round(i (T - 1) / (steps - 1))``); ``[T - 1]`` for one step."""
    _check(steps, timesteps)
    if steps == 1:
        return [timesteps - 1]
    stride = (timesteps - 1) / (steps - 1)
    return sorted({round(i * stride) for i in range(steps)})


def diffae_timesteps(timesteps: int, steps: int) -> list[int]:
    """DiffAE's "ddimK" timesteps, increasing: 0, s, 2s, ... for the first integer stride s
    in 1..T-1 that gives exactly ``steps`` of them (10 of 1000: 0, 100, ..., 900; 100: 0 ... 990;
    250: 0 ... 996; T - 1 itself is never used). ConfigError when no stride does (e.g. 1 or 999
    of 1000)."""
    _check(steps, timesteps)
    for stride in range(1, timesteps):
        if len(range(0, timesteps, stride)) == steps:
            return list(range(0, timesteps, stride))
    raise ConfigError(f"DiffAE's DDIM spacing has no stride giving exactly {steps} of {timesteps} timesteps "
                      "(it takes counts like 10, 20, 50, 100, 200, 250, 500, 1000)")


def pdae_timesteps(timesteps: int, steps: int) -> list[int]:
    """PDAE's "ddimK" timesteps, increasing: the ``steps + 1`` points
    int(linspace(0, T - 1, steps + 1)) (10 of 1000: 0, 99, 199, ..., 899, 999)."""
    _check(steps, timesteps)
    return [int(v) for v in np.linspace(0, timesteps - 1, steps + 1)]
