"""The authors' released DBAE checkpoints, converted to this package's networks exactly.

The authors (github.com/aailab-kaist/DBAE, commit 533f564) released
``ema_0.9999_1020000.pt`` (FFHQ128 stochastic and deterministic, CelebA64 deterministic) and
``ema_0.9999_980000.pt`` (CelebA64 stochastic). Each is ``torch.save`` of the state dict of
their whole ``UNetModel``, with the EMA parameters and the live model's buffers:

- the score U-Net (guided-diffusion's ADM) at the top level, its z embedding ``label_emb``;
- ``encoder.*``: DiffAE's semantic encoder (one attention head, a 1x1-conv head);
- ``decoder.*``: a FastGAN generator whose convs carry spectral norm (``weight_orig`` and the
  power-iteration vectors ``weight_u``, ``weight_v``) and whose norms are BatchNorms.

The conversion (:func:`convert`) is exact; nothing is re-derived by another method:

- names follow :mod:`dbae.nn` (``in_layers.0`` -> ``in_norm``, ``label_emb`` -> ``z_embed``, ...);
- the torso's attention ``qkv`` rows are reordered from the legacy (head, q|k|v, channel)
  order to (q|k|v, head, channel), and its 1x1 ``Conv2d`` weights become ``Conv1d`` ones;
- the encoder's 1x1-conv head becomes the Linear ``head``;
- every spectral norm is baked into its conv's weight as ``weight_orig / sigma`` with
  ``sigma = u . (W v)`` from the stored vectors, as torch computes it in eval mode (not the
  true largest singular value, which differs);
- every BatchNorm becomes the per-channel affine it computes in eval mode,
  ``weight / sqrt(running_var + 1e-5)`` and ``bias - running_mean * that``;
- ``decoder.feat_256`` (built by their generator but never run) and the BatchNorms'
  ``num_batches_tracked`` counters are left out.

The derived tensors (baked and folded) are computed in float64 from the stored float32
values and then rounded once to the requested dtype. The network configuration is read
off the tensors' shapes (:func:`infer_model_config`); the one thing shapes cannot tell, the
heads of the U-Net's attention, is 64 channels per head in all of the authors' scripts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch

from ..config import OFFICIAL_DBAE, DecoderConfig, EncoderConfig, ModelConfig, Preset, TrainConfig, UNetConfig, get_preset
from ..errors import CheckpointError, ConfigError
from .adm_keys import Conversion, StateMapper, encoder_layout, layout_error, unet_layout

Tensor = torch.Tensor

#: what these files are called in messages
KIND = "the authors' DBAE checkpoint (aailab-kaist/DBAE)"
#: keys every file of the authors' DBAE has
MARKERS = ("time_embed.0.weight", "label_emb.weight", "input_blocks.0.0.weight", "out.2.weight",
           "encoder.input_blocks.0.0.weight", "encoder.out.3.weight", "decoder.init.init.0.weight_orig")
#: channels per head of the U-Net's attention in every script of the authors (num_head_channels)
HEAD_CHANNELS = 64
#: the authors' DiffAE encoder template: residual blocks per level (enc_num_res_block)
ENCODER_RES_BLOCKS = 2
#: BatchNorm2d's eps in their generator (torch's default)
BATCHNORM_EPS = 1e-5
#: the generator builds this block but never runs it
UNUSED_PREFIX = "decoder.feat_256."



def looks_like(state: Mapping[str, object]) -> bool:
    """Whether a state dict has the keys of the authors' DBAE networks."""
    return all(k in state for k in MARKERS)


# ----- the configuration, from the shapes -----
def _fail(path: Path | str, why: str) -> CheckpointError:
    return layout_error(path, KIND, why)


