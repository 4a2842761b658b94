"""The decoder Dec: z -> x_T of SPEC 1 (FastGAN-style generator without noise inputs)."""

from __future__ import annotations

import torch
from torch import nn

from ..config import DecoderConfig
from ..errors import ConfigError
from .layers import group_norm

Tensor = torch.Tensor

#: groups of the decoder's GroupNorms (GroupNorm instead of FastGAN's BatchNorm keeps every
#: sample independent of the rest of its batch, in train and eval mode alike)
NUM_GROUPS = 32
#: FastGAN gates a level with the level 4 octaves below it (4x4 -> 64x64, 8x8 -> 128x128)
EXCITATION_GAP = 4


class ChannelAffine(nn.Module):
    """``x * weight + bias`` per channel: a BatchNorm as it runs at inference, with its
    running statistics folded in (``weight = gamma / sqrt(var + eps)``,
    ``bias = beta - mean * weight``). The norm of the official decoder's weights."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight[:, None, None] + self.bias[:, None, None]


def _norm_glu(channels: int, norm: str) -> nn.Sequential:
    """The norm (``"group"`` or ``"affine"``) over ``2 * channels``, then a GLU halving them
    to ``channels``."""
    layer = group_norm(2 * channels, NUM_GROUPS) if norm == "group" else ChannelAffine(2 * channels)
    return nn.Sequential(layer, nn.GLU(dim=1))


class UpBlock(nn.Module):
    """FastGAN ``UpBlock``: nearest x2 upsampling, 3x3 conv to 2c, norm, GLU."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "group") -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        # no bias: the norm right after removes it (or, as an affine, holds it)
        self.conv = nn.Conv2d(in_channels, 2 * out_channels, 3, padding=1, bias=False)
        self.act = _norm_glu(out_channels, norm)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv(self.up(x)))


class SkipExcitation(nn.Module):
    """FastGAN skip-layer excitation: a low-resolution map gates a high-resolution one.

    ``gate = sigmoid(conv1x1(SiLU(conv4x4(avgpool_to_4x4(low)))))`` of shape (B, C_high, 1, 1);
    the output is ``high * gate``. ``low_size`` is the side length of the low map (a multiple
    of 4), so the pooling has a fixed kernel (ONNX-friendly, unlike adaptive pooling).
    """

    def __init__(self, low_channels: int, high_channels: int, low_size: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(
            nn.AvgPool2d(low_size // 4),
            nn.Conv2d(low_channels, high_channels, 4, bias=False),
            nn.SiLU(),
            nn.Conv2d(high_channels, high_channels, 1, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, low: Tensor, high: Tensor) -> Tensor:
        return high * self.gate(low)


class Decoder(nn.Module):
    """z -> x_T: a 4x4 seed from a transposed conv, one ``UpBlock`` per octave, optional
    skip-layer excitation, and a final conv to the image channels (3x3 with bias, or as
    the authors': 1x1 without; no tanh: the bridge endpoint is unconstrained).

    ``cfg.channels[i]`` is the width at side ``4 * 2**i``. Skip-layer excitation pairs each
    level with the one ``gap = min(4, levels - 1)`` octaves below it, as FastGAN does
    (4->64, 8->128 at 128x128; 4->32 at 32x32, 4->16 at 16x16); with fewer than three levels
    (``gap < 2``) there is no excitation.
    """

    def __init__(self, cfg: DecoderConfig, image_size: int, image_channels: int, z_dim: int) -> None:
        super().__init__()
        chans = cfg.channels
        levels = len(chans)
        if 4 * 2 ** (levels - 1) != image_size:
            raise ConfigError(f"decoder channels {chans} do not span 4x4 .. {image_size}x{image_size}")
        self.init = nn.Sequential(nn.ConvTranspose2d(z_dim, 2 * chans[0], 4, bias=False), _norm_glu(chans[0], cfg.norm))
        self.ups = nn.ModuleList(UpBlock(chans[i - 1], chans[i], cfg.norm) for i in range(1, levels))
        gap = min(EXCITATION_GAP, levels - 1)
        self.excitation_gap = gap
        # keyed by the index of the gated (high-resolution) level
        self.excitations = nn.ModuleDict(
            {
                str(i): SkipExcitation(chans[i - gap], chans[i], 4 * 2 ** (i - gap))
                for i in range(gap, levels)
                if cfg.skip_excitation and gap >= 2
            }
        )
        k = cfg.output_kernel
        self.to_image = nn.Conv2d(chans[-1], image_channels, k, padding=k // 2, bias=cfg.output_bias)

    def forward(self, z: Tensor) -> Tensor:
        feats = [self.init(z[:, :, None, None])]
        for i, up in enumerate(self.ups, start=1):
            h = up(feats[-1])
            if str(i) in self.excitations:
                h = self.excitations[str(i)](feats[i - self.excitation_gap], h)
            feats.append(h)
        return self.to_image(feats[-1])
