"""Fused sampler steps (SPEC 6): denoiser output, clamp, drift and update in one pass.

With ``D = clamp(c_skip x + c_out F, -1, 1)`` (F the raw network output) and the drift
``d = k_x x + k_D D + k_T x_T`` of :func:`dbae.sampling.drift`:

- :func:`euler_step`: ``x + dt d`` (the Euler step; the last Heun step);
- :func:`heun_predict`: the same step, also returning ``d`` for the corrector;
- :func:`heun_correct`: ``x_start + dt/2 (d1 + d2)``, ``d2`` the drift at the predicted point
  from the network output there, with the scalars of ``t_next``;
- :func:`churn_step`: the SDE Euler-Maruyama step ``x + dt d + sqrt(|dt|) g eps``.

Each runs as one op, ``torch.ops.dbae.<name>`` (C++/CUDA, ``csrc/fused_step/``), or as its
pure-PyTorch reference ``<name>_reference``. Both compute in float32 on float32, float16 or
bfloat16 storage and return the input dtype. The tensors must agree in shape, dtype and device;
non-contiguous inputs are copied first (one extra pass); outputs are contiguous.

Noise: element ``i`` of a churn step takes a standard normal from Philox4x32-10 with key
``seed`` and counter ``(i // 4, offset)`` (64-bit halves), Box-Muller on the four output words:
the same stream on CPU, on CUDA and in the reference, for any layout of threads. Give every
step its own ``offset`` (e.g. the step index); ``offset`` does not advance with the size.

Backends, chosen by ``DBAE_KERNELS`` when this module is imported: ``auto`` (default: the
compiled kernels for the tensors' device when available, else the reference), ``reference``,
``cpu`` or ``cuda`` (forced: an unavailable backend raises RuntimeError); ``triton``, which
selects the Triton training ops of :mod:`dbae.kernels`, means ``auto`` here. See :func:`backend`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from . import _ext
from . import sampling as _sampling
from .bridge import VPBridge, float64_scalar

Tensor = torch.Tensor

MODES = ("auto", "reference", "cpu", "cuda")
#: DBAE_KERNELS values that select other kernels (dbae.kernels' Triton ops): auto here
_OTHER_KERNELS_MODES = ("triton",)


@dataclass(frozen=True)
class FusedScalars:
    """Host float64 scalars of one fused step, rounded once to float32 by the kernels."""

    c_skip: float  # preconditioning of the denoiser at the step's t
    c_out: float
    k: _sampling.StepScalars  # drift scalars (k_x, k_D, k_T, g) at the step's t
    dt: float  # t_next - t (negative)

    @classmethod
    def at(cls, bridge: VPBridge, t: float, k: _sampling.StepScalars, dt: float) -> FusedScalars:
        """The scalars of a step of length ``dt`` that evaluates the network at ``t``."""
        pre = bridge.preconditioning(t)
        return cls(float64_scalar(pre.c_skip), float64_scalar(pre.c_out), k, dt)

    @property
    def noise_scale(self) -> float:
        """Standard deviation ``sqrt(|dt|) g`` of a churn step's noise."""
        return math.sqrt(abs(self.dt)) * self.k.g

    def op_args(self) -> tuple[float, ...]:
        """The scalars in the order of the ops' schemas."""
        return (self.c_skip, self.c_out, self.k.k_x, self.k.k_D, self.k.k_T, self.dt)


# ----- backend selection -----

_MODE = os.environ.get("DBAE_KERNELS", "auto").lower()
_OPS_ERROR: str | None = "not loaded (DBAE_KERNELS=reference)" if _MODE == "reference" else _ext.load_ops()
#: devices with compiled kernels, e.g. ("cpu",) or ("cpu", "cuda")
KERNEL_DEVICES: tuple[str, ...] = () if _OPS_ERROR else tuple(
    dev for dev in ("cpu", "cuda") if torch._C._dispatch_has_kernel_for_dispatch_key("dbae::euler_step", dev.upper())
)


def backend(device: torch.device | str = "cpu") -> str:
    """``"reference"``, ``"cpu"`` or ``"cuda"``: what serves tensors on ``device``.

    Raises ValueError for an unknown ``DBAE_KERNELS`` and RuntimeError when it forces a backend
    that is unavailable or does not match ``device``.
    """
    kind = torch.device(device).type
    if _MODE not in MODES + _OTHER_KERNELS_MODES:
        raise ValueError(f"DBAE_KERNELS={_MODE!r}: choose one of {', '.join(MODES + _OTHER_KERNELS_MODES)}")
    if _MODE == "reference":
        return "reference"
    if _MODE in ("auto",) + _OTHER_KERNELS_MODES:
        return kind if kind in KERNEL_DEVICES else "reference"
    if kind != _MODE:
        raise RuntimeError(f"DBAE_KERNELS={_MODE} forces the {_MODE} kernels, but the tensors are on {kind}")
    if _MODE not in KERNEL_DEVICES:
        why = _OPS_ERROR or f"dbae/{_ext.OPS_LIBRARY} was built without {_MODE} kernels"
        raise RuntimeError(f"DBAE_KERNELS={_MODE}: the fused {_MODE} kernels are unavailable: {why}")
    return _MODE


