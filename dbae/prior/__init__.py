"""The generative latent prior (SPEC section 7): inferred latents with their statistics,
an MLP-skip latent DDIM trained on them, and unconditional generation through the
autoencoder's decoder and bridge sampler.

Modules: :mod:`.config` (typed presets), :mod:`.identity` (which autoencoder a file
belongs to), :mod:`.latents` (inferring and storing z), :mod:`.network` (the MLP),
:mod:`.ddim` (loss and DDIM sampler), :mod:`.checkpoint` (prior files), :mod:`.train`
(training loop), :mod:`.generate` (sampling images).
"""

from .checkpoint import LoadedPrior, default_prior_dir, load_prior, resolve_prior, save_prior
from .config import (
    PRIOR_PRESETS,
    LatentDiffusionConfig,
    PriorNetConfig,
    PriorPreset,
    PriorTrainConfig,
    default_prior_preset,
    get_prior_preset,
    override_prior,
)
from .ddim import LatentDiffusion
from .generate import Generation, check_prior_fits, generate
from .identity import AutoencoderRef, check_same_autoencoder, file_sha256, identify_checkpoint
from .latents import LatentInfo, LatentSet, default_latents_path, infer_latents, load_latents, save_latents
from .network import MLPSkipNet
from .train import PriorTrainResult, train_prior

__all__ = [
    "PRIOR_PRESETS", "AutoencoderRef", "Generation", "LatentDiffusion", "LatentDiffusionConfig", "LatentInfo",
    "LatentSet", "LoadedPrior", "MLPSkipNet", "PriorNetConfig", "PriorPreset", "PriorTrainConfig",
    "PriorTrainResult", "check_prior_fits", "check_same_autoencoder", "default_latents_path",
    "default_prior_dir", "default_prior_preset", "file_sha256", "generate", "get_prior_preset",
    "identify_checkpoint", "infer_latents", "load_latents", "load_prior", "override_prior", "resolve_prior",
    "save_latents", "save_prior", "train_prior",
]
