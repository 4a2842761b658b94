"""Baselines of the DBAE paper built on the package's own networks.

- :mod:`.ddim`: DDPM's discrete linear schedule, deterministic DDIM sampling and inversion.
- :mod:`.diffae`: DiffAE (Preechakul et al. 2022): semantic encoder + z-conditioned eps U-Net.
- :mod:`.config`: typed configs and presets mirroring :mod:`dbae.config`.
- :mod:`.train`: a minimal seeded training loop with EMA and safetensors checkpoints.
"""

from __future__ import annotations

from .config import DIFFAE_PRESETS, DiffAEConfig, DiffAEPreset, DiffAETrainConfig, diffae_preset
from .ddim import DDIMResult, DDPMSchedule, ScheduleConfig, gaussian_eps
from .diffae import DiffAE, Decoding, DiffAELoss, Inversion, Reconstruction, ZConditionedUNet
from .train import DiffAETrainResult, load_diffae, save_diffae, train_diffae

__all__ = [
    "DDIMResult", "DDPMSchedule", "DIFFAE_PRESETS", "Decoding", "DiffAE", "DiffAEConfig", "DiffAELoss",
    "DiffAEPreset", "DiffAETrainConfig", "DiffAETrainResult", "Inversion", "Reconstruction",
    "ScheduleConfig", "ZConditionedUNet", "diffae_preset", "gaussian_eps", "load_diffae", "save_diffae",
    "train_diffae",
]
