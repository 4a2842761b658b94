"""The discrete DDPM schedule and the deterministic DDIM of DiffAE and PDAE, as their authors run it.

Sources: DDPM (Ho et al. 2020), DDIM (Song et al. 2021, eq. 12 with sigma = 0), and the
authors' code as the fixtures in tests/fixtures/official_diffae and official_pdae record it
(their README.md files; DiffAE at commit 00c57d3, PDAE at 4f9c29a).

Schedule (DDPM's linear betas at T = 1000)::

    beta_t  = beta_start + (beta_end - beta_start) * t / (T - 1),   t = 0..T-1
    abar_t  = prod_{s=0..t} (1 - beta_s)                            (alphas_bar)
    x_t     = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,              eps ~ N(0, I)

with beta_start = 1e-4, beta_end = 0.02, T = 1000. The networks predict eps.

One deterministic DDIM step, from a state at level ``a`` (the network sees the timestep
label t) to level ``a'``, clipping as both authors' ``clip_denoised=True``::

    x0_hat = (x - sqrt(1 - a) eps) / sqrt(a),  clamped to [-1, 1]
    eps'   = (x - sqrt(a) x0_hat) / sqrt(1 - a)          (eps re-derived from the clamped x0_hat)
    x'     = sqrt(a') x0_hat + sqrt(1 - a') eps'

The step grids and the levels at their ends differ between the two methods, and are the
authors' own (:data:`DDIM_RULES`):

- ``"diffae"`` (DiffAE's "ddimK" spacing): the first integer stride s with exactly K
  elements in range(0, T, s); the timesteps are 0, s, 2s, ... (K = 10: 0, 100, ..., 900; 100:
  0 ... 990; 250: 0 ... 996; T - 1 itself is never used). Decoding starts at level
  abar[t_{K-1}] and steps t_{K-1} -> ... -> t_0 -> abar = 1 (returning the clamped x0_hat);
  inversion takes x_0 as the state at t = 0 (level abar[0]) and steps t_0 -> ... -> t_{K-1}
  -> abar = 0 (its result is the eps' of the last step).
- ``"pdae"`` (PDAE's "ddimK"): K + 1 points t_j = int(linspace(0, T - 1, K + 1)[j]).
  Decoding starts at level abar[T-1] and steps t_K -> ... -> t_1 -> t_0: the network is never
  evaluated at t = 0, and the result (at level abar[0]) is not clamped; inversion takes x_0 at
  level abar[0] and steps t_0 -> ... -> t_K. PDAE's eps is shifted by its gradient estimator
  (``eps - sqrt(1 - abar_t) G``); with ``stop_percent`` p the shift is used only while
  j - 1 >= int(p K).

Both use K network evaluations. All schedule scalars are float64 (host Python floats); the
state keeps the dtype of its input, so a float64 state gives float64 DDIM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from ..errors import ConfigError
from ..spacing import diffae_timesteps, pdae_timesteps

Tensor = torch.Tensor
#: eps_hat = eps_fn(x_t, t, shift): x_t (B, ...), integer timestep labels t (B,) (torch.long), and
#: whether PDAE's gradient estimator shifts this step's eps (ignored by DiffAE)
EpsFn = Callable[[Tensor, Tensor, bool], Tensor]


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


#: the authors' DDIM grids (module docstring)
DDIM_RULES = ("diffae", "pdae")


@dataclass(frozen=True)
class DDIMStep:
    """One DDIM step: the network sees timestep ``t`` on the state at level ``a`` and the step
    lands at level ``a_next``; ``shift``: PDAE uses its gradient estimator on this step."""

    t: int
    a: float
    a_next: float
    shift: bool = True


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


class DiffusionNoise(NamedTuple):
    """The draws of a batch's diffusion loss, made ahead of it (:meth:`DDPMSchedule.draw_noise`):
    t (B,) and eps (B, C, H, W). Rows belong to samples: a slice is a micro-batch's share."""

    t: Tensor
    eps: Tensor

    def slice(self, start: int, stop: int) -> "DiffusionNoise":
        return DiffusionNoise(self.t[start:stop], self.eps[start:stop])


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

    def draw_noise(self, shape: tuple[int, ...], generator: torch.Generator | None = None, device=None,
                   dtype: torch.dtype = torch.float32) -> DiffusionNoise:  # fmt: skip
        """t (:meth:`sample_t`) then eps ~ N(0, I) of ``shape`` (B, C, H, W) from ``generator``:
        the draws of the baselines' losses, in their order."""
        t = self.sample_t(shape[0], generator=generator, device=device)
        return DiffusionNoise(t, torch.randn(shape, generator=generator, device=device, dtype=dtype))

    def q_sample(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps for integer timesteps t (B,)."""
        ab = self.alphas_bar.to(x0.device)[t].view(-1, *([1] * (x0.dim() - 1)))
        return (ab.sqrt() * x0.double() + (1.0 - ab).sqrt() * eps.double()).to(x0.dtype)

    # ----- DDIM -----
    def level(self, t: int) -> float:
        """abar_t as a float64 Python float."""
        return self._ab[t]

    def ddim_plan(self, rule: str, steps: int, *, invert: bool = False, stop_percent: float = 0.0) -> list[DDIMStep]:
        """The steps of a K-step DDIM decode (or inversion) under ``rule`` (module docstring)."""
        if rule not in DDIM_RULES:
            raise ConfigError(f"DDIM rule must be one of {', '.join(DDIM_RULES)}, got {rule!r}")
        steps = check_steps(steps, self.timesteps)
        ab = self._ab
        if rule == "diffae":
            ts = diffae_timesteps(self.timesteps, steps)
            if invert:
                return [DDIMStep(ts[i], ab[ts[i]], ab[ts[i + 1]] if i + 1 < steps else 0.0) for i in range(steps)]
            return [DDIMStep(ts[i], ab[ts[i]], ab[ts[i - 1]] if i > 0 else 1.0) for i in reversed(range(steps))]
        ts = pdae_timesteps(self.timesteps, steps)
        if invert:
            return [DDIMStep(ts[j], ab[ts[j]], ab[ts[j + 1]]) for j in range(steps)]
        first_unshifted = int(stop_percent * steps)
        return [DDIMStep(ts[j], ab[ts[j]], ab[ts[j - 1]], shift=j - 1 >= first_unshifted) for j in range(steps, 0, -1)]

    @staticmethod
    def ddim_step(x: Tensor, eps: Tensor, a: float, a_next: float, *, clip: bool = False) -> tuple[Tensor, Tensor]:
        """One deterministic DDIM step from level ``a`` to ``a_next`` (module docstring):
        ``(x', x0_hat)``. ``clip`` clamps x0_hat to [-1, 1] and re-derives eps from it."""
        eps = eps.to(x.dtype)
        x0_hat = (x - (1.0 - a) ** 0.5 * eps) / a**0.5
        if clip:
            x0_hat = x0_hat.clamp(-1.0, 1.0)
            eps = (x - a**0.5 * x0_hat) / (1.0 - a) ** 0.5
        return a_next**0.5 * x0_hat + (1.0 - a_next) ** 0.5 * eps, x0_hat

    @torch.no_grad()
    def run(
        self, eps_fn: EpsFn, x: Tensor, plan: list[DDIMStep], *, clip: bool = False, progress: bool = False,
        trajectory: list[tuple[Tensor, Tensor]] | None = None, desc: str = "DDIM",
    ) -> DDIMResult:  # fmt: skip
        """Run the steps of ``plan`` from ``x``: one ``eps_fn(x, t, shift)`` per step (its NFE).
        ``clip``: clamp x0_hat (as both authors' ``clip_denoised=True``, which the autoencoders
        pass); ``trajectory``: gets (state after, x0_hat) of every step."""
        it = plan
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(plan, desc=desc, unit="step", leave=False, dynamic_ncols=True)
        nfe = 0
        for step in it:
            label = torch.full((x.shape[0],), step.t, device=x.device, dtype=torch.long)
            eps = eps_fn(x, label, step.shift)
            nfe += 1
            x, x0_hat = self.ddim_step(x, eps, step.a, step.a_next, clip=clip)
            if trajectory is not None:
                trajectory.append((x, x0_hat))
        return DDIMResult(x, nfe)

    def sample(self, eps_fn: EpsFn, x_T: Tensor, steps: int, *, rule: str = "diffae", clip: bool = False,
               stop_percent: float = 0.0, progress: bool = False) -> DDIMResult:  # fmt: skip
        """Deterministic DDIM decode from ``x_T`` under ``rule``: ``steps`` NFE."""
        plan = self.ddim_plan(rule, steps, stop_percent=stop_percent)
        return self.run(eps_fn, x_T, plan, clip=clip, progress=progress, desc="DDIM sample")

    def invert(self, eps_fn: EpsFn, x0: Tensor, steps: int, *, rule: str = "diffae", clip: bool = False,
               progress: bool = False) -> DDIMResult:  # fmt: skip
        """DDIM inversion of ``x0`` under ``rule``: ``steps`` NFE; its result is where
        :meth:`sample` with the same rule starts."""
        plan = self.ddim_plan(rule, steps, invert=True)
        return self.run(eps_fn, x0, plan, clip=clip, progress=progress, desc="DDIM inversion")


def gaussian_eps(mean: float, std: float, alphas_bar: Tensor) -> EpsFn:
    """The exact eps-predictor of data x_0 ~ N(mean, std^2) (elementwise, independent):

    ``x_t ~ N(sqrt(a) m, a s^2 + 1 - a)`` and ``E[eps | x_t] = sqrt(1-a) (x_t - sqrt(a) m) / (a s^2 + 1 - a)``
    with ``a = abar_t``. A closed-form stand-in for a perfectly trained network (tests, checks).
    """
    ab = alphas_bar.to(torch.float64)

    def eps_fn(x: Tensor, t: Tensor, shift: bool = True) -> Tensor:
        a = ab.to(x.device)[t].view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        return (1.0 - a).sqrt() * (x - a.sqrt() * mean) / (a * std**2 + 1.0 - a)

    return eps_fn


__all__ = [
    "DDIMResult", "DDIMStep", "DDIM_RULES", "DDPMSchedule", "EpsFn", "ScheduleConfig", "check_steps",
    "diffae_timesteps", "gaussian_eps", "pdae_timesteps",
]
