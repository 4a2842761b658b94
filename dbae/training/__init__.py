"""Training: the one loop of every method (its objectives: :mod:`.objective`), EMA, checkpoints and metrics log."""

from ..checkpoints import Checkpoint, load_checkpoint, save_checkpoint
from .dbae_objective import DBAEObjective
from .ema import EMA
from .objective import LoopConfig, Objective
from .trainer import TrainOptions, TrainResult, Trainer, override, train

__all__ = [
    "Checkpoint", "load_checkpoint", "save_checkpoint", "DBAEObjective", "EMA", "LoopConfig", "Objective",
    "TrainOptions", "TrainResult", "Trainer", "override", "train",
]
