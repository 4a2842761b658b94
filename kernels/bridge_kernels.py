"""Triton kernels of the fused training ops (imports triton: load through :mod:`.backend`).

Every kernel runs on a (ceil(P / BLOCK), B) grid: program (j, b) handles the BLOCK values
j*BLOCK ... of sample b (P values per sample, images contiguous), so the per-sample
coefficients are scalars loaded once per program from row b of the table. Arithmetic is
float32; loads upcast, stores round to each output's dtype.

Noise: one Philox4x32 call (``tl.randint4x``, ROUNDS rounds: 10 by default, the
standard Philox4x32-10) gives four normals (two Box-Muller pairs). Program (j, b) makes TILE calls, with counters (b << 32) | (j*TILE + k), k < TILE,
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
_WEIGHT = tl.constexpr(_table.WEIGHT)


@triton.jit
def _uniform(i):
    """Random uint32 -> float32 uniform on (0, 1] from its top 23 bits.

    The bits become the mantissa of a float in [1, 2): integer operations and one
    subtraction, no int-to-float conversion (a quarter-rate instruction, like the
    transcendentals, and with Philox the cost of the kernels in bfloat16).
    """
    one_to_two = ((i.to(tl.uint32, bitcast=True) >> 9) | 0x3F800000).to(tl.float32, bitcast=True)
    return 2.0 - one_to_two


# The decorators make interpreted kernels exactly when TRITON_INTERPRET=1 at import.
INTERPRETED = isinstance(_uniform, InterpretedFunction)
_FAST_MATH = tl.constexpr(not INTERPRETED)


@triton.jit
def _normal_pair(i1, i2):
    """Box-Muller: two independent N(0, 1) from two random uint32 (|values| < 5.7)."""
    u1 = _uniform(i1)  # > 0: log(u1) is finite, |normal| <= sqrt(-2 log 2**-23) < 5.7
    theta = 6.283185307179586 * _uniform(i2) - 3.141592653589793  # uniform angle in (-pi, pi]
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
def _noise(seed, ROUNDS: tl.constexpr):
    """The four float32 N(0, 1) streams of this program, (TILE,) each, one per quarter."""
    b, j = tl.program_id(1), tl.program_id(0)
    counter = (b.to(tl.int64) << 32) | (j.to(tl.int64) * _TILE + tl.arange(0, _TILE))
    i1, i2, i3, i4 = tl.randint4x(seed, counter, ROUNDS)
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
def noise_kernel(out_ptr, seed, P, ROUNDS: tl.constexpr):
    """out = eps (float32), the noise that every other kernel regenerates."""
    eps = _noise(seed, ROUNDS)
    for q in tl.static_range(4):
        offsets, mask = _quarter(P, q)
        _store(out_ptr, offsets, mask, eps[q])


@triton.jit(do_not_specialize=["seed"])
def bridge_input_kernel(x0_ptr, x_T_ptr, table_ptr, x_t_ptr, x_in_ptr, seed, P, ROUNDS: tl.constexpr):
    """x_t = a x_T + b x0 + sqrt(v) eps and x_in = c_in x_t in one pass."""
    eps = _noise(seed, ROUNDS)
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
def bridge_mse_kernel(F_ptr, x0_ptr, x_T_ptr, table_ptr, partial_ptr, seed, P, ROUNDS: tl.constexpr):
    """partial[b, j] = sum over the values of program (j, b) of (D - x0)^2."""
    eps = _noise(seed, ROUNDS)
    coefficients = _coefficients(table_ptr)
    total = tl.zeros((_TILE,), tl.float32)
    for q in tl.static_range(4):
        offsets, mask = _quarter(P, q)
        r = _residual(F_ptr, x0_ptr, x_T_ptr, eps[q], offsets, mask, coefficients)
        total += r * r
    tl.store(partial_ptr + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0), tl.sum(total, axis=0))


@triton.jit
def bridge_loss_finish_kernel(
    partial_ptr, table_ptr, mse_ptr, loss_ptr, B, NUM_PARTIALS, P, ROWS: tl.constexpr, COLUMNS: tl.constexpr
):
    """One program: mse[b] = sum_j partial[b, j] / P and loss = mean_b(weight[b] mse[b]).

    A fixed-order reduction (ROWS samples at a time, COLUMNS >= NUM_PARTIALS), so the loss is
    deterministic: no atomics.
    """
    rows, columns = tl.arange(0, ROWS), tl.arange(0, COLUMNS)
    total = tl.zeros((ROWS,), tl.float32)
    for start in range(0, B, ROWS):
        sample = start + rows
        valid = sample < B
        mask = valid[:, None] & (columns[None, :] < NUM_PARTIALS)
        partial = tl.load(partial_ptr + sample[:, None] * NUM_PARTIALS + columns[None, :], mask=mask, other=0.0)
        mse = tl.sum(partial, axis=1) / P
        tl.store(mse_ptr + sample, mse, mask=valid)
        total += tl.where(valid, tl.load(table_ptr + sample * _NUM_COLUMNS + _WEIGHT, mask=valid, other=0.0) * mse, 0.0)
    tl.store(loss_ptr, tl.sum(total, axis=0) / B)


@triton.jit(do_not_specialize=["seed"])
def bridge_loss_backward_kernel(
    grad_loss_ptr,
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
    ROUNDS: tl.constexpr,
    HAS_GRAD_LOSS: tl.constexpr,
    HAS_GRAD_MSE: tl.constexpr,
    WANT_X0: tl.constexpr,
):
    """The gradients of (loss, mse) for upstream gradients grad_loss (scalar) and grad_mse (B,).

    Per sample, g = grad_mse[b] + grad_loss weight[b] / B is the gradient of mse[b]; with
    s = 2 g / P r: grad_F = c_out s, grad_x_T = a c_skip s, grad_x0 = b c_skip s - s.
    """
    eps = _noise(seed, ROUNDS)
    coefficients = _coefficients(table_ptr)
    a, b, _, _, c_skip, c_out = coefficients
    g = 0.0
    if HAS_GRAD_MSE:
        g += tl.load(grad_mse_ptr + tl.program_id(1))
    if HAS_GRAD_LOSS:
        weight = tl.load(table_ptr + tl.program_id(1) * _NUM_COLUMNS + _WEIGHT)
        g += tl.load(grad_loss_ptr) * weight / tl.num_programs(1)
    scale = 2.0 / P * g
    for q in tl.static_range(4):
        offsets, mask = _quarter(P, q)
        s = scale * _residual(F_ptr, x0_ptr, x_T_ptr, eps[q], offsets, mask, coefficients)
        grad_x_t = c_skip * s
        _store(grad_F_ptr, offsets, mask, c_out * s)
        _store(grad_x_T_ptr, offsets, mask, a * grad_x_t)
        if WANT_X0:
            _store(grad_x0_ptr, offsets, mask, b * grad_x_t - s)
