"""A minimal, seeded training loop for the DiffAE baseline, and its checkpoints.

Each step ``s`` (1-based) takes the batch ``StepBatchSampler(len(data), B, seed).indices(s-1)``
and draws t and eps from a generator seeded by ``step_seed(seed, s)``, so a run (and a
resumed run) is a pure function of the preset and the data. Adam or RAdam, gradient
clipping, an EMA copy of the weights (DiffAE samples from the EMA model).

Checkpoints (``<out>/checkpoints/step-XXXXXXXX.safetensors``) are safetensors files written
atomically (:func:`dbae.checkpoints.atomic_write`), never pickle: tensors ``model.*``,
``ema.*``, ``optim.<i>.<key>``; metadata ``format`` (:data:`FORMAT`), ``preset`` (the typed
DiffAE preset as JSON), ``step`` and ``optim`` (the optimizer's non-tensor state as JSON).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch.utils.data import Dataset

from ..data.shapes import ShapesDataset
from ..errors import CheckpointError, ConfigError, DataError, TrainingDiverged
from ..training.batches import StepBatchSampler, step_seed
from ..checkpoints import (
    checkpoint_name,
    load_state_strict,
    read_tagged_safetensors,
    split_weights,
    write_weights_file,
)
from ..training.ema import EMA
from .config import DiffAEPreset, DiffAETrainConfig, preset_from_dict, preset_to_json
from .diffae import DiffAE

FORMAT = "dbae-diffae-checkpoint/1"


# ----- checkpoints -----
def save_diffae(
    path: Path,
    *,
    preset: DiffAEPreset,
    step: int,
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor],
    optim: dict[str, Any] | None = None,
    extra: dict[str, str] | None = None,
    before_replace: Callable[[str], None] | None = None,
) -> Path:
    """Write one DiffAE checkpoint atomically (module docstring); ``extra``: more string
    metadata, ``before_replace``: see :func:`dbae.checkpoints.atomic_write`."""
    metadata = {**(extra or {}), "format": FORMAT, "preset": preset_to_json(preset), "step": str(step)}
    return write_weights_file(Path(path), metadata, model, ema, optim, before_replace)


@dataclass
class DiffAECheckpoint:
    """The contents of a DiffAE checkpoint file."""

    path: Path
    preset: DiffAEPreset
    step: int
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optim: dict[str, Any] | None


def read_diffae_checkpoint(path: str | Path) -> DiffAECheckpoint:
    """Read and validate a DiffAE checkpoint; CheckpointError for a missing, corrupt or
    foreign file, or unreadable metadata."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no DiffAE checkpoint at {path}")
    meta, tensors = read_tagged_safetensors(path, FORMAT, "DiffAE checkpoint")
    try:
        preset = preset_from_dict(json.loads(meta["preset"]))
        step = int(meta["step"])
        optim_meta = json.loads(meta["optim"]) if "optim" in meta else None
    except (KeyError, ValueError, ConfigError) as exc:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f"{path} has unreadable metadata ({exc})") from None
    model, ema, optim = split_weights(path, tensors, optim_meta)
    return DiffAECheckpoint(path, preset, step, model, ema, optim)


def load_diffae(
    path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu"
) -> tuple[DiffAE, DiffAEPreset]:
    """The DiffAE of a checkpoint (its EMA weights unless ``ema=False``), in eval mode, and
    its preset."""
    ckpt = read_diffae_checkpoint(path)
    model = DiffAE(ckpt.preset.model)
    weights = ckpt.ema if ema and ckpt.ema else ckpt.model
    load_state_strict(model, weights, "DiffAE EMA" if weights is ckpt.ema else "DiffAE", ckpt.path)
    return model.to(device).eval(), ckpt.preset


# ----- training -----
@dataclass
class DiffAETrainResult:
    """``model``: the trained network (raw weights); ``ema``: its EMA copy (eval mode, what
    to sample from); ``losses``: (step, mean loss over the log window); ``path``: the last
    checkpoint (None without an output directory)."""

    model: DiffAE
    ema: DiffAE
    step: int
    losses: list[tuple[int, float]]
    seconds: float
    path: Path | None


def _batch(data: Dataset, indices: list[int], device: torch.device) -> torch.Tensor:
    """Images (B, C, S, S) of ``indices``; a ShapesDataset renders the whole batch at once."""
    if isinstance(data, ShapesDataset):
        return ShapesDataset.render(data.factors_at(indices), data.image_size).to(device)
    items = [data[i] for i in indices]
    images = [it[0] if isinstance(it, (tuple, list)) else it for it in items]
    if not all(isinstance(im, torch.Tensor) for im in images):
        raise DataError("the training data must yield image tensors or (image, ...) tuples")
    return torch.stack(images).to(device=device, dtype=torch.float32)


class ResumePoint(Protocol):
    """What :func:`fit` resumes from: a read checkpoint (DiffAE or PDAE), already checked to
    belong to the model being trained."""

    path: Path
    step: int
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optim: dict[str, Any] | None


