"""What a method supplies to the one training loop (:class:`dbae.training.Trainer`).

The loop owns everything that is the same for every method: the seeded batches and draws of
each step, gradient accumulation, DDP, mixed precision, gradient clipping, the EMA, the
divergence check, signals, logging, the checkpoints of a run directory and exact resume. An
:class:`Objective` owns what differs: its network (built, and placed under the seed, before
the loop starts), which of its parameters train and with which optimizer, the random draws
and the loss of a step, its checkpoint format, and an optional evaluation for the periodic
image grid and the best checkpoint.

DBAE's objective is :class:`dbae.training.dbae_objective.DBAEObjective`; DiffAE's and the
two PDAE stages' live in :mod:`dbae.baselines.objective`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset

from ..checkpoints import Checkpoint


@dataclass(frozen=True)
class LoopConfig:
    """The settings the loop reads, whichever method's typed config they come from.

    ``first_seed_step``: the ``step_seed`` index of a run's first step (DBAE counts from 0,
    the baselines from 1: kept so that their runs and checkpoints go on exactly as before);
    ``sample_every``: steps between periodic evaluations (None: none)."""

    batch_size: int
    steps: int
    seed: int
    ema_decay: float
    grad_clip: float
    log_every: int
    ckpt_every: int
    sample_every: int | None = None
    precision: str = "fp32"
    num_workers: int = 0
    first_seed_step: int = 0


class Draws(Protocol):
    """The random draws of a global batch; rows belong to samples, so a slice is a micro-batch's share."""

    def slice(self, start: int, stop: int) -> "Draws": ...


class Objective(Protocol):
    #: names the method (and stage) in messages, e.g. "DBAE", "PDAE (ddpm)"
    label: str
    #: the whole network: checkpoints hold its weights as ``model.*`` and its EMA copy as ``ema.*``
    module: nn.Module
    loop: LoopConfig
    #: the training images (items: image tensors in [-1, 1], or (image, ...) tuples)
    dataset: Dataset
    #: ``config.json`` of the run directory (None: the caller writes its own)
    config_text: str | None

    def trainable(self) -> list[nn.Parameter]:
        """The parameters the optimizer sees (and the gradient clipping measures)."""

    def optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer: ...

    def draw(self, batch: int, generator: torch.Generator, device: torch.device) -> Draws:
        """All random draws of a step's global batch of ``batch`` images, from ``generator``."""

    def loss(self, module: nn.Module, x: torch.Tensor, draws: Draws, noise_seed: int
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
        """(loss, logged terms) of the micro-batch ``x`` with its share ``draws``; ``module``
        is :attr:`module` (called through it, so that DDP sees the forward)."""

    def save(self, path: Path, *, step: int, model: dict[str, torch.Tensor], ema: dict[str, torch.Tensor],
             optim: dict[str, Any] | None, scaler: dict[str, Any] | None, extra: dict[str, str] | None = None,
             before_replace: Callable[[str], None] | None = None) -> Path:  # fmt: skip
        """Write one checkpoint of the method's format atomically."""

    def check(self, path: Path) -> None:
        """CheckpointError unless ``path`` is an intact checkpoint of this method (and stage)."""

    def check_model(self, path: Path) -> None:
        """ConfigError or CheckpointError when checkpoint ``path`` holds another model
        configuration (or stage) than this objective trains (cheap: before a resume)."""

    def resume_state(self, path: Path) -> Checkpoint:
        """The state of checkpoint ``path``; ConfigError or CheckpointError when it holds
        another model configuration (or stage) than this objective trains."""

    def eval_images(self, n: int) -> torch.Tensor | None:
        """``n`` held-out images for the periodic evaluation (None: the method has none)."""

    def evaluate(self, module: nn.Module, x: torch.Tensor, grid: Path | None, zoom: int | None) -> dict[str, float]:
        """Metrics (``mse`` among them) of ``module`` on ``x``; a sample grid at ``grid``."""

    def compile(self) -> None:
        """``torch.compile`` the parts of :attr:`module` worth compiling."""
