"""Typed configuration of the DiffAE baseline, with presets mirroring :mod:`dbae.config`.

A DiffAE preset takes the image size, latent size, U-Net and encoder of the DBAE preset of
the same name (so the two methods are compared on the same backbone), makes the encoder
deterministic (DiffAE's z_sem is a deterministic code) and adds DDPM's linear schedule.
Training settings follow the DBAE preset (batch size, learning rate, EMA, steps, seed).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from ..config import OFFICIAL_DBAE
from ..config import PRESETS as DBAE_PRESETS
from ..config import (
    EncoderConfig,
    ModelConfig,
    UNetConfig,
    check_positive_ints,
    dataclass_from_dict,
    get_preset,
    to_dict,
)
from ..errors import ConfigError
from .ddim import ScheduleConfig

OptimizerName = Literal["adam", "radam"]


def _deterministic_encoder() -> EncoderConfig:
    return EncoderConfig(stochastic=False)


@dataclass(frozen=True)
class DiffAEConfig:
    """DiffAE networks: a deterministic :class:`dbae.nn.Encoder` x -> z_sem (``z_dim``) and the
    z-conditioned eps U-Net (:class:`dbae.nn.ScoreUNet` without the x_T input), plus the
    DDPM schedule."""

    image_size: int = 128
    image_channels: int = 3
    z_dim: int = 512
    unet: UNetConfig = field(default_factory=UNetConfig)
    encoder: EncoderConfig = field(default_factory=_deterministic_encoder)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        size = self.image_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 8 or size & (size - 1):
            raise ConfigError(f"image_size must be a power of two >= 8, got {size!r}")
        if size % (2 ** (len(self.unet.channel_mult) - 1)):
            raise ConfigError(f"unet.channel_mult has too many levels for image_size {size}")
        if size % (2 ** (len(self.encoder.channel_mult) - 1)):
            raise ConfigError(f"encoder.channel_mult has too many levels for image_size {size}")
        if self.image_channels < 1:
            raise ConfigError(f"image_channels must be positive, got {self.image_channels}")
        if self.z_dim < 1:
            raise ConfigError(f"z_dim must be positive, got {self.z_dim}")
        if self.encoder.stochastic:
            raise ConfigError("DiffAE's semantic encoder is deterministic: set encoder.stochastic = false")

    @classmethod
    def from_model_config(cls, model: ModelConfig, schedule: ScheduleConfig | None = None) -> "DiffAEConfig":
        """The DiffAE counterpart of a DBAE model: same image size, z_dim, U-Net and encoder
        (made deterministic); DBAE's endpoint decoder and bridge have no counterpart."""
        return cls(
            image_size=model.image_size,
            image_channels=model.image_channels,
            z_dim=model.z_dim,
            unet=model.unet,
            encoder=dataclasses.replace(model.encoder, stochastic=False),
            schedule=schedule or ScheduleConfig(),
        )


@dataclass(frozen=True)
class DiffAETrainConfig:
    """The minimal training loop's settings (:func:`dbae.baselines.train.train_diffae`).

    DiffAE trains with Adam, lr 1e-4, no weight decay, EMA 0.9999, gradient clipping at 1.
    ``ckpt_every`` only applies when the loop is given an output directory."""

    batch_size: int = 64
    lr: float = 1e-4
    optimizer: OptimizerName = "adam"
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    grad_clip: float = 1.0
    steps: int = 1_000_000
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 5000

    def __post_init__(self) -> None:
        check_positive_ints(self, ("batch_size", "steps", "log_every", "ckpt_every"))
        if self.optimizer not in ("adam", "radam"):
            raise ConfigError(f"optimizer must be 'adam' or 'radam', got {self.optimizer!r}")
        if not (self.lr > 0):
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not (self.weight_decay >= 0):
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not (0.0 <= self.ema_decay < 1.0):
            raise ConfigError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if not (self.grad_clip > 0):
            raise ConfigError(f"grad_clip must be > 0, got {self.grad_clip}")


@dataclass(frozen=True)
class DiffAEPreset:
    name: str
    model: DiffAEConfig
    train: DiffAETrainConfig


