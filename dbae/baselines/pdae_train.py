"""Seeded two-stage training of the PDAE baseline, and its checkpoints.

Stage ``"ddpm"`` (:func:`train_ddpm`): the unconditional eps network alone, DDPM's simple
loss (PDAE's "pre-trained" model; with a public checkpoint this stage is skipped).
Stage ``"pdae"`` (:func:`train_pdae`): start from a stage-1 model (its EMA weights), freeze
eps_theta, train encoder + G with PDAE's weighted loss; the optimizer sees only those.

Each step ``s`` (1-based) takes ``StepBatchSampler(len(data), B, seed).indices(s-1)`` and
draws t and eps from a generator seeded by ``step_seed(seed, s)`` (as
:mod:`dbae.baselines.train`), so runs are pure functions of preset, data and start model.

Checkpoints (``<out>/checkpoints/step-XXXXXXXX.safetensors``): safetensors written atomically,
never pickle: tensors ``model.*`` / ``ema.*`` (the whole PDAE module: eps_net, encoder,
gradient_net), ``optim.<i>.<key>``; metadata ``format`` (:data:`FORMAT`), ``preset`` (JSON),
``stage`` (``ddpm`` or ``pdae``), ``step``, ``optim`` (JSON).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from safetensors.torch import save_file
from torch.utils.data import Dataset

from ..errors import CheckpointError, ConfigError, DataError, TrainingDiverged
from ..training.batches import StepBatchSampler, step_seed
from ..training.checkpoint import (
    _flatten_optimizer,
    _unflatten_optimizer,
    atomic_write,
    checkpoint_name,
    load_state_strict,
    read_tagged_safetensors,
)
from ..training.ema import EMA
from .config import DiffAETrainConfig
from .pdae import PDAE
from .pdae_config import PDAEPreset, pdae_preset_from_dict, pdae_preset_to_json
from .train import _batch

FORMAT = "dbae-pdae-checkpoint/1"
Stage = Literal["ddpm", "pdae"]


# ----- checkpoints -----
def save_pdae(
    path: Path,
    *,
    preset: PDAEPreset,
    stage: Stage,
    step: int,
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor],
    optim: dict[str, Any] | None = None,
) -> Path:
    """Write one PDAE checkpoint atomically (module docstring)."""
    if stage not in ("ddpm", "pdae"):
        raise ConfigError(f"stage must be 'ddpm' or 'pdae', got {stage!r}")
    tensors = {f"model.{k}": v for k, v in model.items()}
    tensors.update({f"ema.{k}": v for k, v in ema.items()})
    metadata = {"format": FORMAT, "preset": pdae_preset_to_json(preset), "stage": stage, "step": str(step)}
    if optim is not None:
        optim_tensors, optim_meta = _flatten_optimizer(optim)
        tensors.update(optim_tensors)
        metadata["optim"] = json.dumps(optim_meta)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


@dataclass
class PDAECheckpoint:
    path: Path
    preset: PDAEPreset
    stage: Stage
    step: int
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optim: dict[str, Any] | None


def read_pdae_checkpoint(path: str | Path) -> PDAECheckpoint:
    """Read and validate a PDAE checkpoint; CheckpointError for a missing, corrupt or foreign
    file, or unreadable metadata."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no PDAE checkpoint at {path}")
    meta, tensors = read_tagged_safetensors(path, FORMAT, "PDAE checkpoint")
    try:
        preset = pdae_preset_from_dict(json.loads(meta["preset"]))
        step = int(meta["step"])
        stage = meta["stage"]
        if stage not in ("ddpm", "pdae"):
            raise ValueError(f"unknown stage {stage!r}")
        optim_meta = json.loads(meta["optim"]) if "optim" in meta else None
    except (KeyError, ValueError, ConfigError) as exc:
        raise CheckpointError(f"{path} has unreadable metadata ({exc})") from None
    groups: dict[str, dict[str, torch.Tensor]] = {"model": {}, "ema": {}, "optim": {}}
    for name, value in tensors.items():
        head, _, rest = name.partition(".")
        if head not in groups:
            raise CheckpointError(f"{path} holds an unexpected tensor {name!r}")
        groups[head][rest if head != "optim" else name] = value
    optim = _unflatten_optimizer(groups["optim"], optim_meta) if optim_meta is not None else None
    return PDAECheckpoint(path, preset, stage, step, groups["model"], groups["ema"], optim)  # type: ignore[arg-type]


def load_pdae(
    path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu"
) -> tuple[PDAE, PDAEPreset, Stage]:
    """The PDAE of a checkpoint (its EMA weights unless ``ema=False``) in eval mode, with the
    DDPM frozen when the checkpoint is of stage ``pdae``; its preset and stage."""
    ckpt = read_pdae_checkpoint(path)
    model = PDAE(ckpt.preset.model)
    weights = ckpt.ema if ema and ckpt.ema else ckpt.model
    load_state_strict(model, weights, "PDAE EMA" if weights is ckpt.ema else "PDAE", ckpt.path)
    if ckpt.stage == "pdae":
        model.freeze_ddpm()
    return model.to(device).eval(), ckpt.preset, ckpt.stage


