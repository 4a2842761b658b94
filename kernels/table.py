"""The per-sample coefficient table that the fused training kernels read.

The kernels never evaluate the VP schedule: for each sample b they read one row of a
small float32 table computed here, on the host side, in float64 by the reference math of
:class:`dbae.bridge.VPBridge` (SPEC sections 3-5), and rounded to float32 once.
"""

from __future__ import annotations

import torch

from dbae.bridge import VPBridge

Tensor = torch.Tensor

# Column indices of the table (the Triton kernels use the same numbers).
A = 0  # a(t): coefficient of x_T in x_t
B = 1  # b(t): coefficient of x0 in x_t
SQRT_V = 2  # sqrt(v(t)): noise scale of x_t
C_IN = 3  # network input scale: x_in = c_in x_t
C_SKIP = 4  # D = c_skip x_t + c_out F
C_OUT = 5
WEIGHT = 6  # loss weight lambda(t) = 1 / c_out^2
NUM_COLUMNS = 7


def bridge_table(bridge: VPBridge, t: Tensor) -> Tensor:
    """Float32 table of shape (B, NUM_COLUMNS) for per-sample times ``t`` of shape (B,).

    Computed in float64 by ``bridge`` and placed on ``t``'s device.
    """
    if t.dim() != 1:
        raise ValueError(f"t must have shape (B,), got {tuple(t.shape)}")
    t64 = t.detach().to(torch.float64)
    a, b, v = bridge.coefficients(t64)
    pre = bridge.preconditioning(t64)
    weight = bridge.loss_weight(t64)
    columns = (a, b, torch.sqrt(v), pre.c_in, pre.c_skip, pre.c_out, weight)
    return torch.stack(columns, dim=1).to(torch.float32)


def check_table(table: Tensor, batch: int, device: torch.device) -> None:
    """Raise ValueError unless ``table`` is a float32 (batch, NUM_COLUMNS) table on ``device``."""
    if table.dtype != torch.float32 or tuple(table.shape) != (batch, NUM_COLUMNS):
        raise ValueError(
            f"table must be float32 of shape ({batch}, {NUM_COLUMNS}) (see dbae.kernels.bridge_table), "
            f"got {table.dtype} of shape {tuple(table.shape)}"
        )
    if table.device != device:
        raise ValueError(f"table is on {table.device} but the images are on {device}")
