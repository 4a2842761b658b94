"""The discrete DDPM schedule and deterministic DDIM of DiffAE (Preechakul et al. 2022).

Sources: DDPM (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"), DDIM (Song et al.
2021, "Denoising Diffusion Implicit Models", eq. 12 with sigma = 0 and eq. 14), and DiffAE's
``diffusion/base.py`` / ``diffusion/resample.py`` (``space_timesteps``, ``ddim_sample``,
``ddim_reverse_sample``).

Schedule (DDPM's linear betas, DiffAE's default ``beta_scheduler="linear"`` at T = 1000)::

    beta_t  = beta_start + (beta_end - beta_start) * t / (T - 1),   t = 0..T-1
    abar_t  = prod_{s=0..t} (1 - beta_s)                            (alphas_bar)
    x_t     = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,              eps ~ N(0, I)

with beta_start = 1e-4, beta_end = 0.02, T = 1000. The network predicts eps.

Deterministic DDIM step from level ``a = abar_t`` to level ``a' `` (either direction)::

    x0_hat = (x_t - sqrt(1 - a) eps_hat) / sqrt(a)
    x'     = sqrt(a') x0_hat + sqrt(1 - a') eps_hat

With ``ybar = x / sqrt(a)`` and ``sigma = sqrt((1 - a) / a)`` this is exactly one explicit
Euler step of the probability-flow ODE ``d ybar = eps_hat(x, t) d sigma`` (DDIM eq. 14):
``ybar' = ybar + (sigma' - sigma) eps_hat``. Sampling runs it with decreasing sigma from
x_T ~ N(0, I); inversion runs the same ODE, on the same grid, with increasing sigma from x_0.

Both walk the grid of levels ``1 = abar(-1) > abar(t_0) > ... > abar(t_{k-1})`` where
``t_0 < ... < t_{k-1}`` are ``k`` timesteps spaced evenly over [0, T-1], both ends included
(DiffAE's ``space_timesteps(T, [k])``; ``k = 1`` gives ``[T-1]``):

- sampling (k NFE): eps at ``t_{k-1}, ..., t_0``, stepping to the next smaller level, the
  last step landing on ``abar = 1`` (it returns x0_hat);
- inversion (k NFE): eps at ``(x_0, label 0)``, then at ``t_0, ..., t_{k-2}``, stepping to the
  next larger level, ending on ``abar(t_{k-1})``, the level sampling starts from.

DiffAE's own ``ddim_reverse_sample_loop`` instead treats x_0 as the state at t = 0 and makes
its k-th step to ``abar = 0`` (returning eps_hat itself as x_T); the two differ by terms of
order ``sqrt(1 - abar_0) = 0.01`` and ``sqrt(abar_{T-1}) = 0.0064``. The grid here keeps
inversion and sampling exact mirror images of one discretized ODE.

Clipping (DiffAE's ``clip_denoised=True``): x0_hat is clamped to [-1, 1] and eps_hat is
re-derived from it, ``eps_hat = (x_t - sqrt(a) x0_hat) / sqrt(1 - a)`` (skipped at a = 1,
where x0_hat is x_t itself and the network's eps is used as is).

All schedule scalars are float64 (host Python floats); the state keeps the dtype of its
input, so a float64 state gives float64 DDIM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from ..errors import ConfigError

Tensor = torch.Tensor
#: eps_hat = eps_fn(x_t, t): x_t (B, ...) and integer timestep labels t (B,) (torch.long)
EpsFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class ScheduleConfig:
    """DDPM's linear beta schedule (DiffAE default: 1e-4 .. 0.02 over T = 1000 steps)."""

    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self) -> None:
        if isinstance(self.timesteps, bool) or not isinstance(self.timesteps, int) or self.timesteps < 2:
            raise ConfigError(f"schedule.timesteps must be an integer >= 2, got {self.timesteps!r}")
        if not (0.0 < self.beta_start <= self.beta_end < 1.0):
            raise ConfigError(
                f"schedule betas must satisfy 0 < beta_start <= beta_end < 1, "
                f"got beta_start={self.beta_start}, beta_end={self.beta_end}"
            )


class DDIMResult(NamedTuple):
    """The state reached and the exact number of eps-network evaluations (NFE) it took."""

    x: Tensor
    nfe: int


def check_steps(steps: int, timesteps: int, what: str = "DDIM steps") -> int:
    """``steps`` as an int in [1, timesteps], else ConfigError."""
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise ConfigError(f"{what} must be an integer in [1, {timesteps}], got {steps!r}")
    if not 1 <= steps <= timesteps:
        raise ConfigError(f"{what} must lie in [1, {timesteps}], got {steps}")
    return steps


