"""Building blocks shared by the score U-Net, the encoder and the decoder (ADM-style).

Everything here is written for ``torch.compile`` and ONNX export: control flow depends
only on module structure (never on tensor values) and no op writes into its inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

Tensor = torch.Tensor


def timestep_embedding(
    c_noise: Tensor, dim: int, max_period: float = 10000.0, *, float32_table: bool = False
) -> Tensor:
    """Sinusoidal embedding of a float tensor ``c_noise`` of shape (B,) -> (B, dim).

    Row b is ``[cos(c_b f_0), ..., cos(c_b f_{h-1}), sin(c_b f_0), ..., sin(c_b f_{h-1})]``
    with ``h = dim // 2`` and ``f_k = exp(-ln(max_period) k / h)`` (ADM's table, in that order
    of operations); an odd ``dim`` gets a trailing zero column. Computed in float64 for a
    float64 ``c_noise`` (a float64 model: the float32 sinusoids alone would cap its agreement
    with an exact reference near 1e-5), in float32 otherwise (the caller casts to a
    half-precision network afterwards). ``float32_table``: the frequencies stay float32 even
    then, as DiffAE's and PDAE's code builds them (only the products are float64).
    """
    dtype = torch.float64 if c_noise.dtype == torch.float64 else torch.float32
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32 if float32_table else dtype, device=c_noise.device)
    freqs = torch.exp(-math.log(max_period) * k / half).to(dtype)
    args = c_noise.to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def group_norm(channels: int, num_groups: int) -> nn.GroupNorm:
    """GroupNorm with ``num_groups`` groups, or the largest common divisor with ``channels``
    when ``num_groups`` does not divide it (so odd widths still build)."""
    return nn.GroupNorm(math.gcd(num_groups, channels), channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` in place and return it (ADM's zero-init)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _resampler(up: bool, down: bool) -> nn.Module:
    if up and down:
        raise ValueError("a residual block cannot both upsample and downsample")
    if up:
        return nn.Upsample(scale_factor=2, mode="nearest")
    if down:
        return nn.AvgPool2d(kernel_size=2, stride=2)
    return nn.Identity()


#: how a residual block takes a second condition ``cond`` (besides the time embedding), after
#: the time's scale-shift: none; "scale" h * (1 + Linear(SiLU(cond))) (DiffAE, cond = z);
#: "scale-shift" (1 + s) h + b with (s, b) = Linear(SiLU(cond)) (PDAE's shift branch, cond = an
#: embedding of z)
COND_MODES = ("scale", "scale-shift")


class ResBlock(nn.Module):
    """ADM residual block conditioned on an embedding (the score U-Net's block).

    ``h = conv(resample(SiLU(norm(x))))``; ``h = norm(h) * (1 + scale) + shift`` with
    ``(scale, shift) = Linear(SiLU(emb))`` (scale-shift norm); ``h = conv(dropout(SiLU(h)))``
    with that last conv zero-initialised; output ``skip(resample(x)) + h``. ``up`` / ``down``
    resample by 2 inside the block (nearest / average pooling), on both the residual branch
    and the skip path (ADM ``resblock_updown``). A fresh block is thus the identity (or its
    1x1 skip projection).

    ``cond_channels`` / ``cond_mode`` (:data:`COND_MODES`): a second condition of that width,
    applied after the time's scale-shift by ``cond_proj`` (DiffAE's per-block z scale,
    PDAE's z scale and shift).
    """

    def __init__(
        self,
        channels: int,
        out_channels: int,
        emb_channels: int,
        *,
        dropout: float = 0.0,
        num_groups: int = 32,
        up: bool = False,
        down: bool = False,
        cond_channels: int | None = None,
        cond_mode: str = "scale",
    ) -> None:
        super().__init__()
        self.in_norm = group_norm(channels, num_groups)
        self.resample = _resampler(up, down)
        self.in_conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.out_norm = group_norm(out_channels, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        #: set by ScoreUNet.fuse_emb_projections: this block's columns of the projections of all
        #: blocks, computed at once (``emb`` then holds them, and emb_proj is gone)
        self.emb_columns: tuple[int, int] | None = None
        self.cond_mode = cond_mode if cond_channels is not None else None
        if cond_channels is not None:
            if cond_mode not in COND_MODES:
                raise ConfigError(f"cond_mode must be one of {', '.join(COND_MODES)}, got {cond_mode!r}")
            width = out_channels if cond_mode == "scale" else 2 * out_channels
            self.cond_proj = nn.Sequential(nn.SiLU(), nn.Linear(cond_channels, width))

    def forward(self, x: Tensor, emb: Tensor, cond: Tensor | None = None) -> Tensor:
        h = self.in_conv(self.resample(F.silu(self.in_norm(x))))
        if self.emb_columns is None:
            projected = self.emb_proj(emb)
        else:
            projected = emb[:, self.emb_columns[0] : self.emb_columns[1]]
        scale, shift = projected[:, :, None, None].chunk(2, dim=1)
        h = self.out_norm(h) * (1 + scale) + shift
        if self.cond_mode == "scale":
            h = h * (1 + self.cond_proj(cond)[:, :, None, None])
        elif self.cond_mode == "scale-shift":
            c_scale, c_shift = self.cond_proj(cond)[:, :, None, None].chunk(2, dim=1)
            h = (1 + c_scale) * h + c_shift
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(self.resample(x)) + h


class PlainResBlock(nn.Module):
    """Unconditioned residual block of DiffAE's encoder (and hence the official DBAE one):
    ``skip(resample(x)) + conv(resample(SiLU(norm(x))))``.

    DiffAE's ResBlock drops its whole second norm/conv stage when it has no condition, so
    this block has a single 3x3 conv (not zero-initialised); that is what puts the FFHQ128
    encoder at about 24.7M parameters.
    """

    def __init__(
        self, channels: int, out_channels: int, *, num_groups: int = 32, down: bool = False
    ) -> None:
        super().__init__()
        self.norm = group_norm(channels, num_groups)
        self.resample = _resampler(False, down)
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.skip = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(self.resample(x)) + self.conv(self.resample(F.silu(self.norm(x))))


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the spatial positions, ``num_head_channels`` per head
    (or exactly ``num_heads`` heads when given: the official DBAE/DiffAE encoder attends
    with one head at every width).

    Pre-norm, 1x1 qkv projection whose output rows are ordered (q|k|v, head, channel),
    ``scaled_dot_product_attention``, zero-initialised 1x1 output projection, residual
    connection.
    """

    def __init__(
        self, channels: int, num_head_channels: int, num_groups: int = 32, num_heads: int | None = None
    ) -> None:
        super().__init__()
        if num_heads is not None:
            if num_heads < 1 or channels % num_heads:
                raise ConfigError(f"attention width {channels} cannot be split into num_heads={num_heads} heads")
            num_head_channels = channels // num_heads
        if num_head_channels < 1 or channels % num_head_channels:
            raise ConfigError(
                f"attention width {channels} is not a multiple of num_head_channels={num_head_channels}"
            )
        self.num_heads = channels // num_head_channels
        self.head_channels = num_head_channels
        self.norm = group_norm(channels, num_groups)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, h * w))
        # (B, 3 * C, L) -> (B, 3, heads, L, head_channels), made contiguous: the fused attention
        # kernels (flash, memory-efficient) take only inputs whose last dimension has stride 1;
        # the transposed view would send every call to the math path (which, on CUDA, runs bf16
        # and fp16 in float32 and materialises the L x L scores)
        qkv = qkv.reshape(b, 3, self.num_heads, self.head_channels, h * w).transpose(-1, -2).contiguous()
        q, k, v = qkv.unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, L, head_channels)
        out = out.transpose(-1, -2).reshape(b, c, h * w)
        return x + self.proj(out).reshape(b, c, h, w)


class EmbedSequential(nn.Sequential):
    """A sequence of layers where the ResBlocks also receive the conditioning embedding (and
    their second condition, where they take one)."""

    def forward(self, x: Tensor, emb: Tensor, cond: Tensor | None = None) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb, cond) if isinstance(layer, ResBlock) else layer(x)
        return x
