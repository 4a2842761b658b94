"""The score U-Net F_theta(x_in, c_noise, x_T, z) of SPEC 1 and 9 (ADM / DiffAE layout)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import UNetConfig
from .layers import AttentionBlock, EmbedSequential, ResBlock, group_norm, timestep_embedding, zero_module

Tensor = torch.Tensor


@dataclass
class UNetPaths:
    """The blocks of an ADM U-Net: the input path (with the channels of each skip it leaves),
    the middle block, the output path and the output head."""

    input_blocks: nn.ModuleList
    middle_block: EmbedSequential
    output_blocks: nn.ModuleList
    out: nn.Sequential
    skip_channels: list[int]


def build_paths(
    cfg: UNetConfig, image_size: int, in_channels: int, out_channels: int, *,
    cond_channels: int | None = None, cond_mode: str = "scale",
) -> UNetPaths:  # fmt: skip
    """The blocks of an ADM U-Net of ``cfg`` on ``in_channels`` input channels (see
    :class:`ScoreUNet`); every residual block takes a second condition of width
    ``cond_channels`` in ``cond_mode`` when given (:class:`ResBlock`)."""
    ch = cfg.base_channels
    emb_dim = cfg.emb_channels

    def res(cin: int, cout: int, **kw: bool) -> ResBlock:
        return ResBlock(cin, cout, emb_dim, dropout=cfg.dropout, num_groups=cfg.num_groups,
                        cond_channels=cond_channels, cond_mode=cond_mode, **kw)  # fmt: skip

    def attn(c: int) -> AttentionBlock:
        return AttentionBlock(c, cfg.num_head_channels, cfg.num_groups, cfg.num_heads)

    last = len(cfg.channel_mult) - 1
    side = image_size  # side length of the current feature maps
    cur = ch
    skip_channels = [ch]
    input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers: list[nn.Module] = [res(cur, mult * ch)]
            cur = mult * ch
            if side in cfg.attention_resolutions:
                layers.append(attn(cur))
            input_blocks.append(EmbedSequential(*layers))
            skip_channels.append(cur)
        if level != last:
            input_blocks.append(EmbedSequential(res(cur, cur, down=True)))
            skip_channels.append(cur)
            side //= 2
    middle, output_blocks, out = output_path(cfg, out_channels, list(skip_channels), cur, side, res, attn)
    return UNetPaths(input_blocks, middle, output_blocks, out, skip_channels)


def output_path(cfg: UNetConfig, out_channels: int, skip_channels: list[int], cur: int, side: int, res, attn):
    """(middle block, output blocks, output head) of an ADM U-Net whose input path left
    ``skip_channels`` and ends at ``cur`` channels of side ``side`` (``res(cin, cout, up=...)``
    and ``attn(c)`` make its blocks). Shared by :func:`build_paths` and PDAE's shift branch,
    a second decoder half on the same input path."""
    ch = cfg.base_channels
    skip_channels = list(skip_channels)
    middle = EmbedSequential(res(cur, cur), attn(cur), res(cur, cur))
    output_blocks = nn.ModuleList()
    for level, mult in reversed(list(enumerate(cfg.channel_mult))):
        for i in range(cfg.num_res_blocks + 1):
            layers = [res(cur + skip_channels.pop(), mult * ch)]
            cur = mult * ch
            if side in cfg.attention_resolutions:
                layers.append(attn(cur))
            if level and i == cfg.num_res_blocks:
                layers.append(res(cur, cur, up=True))
                side *= 2
            output_blocks.append(EmbedSequential(*layers))
    out = nn.Sequential(
        group_norm(cur, cfg.num_groups), nn.SiLU(), zero_module(nn.Conv2d(cur, out_channels, 3, padding=1))
    )
    return middle, output_blocks, out


def run_output_path(middle: EmbedSequential, output_blocks: nn.ModuleList, out: nn.Module, skips: list[Tensor],
                    emb: Tensor, cond: Tensor | None) -> Tensor:  # fmt: skip
    """Run the blocks of :func:`output_path` on the input path's ``skips``."""
    skips = list(skips)
    h = middle(skips[-1], emb, cond)
    for block in output_blocks:
        h = block(torch.cat([h, skips.pop()], dim=1), emb, cond)
    return out(h)


