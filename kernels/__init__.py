"""Fused Triton kernels of the DBAE training step. Importable as ``dbae.kernels``.

Triton is optional: without it (or on CPU tensors) every op runs its PyTorch reference.
See :mod:`.bridge_train` for the ops, :mod:`.table` for the per-sample coefficient
table, :mod:`.backend` for how an implementation is chosen (``DBAE_KERNELS``).
"""

from .backend import available
from .bridge_train import BridgeLoss, bridge_input, bridge_loss, bridge_noise
from .table import bridge_table

__all__ = ["BridgeLoss", "available", "bridge_input", "bridge_loss", "bridge_noise", "bridge_table"]
