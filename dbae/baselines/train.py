"""DiffAE's checkpoints (:data:`FORMAT`, laid out as :mod:`.formats` says), and training it
with the one loop (:class:`dbae.training.Trainer`; the seeded steps: :mod:`.objective`).
Adam or RAdam, gradient clipping, an EMA copy of the weights (DiffAE samples from the EMA
model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..checkpoints import Checkpoint, load_weights
from .config import DiffAEPreset, preset_from_dict, preset_to_json
from .diffae import DiffAE
from .formats import BaselineFormat
from .objective import BaselineObjective, BaselineTrainResult, fit_baseline

FORMAT = "dbae-diffae-checkpoint/1"
DIFFAE_FORMAT = BaselineFormat(FORMAT, "DiffAE", preset_to_json, preset_from_dict)


def save_diffae(path: Path, *, preset: DiffAEPreset, **state: Any) -> Path:
    """Write one DiffAE checkpoint atomically (``state``: ``step``, ``model``, ``ema`` and
    optionally ``optim``, ``extra``, ``before_replace``: :meth:`BaselineFormat.save`)."""
    return DIFFAE_FORMAT.save(path, preset=preset, **state)


def read_diffae_checkpoint(path: str | Path) -> Checkpoint:
    """Read and validate a DiffAE checkpoint; CheckpointError for a missing, corrupt or
    foreign file, or unreadable metadata."""
    return DIFFAE_FORMAT.read(path)


def load_diffae(
    path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu"
) -> tuple[DiffAE, DiffAEPreset]:
    """The DiffAE of a checkpoint (its EMA weights unless ``ema=False``), in eval mode, and
    its preset."""
    ckpt = read_diffae_checkpoint(path)
    model = load_weights(DiffAE(ckpt.preset.model), ckpt.model, ckpt.ema, ema, "DiffAE", ckpt.path)
    return model.to(device).eval(), ckpt.preset


def train_diffae(preset: DiffAEPreset, data: Dataset, **options: Any) -> BaselineTrainResult:
    """Train ``preset`` on ``data`` (items: images in [-1, 1], or (image, ...) tuples) for
    ``preset.train.steps`` steps; ``options``: ``out``, ``resume``, ``device``, ``progress``
    and ``log`` of :func:`.objective.fit_baseline`."""
    torch.manual_seed(preset.train.seed)  # the initial weights are part of what the seed fixes
    model = DiffAE(preset.model)
    objective = BaselineObjective("DiffAE", model, list(model.parameters()), DiffAE.loss, preset.train, data,
                                  DIFFAE_FORMAT, preset)  # fmt: skip
    return fit_baseline(objective, **options)
