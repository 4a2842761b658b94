"""The checkpoint format of a baseline (DiffAE's and PDAE's: :mod:`.train`, :mod:`.pdae_train`).

A file of :func:`dbae.checkpoints.write_weights_file`'s layout (tensors ``model.*``, ``ema.*``,
``optim.<i>.<key>``), written atomically, never pickle; metadata ``format`` (the format's
tag), ``preset`` (the typed preset as JSON), ``stage`` (for a format with stages: PDAE's
``ddpm`` or ``pdae``), ``step`` and ``optim`` (the optimizer's non-tensor state as JSON).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..checkpoints import Checkpoint, read_weights_file, write_weights_file
from ..errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class BaselineFormat:
    tag: str
    #: names the method in messages ("DiffAE")
    label: str
    preset_to_json: Callable[[Any], str]
    preset_from_dict: Callable[[dict[str, Any]], Any]
    stages: tuple[str, ...] = ()

    def save(self, path: Path, *, preset: Any, step: int, model: dict[str, torch.Tensor],
             ema: dict[str, torch.Tensor], optim: dict[str, Any] | None = None, extra: dict[str, str] | None = None,
             before_replace: Callable[[str], None] | None = None, stage: str | None = None) -> Path:  # fmt: skip
        """Write one checkpoint atomically; ``extra``: more string metadata, ``before_replace``:
        see :func:`dbae.checkpoints.atomic_write`."""
        if self.stages and stage not in self.stages:
            raise ConfigError(f"stage must be {' or '.join(repr(s) for s in self.stages)}, got {stage!r}")
        staged = {"stage": stage} if self.stages else {}
        metadata = {**(extra or {}), "format": self.tag, "preset": self.preset_to_json(preset), **staged,
                    "step": str(step)}  # fmt: skip
        return write_weights_file(Path(path), metadata, model, ema, optim, before_replace)

    def read(self, path: str | Path) -> Checkpoint:
        """Read and validate a checkpoint; CheckpointError for a missing, corrupt or foreign
        file, or unreadable metadata."""
        ckpt = read_weights_file(path, self.tag, f"{self.label} checkpoint", self.preset_from_dict)
        if self.stages:
            ckpt.stage = ckpt.metadata.get("stage")
            if ckpt.stage not in self.stages:
                raise CheckpointError(f"{ckpt.path} has unreadable metadata (stage {ckpt.stage!r})")
        return ckpt

    def check(self, path: Path, stage: str | None = None) -> Checkpoint:
        """Checkpoint ``path``, read and checked; CheckpointError unless it is of ``stage``."""
        ckpt = self.read(path)
        if ckpt.stage != stage:
            raise CheckpointError(f"{ckpt.path} is a stage-{ckpt.stage!r} checkpoint, not stage {stage!r}")
        return ckpt

    def resume_state(self, path: Path, preset: Any, stage: str | None = None) -> Checkpoint:
        """Checkpoint ``path`` to resume from; CheckpointError unless it holds the model of
        ``preset`` (and is of ``stage``)."""
        ckpt = self.check(path, stage)
        if ckpt.preset.model != preset.model:
            raise CheckpointError(f"{ckpt.path} holds another {self.label} model configuration than this preset")
        return ckpt