class ScoreUNet(nn.Module):
    """ADM U-Net conditioned on the time, the bridge endpoint ``x_T`` and the latent ``z``.

    * ``x_T`` is concatenated to ``x_in`` on the channel axis (input conv sees 2C channels;
      ``in_channels`` overrides that, e.g. C for networks without x_T).
    * ``emb = MLP(sinusoidal(c_noise)) + Linear(z)`` (width ``4 * base_channels`` unless
      ``embed_channels``) drives the scale-shift group norm of every residual block. With
      ``z_conditioning = "block-scale"`` z is not added to it: every residual block scales its
      features by ``1 + Linear(SiLU(z))`` instead (DiffAE's official U-Net); ``"none"``: no z.
    * Encoder path: ``num_res_blocks`` ResBlocks per level, then a downsampling ResBlock
      (except at the last level); middle: ResBlock, attention, ResBlock; decoder path:
      ``num_res_blocks + 1`` ResBlocks per level, each fed the concatenation with one skip,
      then an upsampling ResBlock (except at the top level). Self-attention follows each
      ResBlock whose feature maps have a side length listed in ``attention_resolutions``.
    * Output: GroupNorm, SiLU, zero-initialised 3x3 conv to C channels.
    """

    def __init__(
        self, cfg: UNetConfig, image_size: int, image_channels: int, z_dim: int, in_channels: int | None = None
    ) -> None:
        super().__init__()
        ch = cfg.base_channels
        emb_dim = cfg.emb_channels
        self.base_channels = ch
        self.z_conditioning = cfg.z_conditioning
        self.float32_time_table = cfg.float32_time_table
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.z_conditioning == "embedding":
            self.z_embed = nn.Linear(z_dim, emb_dim)
        block_z = z_dim if cfg.z_conditioning == "block-scale" else None
        paths = build_paths(cfg, image_size, 2 * image_channels if in_channels is None else in_channels,
                            image_channels, cond_channels=block_z, cond_mode="scale")  # fmt: skip
        self.input_blocks, self.middle_block = paths.input_blocks, paths.middle_block
        self.output_blocks, self.out = paths.output_blocks, paths.out
        #: the channels of each skip the input path leaves (for a second decoder half)
        self.skip_channels = paths.skip_channels
        self.emb_proj_fused: nn.Linear | None = None

    @torch.no_grad()
    def fuse_emb_projections(self) -> None:
        """Compute the scale-shift projections of all ResBlocks as one matmul (for inference).

        Each ResBlock projects the same ``SiLU(emb)`` with its own Linear: at batch 1 that is
        one tiny matrix-vector product per block (35 launches in ffhq128's U-Net). This stacks
        their weights into one Linear, :attr:`emb_proj_fused`, and removes the blocks' own,
        so the function is the same and the weights are held once. The state dict changes
        with it: fuse a copy (as the deployment runners do), not a model you will save."""
        if self.emb_proj_fused is not None:
            return
        blocks = [m for m in self.modules() if isinstance(m, ResBlock)]
        linears = [b.emb_proj[1] for b in blocks]
        fused = nn.Linear(linears[0].in_features, sum(lin.out_features for lin in linears))
        fused.to(device=linears[0].weight.device, dtype=linears[0].weight.dtype)
        fused.weight.copy_(torch.cat([lin.weight for lin in linears]))
        fused.bias.copy_(torch.cat([lin.bias for lin in linears]))
        start = 0
        for block, lin in zip(blocks, linears):
            block.emb_columns = (start, start + lin.out_features)
            start += lin.out_features
            del block.emb_proj
        self.emb_proj_fused = fused

    def time_embedding(self, c_noise: Tensor) -> Tensor:
        """MLP(sinusoidal(c_noise)): the sinusoids in float32 (float64 for a float64 c_noise),
        then the network's dtype."""
        sinusoids = timestep_embedding(c_noise, self.base_channels, float32_table=self.float32_time_table)
        return self.time_embed(sinusoids.to(self.time_embed[0].weight.dtype))

    def input_path(self, h: Tensor, emb: Tensor, cond: Tensor | None = None) -> list[Tensor]:
        """The outputs of every input block (the skips; the last one feeds the middle block)."""
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, cond)
            skips.append(h)
        return skips

    def forward(self, x_in: Tensor, c_noise: Tensor, x_T: Tensor, z: Tensor | None) -> Tensor:
        emb = self.time_embedding(c_noise)
        if self.z_conditioning == "embedding":
            emb = emb + self.z_embed(z)
        cond = z if self.z_conditioning == "block-scale" else None
        if self.emb_proj_fused is not None:  # every block's (scale, shift) at once
            emb = self.emb_proj_fused(F.silu(emb))
        skips = self.input_path(torch.cat([x_in, x_T], dim=1) if x_T is not None else x_in, emb, cond)
        return self.output_path(skips, emb, cond)

    def output_path(self, skips: list[Tensor], emb: Tensor, cond: Tensor | None = None) -> Tensor:
        """The middle block, the output path (each block takes the last skip left) and the
        head, from the input path's ``skips`` (left as they were)."""
        return run_output_path(self.middle_block, self.output_blocks, self.out, skips, emb, cond)
