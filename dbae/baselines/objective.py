"""DiffAE and the two PDAE stages as objectives of the one training loop
(:class:`dbae.training.Trainer`, :mod:`dbae.training.objective`).

A baseline objective is a network, the parameters that train (all of DiffAE; PDAE's eps
network in stage ``ddpm``, its encoder and G in stage ``pdae``), one of the diffusion losses
with t and eps drawn ahead for the global batch (:meth:`DDPMSchedule.draw_noise`, in the
order the losses draw them), Adam or RAdam, and a checkpoint format (:mod:`.formats`).

Each step ``s`` (1-based) takes the batch ``StepBatchSampler(len(data), B, seed).indices(s-1)``
and draws t and eps from a generator seeded by ``step_seed(seed, s)`` (the step seeds count
from 1, ``first_seed_step``, as the baselines' runs always have), so a run (and a resumed
run) is a pure function of the preset, the data and its start model. They train in fp32 and
have no periodic evaluation (:mod:`.runs` evaluates after training).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from ..errors import ConfigError
from ..checkpoints import Checkpoint
from ..training.objective import LoopConfig
from ..training.trainer import TrainOptions, Trainer
from .config import DiffAETrainConfig
from .ddim import DiffusionNoise
from .formats import BaselineFormat


@dataclass
class BaselineObjective:
    """``loss_fn(module, x0, noise=...)`` returns an object with ``.loss`` and ``.logs``;
    checkpoints of ``fmt`` record ``preset`` (and ``stage``)."""

    label: str
    module: nn.Module
    params: list[nn.Parameter]
    loss_fn: Callable[..., Any]
    train: DiffAETrainConfig
    dataset: Dataset
    fmt: BaselineFormat
    preset: Any
    stage: str | None = None
    #: the run directory's config.json is written by :mod:`.runs`
    config_text: str | None = None

    def __post_init__(self) -> None:
        cfg = self.train
        self.loop = LoopConfig(batch_size=cfg.batch_size, steps=cfg.steps, seed=cfg.seed, ema_decay=cfg.ema_decay,
                               grad_clip=cfg.grad_clip, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every,
                               first_seed_step=1)  # fmt: skip

    def trainable(self) -> list[nn.Parameter]:
        return self.params

    def optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        opt_cls = torch.optim.RAdam if self.train.optimizer == "radam" else torch.optim.Adam
        return opt_cls(params, lr=self.train.lr, weight_decay=self.train.weight_decay)

    def draw(self, batch: int, generator: torch.Generator, device: torch.device) -> DiffusionNoise:
        c = self.module.config
        return self.module.schedule.draw_noise((batch, c.image_channels, c.image_size, c.image_size), generator, device)

    def loss(self, module: nn.Module, x: torch.Tensor, draws: DiffusionNoise, noise_seed: int
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
        out = self.loss_fn(module, x, noise=draws)
        return out.loss, out.logs

    def save(self, path: Path, *, scaler: dict[str, Any] | None = None, **state: Any) -> Path:
        if scaler:
            raise ConfigError(f"{self.label} trains in fp32: it has no loss-scaler state to save")
        return self.fmt.save(path, preset=self.preset, stage=self.stage, **state)

    def resume_state(self, path: Path) -> Checkpoint:
        return self.fmt.resume_state(path, self.preset, self.stage)

    def check(self, path: Path) -> None:
        self.fmt.check(path, self.stage)

    def check_model(self, path: Path) -> None:
        self.resume_state(path)

    def eval_images(self, n: int) -> torch.Tensor | None:
        return None  # no periodic evaluation: runs.post_training_eval evaluates the finished model

    def evaluate(self, module: nn.Module, x: torch.Tensor, grid: Path | None, zoom: int | None) -> dict[str, float]:
        raise ConfigError(f"{self.label} has no periodic evaluation (dbae.baselines.runs evaluates after training)")

    def compile(self) -> None:
        self.module.compile()


@dataclass
class BaselineTrainResult:
    """``model``: the trained network (raw weights); ``ema``: its EMA copy (eval mode, what
    to sample from); ``losses``: (step, mean loss over the log window); ``path``: the last
    checkpoint (None without an output directory); ``stage``: PDAE's stage (None for DiffAE)."""

    model: nn.Module
    ema: nn.Module
    step: int
    losses: list[tuple[int, float]]
    seconds: float
    path: Path | None
    stage: str | None = None
    #: the signal (SIGTERM or SIGINT) that stopped the run before its last step, if any
    stopped_by: int | None = None


def fit_baseline(objective: BaselineObjective, *, out: str | Path | None = None,
                 resume: str | Path | bool | None = None, config: dict[str, Any] | None = None,
                 device: str | torch.device = "cpu", progress: bool = True, log: Callable[[str], None] = print
                 ) -> BaselineTrainResult:  # fmt: skip
    """Train ``objective`` with the one loop for its preset's steps: with ``out``, a checkpoint
    in ``out/checkpoints`` every ``ckpt_every`` steps and at the end (all kept), the loss log
    ``out/metrics.jsonl`` and ``config`` as ``out/config.json``. ``resume``: continue from
    that checkpoint of the same preset (and stage), or with True from ``out``'s newest intact
    one (a new run when it has none; without it, ``out`` must hold no checkpoint), with the
    same batches and noise as an uninterrupted run."""
    if config is not None:
        objective.config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    auto = resume is True
    options = TrainOptions(out=None if out is None else Path(out), resume=auto,
                           resume_from=None if resume is None or isinstance(resume, bool) else Path(resume),
                           device=str(torch.device(device)), progress=progress, keep_last=None, eval_images=0,
                           log=log)  # fmt: skip
    trainer = Trainer(objective, options)
    result = trainer.fit()
    return BaselineTrainResult(objective.module, trainer.ema.module, result.step, result.losses, result.seconds,
                               result.checkpoint, objective.stage, result.stopped_by)  # fmt: skip
