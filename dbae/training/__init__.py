"""Training: the loop, EMA, checkpoints and metrics log."""

from ..checkpoints import Checkpoint, load_checkpoint, save_checkpoint
from .ema import EMA
from .trainer import TrainOptions, TrainResult, Trainer, override, train

__all__ = [
    "Checkpoint", "load_checkpoint", "save_checkpoint", "EMA",
    "TrainOptions", "TrainResult", "Trainer", "override", "train",
]
