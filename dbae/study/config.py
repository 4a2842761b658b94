"""The typed configuration of the paper-claims study (:mod:`dbae.study`).

Every method gets the same training budget: ``steps`` optimisation steps of ``batch_size``
images (PDAE: ``steps`` for its unconditional DDPM and ``steps`` for its encoder and
gradient estimator; its DDPM stands for the public pre-trained model the PDAE paper starts
from, so it is budget on top). The networks of every method are those of ``preset``
(:func:`dbae.baselines.diffae_preset` mirrors a DBAE preset's U-Net and encoder).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import PRESETS, check_positive_ints
from ..errors import ConfigError

#: the compared methods: DBAE, DBAE-d (deterministic encoder), DiffAE, PDAE
METHODS: tuple[str, ...] = ("dbae", "dbae-d", "diffae", "pdae")
LABELS: dict[str, str] = {"dbae": "DBAE", "dbae-d": "DBAE-d", "diffae": "DiffAE", "pdae": "PDAE"}


@dataclass(frozen=True)
class StudyConfig:
    """What the study trains and measures.

    - training: ``preset``, ``steps`` per method (and per PDAE stage), ``batch_size`` (None:
      the preset's), ``dataset`` ("shapes" or an image folder / zip / LMDB), ``seed``;
    - reconstruction: ``recon_images`` held-out images; DBAE decodes with ``dbae_nfe`` NFE
      from x_T = Dec(z); DiffAE / PDAE decode ``decode_steps`` DDIM steps from a random x_T
      (tractable) and from the DDIM-inverted x_T (``diffae_inversion_steps`` /
      ``pdae_inversion_steps``: the authors' 250 and 100);
    - probe and TAD (shapes only): ``probe_train`` / ``probe_test`` latents of the train /
      test splits, labels from the shapes factors;
    - latency: ``latency_batch`` images, median of ``latency_runs`` timed calls after
      ``latency_warmup`` untimed ones, reported per image;
    - ``grid_images``: images per row of the reconstruction grid.
    """

    preset: str = "shapes16"
    steps: int = 2000
    batch_size: int | None = None
    dataset: str = "shapes"
    seed: int = 0
    methods: tuple[str, ...] = METHODS
    recon_images: int = 256
    dbae_nfe: int = 10
    decode_steps: int = 100
    diffae_inversion_steps: int = 250
    pdae_inversion_steps: int = 100
    probe_train: int = 2000
    probe_test: int = 1000
    latency_batch: int = 16
    latency_runs: int = 5
    latency_warmup: int = 1
    grid_images: int = 8
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; choose one of: {', '.join(sorted(PRESETS))}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods or len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"methods must be distinct names from {', '.join(METHODS)}, got {list(self.methods)}")
        check_positive_ints(self, ("steps", "recon_images", "dbae_nfe", "decode_steps", "diffae_inversion_steps",
                                   "pdae_inversion_steps", "latency_batch", "latency_runs", "grid_images"))
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or self.batch_size < 1):
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size!r}")
        if self.probe_train < 2 or self.probe_test < 2:
            raise ConfigError(f"probe_train and probe_test must be >= 2, got {self.probe_train}, {self.probe_test}")
        if self.latency_warmup < 0:
            raise ConfigError(f"latency_warmup must be >= 0, got {self.latency_warmup}")

    def replace(self, **changes: object) -> "StudyConfig":
        """A copy with the given (non-None) fields changed."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def smoke_config() -> StudyConfig:
    """A seconds-long run of the whole pipeline (tiny16 networks, a few steps): for tests,
    not for conclusions."""
    return StudyConfig(
        preset="tiny16", steps=3, batch_size=8, recon_images=8, dbae_nfe=2, decode_steps=3,
        diffae_inversion_steps=3, pdae_inversion_steps=3, probe_train=48, probe_test=32, latency_batch=4,
        latency_runs=1, latency_warmup=0, grid_images=4,
    )  # fmt: skip


__all__ = ["LABELS", "METHODS", "StudyConfig", "smoke_config"]
