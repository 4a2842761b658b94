"""The VP diffusion bridge of SPEC sections 2-4 and 6: schedule, bridge marginal,
preconditioning, loss weight and the sampler drift coefficients.

This module is the pure-PyTorch reference for all of that math. Every function takes
``t`` as a float or a tensor of any shape and works elementwise. Internally everything is
computed in float64 with ``expm1``/``log1p`` forms (so values near ``t -> 0`` and
``t -> T`` stay accurate) and cast back to the dtype of ``t`` when ``t`` is a tensor of a
floating dtype; plain floats come back as float64 tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class BridgeConfig:
    """Settings of the VP bridge (SPEC 2, 4, 6). Defaults are the paper's."""

    beta_d: float = 2.0
    beta_min: float = 0.1
    T: float = 1.0
    t_min: float = 1e-4
    sigma_0: float = 0.5
    sigma_T: float = 0.5
    cov: float = 0.0
    #: sampling starts at ``T - start_offset`` (the bridge is degenerate at T itself)
    start_offset: float = 1e-4
    #: Karras grid exponent
    rho: float = 7.0

    def __post_init__(self) -> None:
        if not (0.0 < self.t_min < self.T):
            raise ValueError(f"need 0 < t_min < T, got t_min={self.t_min}, T={self.T}")
        if self.beta_d < 0 or self.beta_min <= 0:
            raise ValueError("need beta_d >= 0 and beta_min > 0")
        if not (0.0 < self.start_offset < self.T - self.t_min):
            raise ValueError("start_offset must lie in (0, T - t_min)")


class BridgeCoefficients(NamedTuple):
    a: Tensor  # coefficient of x_T
    b: Tensor  # coefficient of x0
    v: Tensor  # bridge variance


class Preconditioning(NamedTuple):
    c_in: Tensor
    c_skip: Tensor
    c_out: Tensor
    c_noise: Tensor


class DriftCoefficients(NamedTuple):
    """``drift = k_x * x + k_D * D + k_T * x_T`` (plus ``g * sqrt|dt| * eps`` for the SDE)."""

    k_x: Tensor
    k_D: Tensor
    k_T: Tensor
    g: Tensor  # diffusion coefficient g(t), used for the SDE noise term


def _as64(t: float | Tensor) -> tuple[Tensor, torch.dtype]:
    if isinstance(t, Tensor):
        out_dtype = t.dtype if t.dtype.is_floating_point else torch.float64
        return t.to(torch.float64), out_dtype
    return torch.tensor(float(t), dtype=torch.float64, device="cpu"), torch.float64


