"""Other projects' PyTorch checkpoints (``.pt``, ``.ckpt``), read safely.

Such a file is a pickle, and unpickling can run any code. This module reads them only with
``torch.load(weights_only=True)``: tensors, containers and plain values, plus, where a known
format needs it, named stand-in classes for harmless records (never the real class). A file
that needs anything else is refused with one line naming what it asks for.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import CheckpointError

#: suffixes of the pickled checkpoints read here (the authors' files: ``ema_0.9999_1020000.pt``,
#: DiffAE's ``last.ckpt``, PDAE's ``checkpoint.pt``, the classifiers' ``best.pt``)
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def is_torch_pickle(path: str | Path) -> bool:
    """Whether ``path`` is a file written by ``torch.save`` (a zip archive, or the legacy
    pickle stream), judged by its first bytes (not its name)."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        head = fh.read(2)
    return head == b"PK" or head == b"\x80\x02"


def load_weights_only(path: str | Path, *, stand_ins: Mapping[str, type] | None = None) -> Any:
    """The object in ``torch.save`` file ``path``, read with ``weights_only=True`` onto the
    CPU (memory-mapped where the format allows: the tensors are read from the file as they
    are used). ``stand_ins`` maps a dotted class name the file refers to onto a harmless
    class to build instead (for records such as Lightning's callback state).

    CheckpointError (one line) when the file is missing, not a PyTorch checkpoint, or needs
    arbitrary unpickling (naming the globals it asks for)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no file at {path}")
    allowed = [(cls, name) for name, cls in (stand_ins or {}).items()]
    mmap = zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise CheckpointError(_refusal(path, set(stand_ins or {}))) from None
    except (RuntimeError, EOFError, ValueError, KeyError, OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def _refusal(path: Path, allowed: set[str]) -> str:
    try:
        wanted = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed]
    except Exception:  # the legacy format cannot be scanned
        wanted = []
    what = f" (it asks for {', '.join(wanted[:5])}{', ...' if len(wanted) > 5 else ''})" if wanted else ""
    return (f"{path} cannot be read without arbitrary unpickling{what}; dbae reads PyTorch files only with "
            "torch.load(weights_only=True), so that a file cannot run code: save its state_dict alone")


def tensor_dict(obj: Any, path: Path, what: str) -> dict[str, torch.Tensor]:
    """``obj`` as a dict of name -> tensor (a state dict), or CheckpointError saying that
    ``path`` holds something else than ``what``."""
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path} does not hold {what} (found {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path} does not hold {what}: entry {bad[0]!r} is not a named tensor")
    return dict(obj)
