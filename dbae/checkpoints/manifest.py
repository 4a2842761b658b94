"""The checkpoint manifest: the sha256 and size of every checkpoint of a run.

``<run>/checkpoints/manifest.json`` maps a checkpoint's file name to its hash, size and
step. A checkpoint's entry is written *before* the file is renamed to its final name (the
hash is taken of the finished temporary file), so every checkpoint under its final name has
an entry, and a file whose bytes no longer hash to it (a flipped bit, a truncated copy) is
detected and skipped on resume.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .atomic import atomic_write_text

MANIFEST = "manifest.json"
FORMAT = "dbae-manifest/1"


def sha256_file(path: Path | str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(directory: Path) -> dict[str, dict[str, Any]]:
    """name -> {"sha256", "bytes", "step"}; empty when there is no readable manifest."""
    path = Path(directory) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]


def _write(directory: Path, files: dict[str, dict[str, Any]]) -> None:
    text = json.dumps({"format": FORMAT, "files": dict(sorted(files.items()))}, indent=2) + "\n"
    atomic_write_text(Path(directory) / MANIFEST, text)


def record(directory: Path, name: str, finished: Path | str, step: int) -> None:
    """Enter ``name`` with the hash of the finished file ``finished`` (its temporary name);
    entries whose files are gone are dropped."""
    directory = Path(directory)
    files = {n: e for n, e in read_manifest(directory).items() if (directory / n).exists()}
    files[name] = {"sha256": sha256_file(finished), "bytes": Path(finished).stat().st_size, "step": step}
    _write(directory, files)


def forget(directory: Path, names: list[str]) -> None:
    """Drop the entries of deleted checkpoints ``names``."""
    files = read_manifest(directory)
    if any(n in files for n in names):
        _write(directory, {n: e for n, e in files.items() if n not in names})


def verify(path: Path) -> bool:
    """Check ``path`` against its manifest entry: True when it matches, False when the
    manifest has no entry for it (a run from before manifests); CheckpointError when the
    size or hash differs."""
    path = Path(path)
    entry = read_manifest(path.parent).get(path.name)
    if entry is None:
        return False
    size = path.stat().st_size
    if size != entry.get("bytes"):
        raise CheckpointError(
            f"{path} is truncated or corrupt: {size} bytes, the manifest recorded {entry.get('bytes')}"
        )
    if sha256_file(path) != entry.get("sha256"):
        raise CheckpointError(f"{path} is corrupt: its sha256 differs from the one recorded in {MANIFEST}")
    return True
