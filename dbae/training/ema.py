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
        for ema_p, p in zip(self.module.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1.0 - self.decay)
        for ema_b, b in zip(self.module.buffers(), model.buffers()):
            ema_b.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()
