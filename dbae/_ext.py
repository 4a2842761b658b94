"""Loads the compiled extension ``dbae._C`` when it was built; ``None`` otherwise.

Set ``DBAE_KERNELS=reference`` to ignore the extension and use the pure-PyTorch
reference everywhere.
"""

from __future__ import annotations

import os
from types import ModuleType


def _load() -> ModuleType | None:
    if os.environ.get("DBAE_KERNELS", "auto").lower() == "reference":
        return None
    try:
        from . import _C
    except ImportError:
        return None
    return _C


C: ModuleType | None = _load()
