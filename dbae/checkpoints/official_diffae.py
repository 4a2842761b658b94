"""The authors' released DiffAE checkpoints (github.com/phizaz/diffae, commit 00c57d3), converted
to this package's networks exactly.

Their file is a PyTorch Lightning ``last.ckpt``: a dict whose ``state_dict`` holds ``model.*``
(the trained network) and ``ema_model.*`` (its EMA copy, which all their inference uses), the
fixed noise ``x_T`` of their training grids, and for the latent presets the latent DPM
(``*.latent_net.*``) and the statistics that normalise z (``conds_mean``, ``conds_std``).
Its ``callbacks`` are keyed by Lightning's ``ModelCheckpoint`` class, the one global a
``weights_only`` load refuses: a harmless stand-in is allowed under that exact name
(:data:`STAND_INS`), nothing else.

Their U-Net is the ADM U-Net of :mod:`dbae.nn` with settings (:class:`dbae.config.UNetConfig`):
z scales every residual block's features by ``1 + Linear(SiLU(z))`` after the time's
scale-shift instead of entering the time embedding (``z_conditioning = "block-scale"``), the
time embedding is 512 wide at any width (``embed_channels``), attention has one head, and the
sinusoids' frequency table is float32 (``float32_time_table``). Their semantic encoder is
:class:`dbae.nn.Encoder` with one-head attention. The latent DPM is :class:`dbae.prior.MLPSkipNet`
(its ``linear_emb`` is the same tensor as ``cond_layers.1``, saved twice) sampled with
DiffAE's DDIM spacing.

What is converted: names (``time_embed.time_embed`` -> ``time_embed``, ``cond_emb_layers.1`` ->
``cond_proj.1``, the encoder onto its flat ``body``, the latent net's last layer -> ``out``, ...),
the encoder's 1x1-conv head into a Linear, ``conds_mean`` / ``conds_std`` into the prior's
latent statistics. Left out: ``model.*`` (the non-EMA weights), ``x_T`` and the duplicate
``linear_emb`` keys (checked equal to ``cond_layers.1``). No tensor is recomputed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import torch

from ..config import EncoderConfig, UNetConfig
from ..errors import ConfigError
from .adm_keys import Conversion, StateMapper, encoder_layout, layout_error, unet_layout

Tensor = torch.Tensor

KIND = "the authors' DiffAE checkpoint (phizaz/diffae)"
#: the global that their Lightning checkpoints refer to, and the harmless class read in its place
LIGHTNING_CALLBACK = "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"


class LightningCallbackRecord:
    """Stands in for Lightning's ``ModelCheckpoint`` class while unpickling a ``last.ckpt`` (its
    ``callbacks`` dict is keyed by the class object); it has no behaviour."""


STAND_INS = {LIGHTNING_CALLBACK: LightningCallbackRecord}
EMA = "ema_model."
#: keys every DiffAE autoencoder of theirs has under ``state_dict``
MARKERS = (EMA + "time_embed.time_embed.0.weight", EMA + "input_blocks.0.0.weight",
           EMA + "encoder.input_blocks.0.0.weight", EMA + "encoder.out.3.weight")  # fmt: skip
#: their encoder's residual blocks per level (enc_num_res_block)
ENCODER_RES_BLOCKS = 2


def looks_like(obj: object) -> bool:
    """Whether ``obj`` (a loaded file) is a DiffAE Lightning checkpoint of theirs."""
    state = obj.get("state_dict") if isinstance(obj, Mapping) else None
    return isinstance(state, Mapping) and all(k in state for k in MARKERS)


@dataclass(frozen=True)
class DiffAELayout:
    """What a DiffAE file holds: its autoencoder's configuration and, for the latent presets,
    its latent DPM's network configuration."""

    model: Any  # dbae.baselines.config.DiffAEConfig
    latent: Any | None  # dbae.prior.config.PriorNetConfig
    step: int


def infer_layout(obj: Mapping[str, Any], path: Path | str = "the file") -> DiffAELayout:
    """The configuration of the networks in a DiffAE checkpoint, read off its shapes."""
    from ..baselines.config import DiffAEConfig
    from ..prior.config import PriorNetConfig

    state = obj["state_dict"]
    fail = lambda why: layout_error(path, KIND, why)  # noqa: E731
    emb = state[EMA + "time_embed.time_embed.0.weight"].shape[0]
    first_cond = next((v for k, v in state.items() if k.startswith(EMA) and k.endswith(".cond_emb_layers.1.weight")),
                      None)  # fmt: skip
    if first_cond is None:
        raise fail("no z conditioning (cond_emb_layers) in its U-Net")
    z_dim = first_cond.shape[1]
    # the image side from the x_T buffer (their training grid's noise) when present, else the
    # encoder's levels (it ends at 4x4)
    size = state["x_T"].shape[-1] if "x_T" in state else None
    enc = encoder_layout(state, EMA + "encoder.", size, ENCODER_RES_BLOCKS, fail)
    size = size if size is not None else 4 * 2 ** (enc.levels - 1)
    shape = unet_layout(state, EMA, size, fail)
    if state[EMA + "encoder.out.3.weight"].shape[0] != z_dim:
        raise fail("the encoder's output and the U-Net's z conditioning differ in width")
    unet = UNetConfig(base_channels=shape.base_channels, channel_mult=shape.channel_mult,
                      num_res_blocks=shape.num_res_blocks, attention_resolutions=shape.attention, dropout=0.1,
                      num_groups=32, num_heads=1, embed_channels=emb, z_conditioning="block-scale",
                      float32_time_table=True)  # fmt: skip
    encoder = EncoderConfig(base_channels=enc.base_channels, channel_mult=enc.channel_mult,
                            num_res_blocks=ENCODER_RES_BLOCKS, attention_resolutions=enc.attention, num_heads=1,
                            num_groups=32, stochastic=False)  # fmt: skip
    try:
        model = DiffAEConfig(image_size=size, image_channels=shape.in_channels, z_dim=z_dim, unet=unet,
                             encoder=encoder)  # fmt: skip
    except ConfigError as exc:
        raise fail(str(exc)) from None
    latent = None
    if EMA + "latent_net.time_embed.0.weight" in state:
        layers = sorted({int(m.group(1)) for k in state if (m := re.match(rf"{re.escape(EMA)}latent_net\.layers\.(\d+)\.", k))})
        width = state[f"{EMA}latent_net.layers.0.linear.weight"].shape[0]
        t_ch = state[EMA + "latent_net.time_embed.0.weight"].shape[1]
        t_emb = state[EMA + "latent_net.time_embed.0.weight"].shape[0]
        latent = PriorNetConfig(num_layers=len(layers), width=width, time_channels=t_ch, time_embed_dim=t_emb)
    step = obj.get("global_step", 0)
    return DiffAELayout(model, latent, int(step) if isinstance(step, int) else 0)


