"""Typed configuration of the latent prior (SPEC section 7), with named presets.

The prior is a latent DDIM over the autoencoder's normalized z: an MLP with skip
connections (:mod:`.network`) trained with the discrete-time noise-prediction loss of
:mod:`.ddim`. Paper presets (the paper's Table 7, DiffAE's latent DDIM): ``celeba64``
(10 layers; the paper also lists a 15-layer variant, ``celeba64-deep``) and ``ffhq128``,
all 2048 wide, constant beta 0.008 over T = 1000 steps, AdamW lr 1e-4 weight decay 0.01,
600M latents seen. The paper gives no prior for Horse/Bedroom. CPU presets: ``shapes``
(the README's picture, a minute or two) and ``tiny`` (unit tests, seconds).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..config import check_positive_ints, dataclass_from_dict
from ..errors import ConfigError

LOSSES = ("l1", "l2")
SPACINGS = ("even", "diffae")


@dataclass(frozen=True)
class PriorNetConfig:
    """MLP-skip denoiser eps_theta(z_t, t) (DiffAE's MLPSkipNet).

    ``num_layers`` linear layers; every hidden layer after the first sees
    ``concat(h, z_t)`` (the skip), then LayerNorm and SiLU, and its output is scaled by
    ``1 + Linear(time embedding)``. The last layer maps back to ``z_dim``.
    """

    num_layers: int = 10
    width: int = 2048
    #: channels of the sinusoidal timestep features
    time_channels: int = 64
    #: width of the time embedding MLP that conditions every layer
    time_embed_dim: int = 512
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.num_layers < 2:
            raise ConfigError(f"prior num_layers must be >= 2, got {self.num_layers}")
        for name in ("width", "time_channels", "time_embed_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"prior {name} must be positive, got {getattr(self, name)}")
        if self.time_channels % 2:
            raise ConfigError(f"prior time_channels must be even, got {self.time_channels}")
        if not (0.0 <= self.dropout < 1.0):
            raise ConfigError(f"prior dropout must lie in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class LatentDiffusionConfig:
    """Discrete-time VP diffusion of normalized latents: x_t = sqrt(abar_t) x_0 +
    sqrt(1 - abar_t) eps with abar_t = prod_{s<=t} (1 - beta), constant beta."""

    timesteps: int = 1000
    beta: float = 0.008
    #: "l1" or "l2" distance between predicted and true noise
    loss: str = "l1"
    #: the DDIM sampler's timesteps (:mod:`dbae.spacing`): "even" over [0, T - 1] with both ends, or
    #: "diffae" (DiffAE's latent sampler, for its imported priors)
    spacing: str = "even"

    def __post_init__(self) -> None:
        if self.spacing not in SPACINGS:
            raise ConfigError(f"prior spacing must be one of {', '.join(SPACINGS)}, got {self.spacing!r}")
        if self.timesteps < 2:
            raise ConfigError(f"prior timesteps must be >= 2, got {self.timesteps}")
        if not (0.0 < self.beta < 1.0):
            raise ConfigError(f"prior beta must lie in (0, 1), got {self.beta}")
        if self.loss not in LOSSES:
            raise ConfigError(f"prior loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")


@dataclass(frozen=True)
class PriorTrainConfig:
    batch_size: int = 512
    lr: float = 1e-4
    weight_decay: float = 0.01
    steps: int = 1_171_875
    ema_decay: float = 0.9999
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 100
    ckpt_every: int = 10_000

    def __post_init__(self) -> None:
        check_positive_ints(self, ("batch_size", "steps", "log_every", "ckpt_every"), prefix="prior ")
        if self.lr <= 0:
            raise ConfigError(f"prior lr must be positive, got {self.lr}")
        if not (0.0 <= self.ema_decay < 1.0):
            raise ConfigError(f"prior ema_decay must lie in [0, 1), got {self.ema_decay}")


@dataclass(frozen=True)
class PriorPreset:
    """A named prior: network, diffusion and training settings."""

    name: str
    net: PriorNetConfig = field(default_factory=PriorNetConfig)
    diffusion: LatentDiffusionConfig = field(default_factory=LatentDiffusionConfig)
    train: PriorTrainConfig = field(default_factory=PriorTrainConfig)


def _paper(name: str, layers: int, batch: int) -> PriorPreset:
    steps = 600_000_000 // batch  # 600M latents seen (paper's Table 7)
    return PriorPreset(
        name,
        PriorNetConfig(num_layers=layers, width=2048, time_channels=64, time_embed_dim=512),
        LatentDiffusionConfig(timesteps=1000, beta=0.008, loss="l1"),
        PriorTrainConfig(batch_size=batch, lr=1e-4, weight_decay=0.01, steps=steps, ema_decay=0.9999),
    )


def _shapes() -> PriorPreset:
    """CPU prior for the shapes autoencoders (z_dim 16-32): about a minute on one core."""
    return PriorPreset(
        "shapes",
        PriorNetConfig(num_layers=4, width=256, time_channels=32, time_embed_dim=64),
        LatentDiffusionConfig(timesteps=1000, beta=0.008, loss="l2"),
        PriorTrainConfig(batch_size=256, lr=1e-3, weight_decay=0.01, steps=6000, ema_decay=0.995,
                         log_every=50, ckpt_every=2000),
    )


def _tiny() -> PriorPreset:
    """Unit-test prior: seconds on one core."""
    return PriorPreset(
        "tiny",
        PriorNetConfig(num_layers=4, width=128, time_channels=32, time_embed_dim=64),
        LatentDiffusionConfig(timesteps=1000, beta=0.008, loss="l2"),
        PriorTrainConfig(batch_size=256, lr=2e-3, weight_decay=0.01, steps=1500, ema_decay=0.99,
                         log_every=50, ckpt_every=1500),
    )


PRIOR_PRESETS: dict[str, typing.Callable[[], PriorPreset]] = {
    "celeba64": lambda: _paper("celeba64", 10, 512),
    "celeba64-deep": lambda: _paper("celeba64-deep", 15, 512),
    "ffhq128": lambda: _paper("ffhq128", 10, 256),
    "shapes": _shapes,
    "tiny": _tiny,
}

#: the prior preset chosen by default for an autoencoder preset
DEFAULT_FOR_AUTOENCODER = {"celeba64": "celeba64", "ffhq128": "ffhq128", "shapes16": "shapes",
                           "shapes32": "shapes", "tiny16": "tiny"}


def get_prior_preset(name: str) -> PriorPreset:
    try:
        return PRIOR_PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown prior preset {name!r}; choose one of: {', '.join(sorted(PRIOR_PRESETS))}") from None


def default_prior_preset(autoencoder_preset: str) -> str:
    """The prior preset for an autoencoder preset name (``ffhq128`` for unknown ones)."""
    return DEFAULT_FOR_AUTOENCODER.get(autoencoder_preset, "ffhq128")


def override_prior(preset: PriorPreset, **train_fields: Any) -> PriorPreset:
    """``preset`` with some training fields replaced (``None`` values are ignored)."""
    fields = {k: v for k, v in train_fields.items() if v is not None}
    try:
        return dataclasses.replace(preset, train=dataclasses.replace(preset.train, **fields))
    except TypeError as exc:
        raise ConfigError(f"prior training config: {exc}") from None


# ----- (de)serialization -----
def prior_to_dict(preset: PriorPreset) -> dict[str, Any]:
    return dataclasses.asdict(preset)


def prior_dumps(preset: PriorPreset) -> str:
    return json.dumps(prior_to_dict(preset), indent=2, sort_keys=True)


def prior_from_dict(data: Mapping[str, Any]) -> PriorPreset:
    return dataclass_from_dict(PriorPreset, data, "prior")