class DDPMSchedule:
    """The discrete schedule of one :class:`ScheduleConfig` and its DDIM sampler/inverter."""

    def __init__(self, config: ScheduleConfig | None = None) -> None:
        self.config = config or ScheduleConfig()
        T = self.config.timesteps
        #: beta_t = beta_start + (beta_end - beta_start) t / (T - 1), t = 0..T-1
        #: (float64, on the CPU whatever the default device)
        self.betas = torch.linspace(self.config.beta_start, self.config.beta_end, T, dtype=torch.float64, device="cpu")
        #: abar_t = prod_{s <= t} (1 - beta_s), t = 0..T-1 (float64)
        self.alphas_bar = torch.cumprod(1.0 - self.betas, dim=0)
        self._ab: list[float] = self.alphas_bar.tolist()

    @property
    def timesteps(self) -> int:
        return self.config.timesteps

    # ----- training -----
    def sample_t(
        self, n: int, *, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> Tensor:
        """``n`` timesteps uniform on {0, ..., T-1} (DiffAE's ``UniformSampler``), torch.long."""
        return torch.randint(0, self.timesteps, (n,), generator=generator, device=device)

    def q_sample(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps for integer timesteps t (B,)."""
        ab = self.alphas_bar.to(x0.device)[t].view(-1, *([1] * (x0.dim() - 1)))
        return (ab.sqrt() * x0.double() + (1.0 - ab).sqrt() * eps.double()).to(x0.dtype)

    # ----- DDIM -----
    def ddim_timesteps(self, steps: int) -> list[int]:
        """``steps`` timesteps, increasing, evenly spaced over [0, T-1] with both ends
        (``round(i (T-1) / (steps-1))`` up to float ties, DiffAE's ``space_timesteps``);
        ``[T-1]`` for 1 step."""
        steps = check_steps(steps, self.timesteps)
        if steps == 1:
            return [self.timesteps - 1]
        # accumulated exactly as DiffAE's space_timesteps does (the float sums decide a few
        # ties differently from round(i * stride), e.g. for 999 steps)
        stride = (self.timesteps - 1) / (steps - 1)
        out, cur = [], 0.0
        for _ in range(steps):
            out.append(round(cur))
            cur += stride
        return out

    def level(self, t: int) -> float:
        """abar_t as a float64 Python float; ``t = -1`` is the data level abar = 1."""
        return 1.0 if t < 0 else self._ab[t]

    @staticmethod
    def ddim_step(x: Tensor, eps: Tensor, a: float, a_next: float, *, clip: bool = False) -> Tensor:
        """One deterministic DDIM step from level ``a = abar_t`` to ``a_next`` (module docstring):
        ``x0_hat = (x - sqrt(1-a) eps) / sqrt(a)``, ``x' = sqrt(a_next) x0_hat + sqrt(1-a_next) eps``.

        ``clip`` clamps x0_hat to [-1, 1] and re-derives ``eps = (x - sqrt(a) x0_hat) / sqrt(1-a)``
        (not at ``a = 1``, where x0_hat = x)."""
        eps = eps.to(x.dtype)
        if a >= 1.0:
            x0_hat = x
        else:
            x0_hat = (x - (1.0 - a) ** 0.5 * eps) / a**0.5
            if clip:
                x0_hat = x0_hat.clamp(-1.0, 1.0)
                eps = (x - a**0.5 * x0_hat) / (1.0 - a) ** 0.5
        return a_next**0.5 * x0_hat + (1.0 - a_next) ** 0.5 * eps

    @torch.no_grad()
    def sample(
        self, eps_fn: EpsFn, x_T: Tensor, steps: int, *, clip: bool = False, progress: bool = False
    ) -> DDIMResult:
        """Deterministic DDIM from ``x_T`` (taken at level abar_{T-1}) to data: ``steps`` NFE,
        eps evaluated at ``t_{k-1}, ..., t_0`` (:meth:`ddim_timesteps`), last step to abar = 1."""
        ts = self.ddim_timesteps(steps)
        pairs = list(zip(reversed(ts), list(reversed(ts[:-1])) + [-1]))
        return self._run(eps_fn, x_T, pairs, clip, progress, "DDIM sample")

    @torch.no_grad()
    def invert(
        self, eps_fn: EpsFn, x0: Tensor, steps: int, *, clip: bool = False, progress: bool = False
    ) -> DDIMResult:
        """DDIM inversion: the same Euler scheme on the same grid run forward, from ``x0``
        (level abar = 1, network label 0) through ``t_0, ..., t_{k-2}`` to ``t_{k-1}``; ``steps``
        NFE. Its output is the x_T that :meth:`sample` with the same ``steps`` starts from."""
        ts = self.ddim_timesteps(steps)
        pairs = list(zip([-1] + ts[:-1], ts))
        return self._run(eps_fn, x0, pairs, clip, progress, "DDIM inversion")

    def _run(
        self, eps_fn: EpsFn, x: Tensor, pairs: list[tuple[int, int]], clip: bool, progress: bool, desc: str
    ) -> DDIMResult:
        it = pairs
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(pairs, desc=desc, unit="step", leave=False, dynamic_ncols=True)
        nfe = 0
        for t, t_next in it:
            label = torch.full((x.shape[0],), max(t, 0), device=x.device, dtype=torch.long)
            eps = eps_fn(x, label)
            nfe += 1
            x = self.ddim_step(x, eps, self.level(t), self.level(t_next), clip=clip)
        return DDIMResult(x, nfe)


def gaussian_eps(mean: float, std: float, alphas_bar: Tensor) -> EpsFn:
    """The exact eps-predictor of data x_0 ~ N(mean, std^2) (elementwise, independent):

    ``x_t ~ N(sqrt(a) m, a s^2 + 1 - a)`` and ``E[eps | x_t] = sqrt(1-a) (x_t - sqrt(a) m) / (a s^2 + 1 - a)``
    with ``a = abar_t``. A closed-form stand-in for a perfectly trained network (tests, checks).
    """
    ab = alphas_bar.to(torch.float64)

    def eps_fn(x: Tensor, t: Tensor) -> Tensor:
        a = ab.to(x.device)[t].view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        return (1.0 - a).sqrt() * (x - a.sqrt() * mean) / (a * std**2 + 1.0 - a)

    return eps_fn


__all__ = ["DDIMResult", "DDPMSchedule", "EpsFn", "ScheduleConfig", "check_steps", "gaussian_eps"]
