"""The DBAE model: encoder, endpoint decoder and bridge score network (SPEC 1, 4-6)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import nn

from .bridge import Preconditioning, VPBridge
from .config import ModelConfig
from .errors import ConfigError, DataError
from .losses import total_correlation
from .nn import Decoder, Encoder, ScoreUNet, count_parameters
from .sampling import BridgeSampler, SampleResult, SamplerName, steps_for_nfe

Tensor = torch.Tensor


@dataclass(frozen=True)
class LossOutput:
    loss: Tensor  # scalar, differentiable
    logs: dict[str, Tensor]  # detached scalar terms for logging (no host sync)


@dataclass(frozen=True)
class LossNoise:
    """The random draws of :meth:`DBAE.loss` for a batch, made ahead of it
    (:meth:`DBAE.draw_loss_noise`): z noise (None for DBAE-d), t, and the bridge noise eps
    (None where the fused path makes it in-kernel). Rows belong to samples, so a slice of
    a batch's draws is what that slice of the batch gets: how distributed training and
    gradient accumulation give each micro-batch its share of the global batch's draws."""

    z_eps: Tensor | None  # (B, z_dim)
    t: Tensor  # (B,)
    eps: Tensor | None  # (B, C, H, W)

    def slice(self, start: int, stop: int) -> "LossNoise":
        cut = lambda x: None if x is None else x[start:stop]  # noqa: E731
        return LossNoise(cut(self.z_eps), self.t[start:stop], cut(self.eps))


@dataclass(frozen=True)
class ReconstructionResult:
    images: Tensor  # decoded images, clamped to [-1, 1]
    x_T: Tensor  # the endpoints Dec(z)
    z: Tensor
    nfe: int
    steps: int


TC_NEEDS_STOCHASTIC = (
    "the total-correlation penalty (tc_weight > 0) needs the stochastic encoder "
    "(encoder.stochastic = true): its estimator uses the Gaussians q(z|x)"
)


def fused_training(device: torch.device) -> bool:
    """Whether :meth:`DBAE.loss` runs the fused Triton ops on ``device``.

    ``DBAE_KERNELS=auto`` (default): on CUDA when Triton is installed; never on the CPU
    (the Triton interpreter is far too slow to train with). ``triton``: always, raising
    where Triton cannot run. ``reference`` (or the C++-only ``cpu``/``cuda``): never.
    """
    selected = os.environ.get("DBAE_KERNELS", "auto").strip().lower() or "auto"
    if selected not in ("auto", "triton") or (selected == "auto" and device.type != "cuda"):
        return False
    from .kernels.backend import use_triton

    return use_triton(device)


def fused_sampling(device: torch.device, dtype: torch.dtype = torch.float32) -> bool:
    """Whether :meth:`DBAE.decode` runs the fused C++/CUDA sampler steps on ``device`` for a
    state of ``dtype`` (``DBAE_KERNELS`` decides, see :func:`dbae.fused_step.backend`; the
    kernels take float32, float16 and bfloat16: a float64 decode runs the reference sampler)."""
    from . import fused_step

    return dtype in (torch.float32, torch.float16, torch.bfloat16) and fused_step.backend(device) != "reference"


def _per_sample(c: Tensor | float, like: Tensor) -> Tensor | float:
    if isinstance(c, float):  # one time for the whole batch: a scalar operand, rounded to like's dtype
        return c
    return c.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))


