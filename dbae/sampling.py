"""Bridge samplers of SPEC section 6: Euler, Heun and stochastic churn on the Karras grid.

The per-step scalars (k_x, k_D, k_T, g) are computed once on the host in float64; the
per-element work of a step is the linear combination ``k_x x + k_D D + k_T x_T``
(:func:`drift`), which fused kernels replace without changing the algorithm.

The drift is evaluated as ``k_x (x - x_T) + k_D (D - x_T) + k_sum x_T`` with
``k_sum = k_x + k_D + k_T`` summed in float64: the same function, rounded far less. Near
t = T, k_x and k_T are about -5e3 and +5e3 and cancel to about 1, while x is (close to) x_T;
summed term by term in float32 they left errors of 2e-4 to 7e-4 in the decoded images,
which the rewritten form removes (and near t_min, where k_x and k_D cancel, the step dt is
1e-4, so what remains is negligible).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch

from . import _ext
from .bridge import BridgeConfig, VPBridge, float64_scalar, karras_grid

Tensor = torch.Tensor
#: ``denoise(x, t) -> D``: x (B, C, H, W), t a python float (the same for the whole batch)
DenoiseFn = Callable[[Tensor, float], Tensor]
#: ``network(x, t) -> F``: the raw U-Net output (the fused steps apply the preconditioning)
NetworkFn = Callable[[Tensor, float], Tensor]
SamplerName = Literal["euler", "heun"]
SAMPLERS = ("euler", "heun")


@dataclass(frozen=True)
class StepScalars:
    """Host-side float64 scalars of one drift evaluation."""

    k_x: float
    k_D: float
    k_T: float
    g: float

    @property
    def k_sum(self) -> float:
        """``k_x + k_D + k_T`` in float64: the coefficient of x_T in the rewritten drift."""
        return self.k_x + self.k_D + self.k_T



@dataclass(frozen=True)
class SamplingPlan:
    """Times and host-side float64 scalars of every network evaluation of a run."""

    steps: int
    sampler: str
    churn: float
    ts: list[float]  # Karras grid t_0 > ... > t_{steps-1}, then 0
    t_hats: list[float]  # where each step's ODE part starts (t_i without churn)
    sde: list[StepScalars] | None  # SDE scalars at t_i (churn only)
    ode: list[StepScalars]  # ODE scalars at t_hat_i
    ode_next: list[StepScalars] | None  # ODE scalars at t_{i+1} (Heun corrector only)

    @property
    def nfe(self) -> int:
        return nfe_for(self.steps, self.sampler, self.churn)


@dataclass(frozen=True)
class SampleResult:
    images: Tensor
    nfe: int
    steps: int


def nfe_for(steps: int, sampler: str, churn: float) -> int:
    """Exact number of network evaluations of a run (SPEC 11)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if steps < 1:
        raise ValueError("steps must be >= 1")
    base = steps if sampler == "euler" else 2 * (steps - 1) + 1
    return base + (steps if churn > 0 else 0)


def steps_for_nfe(nfe: int, sampler: str, churn: float) -> int:
    """Largest number of grid steps whose NFE does not exceed ``nfe``."""
    if nfe < nfe_for(1, sampler, churn):
        raise ValueError(f"nfe={nfe} is too small for sampler {sampler!r} (churn={churn}): "
                         f"need at least {nfe_for(1, sampler, churn)}")
    steps = 1
    while nfe_for(steps + 1, sampler, churn) <= nfe:
        steps += 1
    return steps


def drift(x: Tensor, D: Tensor, x_T: Tensor, k: StepScalars) -> Tensor:
    """Reference per-element drift ``k_x x + k_D D + k_T x_T``, evaluated as
    ``k_x (x - x_T) + k_D (D - x_T) + k_sum x_T`` (see the module docstring)."""
    return k.k_x * (x - x_T) + k.k_D * (D - x_T) + k.k_sum * x_T