@torch.no_grad()
def convert(obj: Mapping[str, Any], layout: DiffAELayout, path: Path | str = "the file") -> tuple[Conversion, Conversion | None]:
    """(the DiffAE autoencoder's state dict, the latent DPM's state dict with ``latent_mean``
    and ``latent_std``, or None) of a DiffAE checkpoint; CheckpointError naming the file and
    the first keys that do not fit otherwise."""
    from ..baselines.diffae import DiffAE

    state = obj["state_dict"]
    with torch.device("meta"):
        target = DiffAE(layout.model)
    auto = {k: v for k, v in state.items() if not k.startswith((EMA + "latent_net.", "model.latent_net."))
            and k not in ("conds_mean", "conds_std")}  # fmt: skip
    m = StateMapper.for_module(auto, target, path, KIND)
    m.drop(*[k for k in auto if k.startswith("model.") or k == "x_T"])
    unet = [k for k in auto if k.startswith(EMA) and not k.startswith(EMA + "encoder.")]
    m.unet(unet, EMA, "unet.", {"time_embed.time_embed.": "time_embed."})
    m.encoder(EMA + "encoder.", "encoder.")
    notes = [
        f"the EMA networks (ema_model.*) mapped onto dbae.nn ({len(m.out)} tensors): U-Net with per-block z "
        f"scales (cond_emb_layers -> cond_proj), one-head attention, a {layout.model.unet.emb_channels}-wide time "
        "embedding",
        "encoder head: 1x1 conv stored as a Linear",
        "left out: the non-EMA weights (model.*) and the training grid's fixed noise x_T",
    ]
    autoencoder = m.finish(f"DiffAE {layout.model.image_size}px", notes)
    if layout.latent is None:
        return autoencoder, None
    return autoencoder, _convert_latent(state, layout, path)


def _convert_latent(state: Mapping[str, Tensor], layout: DiffAELayout, path: Path | str) -> Conversion:
    from ..prior.network import MLPSkipNet

    with torch.device("meta"):
        target = MLPSkipNet(layout.latent, layout.model.z_dim)
    prefix = EMA + "latent_net."
    latent = {k: v for k, v in state.items() if k.startswith(prefix)}
    latent.update({k: state[k] for k in ("conds_mean", "conds_std") if k in state})
    z_dim = layout.model.z_dim
    wanted = {**{k: tuple(v.shape) for k, v in target.state_dict().items()}, "latent_mean": (z_dim,),
              "latent_std": (z_dim,)}  # fmt: skip
    m = StateMapper(latent, wanted, path, KIND)
    last = layout.latent.num_layers - 1
    for key, value in latent.items():
        rest = key[len(prefix):]
        if key in ("conds_mean", "conds_std"):
            m.put("latent_mean" if key == "conds_mean" else "latent_std", value.reshape(-1), key)
        elif rest.startswith(f"layers.{last}.linear."):
            m.put("out." + rest.removeprefix(f"layers.{last}.linear."), value, key)
        elif ".linear_emb." in rest:
            twin = prefix + rest.replace(".linear_emb.", ".cond_layers.1.")
            if twin not in latent or not _same(latent[twin], value):
                raise layout_error(path, KIND, f"{key} is not the same tensor as {twin}")
            m.drop(key)
        else:
            m.put(rest.replace(".cond_layers.1.", ".cond.1."), value, key)
    notes = [f"the latent DPM (ema_model.latent_net.*, {layout.latent.num_layers} layers) mapped onto dbae.prior's "
             "MLPSkipNet, its last layer as out; conds_mean / conds_std as the prior's latent statistics",
             "left out: the duplicate linear_emb keys (the same tensors as cond_layers.1)"]
    return m.finish("latent prior", notes)


def _same(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors of a file hold the same values (the same storage, as their two keys of
    one parameter do; shapes only for meta tensors, which key lists are checked with)."""
    if a.shape != b.shape:
        return False
    return a.is_meta or (a.data_ptr() == b.data_ptr() and a.stride() == b.stride()) or torch.equal(a, b)


def recognised_name(model: Any) -> str:
    """The preset name of a DiffAE configuration of theirs (``official-custom`` for a layout
    they did not release)."""
    from ..baselines.config import official_diffae_models

    for name, config in official_diffae_models().items():
        if replace(config, schedule=model.schedule) == model:
            return name
    return "official-custom"
