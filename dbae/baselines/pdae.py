"""PDAE (Zhang et al. 2022, "Unsupervised Representation Learning from Pre-trained Diffusion
Probabilistic Models"; official code github.com/ckczzj/PDAE) built from DBAE's own networks,
as the baseline of the DBAE paper's Tables 1, 2, 5, 9, 10.

Model:

- a pre-trained, then frozen, unconditional DDPM ``eps_theta(x_t, t)``:
  :class:`UnconditionalUNet`, our :class:`dbae.nn.ScoreUNet` (ADM layout) with the C image
  channels as its only input and no z input (``emb = MLP(sinusoidal(t))``);
- a deterministic encoder ``z = E_phi(x_0)``: :class:`dbae.nn.Encoder`;
- a gradient estimator ``G_psi(x_t, z, t)`` (PDAE's "decoder"), approximating the classifier
  gradient ``grad_{x_t} log p(z | x_t)``: :class:`GradientUNet`, a z-conditioned ScoreUNet
  (``emb = MLP(sinusoidal(t)) + Linear(z)``) with its own weights. Its output conv is
  zero-initialised (as PDAE's ``shift_out``), so before training ``G = 0`` and the model is
  exactly the pre-trained DDPM.

Difference from the official code, on purpose (shared backbone): PDAE's ShiftUNet reuses the
frozen U-Net's time embedding and encoder-half features and trains only a second middle block
and decoder half (one shared forward gives eps and G). Here G is a complete second U-Net fed
x_t directly (about one U-Net more parameters, the same input/outputs and the same role).

Mean shift (classifier guidance, Dhariwal & Nichol 2021): the z-conditional reverse mean is
``mu_theta(x_t, t) + Sigma_t G_psi(x_t, z, t)``; in eps form

    eps(x_t, t, z) = eps_theta(x_t, t) - coeff(t) * G_psi(x_t, z, t)        (:meth:`PDAE.shifted_eps`)

with two coefficients, exactly as in the official code:

- training (PDAE eq. 9, ``GaussianDiffusion.shift_coef``): ``Sigma_t = beta~_t`` (posterior
  variance) gives ``coeff_train(t) = sqrt(alpha_t) (1 - abar_{t-1}) / sqrt(1 - abar_t)``
  (``abar_{-1} = 1``, so G is not used at t = 0); ``train_shift="score"`` uses
  ``sqrt(1 - abar_t)`` instead;
- DDIM sampling and inversion (``DDIM.shift_ddim_sample`` / ``shift_ddim_encode``):
  ``coeff_sample(t) = sqrt(1 - abar_t)``, the exact score identity
  ``eps(x_t|z) = -sqrt(1 - abar_t) grad log p(x_t | z) = eps(x_t) - sqrt(1 - abar_t) grad log p(z | x_t)``.

Training (two stages; :mod:`.pdae_train`): (1) the plain DDPM, ``mean ||eps_theta(x_t, t) - eps||^2``;
(2) with eps_theta frozen (no gradients, eval mode), encoder and G jointly minimise PDAE's
weighted loss ``mean lambda_t ||eps_theta(x_t, t) - coeff_train(t) G_psi(x_t, E(x_0), t) - eps||^2``
with ``lambda_t = SNR_t^gamma / (1 + SNR_t)``, ``SNR_t = abar_t / (1 - abar_t)``, gamma = 0.1.

Inference (:mod:`.ddim`, with clipping of x0_hat as in the official DDIM): x_T by DDIM
inversion of x_0 under the shifted eps; decoding by deterministic DDIM from x_T (inferred, or
x_T ~ N(0, I) for the "random x_T" rows). Defaults: 100 inversion steps and 100 decoding
steps (the PDAE paper's autoencoding setting); the DBAE paper also quotes 1000 and 500
(Table 5: 500 + 500).

NFE convention: ``nfe`` counts sampler steps, i.e. evaluations of the shifted eps; each one
is one forward pass of eps_theta AND one of G_psi (the official decoder call returns both),
so ``network_evals = 2 * nfe`` (the DBAE paper's Table 5 lists PDAE's NFE per network:
Dec_psi 500 and score 500). The encoder pass is counted apart (never an NFE).
"""

from __future__ import annotations

import contextlib
from typing import Literal, NamedTuple

import torch
from torch import nn

