"""The score U-Net F_theta(x_in, c_noise, x_T, z) of SPEC 1 and 9 (ADM / DiffAE layout)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import UNetConfig
from .layers import AttentionBlock, EmbedSequential, ResBlock, group_norm, timestep_embedding, zero_module

Tensor = torch.Tensor


class ScoreUNet(nn.Module):
    """ADM U-Net conditioned on the time, the bridge endpoint ``x_T`` and the latent ``z``.

    * ``x_T`` is concatenated to ``x_in`` on the channel axis (input conv sees 2C channels).
    * ``emb = MLP(sinusoidal(c_noise)) + Linear(z)`` (width ``4 * base_channels``) drives the
      scale-shift group norm of every residual block.
    * Encoder path: ``num_res_blocks`` ResBlocks per level, then a downsampling ResBlock
      (except at the last level); middle: ResBlock, attention, ResBlock; decoder path:
      ``num_res_blocks + 1`` ResBlocks per level, each fed the concatenation with one skip,
      then an upsampling ResBlock (except at the top level). Self-attention follows each
      ResBlock whose feature maps have a side length listed in ``attention_resolutions``.
    * Output: GroupNorm, SiLU, zero-initialised 3x3 conv to C channels.
    """

    def __init__(self, cfg: UNetConfig, image_size: int, image_channels: int, z_dim: int) -> None:
        super().__init__()
        ch = cfg.base_channels
        emb_dim = 4 * ch
        self.base_channels = ch
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.z_embed = nn.Linear(z_dim, emb_dim)

        def res(cin: int, cout: int, **kw: bool) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, dropout=cfg.dropout, num_groups=cfg.num_groups, **kw)

        def attn(c: int) -> AttentionBlock:
            return AttentionBlock(c, cfg.num_head_channels, cfg.num_groups)

        last = len(cfg.channel_mult) - 1
        side = image_size  # side length of the current feature maps
        cur = ch
        skip_channels = [ch]
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(2 * image_channels, ch, 3, padding=1))])
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res(cur, mult * ch)]
                cur = mult * ch
                if side in cfg.attention_resolutions:
                    layers.append(attn(cur))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_channels.append(cur)
            if level != last:
                self.input_blocks.append(EmbedSequential(res(cur, cur, down=True)))
                skip_channels.append(cur)
                side //= 2

        self.middle_block = EmbedSequential(res(cur, cur), attn(cur), res(cur, cur))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(cur + skip_channels.pop(), mult * ch)]
                cur = mult * ch
                if side in cfg.attention_resolutions:
                    layers.append(attn(cur))
                if level and i == cfg.num_res_blocks:
                    layers.append(res(cur, cur, up=True))
                    side *= 2
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(
            group_norm(cur, cfg.num_groups), nn.SiLU(), zero_module(nn.Conv2d(cur, image_channels, 3, padding=1))
        )
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

    def forward(self, x_in: Tensor, c_noise: Tensor, x_T: Tensor, z: Tensor) -> Tensor:
        # the sinusoids in float32 (float64 for a float64 c_noise), then the network's dtype
        t_emb = timestep_embedding(c_noise, self.base_channels).to(self.time_embed[0].weight.dtype)
        emb = self.time_embed(t_emb) + self.z_embed(z)
        if self.emb_proj_fused is not None:  # every block's (scale, shift) at once
            emb = self.emb_proj_fused(F.silu(emb))
        h = torch.cat([x_in, x_T], dim=1)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)
