"""Loading trained models for inference: from a run directory, a checkpoint file of this
package, or a released checkpoint of the authors (converted in memory)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoints import load_checkpoint, load_state_strict, resolve_checkpoint
from .checkpoints.foreign import is_torch_pickle
from .checkpoints.integrity import TENSORS_KEY
from .checkpoints.imports import imported_record, read_foreign
from .config import Preset
from .errors import CheckpointError
from .model import DBAE


@dataclass
class LoadedModel:
    model: DBAE
    preset: Preset
    step: int
    path: Path
    #: what identifies the weights the model holds without hashing them again: the sha256 of
    #: the checkpoint's tensor data (checked when it was read) and which weights (EMA or raw);
    #: None where the file carries none (an authors' .pt, a checkpoint of an older dbae)
    weights_id: str | None = None


def load_model(path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu") -> LoadedModel:
    """The model of a checkpoint, in eval mode, with its EMA weights unless ``ema=False``.

    ``path`` may also be a released checkpoint of the authors' code (``ema_0.9999_1020000.pt``):
    it is converted in memory, with one line on stderr about ``dbae import``, which converts
    it once into a run directory."""
    path = resolve_checkpoint(path)
    if is_torch_pickle(path):
        foreign = read_foreign(path)
        if foreign.method != "dbae":
            raise CheckpointError(f"{path} is a {foreign.method.replace('diffae', 'DiffAE').replace('pdae', 'PDAE')} "
                                  "checkpoint, not a DBAE one; this needs a DBAE checkpoint")
        if not ema:
            raise CheckpointError(f"{path} holds EMA weights only (the authors save no others); drop --raw-weights")
        print(f"note: converted {path.name} in memory ({foreign.provenance['recognised_as']}); "
              f"`dbae import {path} --out RUN` converts it once, into a run directory that records where it came "
              "from and whose sha256 is checked on every load", file=sys.stderr)
        model = _loaded(foreign.preset, foreign.state, "EMA", path)
        return LoadedModel(model.to(device).eval(), foreign.preset, foreign.step, path)
    ckpt = load_checkpoint(path, with_optimizer=False)
    if not ema and not ckpt.model:
        record = imported_record(ckpt.metadata)
        origin = f" (imported from {record.get('source')})" if record else ""
        raise CheckpointError(f"{path} holds EMA weights only{origin}; drop --raw-weights")
    weights = ckpt.ema if ema and ckpt.ema else ckpt.model
    what = "EMA" if weights is ckpt.ema else "model"
    model = _loaded(ckpt.preset, weights, what, path)
    digest = ckpt.metadata.get(TENSORS_KEY)
    weights_id = f"{digest}/{what}" if digest else None
    return LoadedModel(model.to(device).eval(), ckpt.preset, ckpt.step, path, weights_id)


def _loaded(preset: Preset, weights: dict[str, torch.Tensor], what: str, path: Path) -> DBAE:
    """The model of ``preset`` holding ``weights`` themselves: built on the meta device, so
    that its own initial weights are never allocated, and the loaded tensors are not copied."""
    with torch.device("meta"):
        model = DBAE(preset.model)
    load_state_strict(model, {k: v.float() if v.is_floating_point() else v for k, v in weights.items()},
                      what, path, assign=True)  # fmt: skip
    return model
