"""The encoder Enc: image -> z of SPEC 1 and 9 (DiffAE's half U-Net)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import EncoderConfig
from .layers import AttentionBlock, PlainResBlock, group_norm

Tensor = torch.Tensor


class Encoder(nn.Module):
    """Downsampling half of the U-Net without time conditioning, a middle block
    (ResBlock, attention, ResBlock), then GroupNorm, SiLU, global average pooling and a
    linear head (DiffAE's ``BeatGANsEncoderModel`` with ``pool="adaptivenonzero"``).

    Each level has ``num_res_blocks`` :class:`PlainResBlock` (+ attention at the side lengths
    in ``attention_resolutions``), then a downsampling PlainResBlock except at the last level.

    ``forward(x)`` returns ``(mu, sig)``: for a deterministic encoder ``(z, None)``; for a
    stochastic one the head gives ``(m, l)`` and ``mu = 5 tanh(m / 5)``,
    ``sig = exp(5 tanh(l / 5)) + 0.01`` (SPEC 1), so ``|mu| <= 5`` and ``sig > 0.01``.
    """

    def __init__(self, cfg: EncoderConfig, image_size: int, image_channels: int, z_dim: int) -> None:
        super().__init__()
        self.stochastic = cfg.stochastic
        ch = cfg.base_channels
        groups = cfg.num_groups

        def attn(c: int) -> AttentionBlock:
            return AttentionBlock(c, cfg.num_head_channels, groups, cfg.num_heads)

        last = len(cfg.channel_mult) - 1
        side = image_size  # side length of the current feature maps
        cur = ch
        layers: list[nn.Module] = [nn.Conv2d(image_channels, ch, 3, padding=1)]
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers.append(PlainResBlock(cur, mult * ch, num_groups=groups))
                cur = mult * ch
                if side in cfg.attention_resolutions:
                    layers.append(attn(cur))
            if level != last:
                layers.append(PlainResBlock(cur, cur, num_groups=groups, down=True))
                side //= 2
        layers += [PlainResBlock(cur, cur, num_groups=groups), attn(cur), PlainResBlock(cur, cur, num_groups=groups)]
        self.body = nn.Sequential(*layers)
        self.out_norm = group_norm(cur, groups)
        self.head = nn.Linear(cur, 2 * z_dim if cfg.stochastic else z_dim)

    def head_output(self, x: Tensor) -> Tensor:
        """The head's raw output: z itself for a deterministic encoder, ``(m, l)`` (2 z_dim
        numbers, before the soft clamps) for a stochastic one."""
        h = F.silu(self.out_norm(self.body(x)))
        return self.head(h.mean(dim=(2, 3)))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        out = self.head_output(x)
        if not self.stochastic:
            return out, None
        m, l = out.chunk(2, dim=1)
        mu = 5 * torch.tanh(m / 5)
        sig = torch.exp(5 * torch.tanh(l / 5)) + 0.01
        return mu, sig