def report() -> str:
    """One line on the fused-step backends, for logs."""
    ops = f"ops library: {_OPS_ERROR}" if _OPS_ERROR else f"kernels for: {', '.join(KERNEL_DEVICES)}"
    return f"DBAE_KERNELS={_MODE}; {ops}"


def _use_ops(x: Tensor) -> bool:
    return backend(x.device) != "reference"


# ----- the steps -----


def euler_step(x: Tensor, F: Tensor, x_T: Tensor, s: FusedScalars, *, clamp: bool = True) -> Tensor:
    """``x + dt d`` with ``d`` the drift at ``x`` (network output ``F`` at ``x``)."""
    if _use_ops(x):
        return torch.ops.dbae.euler_step(x, F, x_T, *s.op_args(), clamp)
    return euler_step_reference(x, F, x_T, s, clamp=clamp)


def heun_predict(x: Tensor, F: Tensor, x_T: Tensor, s: FusedScalars, *, clamp: bool = True) -> tuple[Tensor, Tensor]:
    """``(x_pred, d)``: the Euler step and its drift, stored in ``x``'s dtype."""
    if _use_ops(x):
        return torch.ops.dbae.heun_predict(x, F, x_T, *s.op_args(), clamp)
    return heun_predict_reference(x, F, x_T, s, clamp=clamp)


def heun_correct(
    x_start: Tensor, d1: Tensor, x_pred: Tensor, F: Tensor, x_T: Tensor, s: FusedScalars, *, clamp: bool = True
) -> Tensor:
    """``x_start + dt/2 (d1 + d2)``; ``F`` is the network output at ``x_pred``, ``s`` holds
    the scalars of ``t_next`` and the step's ``dt``."""
    if _use_ops(x_start):
        return torch.ops.dbae.heun_correct(x_start, d1, x_pred, F, x_T, *s.op_args(), clamp)
    return heun_correct_reference(x_start, d1, x_pred, F, x_T, s, clamp=clamp)


def churn_step(
    x: Tensor, F: Tensor, x_T: Tensor, s: FusedScalars, seed: int, offset: int, *, clamp: bool = True
) -> Tensor:
    """``x + dt d + sqrt(|dt|) g eps`` with ``eps`` from the Philox stream ``(seed, offset)``;
    ``s`` holds the SDE drift scalars."""
    if _use_ops(x):
        return torch.ops.dbae.churn_step(x, F, x_T, *s.op_args(), s.noise_scale, seed, offset, clamp)
    return churn_step_reference(x, F, x_T, s, seed, offset, clamp=clamp)


# ----- pure-PyTorch references (float32 math, the kernels' order of operations) -----


def _check_alike(op: str, **tensors: Tensor) -> None:
    """The checks of the ops (csrc/fused_step/inputs.cpp): one float dtype, device and shape."""
    (name0, t0), *rest = tensors.items()
    if t0.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise RuntimeError(f"{op}: supports float32, float16 and bfloat16 tensors, got {name0} of dtype {t0.dtype}")
    for name, t in rest:
        for what, got, want in (
            ("is on", t.device, t0.device),
            ("has dtype", t.dtype, t0.dtype),
            ("has shape", tuple(t.shape), tuple(t0.shape)),
        ):
            if got != want:
                raise RuntimeError(f"{op}: {name} {what} {got} but {name0} {what} {want}")


def _drift32(x32: Tensor, F: Tensor, x_T: Tensor, s: FusedScalars, clamp: bool) -> Tensor:
    D = s.c_skip * x32 + s.c_out * F.float()
    if clamp:
        D = D.clamp(-1.0, 1.0)
    return _sampling.drift(x32, D, x_T.float(), s.k)


def euler_step_reference(x: Tensor, F: Tensor, x_T: Tensor, s: FusedScalars, *, clamp: bool = True) -> Tensor:
    _check_alike("euler_step", x=x, F=F, x_T=x_T)
    x32 = x.float()
    return (x32 + s.dt * _drift32(x32, F, x_T, s, clamp)).to(x.dtype)


def heun_predict_reference(
    x: Tensor, F: Tensor, x_T: Tensor, s: FusedScalars, *, clamp: bool = True
) -> tuple[Tensor, Tensor]:
    _check_alike("heun_predict", x=x, F=F, x_T=x_T)
    x32 = x.float()
    d = _drift32(x32, F, x_T, s, clamp)
    return (x32 + s.dt * d).to(x.dtype), d.to(x.dtype)


