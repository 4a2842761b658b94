"""What the benchmark scripts share: the machine they ran on, and writing their JSON."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch


def machine() -> dict[str, Any]:
    """Where and when a measurement ran, and how busy the machine was."""
    return {"machine": platform.node(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "load_average": os.getloadavg()}  # fmt: skip


def write_json(path: Path | None, result: dict[str, Any]) -> None:
    """Write ``result`` to ``path`` (indented JSON, folders made) and say so; nothing for None."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
