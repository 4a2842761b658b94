"""Which implementation an op runs: the Triton kernels or the PyTorch reference.

``DBAE_KERNELS`` selects: ``auto`` (default) runs Triton wherever it can run for the given
tensors, ``reference`` always runs the reference, ``triton`` always runs Triton and raises
where it cannot. The variable is shared with the C++ fused sampler steps
(:mod:`dbae.fused_step`), whose values ``cpu`` and ``cuda`` leave these ops on ``auto``.
The decision is taken per call (under ``torch.compile``: once, when the op is traced).

Triton can run on CUDA tensors, or on any tensors when the kernels were built by the
Triton interpreter (``TRITON_INTERPRET=1`` set before :mod:`dbae.kernels` was first
imported). Interpreted kernels run eagerly only: they cannot be traced by
``torch.compile``, so a traced call falls back to the reference in ``auto`` mode.
"""

from __future__ import annotations

import os
from functools import cache
from types import ModuleType

import torch

ENV_VAR = "DBAE_KERNELS"
MODES = ("auto", "reference", "triton")
_OTHER_KERNELS_MODES = ("cpu", "cuda")  # select dbae.fused_step's C++ kernels: auto here


@cache
def kernel_module() -> ModuleType | None:
    """:mod:`dbae.kernels.bridge_kernels`, or None without Triton (or torch < 2.6)."""
    try:
        from torch.library import triton_op  # noqa: F401  (wraps the kernels as ops)

        from . import bridge_kernels
    except ImportError:
        return None
    return bridge_kernels


def mode() -> str:
    """The selection for these ops: one of MODES."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value in _OTHER_KERNELS_MODES:
        return "auto"
    if value not in MODES:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(MODES + _OTHER_KERNELS_MODES)}; got {value!r}")
    return value


def _reason_unavailable(device: torch.device, traced: bool) -> str | None:
    """Why Triton cannot run on ``device`` (None when it can)."""
    kernels = kernel_module()
    if kernels is None:
        return "triton is not installed (or torch < 2.6)"
    if kernels.INTERPRETED:
        return "interpreted Triton kernels cannot be traced by torch.compile" if traced else None
    if device.type != "cuda":
        return f"tensors are on {device.type}, Triton needs CUDA (or TRITON_INTERPRET=1 at import)"
    return None


def available(device: torch.device | str | None = None) -> bool:
    """Whether the Triton kernels can run here: on ``device``, or on the default CUDA device."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return _reason_unavailable(torch.device(device), traced=False) is None


def use_triton(device: torch.device, *, traced: bool = False) -> bool:
    """Whether an op on ``device`` runs the Triton kernel (``traced``: under fake tensors)."""
    selected = mode()
    if selected == "reference":
        return False
    reason = _reason_unavailable(device, traced)
    if reason is not None and selected == "triton":
        raise RuntimeError(f"{ENV_VAR}=triton but the Triton kernels cannot run: {reason}")
    return reason is None
