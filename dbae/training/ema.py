"""Exponential moving average of a model's weights."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Holds a frozen copy of ``model`` updated as ``ema <- decay ema + (1 - decay) model``."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not (0.0 <= decay < 1.0):
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One multi-tensor lerp over all parameters (a few launches on CUDA instead of one per
        tensor: 564 in ffhq128's networks), the same values as ``ema_p.lerp_(p, 1 - decay)``."""
        ema_params, params = list(self.module.parameters()), [p.detach() for p in model.parameters()]
        if len(ema_params) != len(params):
            raise ValueError(f"the EMA holds {len(ema_params)} parameters, the model {len(params)}")
        if ema_params:
            torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)
        for ema_b, b in zip(self.module.buffers(), model.buffers()):
            ema_b.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()
