"""Seeded two-stage training of the PDAE baseline with the one loop
(:class:`dbae.training.Trainer`; the seeded steps: :mod:`.objective`), and its checkpoints.

Stage ``"ddpm"`` (:func:`train_ddpm`): the unconditional eps network alone, DDPM's simple
loss (PDAE's "pre-trained" model; with a public checkpoint this stage is skipped).
Stage ``"pdae"`` (:func:`train_pdae`): start from a stage-1 model (its EMA weights), freeze
eps_theta, train encoder + G with PDAE's weighted loss; the optimizer sees only those.

Checkpoints (:data:`FORMAT`, laid out as :mod:`.formats` says): ``model.*`` / ``ema.*`` hold
the whole PDAE module (eps_net, encoder, gradient_net); metadata ``stage`` is ``ddpm`` or
``pdae``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from ..checkpoints import Checkpoint, load_weights
from ..errors import CheckpointError, ConfigError
from .formats import BaselineFormat
from .objective import BaselineObjective, BaselineTrainResult, fit_baseline
from .pdae import PDAE
from .pdae_config import PDAEPreset, pdae_preset_from_dict, pdae_preset_to_json

FORMAT = "dbae-pdae-checkpoint/1"
PDAE_FORMAT = BaselineFormat(FORMAT, "PDAE", pdae_preset_to_json, pdae_preset_from_dict, stages=("ddpm", "pdae"))
Stage = Literal["ddpm", "pdae"]


def save_pdae(path: Path, *, preset: PDAEPreset, stage: Stage, **state: Any) -> Path:
    """Write one PDAE checkpoint of ``stage`` atomically (``state``: as :func:`.train.save_diffae`'s)."""
    return PDAE_FORMAT.save(path, preset=preset, stage=stage, **state)


def read_pdae_checkpoint(path: str | Path) -> Checkpoint:
    """Read and validate a PDAE checkpoint; CheckpointError for a missing, corrupt or foreign
    file, or unreadable metadata."""
    return PDAE_FORMAT.read(path)


def load_pdae(
    path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu"
) -> tuple[PDAE, PDAEPreset, Stage]:
    """The PDAE of a checkpoint (its EMA weights unless ``ema=False``) in eval mode, with the
    DDPM frozen when the checkpoint is of stage ``pdae``; its preset and stage."""
    ckpt = read_pdae_checkpoint(path)
    model = load_weights(PDAE(ckpt.preset.model), ckpt.model, ckpt.ema, ema, "PDAE", ckpt.path)
    if ckpt.stage == "pdae":
        model.freeze_ddpm()
    return model.to(device).eval(), ckpt.preset, ckpt.stage  # type: ignore[return-value]


def _objective(stage: Stage, preset: PDAEPreset, model: PDAE, params: list[torch.nn.Parameter], data: Dataset
               ) -> BaselineObjective:  # fmt: skip
    loss = PDAE.ddpm_loss if stage == "ddpm" else PDAE.loss
    cfg = preset.ddpm_train if stage == "ddpm" else preset.train
    return BaselineObjective(f"PDAE ({stage})", model, params, loss, cfg, data, PDAE_FORMAT, preset, stage)


def train_ddpm(preset: PDAEPreset, data: Dataset, **options: Any) -> BaselineTrainResult:
    """Stage 1: the unconditional DDPM eps_theta of ``preset`` on ``data`` for
    ``preset.ddpm_train.steps`` steps (only eps_net is optimised; the result holds a whole
    PDAE module whose encoder and G are untouched initial weights). ``options``: ``out``,
    ``resume``, ``device``, ``progress`` and ``log`` of :func:`.objective.fit_baseline`."""
    torch.manual_seed(preset.ddpm_train.seed)
    model = PDAE(preset.model)
    return fit_baseline(_objective("ddpm", preset, model, list(model.eps_net.parameters()), data), **options)


def train_pdae(preset: PDAEPreset, data: Dataset, pretrained: PDAE | str | Path, **options: Any
               ) -> BaselineTrainResult:  # fmt: skip
    """Stage 2: PDAE's encoder + G on ``data`` for ``preset.train.steps`` steps, starting from
    ``pretrained`` (a stage-1 PDAE, e.g. ``train_ddpm(...).ema``, or a checkpoint path of
    either stage) whose eps network is copied and frozen; encoder and G start from fresh
    seeded weights (G's zero output layer: the start model is exactly the DDPM).
    ``options``: as :func:`train_ddpm`'s."""
    if not isinstance(pretrained, PDAE):
        pretrained, ckpt_preset, _ = load_pdae(pretrained)
        if ckpt_preset.model.unet != preset.model.unet:
            raise CheckpointError("the pre-trained DDPM has another U-Net configuration than this preset")
    elif pretrained.config.unet != preset.model.unet or pretrained.config.image_size != preset.model.image_size:
        raise ConfigError("the pre-trained DDPM has another U-Net configuration than this preset")
    torch.manual_seed(preset.train.seed)
    model = PDAE(preset.model)
    model.eps_net.load_state_dict(pretrained.eps_net.state_dict())
    model.freeze_ddpm()
    return fit_baseline(_objective("pdae", preset, model, model.trainable_parameters(), data), **options)


__all__ = ["FORMAT", "PDAE_FORMAT", "load_pdae", "read_pdae_checkpoint", "save_pdae", "train_ddpm", "train_pdae"]