# ----- training -----
@dataclass
class PDAETrainResult:
    """``model``: raw weights; ``ema``: EMA copy (eval mode, what to sample from); ``losses``:
    (step, mean loss over the log window); ``path``: last checkpoint (None without ``out``)."""

    model: PDAE
    ema: PDAE
    stage: Stage
    step: int
    losses: list[tuple[int, float]]
    seconds: float
    path: Path | None


def _run(
    stage: Stage,
    preset: PDAEPreset,
    cfg: DiffAETrainConfig,
    model: PDAE,
    params: list[torch.nn.Parameter],
    data: Dataset,
    out: str | Path | None,
    resume: str | Path | None,
    device: torch.device,
    progress: bool,
    log: Callable[[str], None],
) -> PDAETrainResult:
    if len(data) < 1:  # type: ignore[arg-type]
        raise DataError("the training data set is empty")
    ema = EMA(model, cfg.ema_decay)
    opt_cls = torch.optim.RAdam if cfg.optimizer == "radam" else torch.optim.Adam
    optimizer = opt_cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start_step = 0
    if resume is not None:
        ckpt = read_pdae_checkpoint(resume)
        if ckpt.preset.model != preset.model:
            raise CheckpointError(f"{ckpt.path} holds another PDAE model configuration than this preset")
        if ckpt.stage != stage:
            raise CheckpointError(f"{ckpt.path} is a stage-{ckpt.stage!r} checkpoint, not stage {stage!r}")
        load_state_strict(model, ckpt.model, "PDAE", ckpt.path)
        load_state_strict(ema.module, ckpt.ema, "PDAE EMA", ckpt.path)
        if ckpt.optim is not None:
            optimizer.load_state_dict(ckpt.optim)
        start_step = ckpt.step
    if start_step > cfg.steps:
        raise ConfigError(f"the checkpoint is at step {start_step}, past the preset's {cfg.steps} steps")
    ckpt_dir = Path(out) / "checkpoints" if out is not None else None

    def save(step: int) -> Path | None:
        if ckpt_dir is None:
            return None
        return save_pdae(ckpt_dir / checkpoint_name(step), preset=preset, stage=stage, step=step,
                         model=model.state_dict(), ema=ema.state_dict(), optim=optimizer.state_dict())

    loss_fn = model.ddpm_loss if stage == "ddpm" else model.loss
    batches = StepBatchSampler(len(data), cfg.batch_size, cfg.seed, start_step, cfg.steps)  # type: ignore[arg-type]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start_step, desc=f"train PDAE ({stage})", unit="step", dynamic_ncols=True)
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
                    raise TrainingDiverged(
                        f"the PDAE ({stage}) loss became {mean_loss} by step {step}; lower the learning rate"
                    )
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
        log(f"PDAE ({stage}) trained to step {cfg.steps} in {seconds:.1f} s; last loss {losses[-1][1]:.4f}")
    return PDAETrainResult(model, ema.module, stage, cfg.steps, losses, seconds, path)


def train_ddpm(
    preset: PDAEPreset,
    data: Dataset,
    *,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> PDAETrainResult:
    """Stage 1: the unconditional DDPM eps_theta of ``preset`` on ``data`` for
    ``preset.ddpm_train.steps`` steps (only eps_net is optimised; the result holds a whole
    PDAE module whose encoder and G are untouched initial weights)."""
    cfg = preset.ddpm_train
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    model = PDAE(preset.model).to(device)
    return _run("ddpm", preset, cfg, model, list(model.eps_net.parameters()), data, out, resume, device,
                progress, log)


def train_pdae(
    preset: PDAEPreset,
    data: Dataset,
    pretrained: PDAE | str | Path,
    *,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> PDAETrainResult:
    """Stage 2: PDAE's encoder + G on ``data`` for ``preset.train.steps`` steps, starting from
    ``pretrained`` (a stage-1 PDAE, e.g. ``train_ddpm(...).ema``, or a checkpoint path of
    either stage) whose eps network is copied and frozen; encoder and G start from fresh
    seeded weights (G's zero output layer: the start model is exactly the DDPM)."""
    cfg = preset.train
    device = torch.device(device)
    if not isinstance(pretrained, PDAE):
        pretrained, ckpt_preset, _ = load_pdae(pretrained)
        if ckpt_preset.model.unet != preset.model.unet:
            raise CheckpointError("the pre-trained DDPM has another U-Net configuration than this preset")
    elif pretrained.config.unet != preset.model.unet or pretrained.config.image_size != preset.model.image_size:
        raise ConfigError("the pre-trained DDPM has another U-Net configuration than this preset")
    torch.manual_seed(cfg.seed)
    model = PDAE(preset.model)
    model.eps_net.load_state_dict(pretrained.eps_net.state_dict())
    model = model.to(device).freeze_ddpm()
    return _run("pdae", preset, cfg, model, model.trainable_parameters(), data, out, resume, device,
                progress, log)


__all__ = [
    "FORMAT", "PDAECheckpoint", "PDAETrainResult", "load_pdae", "read_pdae_checkpoint", "save_pdae",
    "train_ddpm", "train_pdae",
]
