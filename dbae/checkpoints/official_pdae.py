"""The authors' released PDAE checkpoints (github.com/ckczzj/PDAE, commit 4f9c29a), converted to
this package's networks exactly.

A representation-learning checkpoint (``trained-models/autoencoder/<ds>/checkpoint.pt``) is a
plain dict: ``step``, ``encoder`` / ``ema_encoder`` (their CNN encoder), ``decoder`` /
``ema_decoder`` (their ShiftUNet: the frozen pre-trained DPM U-Net under its own names, plus
``label_emb``, ``shift_middle_block``, ``shift_output_blocks`` and ``shift_out``), ``optimizer``
and ``scaler``. Their samplers read the EMA copies, and so does the import.

Here: the DPM U-Net is :class:`dbae.baselines.pdae.UnconditionalUNet` (an ADM U-Net whose
attention uses a fixed number of heads, ``UNetConfig.num_heads``, in the legacy qkv order that
the import reorders); the shift branch is :class:`dbae.baselines.pdae_nets.ShiftBranch` over
that U-Net's input path (``PDAEConfig.gradient = "shift"``); the encoder is
:class:`dbae.baselines.pdae_nets.ConvEncoder` (``encoder_kind = "conv"``). What is converted:
names (``emb_z_layers.1`` -> ``cond_proj.1``, ``shift_*`` -> the branch's blocks, ...) and the
qkv rows of multi-head attention. No tensor is recomputed.

The number of attention heads of the U-Net cannot be read off the shapes; their
pre-trained DPMs' configs are not public (README of tests/fixtures/official_pdae), and the
FFHQ128 one is assumed to be DiffAE's ``ffhq128_ddpm``: one head (:data:`DEFAULT_HEADS`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ..config import UNetConfig
from ..errors import ConfigError
from .adm_keys import Conversion, StateMapper, layout_error, unet_layout

Tensor = torch.Tensor

KIND = "the authors' PDAE checkpoint (ckczzj/PDAE)"
#: the U-Net's attention heads when not given (the assumed config of their FFHQ128 DPM)
DEFAULT_HEADS = 1
#: keys a representation-learning checkpoint of theirs has
MARKERS = ("ema_encoder", "ema_decoder")


def looks_like(obj: object) -> bool:
    """Whether ``obj`` (a loaded file) is a PDAE representation-learning checkpoint of theirs."""
    return (isinstance(obj, Mapping) and all(isinstance(obj.get(k), Mapping) for k in MARKERS)
            and "shift_out.2.weight" in obj["ema_decoder"] and "label_emb.weight" in obj["ema_decoder"])  # fmt: skip


@dataclass(frozen=True)
class PDAELayout:
    model: Any  # dbae.baselines.pdae_config.PDAEConfig
    step: int


def infer_layout(obj: Mapping[str, Any], path: Path | str = "the file", num_heads: int | None = None) -> PDAELayout:
    """The configuration of a PDAE checkpoint's networks, read off its shapes (and ``num_heads``,
    the U-Net's attention heads: :data:`DEFAULT_HEADS` when None)."""
    from ..baselines.pdae_config import PDAEConfig
    from ..baselines.pdae_nets import PDAE_ENCODERS, ConvEncoderConfig

    dec, enc = obj["ema_decoder"], obj["ema_encoder"]
    fail = lambda why: layout_error(path, KIND, why)  # noqa: E731
    heads = DEFAULT_HEADS if num_heads is None else num_heads
    z_dim = dec["label_emb.weight"].shape[1]
    # the image side, from the encoder: one stride-2 conv per width, down to 4x4
    widths = [v.shape[0] for k, v in enc.items() if re.match(r"encoder\.\d+\.weight$", k) and v.dim() == 4]
    size = 4 * 2 ** len(widths)
    shape = unet_layout(dec, "", size, fail)
    unet = UNetConfig(base_channels=shape.base_channels, channel_mult=shape.channel_mult,
                      num_res_blocks=shape.num_res_blocks, attention_resolutions=shape.attention, dropout=0.1,
                      num_groups=32, num_heads=heads, float32_time_table=True)  # fmt: skip
    attn_side = next((size >> (int(m.group(1)) // 3 + 1) for k in enc
                      if (m := re.match(r"encoder\.(\d+)\.qkv\.weight$", k))), 16)  # fmt: skip
    conv = ConvEncoderConfig(tuple(widths), attention_side=attn_side, num_heads=4)
    if size in PDAE_ENCODERS and PDAE_ENCODERS[size].channels == conv.channels:
        conv = PDAE_ENCODERS[size]
    try:
        model = PDAEConfig(image_size=size, image_channels=shape.in_channels, z_dim=z_dim, unet=unet,
                           gradient_unet=unet, gradient="shift", encoder_kind="conv", conv_encoder=conv)  # fmt: skip
    except ConfigError as exc:
        raise fail(str(exc)) from None
    step = obj.get("step", 0)
    return PDAELayout(model, int(step) if isinstance(step, int) else 0)


@torch.no_grad()
def convert(obj: Mapping[str, Any], layout: PDAELayout, path: Path | str = "the file") -> Conversion:
    """The state dict of :class:`dbae.baselines.pdae.PDAE` from a PDAE checkpoint's EMA networks;
    CheckpointError naming the file and the first keys that do not fit otherwise."""
    from ..baselines.pdae import PDAE

    with torch.device("meta"):
        target = PDAE(layout.model)
    source = {f"ema_decoder.{k}": v for k, v in obj["ema_decoder"].items()}
    source.update({f"ema_encoder.{k}": v for k, v in obj["ema_encoder"].items()})
    m = StateMapper.for_module(source, target, path, KIND)
    shift = [k for k in source if k.startswith(("ema_decoder.shift_", "ema_decoder.label_emb."))]
    m.unet([k for k in source if k.startswith("ema_decoder.") and k not in shift], "ema_decoder.", "eps_net.")
    m.unet(shift, "ema_decoder.", "gradient_net.", {"shift_middle_block.": "middle_block.",
                                                     "shift_output_blocks.": "output_blocks.", "shift_out.": "out."})
    for key, value in source.items():
        if key.startswith("ema_encoder.encoder."):
            name = "encoder.body." + key.removeprefix("ema_encoder.encoder.").replace(".proj_out.", ".proj.")
            m.put(name, m.attention_tensor(name, value), key)
    notes = [
        f"the EMA networks (ema_encoder, ema_decoder) mapped onto dbae's PDAE ({len(m.out)} tensors): the frozen DPM "
        "U-Net, the shift branch (shift_* -> gradient_net, emb_z_layers -> cond_proj) and the CNN encoder",
        f"qkv rows of {m.reordered} multi-head attention blocks reordered from (head, q|k|v, channel) to "
        "(q|k|v, head, channel)",
        f"the U-Net's attention taken to have {layout.model.unet.num_heads} head(s) (not readable off the shapes)",
        "left out: the non-EMA encoder and decoder, the optimizer and scaler states",
    ]
    return m.finish(f"PDAE {layout.model.image_size}px", notes)