def official_diffae_models() -> dict[str, DiffAEConfig]:
    """The networks of the DiffAE authors' released models (github.com/phizaz/diffae): the U-Net
    with per-block z scales, a 512-wide time embedding and one attention head, at sides 16 and
    in the middle; the encoder with one head. ``ffhq128-official`` is the layout of their
    ffhq128_autoenc_130M and _72M, horse128 and bedroom128 models."""

    def config(size: int, ch: int, mult: tuple[int, ...], enc_mult: tuple[int, ...]) -> DiffAEConfig:
        unet = UNetConfig(base_channels=ch, channel_mult=mult, num_res_blocks=2, attention_resolutions=(16,),
                          dropout=0.1, num_groups=32, num_heads=1, embed_channels=512, z_conditioning="block-scale",
                          float32_time_table=True)  # fmt: skip
        encoder = EncoderConfig(base_channels=ch, channel_mult=enc_mult, num_res_blocks=2, attention_resolutions=(16,),
                                num_heads=1, num_groups=32, stochastic=False)  # fmt: skip
        return DiffAEConfig(image_size=size, image_channels=3, z_dim=512, unet=unet, encoder=encoder)

    return {
        "ffhq128-official": config(128, 128, (1, 1, 2, 3, 4), (1, 1, 2, 3, 4, 4)),
        "ffhq256-official": config(256, 128, (1, 1, 2, 2, 4, 4), (1, 1, 2, 2, 4, 4, 4)),
        "celeba64-official": config(64, 64, (1, 2, 4, 8), (1, 2, 4, 8, 8)),
    }


def diffae_preset(name: str) -> DiffAEPreset:
    """The DiffAE preset mirroring DBAE preset ``name`` (``celeba64``, ``ffhq128``, ``horse128``,
    ``bedroom128``, ``shapes32``, ``shapes16``, ``tiny16``); ``tiny8``: a minimal CPU model
    (8x8 images, 8-dim z) for smoke tests; the authors' released networks
    (:func:`official_diffae_models`: ``ffhq128-official``, ``ffhq256-official``, ``celeba64-official``)."""
    if name == "tiny8":
        return _tiny8()
    official = official_diffae_models()
    if name in official:
        return DiffAEPreset(name, official[name], DiffAETrainConfig())
    if name not in DIFFAE_PRESETS:
        choices = ", ".join(DIFFAE_PRESETS)
        raise ConfigError(f"unknown DiffAE preset {name!r}; choose one of: {choices}")
    p = get_preset(name)
    t = p.train
    train = DiffAETrainConfig(
        batch_size=t.batch_size, lr=t.lr, ema_decay=t.ema_decay, grad_clip=t.grad_clip,
        steps=t.steps, seed=t.seed, log_every=t.log_every, ckpt_every=t.ckpt_every,
    )
    return DiffAEPreset(name, DiffAEConfig.from_model_config(p.model), train)


def _tiny8() -> DiffAEPreset:
    model = DiffAEConfig(
        image_size=8,
        z_dim=8,
        unet=UNetConfig(
            base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
            num_head_channels=16, dropout=0.0, num_groups=4,
        ),
        encoder=EncoderConfig(
            base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
            num_head_channels=16, num_groups=4, stochastic=False,
        ),
    )
    train = DiffAETrainConfig(batch_size=32, lr=2e-3, ema_decay=0.95, steps=300, log_every=10, ckpt_every=100)
    return DiffAEPreset("tiny8", model, train)


#: DiffAE presets: those mirroring the DBAE presets of the paper and for the CPU (not the DBAE authors'
#: released networks), tiny8, and the DiffAE authors' released networks
DIFFAE_PRESETS: tuple[str, ...] = tuple(sorted({*(n for n in DBAE_PRESETS if n not in OFFICIAL_DBAE), "tiny8",
                                                *official_diffae_models()}))


# ----- (de)serialization -----
def preset_to_json(preset: DiffAEPreset) -> str:
    return json.dumps(to_dict(preset), indent=2, sort_keys=True)


def preset_from_dict(data: Mapping[str, Any]) -> DiffAEPreset:
    return dataclass_from_dict(DiffAEPreset, data, "diffae preset")


def config_from_dict(data: Mapping[str, Any]) -> DiffAEConfig:
    return dataclass_from_dict(DiffAEConfig, data, "diffae model")
