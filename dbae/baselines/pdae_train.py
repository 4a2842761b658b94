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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch.utils.data import Dataset

from ..errors import CheckpointError, ConfigError
from ..checkpoints import (
    load_state_strict,
    read_tagged_safetensors,
    split_weights,
    write_weights_file,
)
from .config import DiffAETrainConfig
from .pdae import PDAE
from .pdae_config import PDAEPreset, pdae_preset_from_dict, pdae_preset_to_json
from .train import fit

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
    extra: dict[str, str] | None = None,
    before_replace: Callable[[str], None] | None = None,
) -> Path:
    """Write one PDAE checkpoint atomically (module docstring); ``extra`` and
    ``before_replace`` as :func:`dbae.baselines.train.save_diffae`'s."""
    if stage not in ("ddpm", "pdae"):
        raise ConfigError(f"stage must be 'ddpm' or 'pdae', got {stage!r}")
    metadata = {**(extra or {}), "format": FORMAT, "preset": pdae_preset_to_json(preset), "stage": stage,
                "step": str(step)}  # fmt: skip
    return write_weights_file(Path(path), metadata, model, ema, optim, before_replace)


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
    model, ema, optim = split_weights(path, tensors, optim_meta)
    return PDAECheckpoint(path, preset, stage, step, model, ema, optim)  # type: ignore[arg-type]


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
    ckpt = None
    if resume is not None:
        ckpt = read_pdae_checkpoint(resume)
        if ckpt.preset.model != preset.model:
            raise CheckpointError(f"{ckpt.path} holds another PDAE model configuration than this preset")
        if ckpt.stage != stage:
            raise CheckpointError(f"{ckpt.path} is a stage-{ckpt.stage!r} checkpoint, not stage {stage!r}")

    def save_weights(path: Path, **weights) -> Path:
        return save_pdae(path, preset=preset, stage=stage, **weights)

    loss_fn = model.ddpm_loss if stage == "ddpm" else model.loss
    ema, losses, path, seconds = fit(f"PDAE ({stage})", "PDAE", model, params, loss_fn, data, cfg, resume=ckpt,
                                     save_weights=save_weights, out=out, device=device, progress=progress, log=log)
    return PDAETrainResult(model, ema, stage, cfg.steps, losses, seconds, path)


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
