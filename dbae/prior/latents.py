"""Inferred latents of a dataset and their per-dimension statistics (SPEC section 7).

A latent set is stored next to its autoencoder checkpoint as
``<checkpoint stem>.latents.safetensors`` (tensors ``z`` (N, d) float32, ``mean`` (d,),
``std`` (d,); metadata ``format`` and ``info``, a JSON record) plus a readable
``<checkpoint stem>.latents.json`` with the same record and the statistics. The record
names the autoencoder by its checkpoint's SHA-256 (:mod:`.identity`), so a latent set is
never used with another autoencoder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..errors import CheckpointError, DataError
from ..model import DBAE
from ..checkpoints import atomic_write_text, read_tagged_safetensors, write_safetensors
from .identity import AutoencoderRef

FORMAT = "dbae-latents/1"
#: floor of a dimension's std, so that a dead (constant) dimension normalizes to 0, not inf
STD_FLOOR = 1e-5


@dataclass(frozen=True)
class LatentInfo:
    """Where a latent set came from: the autoencoder, the data (``dataset`` spec as given
    to :func:`dbae.data.build_dataset`, ``split``, ``seed``, ``count`` images) and
    whether z was sampled from a stochastic encoder (``sampled``) or is its mean."""

    autoencoder: AutoencoderRef
    dataset: str
    split: str
    seed: int
    count: int
    sampled: bool

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "autoencoder": self.autoencoder.to_dict()}


@dataclass(frozen=True)
class LatentSet:
    """Latents ``z`` (N, d) float32 with their per-dimension ``mean`` and ``std`` (d,)."""

    z: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    info: LatentInfo

    @classmethod
    def from_latents(cls, z: torch.Tensor, info: LatentInfo) -> "LatentSet":
        z = z.detach().float().cpu().contiguous()
        if z.dim() != 2 or z.shape[0] < 2:
            raise DataError(f"need at least 2 latent vectors (N, d) for statistics, got shape {tuple(z.shape)}")
        z64 = z.double()
        return cls(z, z64.mean(0).float(), z64.std(0).clamp(min=STD_FLOOR).float(), info)

    @property
    def z_dim(self) -> int:
        return self.z.shape[1]

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """(z - mean) / std, per dimension."""
        return (z - self.mean.to(z)) / self.std.to(z)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """mean + std * z, per dimension (inverse of :meth:`normalize`)."""
        return self.mean.to(z) + self.std.to(z) * z


def default_latents_path(checkpoint: Path) -> Path:
    """``<dir>/<stem>.latents.safetensors`` next to an autoencoder checkpoint file."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.latents.safetensors")


@torch.no_grad()
def infer_latents(
    model: DBAE,
    dataset: Dataset,
    count: int,
    *,
    batch_size: int = 256,
    sample: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """z (count, d) float32 on the CPU of the first ``count`` items of ``dataset`` (items
    are ``(image, ...)``); the encoder mean unless ``sample``."""
    if count < 2:
        raise DataError(f"need at least 2 images to compute latent statistics, got {count}")
    if count > len(dataset):
        raise DataError(f"asked for {count} images but the dataset holds only {len(dataset)}")
    device = next(model.parameters()).device
    starts = range(0, count, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="infer latents", unit="batch", dynamic_ncols=True)
    chunks = []
    for start in starts:
        x = torch.stack([dataset[i][0] for i in range(start, min(start + batch_size, count))])
        z = model.encode(x.to(device), sample=sample, generator=generator)
        if not torch.isfinite(z).all():
            raise DataError(f"the encoder produced non-finite latents for images {start}..{start + len(x) - 1}")
        chunks.append(z.float().cpu())
    return torch.cat(chunks)


def save_latents(path: Path, latents: LatentSet) -> Path:
    """Write the safetensors file and its JSON companion (both atomically)."""
    path = Path(path)
    info = json.dumps(latents.info.to_dict(), sort_keys=True)
    tensors = {"z": latents.z, "mean": latents.mean, "std": latents.std}
    write_safetensors(path, tensors, {"format": FORMAT, "info": info})
    summary = {
        **latents.info.to_dict(),
        "z_dim": latents.z_dim,
        "mean": [round(v, 6) for v in latents.mean.tolist()],
        "std": [round(v, 6) for v in latents.std.tolist()],
    }
    atomic_write_text(path.with_suffix(".json"), json.dumps(summary, indent=2) + "\n")
    return path


def load_latents(path: Path, *, checkpoint_hint: str | None = None) -> LatentSet:
    """Read a latent set; clear :class:`CheckpointError` when it is missing or unreadable.
    ``checkpoint_hint`` names the checkpoint in the "run infer-latents first" message."""
    path = Path(path)
    if not path.is_file():
        target = checkpoint_hint or "<checkpoint>"
        raise CheckpointError(
            f"no latent statistics at {path}; compute them first with `dbae infer-latents --ckpt {target}`"
            " (or pass --latents)"
        )
    meta, tensors = read_tagged_safetensors(path, FORMAT, "dbae latent set")
    try:
        raw = json.loads(meta["info"])
        info = LatentInfo(
            autoencoder=AutoencoderRef.from_dict(raw["autoencoder"], path),
            dataset=str(raw["dataset"]), split=str(raw["split"]), seed=int(raw["seed"]),
            count=int(raw["count"]), sampled=bool(raw["sampled"]),
        )
        z, mean, std = tensors["z"], tensors["mean"], tensors["std"]
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} has unreadable metadata or tensors ({exc!r})") from None
    d = z.shape[1] if z.dim() == 2 else -1
    if z.dim() != 2 or mean.shape != (d,) or std.shape != (d,) or d != info.autoencoder.z_dim:
        raise CheckpointError(
            f"{path}: inconsistent shapes (z {tuple(z.shape)}, mean {tuple(mean.shape)}, std {tuple(std.shape)}, "
            f"z_dim {info.autoencoder.z_dim})"
        )
    return LatentSet(z.float(), mean.float(), std.float(), info)
