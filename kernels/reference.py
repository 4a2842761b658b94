"""Pure-PyTorch reference of the fused training ops, with the noise passed explicitly.

These functions define the semantics that the Triton kernels implement: every input is
upcast to float32, all arithmetic is float32, and each output is rounded once to its
dtype. They are differentiable with ordinary autograd; the ``*_backward`` functions are
the closed-form gradients that the ops use on their reference path (the tests check them,
and the Triton backward kernels, against autograd of the forward functions here).

Shapes: images (B, ...) with P = numel / B values per sample; ``table`` is the
(B, NUM_COLUMNS) float32 table of :mod:`dbae.kernels.table`; ``eps`` is float32 noise of
the images' shape.
"""

from __future__ import annotations

import math

import torch

from . import table as col

Tensor = torch.Tensor


def noise(shape: tuple[int, ...], seed: int, device: torch.device) -> Tensor:
    """The reference path's noise: float32 ``torch.randn`` from a generator seeded by ``seed``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)


def _column(table: Tensor, index: int, ndim: int) -> Tensor:
    """One table column as a (B, 1, ..., 1) tensor that broadcasts against the images."""
    return table[:, index].view(-1, *([1] * (ndim - 1)))


def bridge_sample(x0: Tensor, x_T: Tensor, table: Tensor, eps: Tensor) -> Tensor:
    """x_t = a x_T + b x0 + sqrt(v) eps in float32 (SPEC 3)."""
    n = x0.dim()
    a, b, sqrt_v = (_column(table, i, n) for i in (col.A, col.B, col.SQRT_V))
    return a * x_T.float() + b * x0.float() + sqrt_v * eps


def bridge_input(x0: Tensor, x_T: Tensor, table: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """(x_t, x_in = c_in x_t), both in the promoted dtype of x0 and x_T."""
    dtype = torch.promote_types(x0.dtype, x_T.dtype)
    x_t = bridge_sample(x0, x_T, table, eps)
    x_in = _column(table, col.C_IN, x0.dim()) * x_t
    return x_t.to(dtype), x_in.to(dtype)


def bridge_mse(F: Tensor, x0: Tensor, x_T: Tensor, table: Tensor, eps: Tensor) -> Tensor:
    """Per-sample mean over values of (D - x0)^2, D = c_skip x_t + c_out F; float32 (B,)."""
    n = x0.dim()
    x0 = x0.float()  # upcast once, so that autograd too sums x0's two paths in float32
    x_t = bridge_sample(x0, x_T, table, eps)
    D = _column(table, col.C_SKIP, n) * x_t + _column(table, col.C_OUT, n) * F.float()
    return (D - x0).square().flatten(1).mean(1)


def weighted_loss(mse: Tensor, table: Tensor) -> Tensor:
    """SPEC 5 loss: mean over samples of weight[b] mse[b] (float32 scalar)."""
    return (table[:, col.WEIGHT] * mse).mean()


def loss_to_mse_grad(grad_loss: Tensor | None, grad_mse: Tensor | None, table: Tensor) -> Tensor:
    """The gradient of each mse[b] given those of (weighted_loss, mse): grad_mse + grad_loss weight / B."""
    total = torch.zeros(table.shape[0], dtype=torch.float32, device=table.device)
    if grad_mse is not None:
        total = total + grad_mse.float()
    if grad_loss is not None:
        total = total + grad_loss.float() * table[:, col.WEIGHT] / table.shape[0]
    return total


def bridge_input_backward(
    grad_x_t: Tensor | None,
    grad_x_in: Tensor | None,
    table: Tensor,
    x0_dtype: torch.dtype,
    x_T_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Gradients (x_T, x0) of :func:`bridge_input`; an absent output gradient counts as zero."""
    given = grad_x_t if grad_x_t is not None else grad_x_in
    if given is None:
        raise ValueError("need grad_x_t or grad_x_in")
    n = given.dim()
    g = torch.zeros(given.shape, dtype=torch.float32, device=given.device)
    if grad_x_t is not None:
        g = g + grad_x_t.float()
    if grad_x_in is not None:
        g = g + _column(table, col.C_IN, n) * grad_x_in.float()
    return (_column(table, col.A, n) * g).to(x_T_dtype), (_column(table, col.B, n) * g).to(x0_dtype)


def bridge_mse_backward(
    grad_mse: Tensor, F: Tensor, x0: Tensor, x_T: Tensor, table: Tensor, eps: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (F, x_T, x0) of :func:`bridge_mse` for the upstream gradient ``grad_mse`` (B,)."""
    n = x0.dim()
    values_per_sample = math.prod(x0.shape[1:])
    x_t = bridge_sample(x0, x_T, table, eps)
    c_skip, c_out = _column(table, col.C_SKIP, n), _column(table, col.C_OUT, n)
    r = c_skip * x_t + c_out * F.float() - x0.float()
    # d mse_b / d D = 2 r / P; x_t depends on x_T (a) and x0 (b), and x0 also enters D - x0.
    s = (2.0 / values_per_sample) * grad_mse.float().view(-1, *([1] * (n - 1))) * r
    grad_x_t = c_skip * s
    grad_F = (c_out * s).to(F.dtype)
    grad_x_T = (_column(table, col.A, n) * grad_x_t).to(x_T.dtype)
    grad_x0 = (_column(table, col.B, n) * grad_x_t - s).to(x0.dtype)
    return grad_F, grad_x_T, grad_x0
