"""The encoder Enc: image -> z of SPEC 1 and 9 (DiffAE's half U-Net)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import EncoderConfig
from .layers import AttentionBlock, PlainResBlock, group_norm

Tensor = torch.Tensor

#: the stochastic encoder's sig for every image and dimension at initialisation. PyTorch's
#: default initialisation of the head gives sig of about 1 while mu varies by about 0.08
#: between images, so z starts as almost pure noise (per-dimension var(mu) / sig^2 below 0.01)
#: and at the quick-start budget the U-Net and decoder learn to do without z (issue 22:
#: shapes16 reached SSIM 0.29 at 2000 steps where the deterministic encoder reached 0.86).
#: Starting sig small makes z = mu + sig eps informative from the first step (SSIM 0.895 at
#: 2000 steps; docs/results.md, benchmarks/z_information.py).
#: Only the initial weights change; the forward formula is SPEC 1's, and checkpoints
#: overwrite these values.
INITIAL_SIG = 0.03


def init_log_sig_head(head: nn.Linear, z_dim: int, sig: float = INITIAL_SIG) -> None:
    """Zero weights and the bias :func:`log_sig_bias` for the l half (outputs ``z_dim:``) of
    a stochastic encoder's head: ``sig`` for every input at first."""
    with torch.no_grad():
        head.weight[z_dim:].zero_()
        head.bias[z_dim:].fill_(log_sig_bias(sig))


def log_sig_bias(sig: float) -> float:
    """The head output l for which SPEC 1's ``exp(5 tanh(l / 5)) + 0.01`` equals ``sig``
    (0.01 < sig < exp(5) + 0.01)."""
    return 5.0 * math.atanh(math.log(sig - 0.01) / 5.0)


class Encoder(nn.Module):
    """Downsampling half of the U-Net without time conditioning, a middle block
    (ResBlock, attention, ResBlock), then GroupNorm, SiLU, global average pooling and a
    linear head (DiffAE's ``BeatGANsEncoderModel`` with ``pool="adaptivenonzero"``).

    Each level has ``num_res_blocks`` :class:`PlainResBlock` (+ attention at the side lengths
    in ``attention_resolutions``), then a downsampling PlainResBlock except at the last level.

    ``forward(x)`` returns ``(mu, sig)``: for a deterministic encoder ``(z, None)``; for a
    stochastic one the head gives ``(m, l)`` and ``mu = 5 tanh(m / 5)``,
    ``sig = exp(5 tanh(l / 5)) + 0.01`` (SPEC 1), so ``|mu| <= 5`` and ``sig > 0.01``.
    The l half of the head starts with zero weights and the bias that gives
    ``sig = INITIAL_SIG`` (see there); the m half keeps PyTorch's default initialisation.
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
        if cfg.stochastic:
            init_log_sig_head(self.head, z_dim)

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
