"""Mapping the state dicts of the authors' ADM-family networks onto :mod:`dbae.nn`, key by key.

DBAE's, DiffAE's and PDAE's released code all build guided-diffusion's ADM U-Net (and DiffAE's
semantic encoder, which DBAE reuses) with the same module names. :class:`StateMapper` builds a
target module's state dict from such a source, one key at a time, and checks at the end that
the mapping is exact: every source key used (or deliberately dropped), every target weight
filled, with its shape. The importers (:mod:`.official_dbae`, :mod:`.official_diffae`,
:mod:`.official_pdae`) add what is their own.

What the ADM names become here (``in_layers.0`` -> ``in_norm`` and so on, :data:`UNET_NAMES`),
and the two tensor changes of the attention blocks: the 1x1 ``Conv2d`` weights of some of them
become ``Conv1d`` ones, and the legacy ``qkv`` row order (head, q|k|v, channel) becomes
(q|k|v, head, channel) (:func:`legacy_qkv_to_heads`; the same rows with one head).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from ..errors import CheckpointError

Tensor = torch.Tensor

#: ADM's names inside residual and attention blocks -> dbae.nn's (DiffAE's second condition
#: ``cond_emb_layers`` and PDAE's ``emb_z_layers`` are both :class:`dbae.nn.layers.ResBlock`'s ``cond_proj``)
UNET_NAMES = (
    (".in_layers.0.", ".in_norm."), (".in_layers.2.", ".in_conv."), (".emb_layers.1.", ".emb_proj.1."),
    (".cond_emb_layers.1.", ".cond_proj.1."), (".emb_z_layers.1.", ".cond_proj.1."),
    (".out_layers.0.", ".out_norm."), (".out_layers.3.", ".out_conv."), (".skip_connection.", ".skip."),
    (".proj_out.", ".proj."),
)
#: DiffAE's semantic encoder's names inside its blocks -> :class:`dbae.nn.Encoder`'s
ENCODER_NAMES = ((".in_layers.0.", ".norm."), (".in_layers.2.", ".conv."), (".skip_connection.", ".skip."),
                 (".proj_out.", ".proj."))  # fmt: skip


def rename(key: str, table: tuple[tuple[str, str], ...]) -> str:
    """``key`` with each ``.old.`` segment run of ``table`` replaced (matched with a leading dot)."""
    out = "." + key
    for old, new in table:
        out = out.replace(old, new)
    return out[1:]


def legacy_qkv_to_heads(t: Tensor, heads: int) -> Tensor:
    """Rows of a qkv weight (3C, ...) or bias (3C,) from (head, q|k|v, channel) order to
    (q|k|v, head, channel) order."""
    d = t.shape[0] // (3 * heads)
    return t.reshape(heads, 3, d, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


@dataclass
class Conversion:
    """A converted state dict and what was done to get it."""

    state: dict[str, Tensor]
    #: source keys deliberately left out
    dropped: list[str] = field(default_factory=list)
    #: one line per kind of change (for the provenance record)
    notes: list[str] = field(default_factory=list)


class StateMapper:
    """Builds a state dict with the names and shapes ``wanted`` from ``source``; ``heads``: the
    attention heads of each attention block among them (:meth:`for_module` reads both off a
    module, which may be built on the meta device)."""

    def __init__(self, source: Mapping[str, Tensor], wanted: Mapping[str, tuple[int, ...]], path: Path | str,
                 kind: str, heads: Mapping[str, int] | None = None) -> None:  # fmt: skip
        self.source, self.path, self.kind = source, path, kind
        self.heads = dict(heads or {})
        self.wanted = {k: tuple(v) for k, v in wanted.items()}
        self.out: dict[str, Tensor] = {}
        self.used: set[str] = set()
        self.dropped: list[str] = []
        #: multi-head attention blocks whose qkv rows were reordered
        self.reordered = 0

    @classmethod
    def for_module(cls, source: Mapping[str, Tensor], target: nn.Module, path: Path | str, kind: str) -> "StateMapper":
        from ..nn.layers import AttentionBlock

        heads = {name: m.num_heads for name, m in target.named_modules() if isinstance(m, AttentionBlock)}
        return cls(source, {k: tuple(v.shape) for k, v in target.state_dict().items()}, path, kind, heads)

    # ----- filling -----
    def put(self, name: str, value: Tensor, *sources: str) -> None:
        self.out[name] = value.detach()
        self.used.update(sources)

    def drop(self, *keys: str) -> None:
        self.dropped.extend(keys)
        self.used.update(keys)

    def attention_tensor(self, name: str, value: Tensor) -> Tensor:
        """An attention block's tensor as dbae.nn holds it: 1x1 ``Conv2d`` weights as ``Conv1d``,
        qkv rows reordered for blocks of several heads."""
        if name.endswith((".qkv.weight", ".qkv.bias", ".proj.weight")) and value.dim() == 4:
            value = value[..., 0]
        block = name.rsplit(".", 2)[0]
        if name.endswith((".qkv.weight", ".qkv.bias")) and self.heads.get(block, 1) > 1:
            value = legacy_qkv_to_heads(value, self.heads[block])
            self.reordered += name.endswith(".weight")
        return value

    def unet(self, keys: Iterable[str], src_prefix: str, dst_prefix: str, special: Mapping[str, str] = {}) -> None:
        """An ADM U-Net's tensors: each of ``keys`` (source names starting ``src_prefix``) as
        ``dst_prefix`` + its dbae.nn name; ``special`` renames leading parts first (e.g.
        ``{"label_emb.": "z_embed."}``)."""
        for key in keys:
            rest = key[len(src_prefix):]
            for old, new in special.items():
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            name = dst_prefix + rename(rest, UNET_NAMES)
            self.put(name, self.attention_tensor(name, self.source[key]), key)

    def encoder(self, src_prefix: str, dst_prefix: str) -> None:
        """DiffAE's semantic encoder (``input_blocks.N.M``, ``middle_block.K``, ``out.0`` norm,
        ``out.3`` 1x1-conv head) onto :class:`dbae.nn.Encoder` (a flat ``body``, ``out_norm``,
        a Linear ``head``)."""
        pattern = re.compile(rf"{re.escape(src_prefix)}(?:input_blocks\.(\d+)\.(\d+)|middle_block\.(\d+))\.(.*)$")
        found = {key: m for key in self.source if (m := pattern.match(key))}
        # (0, N, M): input_blocks.N.M; (1, K, 0): middle_block.K; in this order they are the body
        def module(m: re.Match) -> tuple[int, int, int]:
            return (0, int(m.group(1)), int(m.group(2))) if m.group(1) is not None else (1, int(m.group(3)), 0)

        index = {mod: i for i, mod in enumerate(sorted({module(m) for m in found.values()}))}
        for key, m in found.items():
            name = f"{dst_prefix}body.{index[module(m)]}." + rename(m.group(4), ENCODER_NAMES)
            self.put(name, self.attention_tensor(name, self.source[key]), key)
        for key in self.source:
            if key.startswith(src_prefix + "out.0."):
                self.put(dst_prefix + "out_norm." + key[len(src_prefix) + 6:], self.source[key], key)
            elif key.startswith(src_prefix + "out.3."):
                value = self.source[key]
                self.put(dst_prefix + "head." + key[len(src_prefix) + 6:], value[:, :, 0, 0] if value.dim() == 4
                         else value, key)  # fmt: skip

    # ----- checking -----
    def finish(self, what: str, notes: list[str]) -> Conversion:
        """The conversion, after checking that every source key was used (or dropped) and every
        target weight filled with its shape; CheckpointError naming the file and the first keys
        that do not fit otherwise. ``what``: the target networks, for the message."""
        unused = [k for k in self.source if k not in self.used]
        unfilled = [k for k in self.wanted if k not in self.out]
        extra = [k for k in self.out if k not in self.wanted]
        if unused or unfilled or extra:
            parts = []
            if unused:
                parts.append(f"{len(unused)} key(s) of the file fit nowhere (first: {', '.join(unused[:3])})")
            if unfilled:
                parts.append(f"{len(unfilled)} weight(s) of the {what} networks found no key (first: "
                             f"{', '.join(unfilled[:3])})")  # fmt: skip
            if extra:
                parts.append(f"{len(extra)} key(s) of the file map to no weight of the {what} networks "
                             f"(first: {', '.join(extra[:3])})")  # fmt: skip
            raise layout_error(self.path, self.kind, "; ".join(parts))
        wrong = [k for k in self.wanted if tuple(self.out[k].shape) != self.wanted[k]]
        if wrong:
            k = wrong[0]
            raise layout_error(self.path, self.kind, f"{len(wrong)} tensor(s) of other shapes than the {what} "
                                                     f"networks' (first: {k}: {tuple(self.out[k].shape)} vs {self.wanted[k]})")
        return Conversion(self.out, self.dropped, notes)


# ----- reading a layout off the shapes -----
def _entries(state: Mapping[str, Tensor], prefix: str) -> dict[int, set[int]]:
    """index N -> sub-indices M of the keys ``<prefix>N.M.*``."""
    found: dict[int, set[int]] = {}
    for key in state:
        if m := re.match(rf"{re.escape(prefix)}(\d+)\.(\d+)\.", key):
            found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return found


@dataclass(frozen=True)
class UNetLayout:
    """An ADM U-Net's layout as its keys and shapes tell it (not its attention heads)."""

    in_channels: int
    base_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    #: feature-map sides of the attention blocks, largest first
    attention: tuple[int, ...]


