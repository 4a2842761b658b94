"""Triton kernels of the fused training ops (imports triton: load through :mod:`.backend`).

Every kernel runs on a (ceil(P / BLOCK), B) grid: program (j, b) handles the BLOCK values
j*BLOCK ... of sample b (P values per sample, images contiguous), so the per-sample
coefficients are scalars loaded once per program from row b of the table. Arithmetic is
float32; loads upcast, stores round to each output's dtype.

Noise: one Philox4x32-10 call (``tl.randint4x``) gives four normals (two Box-Muller
pairs). Program (j, b) makes TILE calls, with counters (b << 32) | (j*TILE + k), k < TILE,
and uses normal number q of call k for value j*BLOCK + q*TILE + k of sample b
(BLOCK = 4 TILE): four contiguous quarters, one per Philox output. So eps[b, i] depends
only on (seed, b, i), not on the batch size, and every kernel regenerates it from the
seed instead of storing it.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from . import table as _table

TILE = 1024  # values per Philox output stream of a program
BLOCK = 4 * TILE  # values per program

_TILE = tl.constexpr(TILE)
_BLOCK = tl.constexpr(BLOCK)
# Table columns, as compile-time constants of the kernels.
_NUM_COLUMNS = tl.constexpr(_table.NUM_COLUMNS)
_A = tl.constexpr(_table.A)
_B = tl.constexpr(_table.B)
_SQRT_V = tl.constexpr(_table.SQRT_V)
_C_IN = tl.constexpr(_table.C_IN)
_C_SKIP = tl.constexpr(_table.C_SKIP)
_C_OUT = tl.constexpr(_table.C_OUT)


@triton.jit
def _uniform(i):
    """Random uint32 -> float32 uniform on [0, 1), from 31 bits (as ``tl.rand``)."""
    i = i.to(tl.int32, bitcast=True)
    return tl.where(i < 0, ~i, i) * 4.6566127342e-10


# The decorators make interpreted kernels exactly when TRITON_INTERPRET=1 at import.
INTERPRETED = isinstance(_uniform, InterpretedFunction)
_FAST_MATH = tl.constexpr(not INTERPRETED)


@triton.jit
def _normal_pair(i1, i2):
    """Box-Muller: two independent N(0, 1) from two random uint32 (|values| < 5.7)."""
    u1 = tl.maximum(1.0e-7, _uniform(i1))
    theta = 6.283185307179586 * _uniform(i2) - 3.141592653589793  # uniform angle in [-pi, pi)
    if _FAST_MATH:
        # one MUFU instruction each (sin/cos abs. error ~1e-6 for |theta| <= pi); the precise
        # versions cost tens of instructions and would make the kernels compute-bound in bf16
        log_u1 = tl.extra.libdevice.fast_logf(u1)
        cos, sin = tl.extra.libdevice.fast_cosf(theta), tl.extra.libdevice.fast_sinf(theta)
    else:  # the Triton interpreter has no fast variants
        log_u1, cos, sin = tl.log(u1), tl.cos(theta), tl.sin(theta)
    r = tl.sqrt(tl.maximum(-2.0 * log_u1, 0.0))  # an approximate log may be > 0 just below u1 = 1
    return r * cos, r * sin


@triton.jit
def _noise(seed):
    """The four float32 N(0, 1) streams of this program, (TILE,) each, one per quarter."""
    b, j = tl.program_id(1), tl.program_id(0)
    counter = (b.to(tl.int64) << 32) | (j.to(tl.int64) * _TILE + tl.arange(0, _TILE))
    i1, i2, i3, i4 = tl.randint4x(seed, counter)
    n1, n2 = _normal_pair(i1, i2)
    n3, n4 = _normal_pair(i3, i4)
    return n1, n2, n3, n4


@triton.jit
def _quarter(P, q: tl.constexpr):
    """(offsets into the batch, mask) of quarter q of this program's values."""
    b, j = tl.program_id(1), tl.program_id(0)
    local = j * _BLOCK + q * _TILE + tl.arange(0, _TILE)
    return b.to(tl.int64) * P + local, local < P


@triton.jit
def _coefficients(table_ptr):
    """(a, b, sqrt_v, c_in, c_skip, c_out) of this program's sample (unused ones cost nothing)."""
    row = table_ptr + tl.program_id(1) * _NUM_COLUMNS
    return (
        tl.load(row + _A),
        tl.load(row + _B),
        tl.load(row + _SQRT_V),
        tl.load(row + _C_IN),
        tl.load(row + _C_SKIP),
        tl.load(row + _C_OUT),
    )


