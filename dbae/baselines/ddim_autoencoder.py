"""What DiffAE and PDAE share: an encoder z = E(x), an eps function conditioned on z, DDIM
inversion to infer x_T and DDIM decoding from it (:mod:`.ddim`). Subclasses give the eps
function that sampling and inversion use (:meth:`DDIMAutoencoder.sampling_eps`), their
authors' DDIM grid (:attr:`DDIMAutoencoder.ddim_rule`) and whether a decode's result is
clamped (:attr:`DDIMAutoencoder.clamp_output`), and wrap the results in their own types.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..errors import DataError
from .ddim import DDIMStep, DDPMSchedule, check_steps

Tensor = torch.Tensor


class DDIMDecode(NamedTuple):
    images: Tensor  # clamped to [-1, 1] where the method clamps its output
    x_T: Tensor  # the start point used (inferred or drawn)
    nfe: int


class DDIMReconstruct(NamedTuple):
    images: Tensor  # clamped to [-1, 1]
    z: Tensor
    x_T: Tensor
    inversion_nfe: int
    decode_nfe: int


class DDIMAutoencoder(nn.Module):
    """Base of the DDIM-based autoencoders: needs ``self.config`` (image_size, image_channels,
    z_dim), ``self.encoder`` (:class:`dbae.nn.Encoder`) and ``self.schedule`` (:class:`DDPMSchedule`)."""

    config: object
    encoder: nn.Module
    schedule: DDPMSchedule
    #: the authors' DDIM grid and end levels (:data:`dbae.baselines.ddim.DDIM_RULES`)
    ddim_rule: str = "diffae"
    #: whether a decode's result is clamped to [-1, 1] (DiffAE's is the clamped x0_hat; PDAE's is not)
    clamp_output: bool = True

    # ----- checks -----
    def check_images(self, x: Tensor, what: str = "images") -> None:
        c, s = self.config.image_channels, self.config.image_size  # type: ignore[attr-defined]
        if x.dim() != 4 or x.shape[1] != c or x.shape[2] != s or x.shape[3] != s:
            raise DataError(f"{what} must have shape (B, {c}, {s}, {s}) for this model, got {tuple(x.shape)}")

    def check_latents(self, z: Tensor) -> None:
        z_dim = self.config.z_dim  # type: ignore[attr-defined]
        if z.dim() != 2 or z.shape[1] != z_dim:
            raise DataError(f"z must have shape (B, {z_dim}) for this model, got {tuple(z.shape)}")

    @staticmethod
    def _check_batch(z: Tensor, batch: int) -> None:
        if z.shape[0] != batch:
            raise DataError(f"z holds {z.shape[0]} latents for a batch of {batch} images")

    # ----- pieces -----
    def encode(self, x: Tensor) -> Tensor:
        """z = E(x) (B, z_dim) for images in [-1, 1]. One encoder pass, NFE 0."""
        self.check_images(x)
        return self.encoder(x)[0]

    def sampling_eps(self, x_t: Tensor, t: Tensor, z: Tensor, shift: bool = True) -> Tensor:
        """The eps that DDIM sampling and inversion follow, conditioned on z (one NFE);
        ``shift``: PDAE's step uses its gradient estimator (:meth:`.ddim.DDPMSchedule.ddim_plan`)."""
        raise NotImplementedError

    # ----- inference (results: see the subclasses' public methods) -----
    def ddim_steps(self, steps: int, what: str = "DDIM steps", *, invert: bool = False,
                   stop_percent: float = 0.0) -> list[DDIMStep]:  # fmt: skip
        """The DDIM steps of ``steps`` under the method's rule; ConfigError (before any network
        runs) for a count outside the schedule or one the rule's spacing cannot make."""
        steps = check_steps(steps, self.schedule.timesteps, what)
        return self.schedule.ddim_plan(self.ddim_rule, steps, invert=invert, stop_percent=stop_percent)

    def _invert(
        self, x: Tensor, z: Tensor | None, steps: int, clip: bool, progress: bool,
        trajectory: list | None = None,
    ) -> tuple[Tensor, int]:  # fmt: skip
        """(x_T, NFE) of images ``x`` by DDIM inversion under ``sampling_eps(., ., z)``, with
        ``z = E(x)`` when not given: exactly ``steps`` NFE."""
        self.check_images(x)
        plan = self.ddim_steps(steps, "inversion steps", invert=True)
        if z is None:
            z = self.encode(x)
        self.check_latents(z)
        self._check_batch(z, x.shape[0])
        out = self.schedule.run(lambda xt, t, shift: self.sampling_eps(xt, t, z, shift), x, plan, clip=clip,
                                progress=progress, trajectory=trajectory, desc="DDIM inversion")  # fmt: skip
        return out.x, out.nfe

    def _decode(
        self, z: Tensor, x_T: Tensor | None, steps: int, generator: torch.Generator | None, clip: bool, progress: bool,
        *, stop_percent: float = 0.0, trajectory: list | None = None,
    ) -> DDIMDecode:  # fmt: skip
        """Deterministic DDIM from ``x_T`` (``x_T ~ N(0, I)`` from ``generator`` when None):
        exactly ``steps`` NFE."""
        self.check_latents(z)
        plan = self.ddim_steps(steps, "decode steps", stop_percent=stop_percent)
        c, s = self.config.image_channels, self.config.image_size  # type: ignore[attr-defined]
        if x_T is None:
            p = next(self.parameters())
            x_T = torch.randn((z.shape[0], c, s, s), generator=generator, device=z.device, dtype=p.dtype)
        else:
            self.check_images(x_T, "x_T")
            self._check_batch(z, x_T.shape[0])
        out = self.schedule.run(lambda xt, t, shift: self.sampling_eps(xt, t, z, shift), x_T, plan, clip=clip,
                                progress=progress, trajectory=trajectory, desc="DDIM sample")  # fmt: skip
        return DDIMDecode(out.x.clamp(-1.0, 1.0) if self.clamp_output else out.x, x_T, out.nfe)

    def _reconstruct(
        self,
        x: Tensor,
        inversion_steps: int,
        decode_steps: int,
        random_x_T: bool,
        generator: torch.Generator | None,
        clip: bool,
        progress: bool,
    ) -> DDIMReconstruct:
        """Encode, infer x_T (skipped with ``random_x_T``: x_T ~ N(0, I) from ``generator``),
        decode. Step counts are checked before any network runs."""
        self.check_images(x)
        if not random_x_T:
            self.ddim_steps(inversion_steps, "inversion steps", invert=True)
        self.ddim_steps(decode_steps, "decode steps")
        z = self.encode(x)
        if random_x_T:
            inv_nfe, x_T = 0, None
        else:
            x_T, inv_nfe = self._invert(x, z, inversion_steps, clip, progress)
        dec = self._decode(z, x_T, decode_steps, generator, clip, progress)
        return DDIMReconstruct(dec.images, z, dec.x_T, inv_nfe, dec.nfe)
