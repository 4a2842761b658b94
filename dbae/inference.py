"""Loading trained models for inference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import Preset
from .errors import CheckpointError
from .model import DBAE
from .training.checkpoint import latest_valid_checkpoint, load_checkpoint, load_state_strict, verify_checkpoint


@dataclass
class LoadedModel:
    model: DBAE
    preset: Preset
    step: int
    path: Path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory (its newest readable checkpoint)."""
    path = Path(path)
    if path.is_dir():
        warnings: list[str] = []
        errors: list[CheckpointError] = []  # why each newer checkpoint was passed over, newest first

        def check(candidate: Path) -> None:
            try:
                verify_checkpoint(candidate)
            except CheckpointError as exc:
                errors.append(exc)
                raise

        found = latest_valid_checkpoint(path / "checkpoints" if (path / "checkpoints").is_dir() else path,
                                        warn=warnings.append, check=check)
        if found is None:
            if errors:  # the newest one's reason says what is wrong (e.g. a DiffAE run)
                more = f" ({len(errors) - 1} older one(s) unusable too)" if len(errors) > 1 else ""
                raise CheckpointError(f"no usable checkpoint in {path}: {errors[0]}{more}")
            raise CheckpointError(f"no checkpoint in {path} (no step-*.safetensors files in it or in its "
                                  "checkpoints/ folder)")
        for line in warnings:
            print(line)
        return found
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    return path


def load_model(path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu") -> LoadedModel:
    """The model of a checkpoint, in eval mode, with its EMA weights unless ``ema=False``."""
    path = resolve_checkpoint(path)
    ckpt = load_checkpoint(path, with_optimizer=False)
    model = DBAE(ckpt.preset.model)
    weights = ckpt.ema if ema and ckpt.ema else ckpt.model
    load_state_strict(model, weights, "EMA" if weights is ckpt.ema else "model", path)
    return LoadedModel(model.to(device).eval(), ckpt.preset, ckpt.step, path)
