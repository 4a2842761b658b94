"""Fused ops of the DBAE training step, as torch custom ops in the ``dbae`` namespace.

    x_t, x_in = bridge_input(x0, x_T, table, seed)       # one pass, noise made in-kernel
    F = unet(x_in, c_noise, x_T, z)
    loss, mse = bridge_loss(F, x0, x_T, table, seed)     # regenerates x_t from the seed

``table`` comes from :func:`dbae.kernels.table.bridge_table`. The same ``seed`` must be
passed to both ops: the loss regenerates the very x_t that produced x_in, so the step
never materialises the noise. Ops (``torch.ops.dbae.*``):

- ``bridge_input(x0, x_T, table, seed) -> (x_t, x_in)``, outputs in the promoted dtype
  of x0 and x_T; backward to x_T (and x0 when it requires grad) needs only the table.
- ``bridge_loss(F, x0, x_T, table, seed) -> (loss, mse)`` (float32, () and (B,)): mse[b] the
  per-sample mean of (c_skip x_t + c_out F - x0)^2, loss = mean_b(weight[b] mse[b]); two
  launches (the fused pass, then a one-program reduction); backward to F, x_T (and x0)
  regenerates x_t.
- ``bridge_reference_noise(shape, seed, device)``: the reference path's noise (opaque, so that
  generator-seeded ``torch.randn`` is traceable).
- ``bridge_input_backward`` and ``bridge_loss_backward``: the backward passes.

Launch settings (:class:`LaunchConfig`: warps per program, Philox rounds) are module state
that the benchmark sweeps; the defaults are what the tests and training use.

Each op runs its Triton kernel or its PyTorch reference (:mod:`.reference`) as
:mod:`.backend` decides. The two paths differ only in the noise: Philox in the kernels,
``torch.randn(generator=manual_seed(seed))`` in the reference. Inputs may be float32,
bfloat16 or float16 (each its own dtype; arithmetic is float32), contiguous or
channels-last (4-D): the layout of ``x0`` decides, and the other images are brought to it
(copied only if they differ; any other strides are copied to contiguous memory). The
kernels run over memory order, so the Triton noise is eps[b, m] for memory position m of
sample b in that layout: the same images in the two layouts get their noise in different
places (both ops of a step see the same ``x0``, so they agree). Outputs keep the layout.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.library import custom_op

from . import backend, reference
from .table import check_table

try:
    from torch.library import triton_op, wrap_triton  # torch >= 2.6

    from .bridge_kernels import (
        BLOCK,
        bridge_input_backward_kernel,
        bridge_input_kernel,
        bridge_loss_backward_kernel,
        bridge_loss_finish_kernel,
        bridge_mse_kernel,
        noise_kernel,
    )
except ImportError:  # no triton (or torch < 2.6): backend.use_triton() is then always False
    triton_op = wrap_triton = None
    BLOCK = bridge_input_kernel = bridge_input_backward_kernel = None
    bridge_mse_kernel = bridge_loss_finish_kernel = bridge_loss_backward_kernel = noise_kernel = None

Tensor = torch.Tensor

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_BATCH = 65535  # CUDA limit of the grid's second dimension
_MAX_SEED = 2**63


# ----- launch settings -----
@dataclass(frozen=True)
class LaunchConfig:
    """How the kernels are launched: warps per program, and the rounds of Philox4x32.

    The rounds change the noise stream (not its distribution: Philox4x32-7 already passes
    BigCrush; 10 is the standard margin), so runs compare only under equal settings.
    """

    num_warps: int = 4
    philox_rounds: int = 10

    def __post_init__(self) -> None:
        if self.num_warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"num_warps must be a power of two from 1 to 32, got {self.num_warps}")
        if not 1 <= self.philox_rounds <= 10:
            raise ValueError(f"philox_rounds must lie in 1..10, got {self.philox_rounds}")


_launch = LaunchConfig()


def launch_config() -> LaunchConfig:
    return _launch


@contextmanager
def launched_with(config: LaunchConfig) -> Iterator[None]:
    """Run the kernels with ``config`` inside the block (the benchmark's sweep)."""
    global _launch
    previous, _launch = _launch, config
    try:
        yield
    finally:
        _launch = previous


# ----- input checks and launch geometry -----
def _check_images(**images: Tensor) -> None:
    (first_name, first), *rest = images.items()
    if first.dim() < 2:
        raise ValueError(f"{first_name} must have shape (B, ...), got {tuple(first.shape)}")
    for name, x in images.items():
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    for name, x in rest:
        if x.shape != first.shape or x.device != first.device:
            raise ValueError(
                f"{name} ({tuple(x.shape)} on {x.device}) must match {first_name} "
                f"({tuple(first.shape)} on {first.device})"
            )
    if not 0 < first.shape[0] <= _MAX_BATCH or not 0 < math.prod(first.shape[1:]) < 2**31:
        raise ValueError(f"need 1 to {_MAX_BATCH} samples of 1 to 2**31 - 1 values, got {tuple(first.shape)}")


def _check_seed(seed: int) -> None:
    if not 0 <= seed < _MAX_SEED:
        raise ValueError(f"seed must lie in [0, 2**63), got {seed}")


def _traced(x: Tensor) -> bool:
    """True under fake tensors (torch.compile tracing) or on the meta device: nothing runs."""
    return is_fake(x) or x.is_meta


def _memory_format(x0: Tensor) -> torch.memory_format:
    """channels_last where ``x0`` is a 4-D channels-last tensor (and not also contiguous)."""
    if x0.dim() == 4 and not x0.is_contiguous() and x0.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _in_format(fmt: torch.memory_format, *tensors: Tensor | None) -> list[Tensor | None]:
    """The tensors in one dense layout (copies only where they differ); None stays None."""
    return [None if t is None else t.contiguous(memory_format=fmt) for t in tensors]


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _launch_geometry(x: Tensor) -> tuple[int, tuple[int, int]]:
    """(P, grid) for images x of shape (B, ...): one program per BLOCK values of a sample."""
    P = math.prod(x.shape[1:])
    return P, ((P + BLOCK - 1) // BLOCK, x.shape[0])


def _op(name: str):
    """Define an op from a function that is also its fake implementation.

    ``triton_op`` lets torch.compile trace into the kernels; without Triton there are no
    kernels to see, so the op is a plain ``custom_op`` (and torch logs no warning).
    """

    def define(fn):
        if bridge_input_kernel is not None:
            return triton_op(name, fn, mutates_args=())
        op = custom_op(name, fn, mutates_args=())
        op.register_fake(fn)
        return op

    return define


def _reference_eps(x: Tensor, seed: int) -> Tensor:
    return torch.ops.dbae.bridge_reference_noise(x.shape, seed, x.device)


# ----- the reference noise as an opaque op -----
@custom_op("dbae::bridge_reference_noise", mutates_args=())
def _reference_noise(shape: Sequence[int], seed: int, device: torch.device) -> Tensor:
    return reference.noise(tuple(shape), seed, device)


@_reference_noise.register_fake
def _(shape, seed, device):
    return torch.empty(tuple(shape), dtype=torch.float32, device=device)


# ----- bridge_input: x_t and x_in -----
@_op("dbae::bridge_input")
def _bridge_input(x0: Tensor, x_T: Tensor, table: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    _check_images(x0=x0, x_T=x_T)
    check_table(table, x0.shape[0], x0.device)
    _check_seed(seed)
    x0, x_T = _in_format(_memory_format(x0), x0, x_T)
    table = table.contiguous()
    if not backend.use_triton(x0.device, traced=_traced(x0)):
        return reference.bridge_input(x0, x_T, table, _reference_eps(x0, seed))
    P, grid = _launch_geometry(x0)
    x_t = torch.empty_like(x0, dtype=torch.promote_types(x0.dtype, x_T.dtype))  # x0's layout
    x_in = torch.empty_like(x_t)
    wrap_triton(bridge_input_kernel)[grid](
        x0, x_T, table, x_t, x_in, seed, P, ROUNDS=_launch.philox_rounds, num_warps=_launch.num_warps
    )
    return x_t, x_in


@_op("dbae::bridge_input_backward")
def _bridge_input_backward(
    grad_x_t: Tensor | None,
    grad_x_in: Tensor | None,
    table: Tensor,
    x0_dtype: torch.dtype,
    x_T_dtype: torch.dtype,
    want_x0: bool,
) -> list[Tensor]:
    """[grad_x_T] or [grad_x_T, grad_x0] (``want_x0``); at least one gradient must be given."""
    named = (("grad_x_t", grad_x_t), ("grad_x_in", grad_x_in))
    if grad_x_t is None and grad_x_in is None:
        raise ValueError("bridge_input_backward needs grad_x_t or grad_x_in")
    fmt = _memory_format(grad_x_t if grad_x_t is not None else grad_x_in)  # no noise here: any one layout
    given = {name: g.contiguous(memory_format=fmt) for name, g in named if g is not None}
    _check_images(**given)
    like = next(iter(given.values()))  # the shape and device of the gradients
    check_table(table, like.shape[0], like.device)
    table = table.contiguous()
    grad_x_t, grad_x_in = given.get("grad_x_t"), given.get("grad_x_in")
    if not backend.use_triton(like.device, traced=_traced(like)):
        grad_x_T, grad_x0 = reference.bridge_input_backward(grad_x_t, grad_x_in, table, x0_dtype, x_T_dtype)
        return [grad_x_T, grad_x0] if want_x0 else [grad_x_T]
    P, grid = _launch_geometry(like)
    grad_x_T = torch.empty_like(like, dtype=x_T_dtype)  # the gradients' layout
    grad_x0 = torch.empty_like(like, dtype=x0_dtype) if want_x0 else None
    wrap_triton(bridge_input_backward_kernel)[grid](
        grad_x_t, grad_x_in, table, grad_x_T, grad_x0, P,
        HAS_GRAD_X_T=grad_x_t is not None, HAS_GRAD_X_IN=grad_x_in is not None, WANT_X0=want_x0,
        num_warps=_launch.num_warps,
    )  # fmt: skip
    return [grad_x_T, grad_x0] if want_x0 else [grad_x_T]


def _bridge_input_setup(ctx, inputs, output) -> None:
    x0, x_T, table, _ = inputs
    ctx.save_for_backward(table)
    ctx.dtypes = (x0.dtype, x_T.dtype)
    ctx.set_materialize_grads(False)  # an unused x_t costs nothing in the backward


def _bridge_input_grad(ctx, grad_x_t, grad_x_in):
    if grad_x_t is None and grad_x_in is None:
        return None, None, None, None
    (table,) = ctx.saved_tensors
    want_x0 = ctx.needs_input_grad[0]
    grads = torch.ops.dbae.bridge_input_backward(grad_x_t, grad_x_in, table, *ctx.dtypes, want_x0)
    return (grads[1] if want_x0 else None), grads[0], None, None


_bridge_input.register_autograd(_bridge_input_grad, setup_context=_bridge_input_setup)


# ----- bridge_loss: the weighted loss and the per-sample squared error of the denoiser -----
_FINISH_VALUES = 4096  # values of the partial-sum table that the finishing program loads at once


@_op("dbae::bridge_loss")
def _bridge_loss(F: Tensor, x0: Tensor, x_T: Tensor, table: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    _check_images(x0=x0, x_T=x_T, F=F)
    check_table(table, x0.shape[0], x0.device)
    _check_seed(seed)
    x0, x_T, F = _in_format(_memory_format(x0), x0, x_T, F)
    table = table.contiguous()
    if not backend.use_triton(x0.device, traced=_traced(x0)):
        mse = reference.bridge_mse(F, x0, x_T, table, _reference_eps(x0, seed))
        return reference.weighted_loss(mse, table), mse
    P, grid = _launch_geometry(x0)
    # one partial sum per program, then one program sums them in a fixed order: deterministic
    partial = torch.empty((grid[1], grid[0]), dtype=torch.float32, device=x0.device)
    wrap_triton(bridge_mse_kernel)[grid](
        F, x0, x_T, table, partial, seed, P, ROUNDS=_launch.philox_rounds, num_warps=_launch.num_warps
    )
    mse = torch.empty((grid[1],), dtype=torch.float32, device=x0.device)
    loss = torch.empty((), dtype=torch.float32, device=x0.device)
    columns = _next_power_of_2(grid[0])
    rows = max(1, min(_FINISH_VALUES // columns, _next_power_of_2(grid[1])))
    wrap_triton(bridge_loss_finish_kernel)[(1,)](
        partial, table, mse, loss, grid[1], grid[0], P, ROWS=rows, COLUMNS=columns, num_warps=4
    )
    return loss, mse


@_op("dbae::bridge_loss_backward")
def _bridge_loss_backward(
    grad_loss: Tensor | None,
    grad_mse: Tensor | None,
    F: Tensor,
    x0: Tensor,
    x_T: Tensor,
    table: Tensor,
    seed: int,
    want_x0: bool,
) -> list[Tensor]:
    """[grad_F, grad_x_T] or [grad_F, grad_x_T, grad_x0] (``want_x0``); one of grad_loss
    (scalar) and grad_mse ((B,)) must be given."""
    if grad_loss is None and grad_mse is None:
        raise ValueError("bridge_loss_backward needs grad_loss or grad_mse")
    _check_images(x0=x0, x_T=x_T, F=F)
    check_table(table, x0.shape[0], x0.device)
    x0, x_T, F = _in_format(_memory_format(x0), x0, x_T, F)
    table = table.contiguous()
    grad_loss = None if grad_loss is None else grad_loss.float().contiguous()
    grad_mse = None if grad_mse is None else grad_mse.float().contiguous()
    if not backend.use_triton(x0.device, traced=_traced(x0)):
        eps = _reference_eps(x0, seed)
        per_sample = reference.loss_to_mse_grad(grad_loss, grad_mse, table)
        grads = reference.bridge_mse_backward(per_sample, F, x0, x_T, table, eps)
        return list(grads if want_x0 else grads[:2])
    P, grid = _launch_geometry(x0)
    grad_F, grad_x_T = torch.empty_like(F), torch.empty_like(x_T)
    grad_x0 = torch.empty_like(x0) if want_x0 else None
    wrap_triton(bridge_loss_backward_kernel)[grid](
        grad_loss, grad_mse, F, x0, x_T, table, grad_F, grad_x_T, grad_x0, seed, P,
        ROUNDS=_launch.philox_rounds, HAS_GRAD_LOSS=grad_loss is not None, HAS_GRAD_MSE=grad_mse is not None,
        WANT_X0=want_x0, num_warps=_launch.num_warps,
    )  # fmt: skip
    return [grad_F, grad_x_T, grad_x0] if want_x0 else [grad_F, grad_x_T]


def _bridge_loss_setup(ctx, inputs, output) -> None:
    F, x0, x_T, table, seed = inputs
    ctx.save_for_backward(F, x0, x_T, table)
    ctx.seed = seed
    ctx.set_materialize_grads(False)  # an unused loss or mse costs nothing in the backward


def _bridge_loss_grad(ctx, grad_loss, grad_mse):
    if grad_loss is None and grad_mse is None:
        return None, None, None, None, None
    F, x0, x_T, table = ctx.saved_tensors
    want_x0 = ctx.needs_input_grad[1]
    grads = torch.ops.dbae.bridge_loss_backward(grad_loss, grad_mse, F, x0, x_T, table, ctx.seed, want_x0)
    return grads[0], (grads[2] if want_x0 else None), grads[1], None, None


_bridge_loss.register_autograd(_bridge_loss_grad, setup_context=_bridge_loss_setup)


# ----- public API -----
class BridgeLoss(NamedTuple):
    loss: Tensor  # scalar float32: mean over samples of weight * mse
    mse: Tensor  # (B,) float32: per-sample mean of (D - x0)^2, unweighted


def bridge_input(x0: Tensor, x_T: Tensor, table: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """(x_t, x_in): x_t = a x_T + b x0 + sqrt(v) eps with eps made from ``seed``, x_in = c_in x_t."""
    return torch.ops.dbae.bridge_input(x0, x_T, table, seed)


def bridge_loss(F: Tensor, x0: Tensor, x_T: Tensor, table: Tensor, seed: int) -> BridgeLoss:
    """SPEC 5 loss mean_b(lambda_b mse_b) for the network output F at the x_t of ``seed``."""
    return BridgeLoss(*torch.ops.dbae.bridge_loss(F, x0, x_T, table, seed))


def bridge_noise(shape: Sequence[int], seed: int, device: torch.device | str = "cpu") -> Tensor:
    """The float32 noise eps that the ops use for images of ``shape`` on ``device``.

    For checks and debugging (eager only): the ops themselves never materialise it.
    """
    device = torch.device(device)
    shape = tuple(shape)
    _check_seed(seed)
    if not backend.use_triton(device, traced=device.type == "meta"):
        return reference.noise(shape, seed, device)
    out = torch.empty(shape, dtype=torch.float32, device=device)
    _check_images(eps=out)
    P, grid = _launch_geometry(out)
    noise_kernel[grid](out, seed, P, ROUNDS=_launch.philox_rounds, num_warps=_launch.num_warps)
    return out
