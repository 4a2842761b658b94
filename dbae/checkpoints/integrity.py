"""Safetensors files that carry their own check, and the one reader that checks them.

Every safetensors file the package writes (the checkpoints of DBAE, DiffAE and PDAE, latent
priors, latent sets, attribute classifiers, ``dbae encode`` outputs) goes through
:func:`write_safetensors`, which adds two entries to the header's string metadata:

- ``dbae_sha256_tensors``: the sha256 of the tensor data. The digest is taken over the
  tensors in sorted name order; for each, ``name \\0 dtype \\0 d0,d1,... \\0`` (UTF-8) and
  then its raw bytes in C order, as stored. It does not depend on how safetensors lays the
  tensors out in the file.
- ``dbae_sha256_metadata``: the sha256 of the other metadata entries, as compact JSON with
  sorted keys (the configuration, the step, the optimizer's scalars, ...).

So a file checks itself wherever it is copied. Every read goes through
:func:`read_safetensors`, which

1. checks the file against ``manifest.json`` when the folder holding it has one that lists
   it (the trainers' checkpoint folders: :mod:`dbae.checkpoints.manifest`), size then sha256;
2. reads it (a truncated file or a header that no longer parses is an error);
3. recomputes both digests and compares them with the embedded ones.

Any difference is one :class:`~dbae.errors.CheckpointError` naming the file and what differs.
A file written before the digests existed still loads, with one warning per file and process.
A file that passed all checks is not hashed again in the same process while its size,
modification and change times are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from .atomic import atomic_write
from . import manifest

#: metadata key of the sha256 of the tensor data
TENSORS_KEY = "dbae_sha256_tensors"
#: metadata key of the sha256 of the other metadata entries
METADATA_KEY = "dbae_sha256_metadata"
_CHECK_KEYS = (TENSORS_KEY, METADATA_KEY)

#: files checked in this process: resolved path -> (size, mtime_ns, ctime_ns, inode) when checked
_checked: dict[str, tuple[int, int, int, int]] = {}
#: files already warned about (written without the digests)
_warned: set[str] = set()


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """The digest stored under :data:`TENSORS_KEY` (see the module's docstring)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        shape = ",".join(str(d) for d in t.shape)
        h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{shape}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def metadata_sha256(metadata: dict[str, str]) -> str:
    """The digest stored under :data:`METADATA_KEY`: of every entry but the two digests."""
    rest = {k: v for k, v in metadata.items() if k not in _CHECK_KEYS}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def with_digests(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> dict[str, str]:
    """``metadata`` plus the two digests of ``tensors`` and of it."""
    meta = {k: v for k, v in (metadata or {}).items() if k not in _CHECK_KEYS}
    for key, value in meta.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"safetensors metadata must map str to str, got {key!r}: {type(value).__name__}")
    meta[METADATA_KEY] = metadata_sha256(meta)
    meta[TENSORS_KEY] = tensors_sha256(tensors)
    return meta


def write_safetensors(
    path: Path | str,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    before_replace: Callable[[str], None] | None = None,
) -> Path:
    """Write ``tensors`` (moved to the CPU, made contiguous) and ``metadata`` with their
    digests, atomically (:func:`dbae.checkpoints.atomic.atomic_write`; ``before_replace``
    runs on the finished temporary file, e.g. to record it in a manifest).

    Tensors are written from their own memory, not copied first (safetensors writes from
    pointers), so a file takes no more memory to write than its tensors already hold; only
    a tensor that overlaps another one in memory (the same data under two names) is copied."""
    tensors = _without_overlaps({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
    meta = with_digests(tensors, metadata)
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta), before_replace)
    return Path(path)


def _without_overlaps(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with a copy of each one whose bytes overlap another one's (safetensors
    refuses overlapping tensors; views of one storage that do not overlap are fine)."""
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), name)
                   for name, t in tensors.items() if t.numel())
    overlapping, reach = set(), 0
    for start, end, name in spans:
        if start < reach:
            overlapping.add(name)
        reach = max(reach, end)
    return {name: t.clone() if name in overlapping else t for name, t in tensors.items()}


def _stamp(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def _check_manifest(path: Path) -> bool:
    """:func:`dbae.checkpoints.manifest.verify` (True: the manifest beside ``path`` lists it and
    its size and sha256 match; False: no entry; CheckpointError: they differ)."""
    try:
        return manifest.verify(path)
    except OSError as exc:
        raise _corrupt(path, exc) from None


def _corrupt(path: Path, exc: BaseException) -> CheckpointError:
    return CheckpointError(f"{path} is corrupt, truncated or not a safetensors file ({exc})")


def read_header(path: Path | str) -> dict[str, str]:
    """The string metadata of a safetensors file (its header only: nothing is verified but
    that the header parses); CheckpointError for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no file at {path}" if not path.exists() else f"{path} is not a file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        error = _corrupt(path, exc)
    _check_manifest(path)  # says what the manifest recorded, when it lists the file
    raise error


def check_digests(path: Path, metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> bool:
    """CheckpointError when the embedded digests of ``path`` (read as ``metadata`` and
    ``tensors``) differ from the contents; False when it has none (an older file)."""
    if TENSORS_KEY not in metadata and METADATA_KEY not in metadata:
        return False
    if metadata.get(METADATA_KEY) != metadata_sha256(metadata):
        raise CheckpointError(f"{path} is damaged: its header metadata (configuration, step, ...) does not match "
                              f"the sha256 recorded in its header ({METADATA_KEY})")  # fmt: skip
    if metadata.get(TENSORS_KEY) != tensors_sha256(tensors):
        raise CheckpointError(f"{path} is damaged: its tensor data (the weights) does not match the sha256 "
                              f"recorded in its header ({TENSORS_KEY})")  # fmt: skip
    return True


def read_safetensors(
    path: Path | str, warn: Callable[[str], Any] | None = None
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file, after the checks of the module's docstring
    (CheckpointError naming the file and what differs). The digests are left in the
    metadata. ``warn`` (default: stderr) gets the one warning for a file without digests."""
    path = Path(path)
    metadata = read_header(path)
    key = str(path.resolve())
    stamp = _stamp(path)
    known = _checked.get(key) == stamp
    in_manifest = False
    if not known:
        in_manifest = _check_manifest(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise _corrupt(path, exc) from None
    if known:
        return metadata, tensors
    if check_digests(path, metadata, tensors):
        _checked[key] = stamp
    elif key not in _warned:
        _warned.add(key)
        checked = "checked against its manifest.json only" if in_manifest else "loaded without a check of its data"
        (warn or _stderr)(f"warning: {path} carries no sha256 of its own (written by an older dbae): {checked}; "
                          "save it again to add one")  # fmt: skip
    return metadata, tensors


def verify_file(path: Path | str) -> None:
    """CheckpointError unless ``path`` passes every check of :func:`read_safetensors`."""
    read_safetensors(path)


def forget_checks() -> None:
    """Forget which files passed their checks in this process (the next read hashes again)."""
    _checked.clear()


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


__all__ = [
    "METADATA_KEY", "TENSORS_KEY", "check_digests", "forget_checks", "metadata_sha256", "read_header",
    "read_safetensors", "tensors_sha256", "verify_file", "with_digests", "write_safetensors",
]