from ..config import UNetConfig
from ..errors import ConfigError
from ..nn import Encoder, ScoreUNet, count_parameters
from .ddim import DDPMSchedule, DiffusionNoise
from .ddim_autoencoder import DDIMAutoencoder
from .diffae import _time_dtype
from .pdae_nets import ConvEncoder, ShiftBranch
from .pdae_config import PDAEConfig

Tensor = torch.Tensor
CoefKind = Literal["sample", "train"]

#: PDAE's autoencoding defaults: 100-step DDIM inversion, 100-step decoding
DEFAULT_INVERSION_STEPS = 100
DEFAULT_DECODE_STEPS = 100
#: inversion step counts the DBAE paper quotes for PDAE
PAPER_INVERSION_STEPS = (1000, 500, 100)


class UnconditionalUNet(ScoreUNet):
    """The unconditional eps network ``eps_theta(x_t, t)``: a ScoreUNet whose input conv takes
    the C image channels only and which takes no z. ``forward(x_t, t)`` with integer (or
    float) timesteps t (B,)."""

    def __init__(self, cfg: UNetConfig, image_size: int, image_channels: int) -> None:
        super().__init__(cfg, image_size, image_channels, 1)
        # the z embedding and input conv are drawn and then dropped / replaced (rather than built
        # without z on C channels): the initial weights, drawn in this order, are what the
        # baselines' training runs and their tests are calibrated on
        self.input_blocks[0][0] = nn.Conv2d(image_channels, cfg.base_channels, 3, padding=1)
        del self.z_embed
        self.z_conditioning = "none"

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x_t, t.to(_time_dtype(x_t)), None, None)


class GradientUNet(ScoreUNet):
    """The gradient estimator ``G_psi(x_t, z, t)``: a z-conditioned ScoreUNet on the C image
    channels (zero-initialised output, so G = 0 at initialisation). ``forward(x_t, t, z)``."""

    def __init__(self, cfg: UNetConfig, image_size: int, image_channels: int, z_dim: int) -> None:
        super().__init__(cfg, image_size, image_channels, z_dim)
        self.input_blocks[0][0] = nn.Conv2d(image_channels, cfg.base_channels, 3, padding=1)  # as UnconditionalUNet

    def forward(self, x_t: Tensor, t: Tensor, z: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x_t, t.to(_time_dtype(x_t)), None, z)


class PDAELoss(NamedTuple):
    loss: Tensor  # scalar, differentiable
    logs: dict[str, Tensor]  # detached scalars
    eps_nfe: int  # eps_theta evaluations (1)
    gradient_nfe: int  # G_psi evaluations (0 for the DDPM loss, 1 for the PDAE loss)


class PDAEInversion(NamedTuple):
    x_T: Tensor
    nfe: int  # shifted-eps evaluations (steps)
    network_evals: int  # eps_theta + G_psi forward passes (2 * nfe)


class PDAEDecoding(NamedTuple):
    images: Tensor  # not clamped (PDAE's decode ends at level abar[0]: 0.99995 x0_hat + 0.01 eps')
    x_T: Tensor
    nfe: int
    network_evals: int


class PDAEReconstruction(NamedTuple):
    images: Tensor  # not clamped, as PDAEDecoding
    z: Tensor
    x_T: Tensor
    nfe: int  # inversion_nfe + decode_nfe (shifted-eps evaluations)
    inversion_nfe: int
    decode_nfe: int
    network_evals: int  # 2 * nfe (eps_theta + G_psi); the one encoder pass is apart


