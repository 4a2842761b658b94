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

from ..errors import DataError
from ..nn import Encoder, ScoreUNet, count_parameters
from ..config import UNetConfig
from .config import DiffAEConfig
from .ddim import DDPMSchedule, check_steps

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
        self.input_blocks[0][0] = nn.Conv2d(image_channels, cfg.base_channels, 3, padding=1)

    def eps(self, x_t: Tensor, t: Tensor, z: Tensor) -> Tensor:
        """eps_theta(x_t, t, z) for integer (or float) timesteps t (B,)."""
        return self(x_t, t.to(torch.float32), x_t[:, :0], z)


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


class DiffAE(nn.Module):
    """The DiffAE autoencoder (module docstring). Methods validate shapes (DataError) and
    step counts (ConfigError) and report their exact NFE."""

    def __init__(self, config: DiffAEConfig) -> None:
        super().__init__()
        self.config = config
        size, ch, zd = config.image_size, config.image_channels, config.z_dim
        self.encoder = Encoder(config.encoder, size, ch, zd)
        self.unet = ZConditionedUNet(config.unet, size, ch, zd)
        self.schedule = DDPMSchedule(config.schedule)

    # ----- checks -----
    def check_images(self, x: Tensor, what: str = "images") -> None:
        c, s = self.config.image_channels, self.config.image_size
        if x.dim() != 4 or x.shape[1] != c or x.shape[2] != s or x.shape[3] != s:
            raise DataError(f"{what} must have shape (B, {c}, {s}, {s}) for this model, got {tuple(x.shape)}")

    def check_latents(self, z: Tensor) -> None:
        if z.dim() != 2 or z.shape[1] != self.config.z_dim:
            raise DataError(f"z must have shape (B, {self.config.z_dim}) for this model, got {tuple(z.shape)}")

    # ----- pieces -----
    def encode(self, x: Tensor) -> Tensor:
        """z_sem = Enc(x) (B, z_dim) for images in [-1, 1]. One encoder pass, NFE 0."""
        self.check_images(x)
        return self.encoder(x)[0]

    def eps(self, x_t: Tensor, t: Tensor, z: Tensor) -> Tensor:
        """eps_theta(x_t, t, z): one NFE."""
        return self.unet.eps(x_t, t, z).to(x_t.dtype)

    # ----- training -----
    def loss(self, x0: Tensor, generator: torch.Generator | None = None) -> DiffAELoss:
        """DDPM's simple loss ``mean ||eps_theta(x_t, t, Enc(x0)) - eps||^2`` with
        ``t ~ U{0..T-1}`` and ``eps ~ N(0, I)`` from ``generator`` (1 NFE)."""
        self.check_images(x0)
        z = self.encode(x0)
        t = self.schedule.sample_t(x0.shape[0], generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
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
    ) -> Inversion:
        """The stochastic subcode x_T of images ``x`` by DDIM inversion under
        ``eps_theta(., ., z)`` (``z = Enc(x)`` when not given): exactly ``steps`` NFE.
        ``clip`` clamps x0_hat to [-1, 1] at every step (DiffAE's ``clip_denoised``)."""
        self.check_images(x)
        steps = check_steps(steps, self.schedule.timesteps, "inversion steps")
        if z is None:
            z = self.encode(x)
        self._check_batch(z, x.shape[0])
        out = self.schedule.invert(lambda xt, t: self.eps(xt, t, z), x, steps, clip=clip, progress=progress)
        return Inversion(out.x, out.nfe)

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
    ) -> Decoding:
        """Images from z_sem by deterministic DDIM from ``x_T`` (``x_T ~ N(0, I)`` from
        ``generator`` when None): exactly ``steps`` NFE."""
        self.check_latents(z)
        steps = check_steps(steps, self.schedule.timesteps, "decode steps")
        c, s = self.config.image_channels, self.config.image_size
        if x_T is None:
            p = next(self.parameters())
            x_T = torch.randn((z.shape[0], c, s, s), generator=generator, device=z.device, dtype=p.dtype)
        else:
            self.check_images(x_T, "x_T")
            self._check_batch(z, x_T.shape[0])
        out = self.schedule.sample(lambda xt, t: self.eps(xt, t, z), x_T, steps, clip=clip, progress=progress)
        return Decoding(out.x.clamp(-1.0, 1.0), x_T, out.nfe)

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
        self.check_images(x)
        z = self.encode(x)
        if random_x_T:
            inv_nfe, x_T = 0, None
        else:
            x_T, inv_nfe = self.infer_x_T(x, z, inversion_steps, clip=clip, progress=progress)
        dec = self.decode(z, x_T, decode_steps, generator=generator, clip=clip, progress=progress)
        return Reconstruction(dec.images, z, dec.x_T, inv_nfe + dec.nfe, inv_nfe, dec.nfe)

    def parameter_counts(self) -> dict[str, int]:
        counts = {"unet": count_parameters(self.unet), "encoder": count_parameters(self.encoder)}
        counts["total"] = sum(counts.values())
        return counts

    @staticmethod
    def _check_batch(z: Tensor, batch: int) -> None:
        if z.shape[0] != batch:
            raise DataError(f"z holds {z.shape[0]} latents for a batch of {batch} images")
