"""Loads the compiled extensions.

``dbae._C`` (pybind11, float64 sampler scalars): :data:`C`, ``None`` when it was not built.
``dbae/_ops.so`` (torch ops ``torch.ops.dbae.*``, the fused sampler steps): :func:`load_ops`,
called by :mod:`dbae.fused_step`, which also picks the backend.

Set ``DBAE_KERNELS=reference`` to ignore both and use the pure-PyTorch reference everywhere.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

#: file name of the torch-op library, installed next to ``_C`` in the ``dbae`` package
OPS_LIBRARY = "_ops.so"


def _load() -> ModuleType | None:
    if os.environ.get("DBAE_KERNELS", "auto").lower() == "reference":
        return None
    try:
        from . import _C
    except ImportError:
        return None
    return _C


def ops_library_path() -> Path | None:
    """Where ``_ops.so`` is (None when it was not built)."""
    package = importlib.import_module(__package__)
    found = [Path(d) / OPS_LIBRARY for d in package.__path__ if (Path(d) / OPS_LIBRARY).is_file()]
    return found[0] if found else None


def load_ops() -> str | None:
    """Registers the ``torch.ops.dbae.*`` kernels from ``_ops.so``; returns why not, or None.

    The library is a plain shared library (no Python module), so it is looked up in every
    directory of the package: an editable install keeps it apart from the sources.
    """
    import torch

    path = ops_library_path()
    if path is None:
        return f"{OPS_LIBRARY} was not built (was torch importable when the package was built?)"
    try:
        torch.ops.load_library(str(path))
    except OSError as e:
        return f"{path} failed to load: {e}"
    return None


C: ModuleType | None = _load()
