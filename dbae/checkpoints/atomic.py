"""Writing files so that a crash never leaves a half-written file under its final name.

A file is first written to a hidden temporary name in the same directory, flushed to disk,
then renamed over the final name (and the directory entry flushed too). Every file the
package writes (checkpoints, manifests, reports, exports) goes through :func:`atomic_write`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


#: suffix of the temporary files of :func:`atomic_write` (hidden: named ``.<final name>.<random>.tmp``)
PARTIAL_SUFFIX = ".tmp"


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write, before_replace: Callable[[str], None] | None = None) -> None:
    """Call ``write(tmp_path)`` then atomically move the result to ``path``.

    ``before_replace(tmp_path)`` runs on the finished, flushed temporary file just before
    the rename (the trainer records the file's hash in the manifest there)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_partial_files(directory: Path) -> list[Path]:
    """Delete the temporary files that a killed process left in ``directory`` mid-write
    (never under a final name); returns them."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.name.startswith(".") and p.name.endswith(PARTIAL_SUFFIX)]
    for p in found:
        p.unlink(missing_ok=True)
    return found


def atomic_write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write(text)

    atomic_write(path, write)