def fit(
    name: str,
    kind: str,
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    loss_fn: Callable[..., Any],
    data: Dataset,
    cfg: DiffAETrainConfig,
    *,
    resume: ResumePoint | None,
    save_weights: Callable[..., Path],
    out: str | Path | None,
    device: torch.device,
    progress: bool,
    log: Callable[[str], None],
) -> tuple[torch.nn.Module, list[tuple[int, float]], Path | None, float]:
    """Train ``params`` of ``model`` (a ``kind``, e.g. "DiffAE") for steps ``resume.step + 1 ..
    cfg.steps`` (module docstring: batches and noise from the step's seed):
    ``loss_fn(x0, generator=...).loss``, clipping, Adam or RAdam, the EMA; with ``out``, a
    checkpoint ``save_weights(path, step=, model=, ema=, optim=)`` every ``ckpt_every`` steps
    and at the end. Returns (EMA module, (step, mean loss) per log window, last checkpoint,
    seconds); TrainingDiverged on a non-finite loss, ``name`` naming the run in messages."""
    if len(data) < 1:  # type: ignore[arg-type]
        raise DataError("the training data set is empty")
    ema = EMA(model, cfg.ema_decay)
    opt_cls = torch.optim.RAdam if cfg.optimizer == "radam" else torch.optim.Adam
    optimizer = opt_cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start_step = 0
    if resume is not None:
        load_state_strict(model, resume.model, kind, resume.path)
        load_state_strict(ema.module, resume.ema, f"{kind} EMA", resume.path)
        if resume.optim is not None:
            optimizer.load_state_dict(resume.optim)
        start_step = resume.step
    if start_step > cfg.steps:
        raise ConfigError(f"the checkpoint is at step {start_step}, past the preset's {cfg.steps} steps")
    ckpt_dir = Path(out) / "checkpoints" if out is not None else None

    def save(step: int) -> Path | None:
        if ckpt_dir is None:
            return None
        return save_weights(ckpt_dir / checkpoint_name(step), step=step, model=model.state_dict(),
                            ema=ema.state_dict(), optim=optimizer.state_dict())

    batches = StepBatchSampler(len(data), cfg.batch_size, cfg.seed, start_step, cfg.steps)  # type: ignore[arg-type]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start_step, desc=f"train {name}", unit="step", dynamic_ncols=True)
    losses: list[tuple[int, float]] = []
    window = torch.zeros((), device=device)
    window_n = 0
    path: Path | None = None
    began = time.perf_counter()
    model.train()
    try:
        for step in range(start_step + 1, cfg.steps + 1):
            seed = step_seed(cfg.seed, step)
            torch.manual_seed(seed)  # dropout
            generator = torch.Generator(device).manual_seed(seed)
            x0 = _batch(data, batches.indices(step - 1), device)
            loss = loss_fn(x0, generator=generator).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            ema.update(model)
            window += loss.detach()
            window_n += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                mean_loss = float(window) / window_n
                if not math.isfinite(mean_loss):
                    raise TrainingDiverged(f"the {name} loss became {mean_loss} by step {step}; lower the learning rate")
                losses.append((step, mean_loss))
                window.zero_()
                window_n = 0
                if bar is not None:
                    bar.set_postfix(loss=f"{mean_loss:.4f}")
            if bar is not None:
                bar.update(1)
            if step % cfg.ckpt_every == 0 and step < cfg.steps:
                path = save(step)
    finally:
        if bar is not None:
            bar.close()
    if cfg.steps > start_step or path is None:
        path = save(cfg.steps)
    seconds = time.perf_counter() - began
    if losses:
        log(f"{name} trained to step {cfg.steps} in {seconds:.1f} s; last loss {losses[-1][1]:.4f}")
    return ema.module, losses, path, seconds


def train_diffae(
    preset: DiffAEPreset,
    data: Dataset,
    *,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> DiffAETrainResult:
    """Train ``preset`` on ``data`` (items: images in [-1, 1], or (image, ...) tuples) for
    ``preset.train.steps`` steps (module docstring). With ``out``, checkpoints go to
    ``out/checkpoints`` every ``ckpt_every`` steps and at the end. ``resume`` continues
    from a checkpoint of the same preset (same batches and noise as an uninterrupted run)."""
    cfg = preset.train
    device = torch.device(device)
    torch.manual_seed(cfg.seed)  # the initial weights are part of what the seed fixes
    model = DiffAE(preset.model).to(device)
    ckpt = None
    if resume is not None:
        ckpt = read_diffae_checkpoint(resume)
        if ckpt.preset.model != preset.model:
            raise CheckpointError(f"{ckpt.path} holds another DiffAE model configuration than this preset")

    def save_weights(path: Path, **weights) -> Path:
        return save_diffae(path, preset=preset, **weights)

    ema, losses, path, seconds = fit("DiffAE", "DiffAE", model, list(model.parameters()), model.loss, data, cfg,
                                     resume=ckpt, save_weights=save_weights, out=out, device=device,
                                     progress=progress, log=log)
    return DiffAETrainResult(model, ema, cfg.steps, losses, seconds, path)