class BridgeSampler:
    """Integrates the bridge from x_T (t_0 = T - 1e-4) down to t = 0."""

    def __init__(self, bridge: VPBridge | None = None) -> None:
        self.bridge = bridge or VPBridge()

    @property
    def config(self) -> BridgeConfig:
        return self.bridge.config

    def scalars(self, ts: list[float], mode: str) -> list[StepScalars]:
        """Drift scalars at each t, from the C++ extension when built, else the reference."""
        if mode not in ("ode", "sde"):
            raise ValueError(f"mode must be 'ode' or 'sde', got {mode!r}")
        c = self.config
        if _ext.C is not None:
            rows = _ext.C.drift_coefficients(
                ts, 0 if mode == "ode" else 1, 1.0, c.beta_d, c.beta_min, c.T, c.t_min, c.start_offset, c.rho
            )
            return [StepScalars(*row) for row in rows]
        coeffs = self.bridge.drift_coefficients(torch.tensor(ts, dtype=torch.float64), mode)
        return [StepScalars(*(float64_scalar(v[i]) for v in coeffs)) for i in range(len(ts))]

    def sample(
        self,
        denoise: DenoiseFn,
        x_T: Tensor,
        *,
        steps: int,
        sampler: SamplerName = "euler",
        churn: float = 0.0,
        generator: torch.Generator | None = None,
        churn_noise: Sequence[Tensor] | None = None,
        progress: bool = False,
    ) -> SampleResult:
        """Run ``steps`` grid steps; ``denoise`` must already clamp its output if wanted.
        The churn steps draw their noise from ``generator``, or take ``churn_noise[i]`` at
        step i (standard normal, shaped like x_T) when it is given."""
        plan = self.plan(steps, sampler, churn)
        if churn_noise is not None:
            if plan.sde is None:
                raise ValueError("churn_noise was given for a run without churn")
            if len(churn_noise) != steps or any(n.shape != x_T.shape for n in churn_noise):
                raise ValueError(f"churn_noise needs {steps} tensors of shape {tuple(x_T.shape)}")
        ts, t_hats, sde, ode, ode_next = plan.ts, plan.t_hats, plan.sde, plan.ode, plan.ode_next
        evaluate = _Counted(denoise)

        x = x_T
        for i in _progress(range(steps), progress, f"{sampler} x{steps}"):
            t_cur, t_next = ts[i], ts[i + 1]
            if sde is not None:
                # SDE Euler-Maruyama from t_cur to t_hat, then the ODE step from t_hat.
                k = sde[i]
                dt = t_hats[i] - t_cur
                if churn_noise is not None:
                    noise = churn_noise[i].to(device=x.device, dtype=x.dtype)
                else:
                    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = x + dt * drift(x, evaluate(x, t_cur), x_T, k) + (math.sqrt(abs(dt)) * k.g) * noise
                t_cur = t_hats[i]
            dt = t_next - t_cur
            d = drift(x, evaluate(x, t_cur), x_T, ode[i])
            x_next = x + dt * d
            if ode_next is not None and t_next > 0.0:
                d2 = drift(x_next, evaluate(x_next, t_next), x_T, ode_next[i])
                x_next = x + dt * 0.5 * (d + d2)
            x = x_next
        return _checked_result(x, evaluate.calls, plan)

    def plan(self, steps: int, sampler: str, churn: float) -> SamplingPlan:
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if not (0.0 <= churn < 1.0):
            raise ValueError(f"churn must lie in [0, 1), got {churn}")
        ts = karras_grid(steps, self.config)
        # Host-side float64 scalars of every evaluation, computed once up front.
        t_hats = [t + churn * (tn - t) for t, tn in zip(ts[:-1], ts[1:])] if churn > 0.0 else ts[:-1]
        return SamplingPlan(
            steps=steps,
            sampler=sampler,
            churn=churn,
            ts=ts,
            t_hats=t_hats,
            sde=self.scalars(ts[:-1], "sde") if churn > 0.0 else None,
            ode=self.scalars(t_hats, "ode"),
            ode_next=self.scalars(ts[1:-1], "ode") if sampler == "heun" else None,
        )

    def sample_fused(
        self,
        network: NetworkFn,
        x_T: Tensor,
        *,
        steps: int,
        sampler: SamplerName = "euler",
        churn: float = 0.0,
        seed: int = 0,
        clamp: bool = True,
        progress: bool = False,
    ) -> SampleResult:
        """The same integration with the fused steps of :mod:`dbae.fused_step`.

        ``network(x, t)`` returns the raw U-Net output F (in x's dtype); each step forms
        D = c_skip x + c_out F (clamped to [-1, 1] if ``clamp``) and updates x in one pass.
        Churn noise comes from the Philox stream (seed, step index), not a torch generator.
        """
        from . import fused_step as fs

        plan = self.plan(steps, sampler, churn)
        evaluate = _Counted(network)

        def scalars(t: float, k: StepScalars, dt: float) -> fs.FusedScalars:
            return fs.FusedScalars.at(self.bridge, t, k, dt)

        x = x_T
        for i in _progress(range(steps), progress, f"{sampler} x{steps} (fused)"):
            t_cur, t_next = plan.ts[i], plan.ts[i + 1]
            if plan.sde is not None:
                dt = plan.t_hats[i] - t_cur
                x = fs.churn_step(x, evaluate(x, t_cur), x_T, scalars(t_cur, plan.sde[i], dt), seed, i, clamp=clamp)
                t_cur = plan.t_hats[i]
            dt = t_next - t_cur
            F = evaluate(x, t_cur)
            if plan.ode_next is not None and t_next > 0.0:
                x_pred, d = fs.heun_predict(x, F, x_T, scalars(t_cur, plan.ode[i], dt), clamp=clamp)
                s_next = scalars(t_next, plan.ode_next[i], dt)
                x = fs.heun_correct(x, d, x_pred, evaluate(x_pred, t_next), x_T, s_next, clamp=clamp)
            else:
                x = fs.euler_step(x, F, x_T, scalars(t_cur, plan.ode[i], dt), clamp=clamp)
        return _checked_result(x, evaluate.calls, plan)


class _Counted:
    """Wraps the denoiser (or network) and counts its evaluations: the NFE."""

    def __init__(self, fn: Callable[[Tensor, float], Tensor]) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, x: Tensor, t: float) -> Tensor:
        self.calls += 1
        return self.fn(x, t)


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)


def _checked_result(x: Tensor, nfe: int, plan: SamplingPlan) -> SampleResult:
    if nfe != plan.nfe:
        raise RuntimeError(f"NFE accounting broken: counted {nfe}, expected {plan.nfe}")
    return SampleResult(images=x, nfe=nfe, steps=plan.steps)
