"""Append-only JSON-lines metrics log (one object per line, flushed after each write), and the
mean loss of each log window."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLog:
    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        self._fh = open(self.path, "a")

    def _truncate_after(self, step: int) -> None:
        """Drop records newer than ``step`` (written after the checkpoint we resume from)."""
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
        self.path.write_text("".join(f"{line}\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class LossWindow:
    """The mean loss over each log window: summed on the device step by step (no wait for
    it), read once per window; ``means`` holds (step, mean) of every closed window."""

    def __init__(self, device: torch.device | str) -> None:
        self.total = torch.zeros((), device=device)
        self.count = 0
        self.means: list[tuple[int, float]] = []

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss.detach()
        self.count += 1

    def close(self, step: int) -> float:
        """The mean of the window that ends at ``step``; starts the next one."""
        mean = float(self.total) / max(self.count, 1)
        self.means.append((step, mean))
        self.total.zero_()
        self.count = 0
        return mean
