"""The two networks of PDAE's official code that are not ADM U-Nets here: its fixed CNN
encoder and the shift branch of its gradient estimator (github.com/ckczzj/PDAE, commit
4f9c29a; tests/fixtures/official_pdae/README.md describes both).

- :class:`ConvEncoder` (their ``CELEBA64Encoder`` / ``FFHQEncoder``): 3x3 convs of stride 2
  with bias, each followed by GroupNorm(32) and SiLU, one legacy multi-head attention block
  right after the conv that reaches 16x16, then a channel-major flatten of the 4x4 map and a
  Linear to z. :class:`ConvEncoderConfig` holds the widths.
- :class:`ShiftBranch` (the trainable half of their ``ShiftUNet``): a second middle block and
  output path over the frozen eps U-Net's own input path, whose residual blocks take z as a
  scale and a shift after the time's scale-shift (``(1 + z_s) (GN(h)(1 + s_t) + b_t) + z_b``,
  ``(z_s, z_b) = Linear(SiLU(label_emb(z)))``), and its own head. One pass through the shared
  input path gives both eps and G.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import UNetConfig
from ..errors import ConfigError
from ..nn.layers import AttentionBlock, ResBlock, group_norm
from ..nn.unet import ScoreUNet, output_path, run_output_path

Tensor = torch.Tensor


@dataclass(frozen=True)
class ConvEncoderConfig:
    """Widths of :class:`ConvEncoder`'s stride-2 convs (one per halving, down to 4x4), the side
    of the feature map after which attention runs, and its heads."""

    channels: tuple[int, ...] = (64, 128, 256, 256, 256)
    attention_side: int = 16
    num_heads: int = 4
    num_groups: int = 32


#: the authors' two encoders, by image size
PDAE_ENCODERS = {128: ConvEncoderConfig((64, 128, 256, 256, 256)), 64: ConvEncoderConfig((64, 128, 128, 128))}


class ConvEncoder(nn.Module):
    """PDAE's CNN encoder x -> z (module docstring). ``body`` holds the layers in the order (and
    under the indices) of the authors' ``encoder`` Sequential, the SiLUs and the flatten
    included. ``forward`` returns ``(z, None)``, as a deterministic :class:`dbae.nn.Encoder`."""

    stochastic = False

    def __init__(self, cfg: ConvEncoderConfig, image_size: int, image_channels: int, z_dim: int) -> None:
        super().__init__()
        if image_size != 4 * 2 ** len(cfg.channels):
            raise ConfigError(f"a CNN encoder with {len(cfg.channels)} stride-2 convs maps "
                              f"{4 * 2 ** len(cfg.channels)}px images to 4x4, not {image_size}px ones")
        layers: list[nn.Module] = []
        cin, side = image_channels, image_size
        for cout in cfg.channels:
            layers.append(nn.Conv2d(cin, cout, 3, stride=2, padding=1))
            side //= 2
            if side == cfg.attention_side:
                layers.append(AttentionBlock(cout, cout, cfg.num_groups, cfg.num_heads))
            layers += [group_norm(cout, cfg.num_groups), nn.SiLU()]
            cin = cout
        layers += [nn.Flatten(), nn.Linear(cin * 4 * 4, z_dim)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        return self.body(x), None


class ShiftBranch(nn.Module):
    """PDAE's gradient estimator G over ``eps_net``'s input path (module docstring): ``label_emb``
    (z -> the time embedding's width, no activation), ``middle_block``, ``output_blocks`` and
    ``out`` as the eps U-Net's, with z scale-shift residual blocks."""

    def __init__(self, cfg: UNetConfig, eps_net: ScoreUNet, image_size: int, image_channels: int, z_dim: int) -> None:
        super().__init__()
        emb = cfg.emb_channels
        self.label_emb = nn.Linear(z_dim, emb)

        def res(cin: int, cout: int, **kw: bool) -> ResBlock:
            return ResBlock(cin, cout, emb, dropout=cfg.dropout, num_groups=cfg.num_groups, cond_channels=emb,
                            cond_mode="scale-shift", **kw)  # fmt: skip

        def attn(c: int) -> AttentionBlock:
            return AttentionBlock(c, cfg.num_head_channels, cfg.num_groups, cfg.num_heads)

        side = image_size >> (len(cfg.channel_mult) - 1)
        skips = eps_net.skip_channels
        self.middle_block, self.output_blocks, self.out = output_path(cfg, image_channels, skips, skips[-1], side,
                                                                      res, attn)  # fmt: skip

    def forward(self, skips: list[Tensor], emb: Tensor, z: Tensor) -> Tensor:
        return run_output_path(self.middle_block, self.output_blocks, self.out, skips, emb, self.label_emb(z))
