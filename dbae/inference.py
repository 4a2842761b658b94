"""Loading trained models for inference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import Preset
from .model import DBAE
from .checkpoints import load_checkpoint, load_state_strict, resolve_checkpoint


@dataclass
class LoadedModel:
    model: DBAE
    preset: Preset
    step: int
    path: Path


def load_model(path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu") -> LoadedModel:
    """The model of a checkpoint, in eval mode, with its EMA weights unless ``ema=False``."""
    path = resolve_checkpoint(path)
    ckpt = load_checkpoint(path, with_optimizer=False)
    model = DBAE(ckpt.preset.model)
    weights = ckpt.ema if ema and ckpt.ema else ckpt.model
    load_state_strict(model, weights, "EMA" if weights is ckpt.ema else "model", path)
    return LoadedModel(model.to(device).eval(), ckpt.preset, ckpt.step, path)
