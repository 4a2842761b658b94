"""Prior checkpoints: safetensors tensors plus JSON metadata, never pickle, written atomically.

``<prior dir>/prior.safetensors`` holds

- tensors ``model.*`` (raw MLP weights), ``ema.*`` (EMA weights), ``latent_mean`` and
  ``latent_std`` (d,) (the statistics that normalized the training latents),
- metadata (strings): ``format``, ``preset`` (the prior's typed config as JSON), ``step``,
  ``z_dim``, ``autoencoder`` (the autoencoder's identity, :mod:`.identity`) and
  ``latents`` (where the training latents came from).

A readable ``prior.json`` beside it repeats the metadata (plus training facts such as the
last loss).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from ..checkpoints import atomic_write_text, load_weights, read_tagged_safetensors, split_weights, write_weights_file
from .config import PriorPreset, prior_from_dict, prior_to_dict
from .ddim import LatentDiffusion
from .identity import AutoencoderRef
from .network import MLPSkipNet

FORMAT = "dbae-prior/1"
FILE_NAME = "prior.safetensors"


def default_prior_dir(checkpoint: Path) -> Path:
    """``<run>/prior`` for a checkpoint ``<run>/checkpoints/<file>``, else ``<dir>/prior``."""
    parent = Path(checkpoint).parent
    return (parent.parent if parent.name == "checkpoints" else parent) / "prior"


def resolve_prior(path: str | Path) -> Path:
    """A prior file, or a directory holding ``prior.safetensors``."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE_NAME
    if not path.is_file():
        raise CheckpointError(f"no prior at {path}; train one with `dbae train-prior --ckpt <checkpoint>`")
    return path


def save_prior(
    path: Path,
    *,
    preset: PriorPreset,
    step: int,
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor],
    mean: torch.Tensor,
    std: torch.Tensor,
    autoencoder: AutoencoderRef,
    latents: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``path`` (safetensors) and ``path.with_suffix('.json')``, both atomically."""
    path = Path(path)
    metadata = {
        "format": FORMAT,
        "preset": json.dumps(prior_to_dict(preset), sort_keys=True),
        "step": str(step),
        "z_dim": str(int(mean.shape[0])),
        "autoencoder": json.dumps(autoencoder.to_dict(), sort_keys=True),
        "latents": json.dumps(latents, sort_keys=True),
    }
    write_weights_file(path, metadata, model, ema, tensors={"latent_mean": mean.float(), "latent_std": std.float()})
    readable = {
        "format": FORMAT, "step": step, "z_dim": int(mean.shape[0]), "preset": prior_to_dict(preset),
        "autoencoder": autoencoder.to_dict(), "latents": latents, **(extra or {}),
    }
    atomic_write_text(path.with_suffix(".json"), json.dumps(readable, indent=2) + "\n")
    return path


@dataclass
class LoadedPrior:
    """A trained prior ready to sample: the denoiser (eval mode), its diffusion schedule,
    the latent statistics to undo the normalization, and whose latents it models."""

    net: MLPSkipNet
    diffusion: LatentDiffusion
    preset: PriorPreset
    mean: torch.Tensor
    std: torch.Tensor
    autoencoder: AutoencoderRef
    latents: dict[str, Any]
    step: int
    path: Path

    @property
    def z_dim(self) -> int:
        return self.net.z_dim

    @torch.no_grad()
    def sample(
        self,
        n: int,
        steps: int,
        *,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """``n`` latents z (n, d) in the autoencoder's units (denormalized), from ``steps``
        DDIM steps."""
        device = next(self.net.parameters()).device
        noise = torch.randn((n, self.z_dim), generator=generator, device=device)
        zn = self.diffusion.sample(self.net, noise, steps, eta=eta, generator=generator, progress=progress)
        return self.mean.to(zn) + self.std.to(zn) * zn


def load_prior(path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu") -> LoadedPrior:
    """The prior at ``path`` (file or directory) with its EMA weights unless ``ema=False``."""
    path = resolve_prior(path)
    meta, tensors = read_tagged_safetensors(path, FORMAT, "dbae prior")
    try:
        preset = prior_from_dict(json.loads(meta["preset"]))
        step, z_dim = int(meta["step"]), int(meta["z_dim"])
        autoencoder = AutoencoderRef.from_dict(json.loads(meta["autoencoder"]), path)
        latents = json.loads(meta["latents"])
        mean, std = tensors.pop("latent_mean"), tensors.pop("latent_std")
    except (KeyError, ValueError, ConfigError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} has unreadable metadata ({exc!r})") from None
    model, ema_weights, _ = split_weights(path, tensors, None)
    net = load_weights(MLPSkipNet(preset.net, z_dim), model, ema_weights, ema, "prior", path)
    if mean.shape != (z_dim,) or std.shape != (z_dim,):
        raise CheckpointError(f"{path}: latent statistics of shape {tuple(mean.shape)} for z_dim {z_dim}")
    return LoadedPrior(net.to(device).eval(), LatentDiffusion(preset.diffusion), preset, mean, std, autoencoder,
                       latents, step, path)