class PDAE(DDIMAutoencoder):
    """The PDAE autoencoder (module docstring): ``eps_net`` (frozen pre-trained DDPM),
    ``encoder`` and ``gradient_net`` (G). Methods validate shapes (DataError) and step counts
    (ConfigError) and report their exact NFE."""

    ddim_rule = "pdae"
    clamp_output = False  # PDAE's decode ends at level abar[0], unclamped

    def __init__(self, config: PDAEConfig) -> None:
        super().__init__()
        self.config = config
        size, ch, zd = config.image_size, config.image_channels, config.z_dim
        self.eps_net = UnconditionalUNet(config.unet, size, ch)
        if config.encoder_kind == "conv":
            self.encoder = ConvEncoder(config.conv_encoder, size, ch, zd)
        else:
            self.encoder = Encoder(config.encoder, size, ch, zd)
        if config.gradient == "shift":
            self.gradient_net = ShiftBranch(config.gradient_unet, self.eps_net, size, ch, zd)
        else:
            self.gradient_net = GradientUNet(config.gradient_unet, size, ch, zd)
        self.schedule = DDPMSchedule(config.schedule)
        ab = self.schedule.alphas_bar
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        alphas = 1.0 - self.schedule.betas
        #: sqrt(1 - abar_t): DDIM sampling / inversion (float64)
        self.sample_coef = (1.0 - ab).sqrt()
        if config.train_shift == "posterior":
            #: sqrt(alpha_t) (1 - abar_{t-1}) / sqrt(1 - abar_t): PDAE's training shift_coef
            self.train_coef = alphas.sqrt() * (1.0 - ab_prev) / (1.0 - ab).sqrt()
        else:
            self.train_coef = self.sample_coef.clone()
        snr = ab / (1.0 - ab)
        #: lambda_t = SNR_t^gamma / (1 + SNR_t)
        self.loss_weight = snr**config.weight_gamma / (1.0 + snr)
        self._ddpm_frozen = False

    # ----- freezing -----
    def freeze_ddpm(self) -> "PDAE":
        """Freeze the pre-trained eps network: no gradients, eval mode from now on (also after
        :meth:`train`)."""
        self._ddpm_frozen = True
        self.eps_net.requires_grad_(False).eval()
        return self

    @property
    def ddpm_frozen(self) -> bool:
        return self._ddpm_frozen

    def train(self, mode: bool = True) -> "PDAE":
        super().train(mode)
        if self._ddpm_frozen:
            self.eps_net.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the PDAE objective trains: encoder and G."""
        return [*self.encoder.parameters(), *self.gradient_net.parameters()]

    # ----- pieces -----
    def coef(self, t: Tensor, kind: CoefKind, like: Tensor) -> Tensor:
        """coeff(t) of ``kind`` ("sample": sqrt(1 - abar_t); "train": PDAE's training
        coefficient) shaped (B, 1, ..., 1) like ``like``."""
        if kind == "sample":
            table = self.sample_coef
        elif kind == "train":
            table = self.train_coef
        else:
            raise ConfigError(f"coefficient kind must be 'sample' or 'train', got {kind!r}")
        return table.to(like.device)[t.long()].view(-1, *([1] * (like.dim() - 1))).to(like.dtype)

    def eps_and_gradient(self, x_t: Tensor, t: Tensor, z: Tensor, *, frozen_eps: bool = False) -> tuple[Tensor, Tensor]:
        """(eps_theta(x_t, t), G_psi(x_t, z, t)): one evaluation of each (with G the authors' shift
        branch, one pass through the shared input path). ``frozen_eps``: the eps network (and the
        shared path) run without gradients."""
        if isinstance(self.gradient_net, ShiftBranch):
            net = self.eps_net
            with torch.no_grad() if frozen_eps else contextlib.nullcontext():
                emb = net.time_embedding(t.to(_time_dtype(x_t)))
                skips = net.input_path(x_t, emb)
                eps = net.output_path(skips, emb)
            return eps.to(x_t.dtype), self.gradient_net(skips, emb, z).to(x_t.dtype)
        with torch.no_grad() if frozen_eps else contextlib.nullcontext():
            eps = self.eps_net(x_t, t)
        return eps.to(x_t.dtype), self.gradient_net(x_t, t, z).to(x_t.dtype)

    def shifted_eps(self, x_t: Tensor, t: Tensor, z: Tensor, kind: CoefKind = "sample") -> Tensor:
        """``eps_theta(x_t, t) - coeff(t) G_psi(x_t, z, t)``: one eps_theta and one G_psi
        evaluation (one NFE)."""
        eps, grad = self.eps_and_gradient(x_t, t, z)
        return eps - self.coef(t, kind, x_t) * grad

    def sampling_eps(self, x_t: Tensor, t: Tensor, z: Tensor, shift: bool = True) -> Tensor:
        if not shift:  # PDAE's stop_percent: the plain DDPM on this step (G is not evaluated)
            return self.eps_net(x_t, t).to(x_t.dtype)
        return self.shifted_eps(x_t, t, z)

    # ----- training -----
    def _noisy(self, x0: Tensor, generator: torch.Generator | None, noise: DiffusionNoise | None
               ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        if noise is None:
            noise = self.schedule.draw_noise(x0.shape, generator, x0.device, x0.dtype)
        t, eps = noise
        return t, eps, self.schedule.q_sample(x0, t, eps)

    def ddpm_loss(self, x0: Tensor, generator: torch.Generator | None = None, noise: DiffusionNoise | None = None
                  ) -> PDAELoss:  # fmt: skip
        """Stage 1, the plain DDPM: ``mean ||eps_theta(x_t, t) - eps||^2`` (1 eps_theta NFE)."""
        self.check_images(x0)
        if self._ddpm_frozen:
            raise ConfigError("the DDPM of this PDAE is frozen; train it before freeze_ddpm()")
        t, noise, x_t = self._noisy(x0, generator, noise)
        loss = (self.eps_net(x_t, t).float() - noise.float()).square().mean()
        return PDAELoss(loss, {"loss": loss.detach()}, 1, 0)

    def loss(self, x0: Tensor, generator: torch.Generator | None = None, noise: DiffusionNoise | None = None
             ) -> PDAELoss:  # fmt: skip
        """Stage 2, PDAE's weighted loss (module docstring) with ``t ~ U{0..T-1}`` and
        ``eps ~ N(0, I)`` from ``generator`` (or ``noise``, drawn ahead). eps_theta runs without gradients (frozen);
        gradients reach only the encoder and G. One eps_theta and one G_psi evaluation."""
        self.check_images(x0)
        z = self.encode(x0)
        t, noise, x_t = self._noisy(x0, generator, noise)
        eps, grad = self.eps_and_gradient(x_t, t, z, frozen_eps=True)
        eps, grad = eps.float(), grad.float()
        pred = eps - self.coef(t, "train", grad) * grad
        weight = self.loss_weight.to(x0.device)[t].view(-1, *([1] * (x0.dim() - 1))).float()
        loss = (weight * (pred - noise.float()).square()).mean()
        logs = {"loss": loss.detach(), "z_std": z.detach().float().std()}
        return PDAELoss(loss, logs, 1, 1)

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
    ) -> PDAEInversion:
        """x_T of images ``x`` by DDIM inversion under the shifted eps with ``z`` (``E(x)``
        when not given): exactly ``steps`` NFE (``2 * steps`` network evaluations)."""
        x_T, nfe = self._invert(x, z, steps, clip, progress, trajectory)
        return PDAEInversion(x_T, nfe, 2 * nfe)

    @torch.no_grad()
    def decode(
        self,
        z: Tensor,
        x_T: Tensor | None = None,
        steps: int = DEFAULT_DECODE_STEPS,
        *,
        generator: torch.Generator | None = None,
        clip: bool = True,
        stop_percent: float = 0.0,
        progress: bool = False,
        trajectory: list | None = None,
    ) -> PDAEDecoding:
        """Images from z by deterministic DDIM under the shifted eps from ``x_T``
        (``x_T ~ N(0, I)`` from ``generator`` when None): exactly ``steps`` NFE. ``stop_percent``
        p: the gradient estimator shifts only the steps j with j - 1 >= int(p steps) (PDAE's
        option); the others are the plain DDPM's (one network evaluation instead of two)."""
        if not (0.0 <= stop_percent <= 1.0):
            raise ConfigError(f"stop_percent must lie in [0, 1], got {stop_percent}")
        dec = self._decode(z, x_T, steps, generator, clip, progress, stop_percent=stop_percent, trajectory=trajectory)
        shifted = sum(step.shift for step in self.ddim_steps(steps, "decode steps", stop_percent=stop_percent))
        return PDAEDecoding(dec.images, dec.x_T, dec.nfe, dec.nfe + shifted)

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
    ) -> PDAEReconstruction:
        """Encode, infer x_T (``inversion_steps`` NFE; skipped with ``random_x_T``, which draws
        x_T ~ N(0, I) from ``generator`` instead), decode (``decode_steps`` NFE)."""
        r = self._reconstruct(x, inversion_steps, decode_steps, random_x_T, generator, clip, progress)
        nfe = r.inversion_nfe + r.decode_nfe
        return PDAEReconstruction(r.images, r.z, r.x_T, nfe, r.inversion_nfe, r.decode_nfe, 2 * nfe)

    def parameter_counts(self) -> dict[str, int]:
        counts = {
            "eps_net": count_parameters(self.eps_net),
            "gradient_net": count_parameters(self.gradient_net),
            "encoder": count_parameters(self.encoder),
        }
        counts["total"] = sum(counts.values())
        return counts


__all__ = [
    "DEFAULT_DECODE_STEPS", "DEFAULT_INVERSION_STEPS", "GradientUNet", "PAPER_INVERSION_STEPS", "PDAE",
    "PDAEDecoding", "PDAEInversion", "PDAELoss", "PDAEReconstruction", "UnconditionalUNet",
]
