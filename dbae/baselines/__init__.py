"""Baselines of the DBAE paper built on the package's own networks.

- :mod:`.ddim`: DDPM's discrete linear schedule, deterministic DDIM sampling and inversion.
- :mod:`.diffae`: DiffAE (Preechakul et al. 2022): semantic encoder + z-conditioned eps U-Net.
- :mod:`.config`: typed configs and presets mirroring :mod:`dbae.config`.
- :mod:`.objective`: DiffAE and PDAE's stages as objectives of the one training loop
  (:class:`dbae.training.Trainer`); :mod:`.formats`: their checkpoint format.
- :mod:`.train`: DiffAE's checkpoints and training.
- :mod:`.pdae`, :mod:`.pdae_config`, :mod:`.pdae_train`: PDAE (Zhang et al. 2022): a frozen
  unconditional DDPM plus an encoder and a gradient estimator that shifts its eps; two-stage
  training.
- :mod:`.compare`: ``dbae bench compare``, the paper's Table 5 and Table 2 settings measured here.
- :mod:`.runs`: run directories of ``dbae train --method diffae|pdae`` (resume, PDAE's stages).
- :mod:`.checkpoints`: which method a checkpoint is (its format tag) and loading any of them.
- :mod:`.reconstruction`: batched reconstruction from the inverted or a random x_T.
"""

from __future__ import annotations

from .config import DIFFAE_PRESETS, DiffAEConfig, DiffAEPreset, DiffAETrainConfig, diffae_preset
from .ddim import DDIMResult, DDPMSchedule, ScheduleConfig, gaussian_eps
from .diffae import DiffAE, Decoding, DiffAELoss, Inversion, Reconstruction, ZConditionedUNet
from .pdae import PDAE, GradientUNet, PDAEDecoding, PDAEInversion, PDAELoss, PDAEReconstruction, UnconditionalUNet
from .pdae_config import PDAE_PRESETS, PDAEConfig, PDAEPreset, pdae_preset
from .objective import BaselineObjective, BaselineTrainResult
from .pdae_train import load_pdae, read_pdae_checkpoint, save_pdae, train_ddpm, train_pdae
from .train import load_diffae, save_diffae, train_diffae

__all__ = [
    "DDIMResult", "DDPMSchedule", "DIFFAE_PRESETS", "Decoding", "DiffAE", "DiffAEConfig", "DiffAELoss",
    "DiffAEPreset", "DiffAETrainConfig", "BaselineObjective", "BaselineTrainResult", "Inversion", "Reconstruction",
    "ScheduleConfig", "ZConditionedUNet", "diffae_preset", "gaussian_eps", "load_diffae", "save_diffae",
    "train_diffae", "PDAE", "GradientUNet", "PDAEDecoding", "PDAEInversion", "PDAELoss", "PDAEReconstruction",
    "UnconditionalUNet", "PDAE_PRESETS", "PDAEConfig", "PDAEPreset", "pdae_preset", "load_pdae",
    "read_pdae_checkpoint", "save_pdae", "train_ddpm", "train_pdae",
]
