"""The latent prior's denoiser: an MLP with skip connections (DiffAE's MLPSkipNet, SPEC 7).

eps_theta(z_t, t): ``num_layers`` linear layers. Every layer but the first reads
``concat(h, z_t)`` (z_t re-enters at every depth); every layer but the last is followed by
a time-conditioned scale ``h * (1 + W_l emb(t))``, LayerNorm, SiLU and dropout. The last
layer maps back to the latent dimension and predicts the noise.
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn.layers import timestep_embedding
from .config import PriorNetConfig

Tensor = torch.Tensor


class _SkipLayer(nn.Module):
    """Linear -> time scale -> LayerNorm -> SiLU -> dropout."""

    def __init__(self, in_features: int, out_features: int, embed_dim: int, dropout: float) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.cond = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, out_features))
        self.norm = nn.LayerNorm(out_features)
        self.act = nn.SiLU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        h = self.linear(h) * (1.0 + self.cond(emb))
        return self.dropout(self.act(self.norm(h)))


class MLPSkipNet(nn.Module):
    """Noise predictor for normalized latents of dimension ``z_dim``."""

    def __init__(self, config: PriorNetConfig, z_dim: int) -> None:
        super().__init__()
        if z_dim < 1:
            raise ValueError(f"z_dim must be positive, got {z_dim}")
        self.config, self.z_dim = config, z_dim
        c = config
        self.time_embed = nn.Sequential(
            nn.Linear(c.time_channels, c.time_embed_dim), nn.SiLU(), nn.Linear(c.time_embed_dim, c.time_embed_dim)
        )
        layers = [_SkipLayer(z_dim, c.width, c.time_embed_dim, c.dropout)]
        layers += [_SkipLayer(c.width + z_dim, c.width, c.time_embed_dim, c.dropout) for _ in range(c.num_layers - 2)]
        self.layers = nn.ModuleList(layers)
        self.out = nn.Linear(c.width + z_dim, z_dim)

    def forward(self, z_t: Tensor, t: Tensor) -> Tensor:
        """Predicted noise (B, z_dim) for noisy latents z_t (B, z_dim) at timesteps t (B,)."""
        if z_t.dim() != 2 or z_t.shape[1] != self.z_dim:
            raise ValueError(f"expected latents of shape (B, {self.z_dim}), got {tuple(z_t.shape)}")
        # DiffAE's sinusoids: a float32 frequency table, products in float64 for a float64 model
        c = t.to(torch.float64 if z_t.dtype == torch.float64 else torch.float32)
        emb = self.time_embed(timestep_embedding(c, self.config.time_channels, float32_table=True).to(z_t.dtype))
        h = self.layers[0](z_t, emb)
        for layer in self.layers[1:]:
            h = layer(torch.cat([h, z_t], dim=1), emb)
        return self.out(torch.cat([h, z_t], dim=1))