def unet_layout(state: Mapping[str, Tensor], prefix: str, image_size: int, fail) -> UNetLayout:
    """The layout of the ADM U-Net under ``prefix`` (``fail(why)`` makes the error): one up
    block closes every level but the top one, so the output path tells the number of levels;
    the widths and the attention come from the input path."""
    first = state.get(f"{prefix}input_blocks.0.0.weight")
    if first is None:
        raise fail(f"no {prefix}input_blocks.0.0.weight")
    ch = first.shape[0]
    outs = _entries(state, f"{prefix}output_blocks.")
    ups = [n for n, subs in outs.items() if any(f"{prefix}output_blocks.{n}.{m}.qkv.weight" not in state
                                                and f"{prefix}output_blocks.{n}.{m}.in_layers.0.weight" in state
                                                for m in subs if m > 0)]  # fmt: skip
    levels = len(ups) + 1
    if not outs or len(outs) % levels:
        raise fail(f"{len(outs)} output blocks do not split into {levels} levels")
    res_blocks = len(outs) // levels - 1
    ins = _entries(state, f"{prefix}input_blocks.")
    mult, attention, n = [], set(), 1
    for level in range(levels):
        key = f"{prefix}input_blocks.{n}.0.in_layers.2.weight"
        if key not in state:
            raise fail(f"no {key}")
        mult.append(state[key].shape[0] // ch)
        if any(1 in ins.get(n + i, ()) for i in range(res_blocks)):
            attention.add(image_size >> level)
        n += res_blocks + (level < levels - 1)
    return UNetLayout(first.shape[1], ch, tuple(mult), res_blocks, tuple(sorted(attention, reverse=True)))


@dataclass(frozen=True)
class EncoderLayout:
    """DiffAE's semantic encoder's layout (``res_blocks`` residual blocks per level)."""

    base_channels: int
    channel_mult: tuple[int, ...]
    attention: tuple[int, ...]
    levels: int


def encoder_layout(state: Mapping[str, Tensor], prefix: str, image_size: int | None, res_blocks: int,
                   fail) -> EncoderLayout:  # fmt: skip
    """The layout of the encoder under ``prefix``: ``res_blocks`` blocks per level and a down block
    between levels (``image_size`` None: the encoder ends at 4x4, which gives it)."""
    enc = _entries(state, f"{prefix}input_blocks.")
    if not enc or len(enc) % (res_blocks + 1):
        raise fail(f"{len(enc)} encoder input blocks do not make levels of {res_blocks} blocks")
    levels = len(enc) // (res_blocks + 1)
    size = image_size if image_size is not None else 4 * 2 ** (levels - 1)
    ch = state[f"{prefix}input_blocks.0.0.weight"].shape[0]
    mult, attention = [], set()
    for level in range(levels):
        first = 1 + level * (res_blocks + 1)
        mult.append(state[f"{prefix}input_blocks.{first}.0.in_layers.2.weight"].shape[0] // ch)
        if any(1 in enc.get(first + i, ()) for i in range(res_blocks)):
            attention.add(size >> level)
    return EncoderLayout(ch, tuple(mult), tuple(sorted(attention, reverse=True)), levels)


def layout_error(path: Path | str, kind: str, why: str) -> CheckpointError:
    return CheckpointError(f"{path} does not have the layout of {kind}: {why}")
