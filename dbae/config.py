"""Typed configuration of a DBAE model and its training run, with named presets.

Paper presets (SPEC section 9, the paper's Table 6): ``celeba64``, ``ffhq128``,
``horse128``, ``bedroom128``. The networks of the authors' released checkpoints
(``dbae import``): ``ffhq128-official``, ``ffhq128-official-d``, ``celeba64-official``,
``celeba64-official-d`` (``-d``: the deterministic encoder, DBAE-d). Tiny CPU presets: ``shapes16`` (the README's quick start, a few
minutes), ``shapes32`` (a larger CPU model, about an hour on 2 cores) and ``tiny16`` (unit tests).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

from .bridge import BridgeConfig
from .errors import ConfigError


#: how the U-Net takes z: "embedding": Linear(z) added to the time embedding (DBAE);
#: "block-scale": each residual block scales its features by 1 + Linear(SiLU(z)) after the
#: time's scale-shift (DiffAE's official U-Net); "none": no z (an unconditional DDPM)
Z_CONDITIONINGS = ("embedding", "block-scale", "none")


@dataclass(frozen=True)
class UNetConfig:
    """ADM-style score U-Net F_theta(x_in, c_noise, x_T, z) (SPEC 1, 9)."""

    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 3, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    num_head_channels: int = 64
    dropout: float = 0.1
    num_groups: int = 32
    #: a fixed number of heads for every attention block instead of ``width / num_head_channels``
    #: (DiffAE's official U-Net: 1)
    num_heads: int | None = None
    #: width of the time embedding (None: 4 * base_channels; DiffAE's presets: 512 at any width)
    embed_channels: int | None = None
    #: how z enters (:data:`Z_CONDITIONINGS`)
    z_conditioning: str = "embedding"
    #: the sinusoids' frequency table in float32 even in a float64 model (DiffAE's and PDAE's
    #: code); only a float64 model's agreement with their float64 runs depends on it
    float32_time_table: bool = False

    def __post_init__(self) -> None:
        if self.z_conditioning not in Z_CONDITIONINGS:
            raise ConfigError(f"unet.z_conditioning must be one of {', '.join(Z_CONDITIONINGS)}, "
                              f"got {self.z_conditioning!r}")

    @property
    def emb_channels(self) -> int:
        """The time embedding's width."""
        return self.embed_channels if self.embed_channels is not None else 4 * self.base_channels


@dataclass(frozen=True)
class EncoderConfig:
    """Half-U-Net encoder image -> z (SPEC 1, 9)."""

    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 3, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    num_head_channels: int = 64
    #: a fixed number of heads for every attention block instead of ``width / num_head_channels``
    #: (the official DBAE encoder, DiffAE's, uses 1 at every width)
    num_heads: int | None = None
    num_groups: int = 32
    #: stochastic head (DBAE) outputs (m, l) for z = mu + sig eps; deterministic is DBAE-d
    stochastic: bool = True


#: normalisations of the decoder: GroupNorm (ours), or a per-channel affine (the official
#: decoder's BatchNorm in eval mode, its running statistics folded into scale and shift)
DECODER_NORMS = ("group", "affine")


@dataclass(frozen=True)
class DecoderConfig:
    """FastGAN-style upsampling decoder z -> x_T.

    ``channels`` lists the feature width at 4x4, 8x8, ..., image_size (one entry per
    resolution, so ``len(channels) == log2(image_size / 4) + 1``).
    """

    channels: tuple[int, ...] = (1024, 512, 256, 128, 128, 64)
    skip_excitation: bool = True
    #: "group" (GroupNorm: each sample independent of its batch) or "affine" (the authors'
    #: BatchNorm as it runs at inference, for their released weights)
    norm: str = "group"
    #: kernel size and bias of the last conv to the image channels (the authors': 1x1, no bias)
    output_kernel: int = 3
    output_bias: bool = True

    def __post_init__(self) -> None:
        if self.norm not in DECODER_NORMS:
            raise ConfigError(f"decoder.norm must be one of {', '.join(DECODER_NORMS)}, got {self.norm!r}")
        if self.output_kernel not in (1, 3):
            raise ConfigError(f"decoder.output_kernel must be 1 or 3, got {self.output_kernel!r}")