@triton.jit
def _load(ptr, offsets, mask):
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store(ptr, offsets, mask, value):
    tl.store(ptr + offsets, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _x_t(x0, x_T, eps, coefficients):
    a, b, sqrt_v, _, _, _ = coefficients
    return a * x_T + b * x0 + sqrt_v * eps


@triton.jit
def _residual(F_ptr, x0_ptr, x_T_ptr, eps, offsets, mask, coefficients):
    """r = D - x0 with D = c_skip x_t + c_out F (0 outside the mask)."""
    x0 = _load(x0_ptr, offsets, mask)
    x_t = _x_t(x0, _load(x_T_ptr, offsets, mask), eps, coefficients)
    _, _, _, _, c_skip, c_out = coefficients
    r = c_skip * x_t + c_out * _load(F_ptr, offsets, mask) - x0
    return tl.where(mask, r, 0.0)


@triton.jit(do_not_specialize=["seed"])
def noise_kernel(out_ptr, seed, P):
    """out = eps (float32), the noise that every other kernel regenerates."""
    eps = _noise(seed)
    for q in tl.static_range(4):
        offsets, mask = _quarter(P, q)
        _store(out_ptr, offsets, mask, eps[q])


@triton.jit(do_not_specialize=["seed"])
def bridge_input_kernel(x0_ptr, x_T_ptr, table_ptr, x_t_ptr, x_in_ptr, seed, P):
    """x_t = a x_T + b x0 + sqrt(v) eps and x_in = c_in x_t in one pass."""
    eps = _noise(seed)
    coefficients = _coefficients(table_ptr)
    _, _, _, c_in, _, _ = coefficients
    for q in tl.static_range(4):
        offsets, mask = _quarter(P, q)
        x_t = _x_t(_load(x0_ptr, offsets, mask), _load(x_T_ptr, offsets, mask), eps[q], coefficients)
        _store(x_t_ptr, offsets, mask, x_t)
        _store(x_in_ptr, offsets, mask, c_in * x_t)


@triton.jit
def bridge_input_backward_kernel(
    grad_x_t_ptr,
    grad_x_in_ptr,
    table_ptr,
    grad_x_T_ptr,
    grad_x0_ptr,
    P,
    HAS_GRAD_X_T: tl.constexpr,
    HAS_GRAD_X_IN: tl.constexpr,
    WANT_X0: tl.constexpr,
):
    """g = grad_x_t + c_in grad_x_in; grad_x_T = a g, grad_x0 = b g (absent tensors: None pointers)."""
    a, b, _, c_in, _, _ = _coefficients(table_ptr)
    for q in tl.static_range(4):
        offsets, mask = _quarter(P, q)
        g = tl.zeros((_TILE,), tl.float32)
        if HAS_GRAD_X_T:
            g += _load(grad_x_t_ptr, offsets, mask)
        if HAS_GRAD_X_IN:
            g += c_in * _load(grad_x_in_ptr, offsets, mask)
        _store(grad_x_T_ptr, offsets, mask, a * g)
        if WANT_X0:
            _store(grad_x0_ptr, offsets, mask, b * g)


@triton.jit(do_not_specialize=["seed"])
def bridge_mse_kernel(F_ptr, x0_ptr, x_T_ptr, table_ptr, partial_ptr, seed, P):
    """partial[b, j] = sum over the values of program (j, b) of (D - x0)^2."""
    eps = _noise(seed)
    coefficients = _coefficients(table_ptr)
    total = tl.zeros((_TILE,), tl.float32)
    for q in tl.static_range(4):
        offsets, mask = _quarter(P, q)
        r = _residual(F_ptr, x0_ptr, x_T_ptr, eps[q], offsets, mask, coefficients)
        total += r * r
    tl.store(partial_ptr + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0), tl.sum(total, axis=0))


@triton.jit(do_not_specialize=["seed"])
def bridge_mse_backward_kernel(
    grad_mse_ptr,
    F_ptr,
    x0_ptr,
    x_T_ptr,
    table_ptr,
    grad_F_ptr,
    grad_x_T_ptr,
    grad_x0_ptr,
    seed,
    P,
    WANT_X0: tl.constexpr,
):
    """With s = 2 grad_mse[b] / P * r: grad_F = c_out s, grad_x_T = a c_skip s, grad_x0 = b c_skip s - s."""
    eps = _noise(seed)
    coefficients = _coefficients(table_ptr)
    a, b, _, _, c_skip, c_out = coefficients
    scale = 2.0 / P * tl.load(grad_mse_ptr + tl.program_id(1))
    for q in tl.static_range(4):
        offsets, mask = _quarter(P, q)
        s = scale * _residual(F_ptr, x0_ptr, x_T_ptr, eps[q], offsets, mask, coefficients)
        grad_x_t = c_skip * s
        _store(grad_F_ptr, offsets, mask, c_out * s)
        _store(grad_x_T_ptr, offsets, mask, a * grad_x_t)
        if WANT_X0:
            _store(grad_x0_ptr, offsets, mask, b * grad_x_t - s)
