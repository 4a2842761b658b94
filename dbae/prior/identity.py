"""Which autoencoder a latent set or a prior belongs to: the checkpoint's SHA-256.

Latents inferred by one autoencoder mean nothing to another (even the same
architecture after more training steps), so latent sets and priors record the SHA-256 of
the autoencoder checkpoint file and which of its weights (EMA or raw) made the latents;
every consumer checks both before use.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from ..errors import CheckpointError, DBAEError

_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(_CHUNK), b""):
                digest.update(block)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path} to hash it ({exc})") from None
    return digest.hexdigest()


@dataclass(frozen=True)
class AutoencoderRef:
    """Identity of the autoencoder behind a latent set or a prior.

    ``sha256``: hash of the checkpoint file; ``weights``: "ema" or "raw"; ``path``,
    ``step``, ``preset``, ``z_dim``: where it was found and what it is (for messages).
    """

    sha256: str
    weights: str
    path: str
    step: int
    preset: str
    z_dim: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: Path) -> "AutoencoderRef":
        try:
            return cls(str(data["sha256"]), str(data["weights"]), str(data["path"]), int(data["step"]),
                       str(data["preset"]), int(data["z_dim"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: unreadable autoencoder record ({exc!r})") from None

    @classmethod
    def of(cls, path: Path, *, ema: bool, step: int, preset: str, z_dim: int) -> "AutoencoderRef":
        """The identity of checkpoint ``path`` used with its EMA (``ema``) or raw weights."""
        return cls(weights_sha256(path), "ema" if ema else "raw", str(path), step, preset, z_dim)


def weights_sha256(path: str | Path) -> str:
    """The SHA-256 that identifies the weights of checkpoint ``path``: of the file itself, or,
    for a checkpoint that ``dbae import`` converted from another code base's file, of that
    file (so that the authors' file, loaded directly, and its import are one autoencoder)."""
    from ..checkpoints import read_header
    from ..checkpoints.foreign import is_torch_pickle
    from ..checkpoints.imports import imported_record

    if not is_torch_pickle(path):
        record = imported_record(read_header(path))
        if record is not None and isinstance(record.get("source_sha256"), str):
            return record["source_sha256"]
    return file_sha256(path)


def identify_checkpoint(path: str | Path, *, ema: bool = True) -> AutoencoderRef:
    """The identity of autoencoder checkpoint ``path`` (a file, or a run directory: its
    newest checkpoint), read from its header and bytes without building the model (an
    authors' file is read and converted)."""
    from ..config import preset_from_dict
    from ..checkpoints import read_metadata, resolve_checkpoint
    from ..checkpoints.foreign import is_torch_pickle
    from ..checkpoints.imports import read_foreign

    path = resolve_checkpoint(path)
    if is_torch_pickle(path):
        foreign = read_foreign(path)
        return AutoencoderRef.of(path, ema=ema, step=foreign.step, preset=foreign.preset.name,
                                 z_dim=foreign.preset.model.z_dim)  # fmt: skip
    meta = read_metadata(path)
    try:
        preset = preset_from_dict(json.loads(meta["preset"]))
        step = int(meta["step"])
    except (KeyError, ValueError, DBAEError) as exc:
        raise CheckpointError(f"{path} has unreadable metadata ({exc})") from None
    return AutoencoderRef.of(path, ema=ema, step=step, preset=preset.name, z_dim=preset.model.z_dim)


def check_same_autoencoder(
    recorded: AutoencoderRef, actual: AutoencoderRef, what: str, source: Path,
    remedy: str = "Infer latents and train a prior for this checkpoint",
) -> None:  # fmt: skip
    """Raise :class:`CheckpointError` unless ``what`` (read from ``source``) was made by
    the autoencoder ``actual`` with the same weights (``remedy``: what to do otherwise)."""
    if recorded.sha256 != actual.sha256:
        raise CheckpointError(
            f"{what} {source} belongs to another autoencoder: it was made from {recorded.path} "
            f"(step {recorded.step}, sha256 {recorded.sha256[:12]}...), but the checkpoint given is "
            f"{actual.path} (step {actual.step}, sha256 {actual.sha256[:12]}...). "
            f"{remedy}, or pass the matching one"
        )
    if recorded.weights != actual.weights:
        raise CheckpointError(
            f"{what} {source} was made with the {recorded.weights} weights of {recorded.path}, but the "
            f"{actual.weights} weights were asked for" + (" (drop --raw-weights)" if recorded.weights == "ema"
                                                         else " (add --raw-weights)")
        )