@dataclass(frozen=True)
class ModelConfig:
    image_size: int = 128
    image_channels: int = 3
    z_dim: int = 512
    unet: UNetConfig = field(default_factory=UNetConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    bridge: BridgeConfig = field(default_factory=BridgeConfig)

    def __post_init__(self) -> None:
        size = self.image_size
        if size < 8 or size & (size - 1):
            raise ConfigError(f"image_size must be a power of two >= 8, got {size}")
        expected = size.bit_length() - 3 + 1  # log2(size/4) + 1
        if len(self.decoder.channels) != expected:
            raise ConfigError(
                f"decoder.channels needs {expected} entries for image_size {size} "
                f"(4x4 up to {size}x{size}), got {len(self.decoder.channels)}"
            )
        levels = len(self.unet.channel_mult)
        if size % (2 ** (levels - 1)):
            raise ConfigError(f"unet.channel_mult has too many levels for image_size {size}")
        if size % (2 ** (len(self.encoder.channel_mult) - 1)):
            raise ConfigError(f"encoder.channel_mult has too many levels for image_size {size}")
        if self.z_dim < 1:
            raise ConfigError("z_dim must be positive")



def check_positive_ints(config: Any, names: tuple[str, ...], prefix: str = "") -> None:
    """ConfigError unless each field ``names`` of ``config`` is an integer >= 1 (a bool is not)."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{prefix}{name} must be an integer >= 1, got {value!r}")

@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    grad_clip: float = 1.0
    steps: int = 1_000_000
    #: "fp32", "bf16" or "fp16" (autocast; mixed precision is only used on CUDA)
    precision: str = "bf16"
    seed: int = 0
    log_every: int = 50
    sample_every: int = 5000
    ckpt_every: int = 5000
    #: sampler used for the periodic reconstruction grids
    sample_nfe: int = 10
    #: "shapes" (built-in procedural data) or a path to an image folder
    dataset: str = "shapes"
    num_workers: int = 0
    #: weight of the total-correlation penalty on z (DBAE+TC, SPEC 5); 0 turns it off.
    #: Needs the stochastic encoder (see dbae.losses.tc).
    tc_weight: float = 0.0

    def __post_init__(self) -> None:
        if not (self.tc_weight >= 0.0):
            raise ConfigError(f"tc_weight must be >= 0, got {self.tc_weight}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        check_positive_ints(self, ("batch_size", "steps", "log_every", "sample_every", "ckpt_every", "sample_nfe"))
        if not (self.lr > 0.0):
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ConfigError(f"num_workers must be an integer >= 0, got {self.num_workers!r}")
        if not (0.0 <= self.ema_decay < 1.0):
            raise ConfigError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")


@dataclass(frozen=True)
class Preset:
    name: str
    model: ModelConfig
    train: TrainConfig


def _paper_unet_128() -> UNetConfig:
    return UNetConfig(base_channels=128, channel_mult=(1, 1, 2, 3, 4), attention_resolutions=(16,))


def _paper_encoder_128() -> EncoderConfig:
    return EncoderConfig(base_channels=128, channel_mult=(1, 1, 2, 3, 4, 4), attention_resolutions=(16,))


def _paper_128(name: str) -> Preset:
    model = ModelConfig(
        image_size=128,
        z_dim=512,
        unet=_paper_unet_128(),
        encoder=_paper_encoder_128(),
        decoder=DecoderConfig(channels=(1024, 512, 256, 128, 128, 64)),
    )
    return Preset(name, model, TrainConfig(batch_size=128))


def _celeba64() -> Preset:
    model = ModelConfig(
        image_size=64,
        z_dim=512,
        unet=UNetConfig(base_channels=64, channel_mult=(1, 2, 4, 8), attention_resolutions=(16,)),
        encoder=EncoderConfig(base_channels=64, channel_mult=(1, 2, 4, 8, 8), attention_resolutions=(16,)),
        decoder=DecoderConfig(channels=(1024, 512, 256, 128, 128)),
    )
    return Preset("celeba64", model, TrainConfig(batch_size=128))


#: the authors' released DBAE models (github.com/aailab-kaist/DBAE): preset name ->
#: (image size, stochastic encoder). Their networks differ from the paper presets above in
#: settings only: attention at sides 32, 16 and 8 in the U-Net, one attention head in the
#: encoder, and the decoder's BatchNorm (run as in eval) and bias-free 1x1 output conv.
OFFICIAL_DBAE = {
    "ffhq128-official": (128, True),
    "ffhq128-official-d": (128, False),
    "celeba64-official": (64, True),
    "celeba64-official-d": (64, False),
}


def official_dbae_model(image_size: int, stochastic: bool) -> ModelConfig:
    """The network configuration of the authors' released FFHQ128 or CelebA64 model."""
    if image_size == 128:
        ch, mult, enc_mult = 128, (1, 1, 2, 3, 4), (1, 1, 2, 3, 4, 4)
        dec = (1024, 512, 256, 128, 128, 64)
    elif image_size == 64:
        ch, mult, enc_mult = 64, (1, 2, 4, 8), (1, 2, 4, 8, 8)
        dec = (1024, 512, 256, 128, 128)
    else:
        raise ConfigError(f"the authors released DBAE models at 64 and 128 pixels, not {image_size}")
    return ModelConfig(
        image_size=image_size,
        z_dim=512,
        unet=UNetConfig(base_channels=ch, channel_mult=mult, attention_resolutions=(32, 16, 8)),
        encoder=EncoderConfig(
            base_channels=ch, channel_mult=enc_mult, attention_resolutions=(16,), num_heads=1, stochastic=stochastic
        ),
        decoder=DecoderConfig(channels=dec, norm="affine", output_kernel=1, output_bias=False),
    )


def _official(name: str) -> Preset:
    size, stochastic = OFFICIAL_DBAE[name]
    return Preset(name, official_dbae_model(size, stochastic), TrainConfig(batch_size=128))


def _shapes32() -> Preset:
    model = ModelConfig(
        image_size=32,
        z_dim=32,
        unet=UNetConfig(
            base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
            attention_resolutions=(8,), num_head_channels=32, dropout=0.0, num_groups=8,
        ),
        encoder=EncoderConfig(
            base_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1,
            attention_resolutions=(), num_head_channels=32, num_groups=8,
        ),
        decoder=DecoderConfig(channels=(128, 64, 32, 32)),
    )
    train = TrainConfig(
        batch_size=32, lr=2e-3, ema_decay=0.99, steps=6000, precision="fp32",
        log_every=25, sample_every=500, ckpt_every=500, sample_nfe=10,
    )
    return Preset("shapes32", model, train)


def _tiny16_model() -> ModelConfig:
    return ModelConfig(
        image_size=16,
        z_dim=16,
        unet=UNetConfig(
            base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
            attention_resolutions=(8,), num_head_channels=16, dropout=0.0, num_groups=4,
        ),
        encoder=EncoderConfig(
            base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
            attention_resolutions=(), num_head_channels=16, num_groups=4,
        ),
        decoder=DecoderConfig(channels=(64, 32, 16)),
    )


def _tiny16() -> Preset:
    train = TrainConfig(
        batch_size=32, lr=2e-3, ema_decay=0.95, steps=300, precision="fp32",
        log_every=10, sample_every=100, ckpt_every=100, sample_nfe=8,
    )
    return Preset("tiny16", _tiny16_model(), train)


def _shapes16() -> Preset:
    """The README quick start: the tiny16 networks trained long enough (about 3-4 minutes
    on 2 CPU cores) to reconstruct the colour, position and size of held-out shapes."""
    train = TrainConfig(
        batch_size=32, lr=2e-3, ema_decay=0.99, steps=4000, precision="fp32",
        log_every=50, sample_every=1000, ckpt_every=1000, sample_nfe=10,
    )
    return Preset("shapes16", _tiny16_model(), train)


PRESETS: dict[str, Any] = {
    "celeba64": _celeba64,
    "ffhq128": lambda: _paper_128("ffhq128"),
    "horse128": lambda: _paper_128("horse128"),
    "bedroom128": lambda: _paper_128("bedroom128"),
    **{name: (lambda name=name: _official(name)) for name in OFFICIAL_DBAE},
    "shapes32": _shapes32,
    "shapes16": _shapes16,
    "tiny16": _tiny16,
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}") from None


# ----- (de)serialization -----
def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_dict(x) for x in obj]
    return obj


def dataclass_from_dict(cls: type, data: Any, where: str) -> Any:
    """A (frozen) dataclass ``cls`` from a JSON mapping: fields typed as dataclasses recurse,
    lists become tuples; a non-mapping, unknown or mistyped fields raise ConfigError naming
    ``where``. Serves every typed configuration of the package (presets, priors, baselines)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = dataclass_from_dict(hint, value, f"{where}.{name}")
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def model_config_from_dict(data: Mapping[str, Any]) -> ModelConfig:
    return dataclass_from_dict(ModelConfig, data, "model")


def train_config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    return dataclass_from_dict(TrainConfig, data, "train")


def preset_from_dict(data: Mapping[str, Any]) -> Preset:
    return dataclass_from_dict(Preset, data, "preset")


def dumps(obj: Any) -> str:
    return json.dumps(to_dict(obj), indent=2, sort_keys=True)