class DBAE(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        size, ch, zd = config.image_size, config.image_channels, config.z_dim
        self.encoder = Encoder(config.encoder, size, ch, zd)
        self.decoder = Decoder(config.decoder, size, ch, zd)
        self.unet = ScoreUNet(config.unet, size, ch, zd)
        #: the bridge of training (the loss); sampling uses :attr:`sampling_bridge`
        self.bridge = VPBridge(config.bridge)
        self.set_sampling_sigma_T(None)

    # ----- how it samples -----
    @property
    def sampling_sigma_T(self) -> float:
        """The sigma_T of the preconditioning while sampling (SPEC 4)."""
        return self.sampling_bridge.config.sigma_T

    def set_sampling_sigma_T(self, sigma_T: float | None) -> None:
        """Sample with the preconditioning of another sigma_T (None: the trained one, the
        default). Only the preconditioning changes: the drift does not depend on sigma_T.

        The authors' released DBAE scripts train with sigma_T = 0.5 but sample with 0 (their
        ``end_data`` is never passed to the inference scripts), which changes c_in near t = T
        by up to 35x; ``set_sampling_sigma_T(0.0)`` reproduces their reconstructions."""
        if sigma_T is None:
            sigma_T = self.config.bridge.sigma_T
        if not (math.isfinite(sigma_T) and sigma_T >= 0.0):
            raise ConfigError(f"the sampling sigma_T must be a finite number >= 0, got {sigma_T}")
        same = sigma_T == self.config.bridge.sigma_T
        #: the bridge of the preconditioning while sampling (the training bridge unless changed)
        self.sampling_bridge = self.bridge if same else VPBridge(replace(self.config.bridge, sigma_T=sigma_T))
        self.sampler = BridgeSampler(self.sampling_bridge)

    # ----- pieces -----
    def check_images(self, x: Tensor) -> None:
        c, s = self.config.image_channels, self.config.image_size
        if x.dim() != 4 or x.shape[1] != c or x.shape[2] != s or x.shape[3] != s:
            raise DataError(
                f"images must have shape (B, {c}, {s}, {s}) for this model, got {tuple(x.shape)}"
            )

    def encode(self, x: Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """z for images x in [-1, 1]. The mean of a stochastic encoder unless ``sample``."""
        return self._posterior(x, sample=sample, generator=generator)[0]

    def _posterior(
        self, x: Tensor, *, sample: bool, generator: torch.Generator | None, eps: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """(z, mu, sig): the encoder's mean and scale (sig None for DBAE-d) and z, a
        reparameterized sample mu + sig eps when ``sample`` and stochastic, else mu
        (``eps`` given: that noise, else drawn from ``generator``)."""
        self.check_images(x)
        mu, sig = self.encoder(x)
        if sample and sig is not None:
            if eps is None:
                eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            eps = eps.to(mu.dtype)
            return mu + sig * eps, mu, sig
        return mu, mu, sig

    def endpoint(self, z: Tensor) -> Tensor:
        """x_T = Dec(z)."""
        return self.decoder(z)

    def denoise(self, x_t: Tensor, t: Tensor | float, x_T: Tensor, z: Tensor) -> Tensor:
        """Preconditioned denoiser D = c_skip x_t + c_out F(c_in x_t, c_noise, x_T, z), with the
        preconditioning of sampling (:attr:`sampling_bridge`)."""
        return self._denoise(x_t, t, x_T, z, self.sampling_bridge)

    def _denoise(self, x_t: Tensor, t: Tensor | float, x_T: Tensor, z: Tensor, bridge: VPBridge) -> Tensor:
        pre = self._preconditioning(t, x_t, bridge)
        F = self._network(x_t, pre, x_T, z)
        return _per_sample(pre.c_skip, x_t) * x_t + _per_sample(pre.c_out, x_t) * F.to(x_t.dtype)

    def network_output(self, x_t: Tensor, t: Tensor | float, x_T: Tensor, z: Tensor) -> Tensor:
        """The raw U-Net output F(c_in x_t, c_noise, x_T, z) (what the fused sampler steps take),
        with the preconditioning of sampling."""
        return self._network(x_t, self._preconditioning(t, x_t, self.sampling_bridge), x_T, z)

    @staticmethod
    def _preconditioning(t: Tensor | float, x_t: Tensor, bridge: VPBridge) -> Preconditioning:
        """Per-sample coefficients for a tensor of times; for one time (a float, as the samplers
        pass it), the same float64 math on the host, as Python floats: the device then sees
        scalar operands instead of some thirty float64 kernels per step (which a CUDA graph
        would replay on every evaluation)."""
        if not isinstance(t, Tensor) or (t.dim() == 0 and t.device.type == "cpu"):
            return Preconditioning(*map(float, bridge.preconditioning(float(t))))
        if t.dim() == 0:
            t = t.expand(x_t.shape[0])
        return bridge.preconditioning(t.to(torch.float64))

    def _network(self, x_t: Tensor, pre: Preconditioning, x_T: Tensor, z: Tensor) -> Tensor:
        # c_noise reaches the U-Net in float32, or in float64 for a float64 state (where the
        # time embedding is computed in float64 too)
        dtype = torch.float64 if x_t.dtype == torch.float64 else torch.float32
        if isinstance(pre.c_noise, float):
            c_noise = torch.full((x_t.shape[0],), pre.c_noise, dtype=dtype, device=x_t.device)
        else:
            c_noise = pre.c_noise.to(device=x_t.device, dtype=dtype)
        return self.unet(_per_sample(pre.c_in, x_t) * x_t, c_noise, x_T, z)

    # ----- training objective (SPEC 5) -----
    def draw_loss_noise(
        self, batch: int, *, generator: torch.Generator | None = None, device=None, eps: bool = True
    ) -> LossNoise:
        """The draws :meth:`loss` makes for a batch of ``batch`` images from ``generator``,
        in the same order (z noise, t, eps), so ``loss(x0, noise=draw_loss_noise(B, generator=g))``
        equals ``loss(x0, generator=g)`` on the reference path. ``eps=False`` skips eps
        (the last draw), for the fused path that makes it in-kernel."""
        c = self.config
        z_eps = None
        if self.encoder.stochastic:
            z_eps = torch.randn((batch, c.z_dim), generator=generator, device=device, dtype=torch.float32)
        t = self.bridge.sample_t(batch, generator=generator, device=device)
        shape = (batch, c.image_channels, c.image_size, c.image_size)
        e = torch.randn(shape, generator=generator, device=device, dtype=torch.float32) if eps else None
        return LossNoise(z_eps, t, e)

    def loss(
        self,
        x0: Tensor,
        *,
        generator: torch.Generator | None = None,
        noise_seed: int | None = None,
        tc_weight: float = 0.0,
        noise: LossNoise | None = None,
    ) -> LossOutput:
        """The DBAE loss of a batch (SPEC 5), with logged terms.

        z noise and t are drawn from ``generator``. The bridge noise eps comes from
        ``generator`` on the reference path; the fused Triton path (CUDA, see
        :func:`fused_training`) makes it in-kernel from ``noise_seed`` (drawn from
        ``generator`` when not given) and never stores it.

        ``tc_weight > 0`` adds ``tc_weight * TC`` (DBAE+TC): the minibatch-weighted
        estimate of the total correlation of q(z) (:func:`dbae.losses.total_correlation`),
        logged as ``tc``. It needs the stochastic encoder (the estimator's densities are
        its Gaussians q(z|x)); with DBAE-d it raises ConfigError.

        ``noise`` (from :meth:`draw_loss_noise`, or a slice of it) replaces the draws from
        ``generator``; its eps is ignored on the fused path.
        """
        self.check_images(x0)
        B = x0.shape[0]
        if tc_weight < 0:
            raise ConfigError(f"tc_weight must be >= 0, got {tc_weight}")
        if tc_weight > 0 and not self.encoder.stochastic:
            raise ConfigError(TC_NEEDS_STOCHASTIC)
        if noise is not None and noise.t.shape[0] != B:
            raise ValueError(f"noise drawn for {noise.t.shape[0]} images, batch has {B}")
        z_eps = noise.z_eps if noise is not None else None
        z, mu, sig = self._posterior(x0, sample=self.encoder.stochastic, generator=generator, eps=z_eps)
        x_T = self.endpoint(z)
        t = noise.t if noise is not None else self.bridge.sample_t(B, generator=generator, device=x0.device)
        if fused_training(x0.device):
            loss, per_sample = self._fused_loss(x0, x_T, z, t, generator, noise_seed)
        else:
            if noise is not None and noise.eps is not None:
                eps = noise.eps.to(x0.dtype)
            else:
                eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            x_t = self.bridge.marginal_sample(x0, x_T, t, eps)
            D = self._denoise(x_t, t, x_T, z, self.bridge)
            weight = self.bridge.loss_weight(t.to(torch.float64)).to(device=x0.device, dtype=torch.float32)
            per_sample = ((D.float() - x0.float()) ** 2).flatten(1).mean(1)
            loss = (weight * per_sample).mean()
        logs = {
            "loss": loss.detach(),
            "mse": per_sample.detach().mean(),
            "z_std": z.detach().float().std(),
            "x_T_std": x_T.detach().float().std(),
        }
        if tc_weight > 0:
            assert sig is not None
            tc = total_correlation(z, mu, sig)
            loss = loss + tc_weight * tc
            logs["tc"] = tc.detach()
            logs["loss"] = loss.detach()
        return LossOutput(loss, logs)

    def _fused_loss(
        self, x0: Tensor, x_T: Tensor, z: Tensor, t: Tensor, generator: torch.Generator | None, seed: int | None
    ) -> tuple[Tensor, Tensor]:
        """(loss, per-sample MSE) through the fused Triton ops (same math)."""
        from .kernels import bridge_input, bridge_loss, bridge_table

        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=x0.device))
        table = bridge_table(self.bridge, t)
        _, x_in = bridge_input(x0, x_T, table, seed)
        c_noise = self.bridge.preconditioning(t.to(torch.float64)).c_noise.to(torch.float32)
        F = self.unet(x_in, c_noise, x_T, z)
        return bridge_loss(F, x0, x_T, table, seed)

    # ----- sampling (SPEC 6) -----
    @torch.no_grad()
    def decode(
        self,
        z: Tensor,
        nfe: int = 10,
        *,
        sampler: SamplerName = "euler",
        churn: float = 0.0,
        x_T: Tensor | None = None,
        clamp: bool = True,
        generator: torch.Generator | None = None,
        churn_noise: Sequence[Tensor] | None = None,
        progress: bool = False,
    ) -> SampleResult:
        """Images from latents with at most ``nfe`` U-Net evaluations (exact count returned).

        ``x_T`` defaults to Dec(z); passing another endpoint conditions on z only
        (the "condition-only" manipulation mode). ``churn_noise``: the standard normal
        noise of each churn step (one tensor shaped like x_T per step) instead of draws from
        ``generator`` (to replay another implementation's run; the reference sampler then
        runs, whatever the kernels).
        """
        steps = steps_for_nfe(nfe, sampler, churn)
        if x_T is None:
            x_T = self.endpoint(z)
        if fused_sampling(x_T.device, x_T.dtype) and churn_noise is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=x_T.device)) if churn > 0 else 0
            result = self.sampler.sample_fused(
                lambda x, t: self.network_output(x, t, x_T, z).to(x.dtype),
                x_T, steps=steps, sampler=sampler, churn=churn, seed=seed, clamp=clamp, progress=progress,
            )
        else:

            def denoise(x: Tensor, t: float) -> Tensor:
                D = self.denoise(x, t, x_T, z)
                return D.clamp(-1.0, 1.0) if clamp else D

            result = self.sampler.sample(
                denoise, x_T, steps=steps, sampler=sampler, churn=churn, generator=generator,
                churn_noise=churn_noise, progress=progress,
            )
        images = result.images.clamp(-1.0, 1.0) if clamp else result.images
        return SampleResult(images=images, nfe=result.nfe, steps=result.steps)

    @torch.no_grad()
    def reconstruct(
        self,
        x: Tensor,
        nfe: int = 10,
        *,
        sampler: SamplerName = "euler",
        churn: float = 0.0,
        sample_z: bool = False,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> ReconstructionResult:
        """Encode in one pass, then decode: no inversion anywhere."""
        z = self.encode(x, sample=sample_z, generator=generator)
        x_T = self.endpoint(z)
        out = self.decode(z, nfe, sampler=sampler, churn=churn, x_T=x_T, generator=generator, progress=progress)
        return ReconstructionResult(out.images, x_T, z, out.nfe, out.steps)

    def parameter_counts(self) -> dict[str, int]:
        counts = {
            "unet": count_parameters(self.unet),
            "encoder": count_parameters(self.encoder),
            "decoder": count_parameters(self.decoder),
        }
        counts["total"] = sum(counts.values())
        return counts