def infer_model_config(state: Mapping[str, Tensor], path: Path | str = "the file",
                       num_head_channels: int = HEAD_CHANNELS) -> ModelConfig:  # fmt: skip
    """The :class:`ModelConfig` of the networks in ``state``, read off its shapes (CheckpointError
    naming ``path`` and what does not fit when it is not a DBAE layout of the authors' code)."""
    missing = [k for k in MARKERS if k not in state]
    if missing:
        raise _fail(path, f"no {', '.join(missing[:3])}")
    ch = state["time_embed.0.weight"].shape[1]
    z_dim = state["label_emb.weight"].shape[1]
    sizes = sorted(int(m.group(1)) for k in state if (m := re.match(r"decoder\.to_(\d+)\.weight_orig$", k)))
    if len(sizes) != 1:
        raise _fail(path, "no single decoder.to_<size> output conv")
    size = sizes[0]

    fail = lambda why: _fail(path, why)  # noqa: E731
    unet_shape = unet_layout(state, "", size, fail)
    mult, attention = unet_shape.channel_mult, unet_shape.attention
    for side in attention:
        width = ch * mult[(size // side).bit_length() - 1]
        if width % num_head_channels:
            raise _fail(path, f"its attention at side {side} is {width} channels wide, not a multiple of "
                              f"{num_head_channels} channels per head (the authors' scripts use {HEAD_CHANNELS}): "
                              "import it with `dbae import FILE --out RUN --num-head-channels N`, N its head width")
    unet = UNetConfig(base_channels=ch, channel_mult=mult, num_res_blocks=unet_shape.num_res_blocks,
                      attention_resolutions=attention, num_head_channels=num_head_channels, dropout=0.1, num_groups=32)

    enc = encoder_layout(state, "encoder.", size, ENCODER_RES_BLOCKS, fail)
    head = state["encoder.out.3.weight"].shape[0]
    if head not in (z_dim, 2 * z_dim):
        raise _fail(path, f"encoder.out.3 gives {head} numbers for a {z_dim}-dimensional z")
    encoder = EncoderConfig(base_channels=enc.base_channels, channel_mult=enc.channel_mult,
                            num_res_blocks=ENCODER_RES_BLOCKS, attention_resolutions=enc.attention, num_heads=1,
                            num_groups=32, stochastic=head == 2 * z_dim)  # fmt: skip

    widths = [state["decoder.init.init.0.weight_orig"].shape[1] // 2]
    side = 8
    while side <= size:
        key = f"decoder.feat_{side}.1.weight_orig"
        if key not in state:
            raise _fail(path, f"no {key}")
        widths.append(state[key].shape[0] // 2)
        side *= 2
    decoder = DecoderConfig(channels=tuple(widths), skip_excitation=f"decoder.se_{min(size, 64)}.main.1.weight_orig"
                            in state, norm="affine", output_kernel=1, output_bias=False)  # fmt: skip
    try:
        return ModelConfig(image_size=size, z_dim=z_dim, unet=unet, encoder=encoder, decoder=decoder)
    except ConfigError as exc:
        raise _fail(path, str(exc)) from None


def recognise(state: Mapping[str, Tensor], path: Path | str = "the file",
              num_head_channels: int = HEAD_CHANNELS) -> Preset:  # fmt: skip
    """The preset of the networks in ``state``: one of the released models' (``ffhq128-official``,
    ...) when the layout is one of theirs, else a preset named ``official-custom`` with the
    inferred configuration (the authors' code at other sizes, e.g. a model trained anew)."""
    model = infer_model_config(state, path, num_head_channels)
    for name in OFFICIAL_DBAE:
        preset = get_preset(name)
        if preset.model == model:
            return preset
    return Preset("official-custom", model, TrainConfig(batch_size=128))


# ----- the tensors -----
@torch.no_grad()
def spectral_sigma(weight_orig: Tensor, u: Tensor, v: Tensor, dim: int = 0) -> Tensor:
    """``u . (W v)`` in float64, ``W`` the weight with ``dim`` first, flattened to 2-D: the
    divisor torch's spectral norm applies in eval mode (no power iteration)."""
    w = weight_orig.to(torch.float64).movedim(dim, 0).reshape(weight_orig.shape[dim], -1)
    return torch.dot(u.to(torch.float64), torch.mv(w, v.to(torch.float64)))


@torch.no_grad()
def convert(state: Mapping[str, Tensor], preset: Preset, path: Path | str = "the file", *,
            dtype: torch.dtype = torch.float32) -> Conversion:  # fmt: skip
    """The authors' ``state`` as the state dict of ``DBAE(preset.model)``. Tensors copied as
    they are stay as stored (views, no copy); the derived ones (spectral norms baked, BatchNorms
    folded) are computed in float64 and returned in ``dtype``. CheckpointError naming
    ``path`` and the first keys that do not fit when the key sets do not map exactly."""
    from ..model import DBAE

    with torch.device("meta"):
        target = DBAE(preset.model)
    m = StateMapper.for_module(state, target, path, KIND)
    for key in state:
        if key.startswith(UNUSED_PREFIX) or key.endswith(".num_batches_tracked"):
            m.drop(key)
    m.unet([k for k in state if not k.startswith(("encoder.", "decoder."))], "", "unet.", {"label_emb.": "z_embed."})
    m.encoder("encoder.", "encoder.")
    n_sn = n_bn = 0
    # decoder: spectral-normed convs and BatchNorms, module by module
    size = preset.model.image_size
    levels = len(preset.model.decoder.channels)
    convs = {"init.init.0": ("decoder.init.0", 1), f"to_{size}": ("decoder.to_image", 0)}
    norms = {"init.init.1": "decoder.init.1.0"}
    for i in range(1, levels):
        side = 4 * 2**i
        convs[f"feat_{side}.1"] = (f"decoder.ups.{i - 1}.conv", 0)
        norms[f"feat_{side}.2"] = f"decoder.ups.{i - 1}.act.0"
    for i in (j for j in range(levels) if str(j) in target.decoder.excitations):
        for k in (1, 3):
            convs[f"se_{4 * 2**i}.main.{k}"] = (f"decoder.excitations.{i}.gate.{k}", 0)
    for src, (dst, dim) in convs.items():
        keys = [f"decoder.{src}.weight_{s}" for s in ("orig", "u", "v")]
        if not all(k in state for k in keys):
            continue  # reported as unfilled below
        w, u, v = (state[k] for k in keys)
        sigma = spectral_sigma(w, u, v, dim)
        m.put(f"{dst}.weight", (w.to(torch.float64) / sigma).to(dtype), *keys)
        n_sn += 1
    for src, dst in norms.items():
        keys = [f"decoder.{src}.{s}" for s in ("weight", "bias", "running_mean", "running_var")]
        if not all(k in state for k in keys):
            continue
        gamma, beta, mean, var = (state[k].to(torch.float64) for k in keys)
        scale = gamma / torch.sqrt(var + BATCHNORM_EPS)
        m.put(f"{dst}.weight", scale.to(dtype), *keys)
        m.put(f"{dst}.bias", (beta - mean * scale).to(dtype), *keys)
        n_bn += 1

    n_dropped = sum(1 for k in m.dropped if k.startswith(UNUSED_PREFIX))
    notes = [
        f"names mapped onto dbae.nn ({len(m.out)} tensors)",
        f"qkv rows of {m.reordered} multi-head U-Net attention blocks reordered from (head, q|k|v, channel) "
        "to (q|k|v, head, channel); 1x1 Conv2d attention weights stored as Conv1d",
        "encoder head: 1x1 conv stored as a Linear",
        f"spectral norm of {n_sn} decoder convs baked into their weights: weight_orig / (u . W v) from the "
        "stored u, v (as torch in eval mode), in float64, then rounded once",
        f"{n_bn} decoder BatchNorms folded into per-channel affines from their running statistics "
        f"(eps {BATCHNORM_EPS}), in float64, then rounded once",
        f"left out: {n_dropped} tensors of decoder.feat_256 (built, never run) and "
        f"{len(m.dropped) - n_dropped} BatchNorm num_batches_tracked counters",
    ]
    return m.finish(preset.name, notes)


def read_classifier(path: str | Path) -> tuple[Tensor, Tensor]:
    """(weight (k, d), bias (k,)) of the authors' attribute classifier: ``best.pt``, the state
    dict of the ``nn.Linear(512, 40)`` their ``dbae_manipulation.py`` loads (CheckpointError
    naming the file and what does not fit otherwise)."""
    from .foreign import load_weights_only, tensor_dict

    path = Path(path)
    state = tensor_dict(load_weights_only(path), path, "a linear classifier's state dict (weight, bias)")
    if set(state) != {"weight", "bias"}:
        raise CheckpointError(f"{path} is not the state dict of one nn.Linear (keys: "
                              f"{', '.join(sorted(state)[:4])}); the authors' classifier has weight and bias only")
    weight, bias = state["weight"], state["bias"]
    if weight.dim() != 2 or bias.shape != (weight.shape[0],):
        raise CheckpointError(f"{path}: weight {tuple(weight.shape)} and bias {tuple(bias.shape)} are not a Linear's")
    return weight, bias
