"""Networks of DBAE: the score U-Net, the encoder and the decoder (SPEC 1, 9)."""

from __future__ import annotations

from torch import nn

from .decoder import Decoder
from .encoder import Encoder
from .unet import ScoreUNet


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters of ``module`` (works on the meta device too)."""
    return sum(p.numel() for p in module.parameters())


__all__ = ["Decoder", "Encoder", "ScoreUNet", "count_parameters"]