class VPBridge:
    """Reference implementation of the VP bridge math (float64 inside)."""

    def __init__(self, config: BridgeConfig | None = None) -> None:
        self.config = config or BridgeConfig()
        c = self.config
        # on the CPU even where a model is built under another default device (e.g. "meta")
        T = torch.tensor(c.T, dtype=torch.float64, device="cpu")
        self._logsnr_T = self._logsnr64(T)
        self._log_s_T = self._log_s64(T)

    # ----- schedule (SPEC 2), float64 in, float64 out -----
    def _exponent64(self, t: Tensor) -> Tensor:
        c = self.config
        return 0.5 * c.beta_d * t * t + c.beta_min * t

    def _log_s64(self, t: Tensor) -> Tensor:
        return -0.5 * self._exponent64(t)

    def _logsnr64(self, t: Tensor) -> Tensor:
        return -torch.log(torch.expm1(self._exponent64(t)))

    def _sigma2_64(self, t: Tensor) -> Tensor:
        return -torch.expm1(2.0 * self._log_s64(t))

    def _one_minus_rho64(self, t: Tensor) -> Tensor:
        return -torch.expm1(self._logsnr_T - self._logsnr64(t))

    def _abv64(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        log_s = self._log_s64(t)
        s = torch.exp(log_s)
        one_minus_rho = self._one_minus_rho64(t)
        rho = torch.exp(self._logsnr_T - self._logsnr64(t))
        a = rho * torch.exp(log_s - self._log_s_T)
        b = one_minus_rho * s
        v = one_minus_rho * self._sigma2_64(t)
        return a, b, v

    # ----- public API: tensors in the dtype of t -----
    def log_s(self, t: float | Tensor) -> Tensor:
        t64, dt = _as64(t)
        return self._log_s64(t64).to(dt)

    def alpha(self, t: float | Tensor) -> Tensor:
        """Signal scale s(t)."""
        t64, dt = _as64(t)
        return torch.exp(self._log_s64(t64)).to(dt)

    def logsnr(self, t: float | Tensor) -> Tensor:
        t64, dt = _as64(t)
        return self._logsnr64(t64).to(dt)

    def sigma2(self, t: float | Tensor) -> Tensor:
        t64, dt = _as64(t)
        return self._sigma2_64(t64).to(dt)

    def beta(self, t: float | Tensor) -> Tensor:
        t64, dt = _as64(t)
        return (self.config.beta_min + self.config.beta_d * t64).to(dt)

    def coefficients(self, t: float | Tensor) -> BridgeCoefficients:
        """a(t), b(t), v(t) of ``x_t = a x_T + b x0 + sqrt(v) eps``."""
        t64, dt = _as64(t)
        a, b, v = self._abv64(t64)
        return BridgeCoefficients(a.to(dt), b.to(dt), v.to(dt))

    def preconditioning(self, t: float | Tensor) -> Preconditioning:
        t64, dt = _as64(t)
        c = self.config
        a, b, v = self._abv64(t64)
        A = a * a * c.sigma_T**2 + b * b * c.sigma_0**2 + 2.0 * a * b * c.cov + v
        c_in = torch.rsqrt(A)
        c_skip = (b * c.sigma_0**2 + a * c.cov) / A
        c_out = torch.sqrt(a * a * (c.sigma_T**2 * c.sigma_0**2 - c.cov**2) + c.sigma_0**2 * v) * c_in
        c_noise = 250.0 * torch.log(t64 + 1e-44)
        return Preconditioning(c_in.to(dt), c_skip.to(dt), c_out.to(dt), c_noise.to(dt))

    def loss_weight(self, t: float | Tensor) -> Tensor:
        """lambda(t) = 1 / c_out(t)^2."""
        t64, dt = _as64(t)
        c_out = self.preconditioning(t64).c_out
        return (1.0 / (c_out * c_out)).to(dt)

    # ----- SDE coefficients (SPEC 6) -----
    def sigt(self, t: float | Tensor) -> Tensor:
        t64, dt = _as64(t)
        return torch.sqrt(torch.expm1(self._exponent64(t64))).to(dt)

    def sigt_prime(self, t: float | Tensor) -> Tensor:
        t64, dt = _as64(t)
        c = self.config
        st = torch.sqrt(torch.expm1(self._exponent64(t64)))
        return (0.5 * (c.beta_min + c.beta_d * t64) * (st + 1.0 / st)).to(dt)

    def f(self, t: float | Tensor) -> Tensor:
        """Drift scale f(t) = s'(t)/s(t) = -beta(t)/2 of the VP SDE."""
        t64, dt = _as64(t)
        return (-0.5 * (self.config.beta_min + self.config.beta_d * t64)).to(dt)

    def g2(self, t: float | Tensor) -> Tensor:
        """Squared diffusion g(t)^2 = beta(t) of the VP SDE."""
        return self.beta(t)

    def drift_coefficients(self, t: float | Tensor, mode: str = "ode", w: float = 1.0) -> DriftCoefficients:
        """Scalars k_x, k_D, k_T with ``drift = k_x x + k_D D + k_T x_T`` (SPEC 6).

        ``mode='ode'``: d = f x - g^2 (0.5 grad_q - w grad_h);
        ``mode='sde'``: d = f x - g^2 (grad_q - w grad_h), noise g sqrt|dt| eps.
        Defined for t in (0, T); undefined at t = 0 and at t = T.
        """
        if mode not in ("ode", "sde"):
            raise ValueError(f"mode must be 'ode' or 'sde', got {mode!r}")
        t64, dt = _as64(t)
        c = self.config
        a, b, v = self._abv64(t64)
        beta = c.beta_min + c.beta_d * t64
        f = -0.5 * beta
        g2 = beta
        log_s = self._log_s64(t64)
        s_ratio = torch.exp(log_s - self._log_s_T)
        # sigma^2 (1/rho - 1) = sigma^2 expm1(logsnr(t) - logsnr(T))
        h = self._sigma2_64(t64) * torch.expm1(self._logsnr64(t64) - self._logsnr_T)
        q = 0.5 if mode == "ode" else 1.0
        # grad_q = -(x - a x_T - b D)/v ; grad_h = -(x - s_ratio x_T)/h
        # d = f x + g2 * [ q (x - a x_T - b D)/v - w (x - s_ratio x_T)/h ]
        k_x = f + g2 * (q / v - w / h)
        k_D = -g2 * q * b / v
        k_T = g2 * (-q * a / v + w * s_ratio / h)
        g = torch.sqrt(g2)
        return DriftCoefficients(k_x.to(dt), k_D.to(dt), k_T.to(dt), g.to(dt))

    # ----- training-time helpers -----
    def sample_t(self, n: int, *, generator: torch.Generator | None = None, device=None) -> Tensor:
        """t ~ Uniform[t_min, T], float32, shape (n,)."""
        c = self.config
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        return (c.t_min + (c.T - c.t_min) * u).to(torch.float32)

    def marginal_sample(self, x0: Tensor, x_T: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_t = a x_T + b x0 + sqrt(v) eps with per-sample t of shape (B,)."""
        a, b, v = (c.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1))) for c in self.coefficients(t))
        return a * x_T + b * x0 + torch.sqrt(v) * eps


def karras_grid(n: int, config: BridgeConfig | None = None) -> list[float]:
    """The sampling grid t_0 > ... > t_{n-1} = t_min, then t_n = 0 (SPEC 6), as floats."""
    c = config or BridgeConfig()
    if n < 1:
        raise ValueError(f"need at least one sampling step, got {n}")
    t0 = c.T - c.start_offset
    if n == 1:
        return [t0, 0.0]
    inv = 1.0 / c.rho
    lo, hi = c.t_min**inv, t0**inv
    ts = [(hi + i / (n - 1) * (lo - hi)) ** c.rho for i in range(n)]
    ts[-1] = c.t_min  # exact despite rounding
    return ts + [0.0]


def float64_scalar(x: Tensor) -> float:
    out = float(x)
    if not math.isfinite(out):
        raise FloatingPointError(f"non-finite sampler coefficient {out}")
    return out
