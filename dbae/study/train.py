"""Training the study's methods with one budget (:class:`~dbae.study.config.StudyConfig`),
each in its own run directory ``<out>/runs/<method>`` through the same code as ``dbae train``:
the DBAE trainer for DBAE and DBAE-d, :mod:`dbae.baselines.runs` for DiffAE and PDAE.

Runs are always opened with resume: a finished run is reused as it is, an interrupted one
is continued (the loops seed every step, so the result is that of an uninterrupted run);
a run trained to another number of steps is refused.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..baselines.config import diffae_preset
from ..baselines.pdae_config import pdae_preset
from ..baselines.runs import RunOptions, run_diffae, run_pdae
from ..config import Preset, get_preset
from ..errors import ConfigError
from ..training import TrainOptions, override, train
from ..checkpoints import atomic_write_text, list_checkpoints
from .config import LABELS, StudyConfig


#: the training time the study records in each run directory (so that a reused run reports it)
RECORD = "study_training.json"


@dataclass(frozen=True)
class TrainedMethod:
    """``checkpoint``: the final checkpoint; ``seconds``: the run's training time, summed
    over the invocations that trained it (read back from ``<run>/study_training.json`` when
    the run is reused; evaluation passes of the trainers included); ``seconds_now``: the
    time spent in this invocation; ``resumed_from``: the step of the (final-stage)
    checkpoint its run directory already held (0: trained from scratch now)."""

    name: str
    label: str
    run: Path
    checkpoint: Path
    steps: int
    batch_size: int
    seconds: float
    seconds_now: float
    resumed_from: int


def dbae_preset(cfg: StudyConfig, deterministic: bool) -> Preset:
    """The DBAE (or DBAE-d: deterministic encoder, ``encoder.stochastic = false``) preset of
    the study: the preset's networks, the study's steps / batch / seed / data, one
    evaluation and one checkpoint at the end."""
    p = get_preset(cfg.preset)
    if deterministic:
        model = dataclasses.replace(p.model, encoder=dataclasses.replace(p.model.encoder, stochastic=False))
        p = dataclasses.replace(p, name=f"{p.name}-d", model=model)
    return override(p, steps=cfg.steps, batch_size=cfg.batch_size, seed=cfg.seed, dataset=cfg.dataset,
                    sample_every=cfg.steps, ckpt_every=cfg.steps, log_every=min(p.train.log_every, cfg.steps))


def _held_step(run: Path) -> int:
    found = list_checkpoints(run / "checkpoints")
    return found[-1][0] if found else 0


def _check_steps(name: str, run: Path, step: int, steps: int) -> None:
    if step != steps:
        raise ConfigError(f"{run} holds a {LABELS[name]} run trained to step {step}, not {steps}: "
                          "choose another --out for another number of steps")  # fmt: skip


def train_method(name: str, cfg: StudyConfig, out: Path, *, progress: bool = True,
                 log: Callable[[str], None] = print) -> TrainedMethod:  # fmt: skip
    """Train (or reuse) ``name`` of the study in ``out/runs/<name>``."""
    run = Path(out) / "runs" / name
    held = _held_step(run)
    if held > cfg.steps:
        _check_steps(name, run, held, cfg.steps)
    began = time.perf_counter()
    if name in ("dbae", "dbae-d"):
        preset = dbae_preset(cfg, deterministic=name == "dbae-d")
        result = train(preset, TrainOptions(out=run, resume=True, device=cfg.device, progress=progress, log=log))
        step, ckpt, batch = result.step, result.checkpoint, preset.train.batch_size
    else:
        options = RunOptions(out=run, dataset=cfg.dataset, resume=True, device=cfg.device, progress=progress,
                             eval_images=0, log=log)  # fmt: skip
        fixed = {"steps": cfg.steps, "seed": cfg.seed, "ckpt_every": cfg.steps}
        if cfg.batch_size is not None:
            fixed["batch_size"] = cfg.batch_size
        if name == "diffae":
            dp = diffae_preset(cfg.preset)
            dp = dataclasses.replace(dp, train=dataclasses.replace(dp.train, **fixed))
            res = run_diffae(dp, options)
            batch = dp.train.batch_size
        else:
            pp = pdae_preset(cfg.preset)
            pp = dataclasses.replace(pp, ddpm_train=dataclasses.replace(pp.ddpm_train, **fixed),
                                     train=dataclasses.replace(pp.train, **fixed))  # fmt: skip
            res = run_pdae(pp, options)
            batch = pp.train.batch_size
        step, ckpt = res.step, res.checkpoint
    _check_steps(name, run, step, cfg.steps)
    now = time.perf_counter() - began
    total = _recorded_seconds(run) if held else 0.0
    if held < cfg.steps:  # something was trained now
        total += now
        atomic_write_text(run / RECORD, json.dumps({"steps": step, "seconds": total}, indent=2) + "\n")
    return TrainedMethod(name, LABELS[name], run, ckpt, step, batch, total, now, held)


def _recorded_seconds(run: Path) -> float:
    try:
        return float(json.loads((run / RECORD).read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return float("nan")  # a run trained outside the study: its time is unknown


__all__ = ["TrainedMethod", "dbae_preset", "train_method"]
