"""DiffAE (Preechakul et al. 2022, "Diffusion Autoencoders are Linear-Separable..."; arXiv
2111.15640) built from DBAE's own networks, as the baseline of the paper's Tables 2, 9, 10.

Model:

- semantic encoder ``z_sem = Enc(x_0)``: :class:`dbae.nn.Encoder`, deterministic head;
- conditional eps network ``eps_theta(x_t, t, z_sem)``: :class:`dbae.nn.ScoreUNet` with the
  same ADM layout and z conditioning (``emb = MLP(sinusoidal(t)) + Linear(z)``) but without
  the bridge endpoint input (:class:`ZConditionedUNet`). The time label is the integer DDPM
  timestep t in 0..T-1 (ADM's convention), fed as ``c_noise = t``.

Differences from the official DiffAE code, on purpose (shared backbone): z enters by adding
``Linear(z)`` to the time embedding (scale-shift group norm in every block) instead of
DiffAE's extra multiplicative ``h * (1 + Linear_block(z))`` per residual block.

Training (DDPM "simple" loss, DiffAE's default): ``t ~ U{0..T-1}``, ``eps ~ N(0, I)``,
``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``, ``L = mean || eps_theta(x_t, t, Enc(x_0)) - eps ||^2``;
encoder and U-Net are trained jointly end to end.

Inference (:mod:`.ddim`): the stochastic subcode x_T comes from DDIM inversion of x_0 under
``eps_theta(., ., z_sem)`` (DiffAE's ``encode_stochastic``, default 250 steps); decoding runs
deterministic DDIM from x_T (inferred, or ``x_T ~ N(0, I)`` for the "random x_T" rows of the
DBAE paper), DiffAE's default 20 or 100 steps. NFE counts eps-network evaluations only: the
encoder pass is not a U-Net evaluation and is reported apart.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..nn import Encoder, ScoreUNet, count_parameters
from ..config import UNetConfig
from .config import DiffAEConfig
from .ddim import DDPMSchedule, DiffusionNoise
from .ddim_autoencoder import DDIMAutoencoder

Tensor = torch.Tensor

#: DiffAE's defaults: 250-step DDIM inversion, 100-step decoding (20 also reported)
DEFAULT_INVERSION_STEPS = 250
DEFAULT_DECODE_STEPS = 100


class ZConditionedUNet(ScoreUNet):
    """DiffAE's eps network: a :class:`ScoreUNet` whose input conv takes the C image channels
    only (no x_T concatenation), so its parameters are exactly those of a z-conditioned ADM
    U-Net. ``forward`` is ScoreUNet's, called with a zero-channel ``x_T`` (``x[:, :0]``, the
    channel concatenation then adds nothing); use :meth:`eps`.
    """

    def __init__(self, cfg: UNetConfig, image_size: int, image_channels: int, z_dim: int) -> None:
        super().__init__(cfg, image_size, image_channels, z_dim)
        # built after the rest (not through in_channels): the initial weights, drawn in this
        # order, are what the baselines' training runs and their tests are calibrated on
        self.input_blocks[0][0] = nn.Conv2d(image_channels, cfg.base_channels, 3, padding=1)

    def eps(self, x_t: Tensor, t: Tensor, z: Tensor) -> Tensor:
        """eps_theta(x_t, t, z) for integer (or float) timesteps t (B,) (fed to the time
        embedding in float64 for a float64 state, float32 otherwise)."""
        return self(x_t, t.to(_time_dtype(x_t)), None, z)


def _time_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class DiffAELoss(NamedTuple):
    loss: Tensor  # scalar, differentiable
    logs: dict[str, Tensor]  # detached scalars
    nfe: int  # U-Net evaluations (1)


class Inversion(NamedTuple):
    x_T: Tensor  # the inferred stochastic subcode
    nfe: int


class Decoding(NamedTuple):
    images: Tensor  # clamped to [-1, 1]
    x_T: Tensor  # the start point used (inferred or drawn)
    nfe: int


class Reconstruction(NamedTuple):
    images: Tensor  # clamped to [-1, 1]
    z: Tensor
    x_T: Tensor
    nfe: int  # inversion_nfe + decode_nfe (U-Net evaluations; the one encoder pass is apart)
    inversion_nfe: int
    decode_nfe: int


class DiffAE(DDIMAutoencoder):
    """The DiffAE autoencoder (module docstring). Methods validate shapes (DataError) and
    step counts (ConfigError) and report their exact NFE."""

    def __init__(self, config: DiffAEConfig) -> None:
        super().__init__()
        self.config = config
        size, ch, zd = config.image_size, config.image_channels, config.z_dim
        self.encoder = Encoder(config.encoder, size, ch, zd)
        self.unet = ZConditionedUNet(config.unet, size, ch, zd)
        self.schedule = DDPMSchedule(config.schedule)

    # ----- pieces -----
    def eps(self, x_t: Tensor, t: Tensor, z: Tensor) -> Tensor:
        """eps_theta(x_t, t, z): one NFE."""
        return self.unet.eps(x_t, t, z).to(x_t.dtype)

    def sampling_eps(self, x_t: Tensor, t: Tensor, z: Tensor, shift: bool = True) -> Tensor:
        return self.eps(x_t, t, z)

    # ----- training -----
    def loss(self, x0: Tensor, generator: torch.Generator | None = None, noise: DiffusionNoise | None = None
             ) -> DiffAELoss:  # fmt: skip
        """DDPM's simple loss ``mean ||eps_theta(x_t, t, Enc(x0)) - eps||^2`` with
        ``t ~ U{0..T-1}`` and ``eps ~ N(0, I)`` from ``generator`` (or ``noise``, drawn
        ahead: :meth:`DDPMSchedule.draw_noise`) (1 NFE)."""
        self.check_images(x0)
        z = self.encode(x0)
        if noise is None:
            noise = self.schedule.draw_noise(x0.shape, generator, x0.device, x0.dtype)
        t, noise = noise
        x_t = self.schedule.q_sample(x0, t, noise)
        err = self.eps(x_t, t, z).float() - noise.float()
        loss = err.square().mean()
        logs = {"loss": loss.detach(), "z_std": z.detach().float().std()}
        return DiffAELoss(loss, logs, 1)

    # ----- inference -----
    @torch.no_grad()
    def infer_x_T(
        self,
        x: Tensor,
        z: Tensor | None = None,
        steps: int = DEFAULT_INVERSION_STEPS,
        *,
        clip: bool = True,
        progress: bool = False,
        trajectory: list | None = None,
    ) -> Inversion:
        """The stochastic subcode x_T of images ``x`` by DDIM inversion under
        ``eps_theta(., ., z)`` (``z = Enc(x)`` when not given): exactly ``steps`` NFE.
        ``clip`` clamps x0_hat to [-1, 1] at every step (DiffAE's ``clip_denoised``);
        ``trajectory`` gets (state, x0_hat) after every step."""
        return Inversion(*self._invert(x, z, steps, clip, progress, trajectory))

    @torch.no_grad()
    def decode(
        self,
        z: Tensor,
        x_T: Tensor | None = None,
        steps: int = DEFAULT_DECODE_STEPS,
        *,
        generator: torch.Generator | None = None,
        clip: bool = True,
        progress: bool = False,
        trajectory: list | None = None,
    ) -> Decoding:
        """Images from z_sem by deterministic DDIM from ``x_T`` (``x_T ~ N(0, I)`` from
        ``generator`` when None): exactly ``steps`` NFE (``trajectory``: as :meth:`infer_x_T`)."""
        return Decoding(*self._decode(z, x_T, steps, generator, clip, progress, trajectory=trajectory))

    @torch.no_grad()
    def reconstruct(
        self,
        x: Tensor,
        inversion_steps: int = DEFAULT_INVERSION_STEPS,
        decode_steps: int = DEFAULT_DECODE_STEPS,
        *,
        random_x_T: bool = False,
        generator: torch.Generator | None = None,
        clip: bool = True,
        progress: bool = False,
    ) -> Reconstruction:
        """Encode, infer x_T (``inversion_steps`` NFE; skipped with ``random_x_T``, which
        draws x_T ~ N(0, I) from ``generator`` instead), decode (``decode_steps`` NFE)."""
        r = self._reconstruct(x, inversion_steps, decode_steps, random_x_T, generator, clip, progress)
        return Reconstruction(r.images, r.z, r.x_T, r.inversion_nfe + r.decode_nfe, r.inversion_nfe, r.decode_nfe)

    def parameter_counts(self) -> dict[str, int]:
        counts = {"unet": count_parameters(self.unet), "encoder": count_parameters(self.encoder)}
        counts["total"] = sum(counts.values())
        return counts