def heun_correct_reference(
    x_start: Tensor, d1: Tensor, x_pred: Tensor, F: Tensor, x_T: Tensor, s: FusedScalars, *, clamp: bool = True
) -> Tensor:
    _check_alike("heun_correct", x_start=x_start, d1=d1, x_pred=x_pred, F=F, x_T=x_T)
    d2 = _drift32(x_pred.float(), F, x_T, s, clamp)
    return (x_start.float() + (0.5 * s.dt) * (d1.float() + d2)).to(x_start.dtype)


def churn_step_reference(
    x: Tensor, F: Tensor, x_T: Tensor, s: FusedScalars, seed: int, offset: int, *, clamp: bool = True
) -> Tensor:
    _check_alike("churn_step", x=x, F=F, x_T=x_T)
    x32 = x.float()
    eps = philox_normal(x.numel(), seed, offset, device=x.device).view(x.shape)
    return (x32 + s.dt * _drift32(x32, F, x_T, s, clamp) + s.noise_scale * eps).to(x.dtype)


# ----- the noise stream: Philox4x32-10 (Salmon et al. 2011) and Box-Muller, in int64 tensors -----

_MASK32 = 0xFFFFFFFF


def _mulhilo(a: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """High and low 32-bit words of ``a * m`` (``a`` uint32 values in int64, ``m`` < 2^32)."""
    p_lo, p_hi = (a & 0xFFFF) * m, (a >> 16) * m  # a m = p_hi 2^16 + p_lo, each < 2^48
    return (p_hi + (p_lo >> 16)) >> 16, (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32


def philox4x32_10(ctr: tuple[Tensor, Tensor, Tensor, Tensor], key: tuple[int, int]) -> tuple[Tensor, ...]:
    """The four output words for counter words ``ctr`` (uint32 values in int64 tensors)."""
    c0, c1, c2, c3 = ctr
    for r in range(10):
        k0 = (key[0] + r * 0x9E3779B9) & _MASK32
        k1 = (key[1] + r * 0xBB67AE85) & _MASK32
        hi0, lo0 = _mulhilo(c0, 0xD2511F53)
        hi1, lo1 = _mulhilo(c2, 0xCD9E8D57)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _box_muller(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    u = ((a >> 8) + 1).to(torch.float32) * 2.0**-24  # (0, 1], exact
    v = (b >> 8).to(torch.float32) * 2.0**-24  # [0, 1), exact
    r = torch.sqrt(-2.0 * torch.log(u))
    theta = (2.0 * math.pi) * v
    return r * torch.cos(theta), r * torch.sin(theta)


@torch.compiler.disable  # Inductor would inline the ten rounds into an exponentially large expression
def philox_normal(n: int, seed: int, offset: int, *, device: torch.device | str = "cpu") -> Tensor:
    """The first ``n`` float32 standard normals of the stream ``(seed, offset)``."""
    if seed < 0 or offset < 0:
        raise ValueError(f"seed and offset must be non-negative, got seed={seed}, offset={offset}")
    g = torch.arange((n + 3) // 4, dtype=torch.int64, device=device)
    ctr = (g & _MASK32, g >> 32, torch.full_like(g, offset & _MASK32), torch.full_like(g, offset >> 32))
    w = philox4x32_10(ctr, (seed & _MASK32, seed >> 32))
    n0, n1 = _box_muller(w[0], w[1])
    n2, n3 = _box_muller(w[2], w[3])
    return torch.stack((n0, n1, n2, n3), dim=1).flatten()[:n]


# ----- fake (meta) implementations: shapes for torch.compile and CUDA-graph capture -----


def _fake_like(op: str, **tensors: Tensor) -> Tensor:
    _check_alike(op, **tensors)
    return torch.empty_like(next(iter(tensors.values())), memory_format=torch.contiguous_format)


if not _OPS_ERROR:

    @torch.library.register_fake("dbae::euler_step")
    def _euler_step_fake(x, F, x_T, c_skip, c_out, k_x, k_D, k_T, dt, clamp=True):
        return _fake_like("dbae::euler_step", x=x, F=F, x_T=x_T)

    @torch.library.register_fake("dbae::heun_predict")
    def _heun_predict_fake(x, F, x_T, c_skip, c_out, k_x, k_D, k_T, dt, clamp=True):
        x_pred = _fake_like("dbae::heun_predict", x=x, F=F, x_T=x_T)
        return x_pred, torch.empty_like(x_pred)

    @torch.library.register_fake("dbae::heun_correct")
    def _heun_correct_fake(x_start, d1, x_pred, F, x_T, c_skip, c_out, k_x, k_D, k_T, dt, clamp=True):
        return _fake_like("dbae::heun_correct", x_start=x_start, d1=d1, x_pred=x_pred, F=F, x_T=x_T)

    @torch.library.register_fake("dbae::churn_step")
    def _churn_step_fake(x, F, x_T, c_skip, c_out, k_x, k_D, k_T, dt, noise_scale, seed, offset, clamp=True):
        return _fake_like("dbae::churn_step", x=x, F=F, x_T=x_T)
