"""Typed configuration of the PDAE baseline, with presets mirroring :mod:`dbae.config`.

A PDAE preset takes the image size, latent size, U-Net and encoder of the DBAE preset of
the same name (as :func:`dbae.baselines.config.diffae_preset` does): the pre-trained
unconditional eps network and the gradient estimator G both use that U-Net layout (PDAE's
official code builds its shift decoder from the same ADM configuration as the pre-trained
model); the encoder is deterministic. Two training stages, each with its own settings:
``ddpm_train`` (the plain DDPM, PDAE's "pre-trained" model) and ``train`` (encoder + G with
the DDPM frozen). Both follow the DBAE preset (batch size, learning rate, EMA, steps, seed).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from ..config import EncoderConfig, ModelConfig, UNetConfig, dataclass_from_dict, to_dict
from ..errors import ConfigError
from .config import DIFFAE_PRESETS, DiffAETrainConfig, diffae_preset
from .ddim import ScheduleConfig
from .pdae_nets import ConvEncoderConfig

#: ``"posterior"``: PDAE's official training coefficient sqrt(alpha_t) (1 - abar_{t-1}) / sqrt(1 - abar_t)
#: (mean shift Sigma_t G with Sigma_t the posterior variance beta~_t); ``"score"``: sqrt(1 - abar_t),
#: the coefficient its DDIM sampler/inverter uses (see :mod:`dbae.baselines.pdae`).
TrainShift = Literal["posterior", "score"]


def _deterministic_encoder() -> EncoderConfig:
    return EncoderConfig(stochastic=False)


#: G's network: "unet", a complete z-conditioned U-Net of its own on x_t (this package's PDAE on a shared
#: backbone); "shift", the authors' ShiftUNet branch over the eps U-Net's input path
#: (:class:`dbae.baselines.pdae_nets.ShiftBranch`)
GRADIENT_NETS = ("unet", "shift")
#: the encoder: "unet", :class:`dbae.nn.Encoder` (DBAE's and DiffAE's); "conv", the authors' fixed CNN
#: (:class:`dbae.baselines.pdae_nets.ConvEncoder`)
ENCODER_KINDS = ("unet", "conv")


@dataclass(frozen=True)
class PDAEConfig:
    """PDAE networks: the unconditional eps U-Net (``unet``), the z-conditioned gradient
    estimator (``gradient_unet``, a whole U-Net or, with ``gradient = "shift"``, the authors'
    branch over the eps U-Net's input path), a deterministic encoder x -> z (``z_dim``; ``encoder``,
    or the authors' CNN ``conv_encoder`` with ``encoder_kind = "conv"``), the DDPM schedule,
    PDAE's loss weighting ``lambda_t = SNR_t^gamma / (1 + SNR_t)`` with ``weight_gamma`` (official
    value 0.1) and the training shift coefficient ``train_shift``."""

    image_size: int = 128
    image_channels: int = 3
    z_dim: int = 512
    unet: UNetConfig = field(default_factory=UNetConfig)
    gradient_unet: UNetConfig = field(default_factory=UNetConfig)
    encoder: EncoderConfig = field(default_factory=_deterministic_encoder)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    weight_gamma: float = 0.1
    train_shift: TrainShift = "posterior"
    gradient: str = "unet"
    encoder_kind: str = "unet"
    conv_encoder: ConvEncoderConfig = field(default_factory=ConvEncoderConfig)

    def __post_init__(self) -> None:
        size = self.image_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 8 or size & (size - 1):
            raise ConfigError(f"image_size must be a power of two >= 8, got {size!r}")
        for name in ("unet", "gradient_unet", "encoder"):
            if size % (2 ** (len(getattr(self, name).channel_mult) - 1)):
                raise ConfigError(f"{name}.channel_mult has too many levels for image_size {size}")
        if self.image_channels < 1:
            raise ConfigError(f"image_channels must be positive, got {self.image_channels}")
        if self.z_dim < 1:
            raise ConfigError(f"z_dim must be positive, got {self.z_dim}")
        if self.encoder.stochastic:
            raise ConfigError("PDAE's encoder is deterministic: set encoder.stochastic = false")
        if not (0.0 <= self.weight_gamma <= 1.0):
            raise ConfigError(f"weight_gamma must lie in [0, 1], got {self.weight_gamma}")
        if self.train_shift not in ("posterior", "score"):
            raise ConfigError(f"train_shift must be 'posterior' or 'score', got {self.train_shift!r}")
        if self.gradient not in GRADIENT_NETS:
            raise ConfigError(f"gradient must be one of {', '.join(GRADIENT_NETS)}, got {self.gradient!r}")
        if self.encoder_kind not in ENCODER_KINDS:
            raise ConfigError(f"encoder_kind must be one of {', '.join(ENCODER_KINDS)}, got {self.encoder_kind!r}")
        layout = ("base_channels", "channel_mult", "num_res_blocks", "attention_resolutions")
        if self.gradient == "shift" and any(getattr(self.unet, f) != getattr(self.gradient_unet, f) for f in layout):
            raise ConfigError("gradient 'shift' runs over the eps U-Net's input path: gradient_unet needs the same "
                              "base_channels, channel_mult, num_res_blocks and attention_resolutions as unet")

    @classmethod
    def from_model_config(cls, model: ModelConfig, schedule: ScheduleConfig | None = None) -> "PDAEConfig":
        """The PDAE counterpart of a DBAE model: same image size, z_dim, U-Net (for both the
        eps network and G) and encoder (made deterministic)."""
        return cls(
            image_size=model.image_size,
            image_channels=model.image_channels,
            z_dim=model.z_dim,
            unet=model.unet,
            gradient_unet=model.unet,
            encoder=dataclasses.replace(model.encoder, stochastic=False),
            schedule=schedule or ScheduleConfig(),
        )


@dataclass(frozen=True)
class PDAEPreset:
    """``ddpm_train``: stage 1 (the unconditional DDPM); ``train``: stage 2 (encoder + G)."""

    name: str
    model: PDAEConfig
    ddpm_train: DiffAETrainConfig
    train: DiffAETrainConfig


def official_pdae_models() -> dict[str, PDAEConfig]:
    """The networks of the PDAE authors' FFHQ128 model (github.com/ckczzj/PDAE): their CNN encoder,
    the pre-trained DPM U-Net (its config is not public: assumed DiffAE's ffhq128_ddpm, one
    attention head at side 16) and the shift branch over its input path."""
    from .pdae_nets import PDAE_ENCODERS

    unet = UNetConfig(base_channels=128, channel_mult=(1, 1, 2, 3, 4), num_res_blocks=2, attention_resolutions=(16,),
                      dropout=0.1, num_groups=32, num_heads=1, float32_time_table=True)  # fmt: skip
    model = PDAEConfig(image_size=128, z_dim=512, unet=unet, gradient_unet=unet, gradient="shift",
                       encoder_kind="conv", conv_encoder=PDAE_ENCODERS[128])  # fmt: skip
    return {"ffhq128-official": model}


def pdae_preset(name: str) -> PDAEPreset:
    """The PDAE preset mirroring DBAE preset ``name`` (``celeba64``, ``ffhq128``, ``horse128``,
    ``bedroom128``, ``shapes32``, ``shapes16``, ``tiny16``); ``tiny8``: a minimal CPU model
    (8x8 images, 8-dim z) for smoke tests; the authors' FFHQ128 network (:func:`official_pdae_models`)."""
    official = official_pdae_models()
    if name in official:
        return PDAEPreset(name, official[name], DiffAETrainConfig(), DiffAETrainConfig())
    if name not in PDAE_PRESETS:
        raise ConfigError(f"unknown PDAE preset {name!r}; choose one of: {', '.join(sorted(DIFFAE_PRESETS))}")
    base = diffae_preset(name)  # the same backbones and training settings as DiffAE's preset
    m = base.model
    model = PDAEConfig(
        image_size=m.image_size, image_channels=m.image_channels, z_dim=m.z_dim, unet=m.unet,
        gradient_unet=m.unet, encoder=m.encoder, schedule=m.schedule,
    )
    return PDAEPreset(name, model, base.train, base.train)


#: PDAE presets: those mirroring the DBAE presets (as DiffAE's), tiny8, and the PDAE authors' FFHQ128 network
PDAE_PRESETS: tuple[str, ...] = tuple(sorted({*(p for p in DIFFAE_PRESETS if not p.endswith("-official")),
                                              *official_pdae_models()}))


# ----- (de)serialization -----
def pdae_preset_to_json(preset: PDAEPreset) -> str:
    return json.dumps(to_dict(preset), indent=2, sort_keys=True)


def pdae_preset_from_dict(data: Mapping[str, Any]) -> PDAEPreset:
    return dataclass_from_dict(PDAEPreset, data, "pdae preset")


__all__ = [
    "PDAEConfig", "PDAEPreset", "PDAE_PRESETS", "TrainShift", "pdae_preset", "pdae_preset_from_dict",
    "pdae_preset_to_json",
]
