"""The checkpoints of a run directory: write them with their hash, keep the last N and
the best one, and pick the one to resume from.

``<run>/checkpoints/`` holds

- ``step-XXXXXXXX.safetensors``: the periodic checkpoints, the newest ``keep_last`` kept;
- ``best.safetensors``: the state with the lowest evaluation MSE so far (EMA reconstructions
  of the held-out images), never deleted by ``keep_last``; its metadata ``best_metric`` and
  ``best_value`` say which and how good, ``step`` when;
- ``manifest.json``: the sha256 of each (:mod:`dbae.checkpoints.manifest`).

Only one process (rank 0) writes here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from ..errors import CheckpointError
from ..checkpoints import manifest
from ..checkpoints import (
    checkpoint_name,
    latest_valid_checkpoint,
    list_checkpoints,
    read_metadata,
    remove_partial_files,
    save_checkpoint,
    verify_checkpoint,
)

BEST = "best.safetensors"
BEST_METRIC = "eval_mse"


class CheckpointKeeper:
    def __init__(self, directory: Path, keep_last: int, log: Callable[[str], None] = print) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.log = log
        self.best: float | None = None

    # ----- writing -----
    def _write(self, name: str, step: int, state: dict[str, Any], extra: dict[str, str] | None = None) -> Path:
        path = self.directory / name
        save_checkpoint(
            path, step=step, extra=extra, **state,
            before_replace=lambda tmp: manifest.record(self.directory, name, tmp, step),
        )
        return path

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write the checkpoint of ``step`` (``state``: the keyword arguments of
        :func:`save_checkpoint` but ``step``), then delete all but the newest ``keep_last``."""
        path = self._write(checkpoint_name(step), step, state)
        old = list_checkpoints(self.directory)[: -self.keep_last]
        for _, p in old:
            p.unlink(missing_ok=True)
        manifest.forget(self.directory, [p.name for _, p in old])
        return path

    def offer_best(self, step: int, value: float, state: dict[str, Any]) -> bool:
        """Write ``best.safetensors`` when ``value`` (lower is better) beats the best so far."""
        if not math.isfinite(value) or (self.best is not None and value >= self.best):
            return False
        self._write(BEST, step, state, {"best_metric": BEST_METRIC, "best_value": repr(float(value))})
        self.best = float(value)
        return True

    # ----- resuming -----
    def existing(self) -> list[tuple[int, Path]]:
        return list_checkpoints(self.directory)

    def resume_point(self) -> Path | None:
        """The newest intact checkpoint (None for an empty directory); clears files a killed
        process left half-written and reads back the best value so far. CheckpointError when
        there are checkpoints but none is intact."""
        for p in remove_partial_files(self.directory):
            self.log(f"removed {p.name}, a file left half-written by an interrupted save")
        found = self.existing()
        path = latest_valid_checkpoint(self.directory, warn=self.log)
        if path is None and found:
            raise CheckpointError(
                f"none of the {len(found)} checkpoint(s) in {self.directory} is intact; "
                "move them away to start over, or choose another --out"
            )
        self.best = self._read_best()
        return path

    def _read_best(self) -> float | None:
        path = self.directory / BEST
        if not path.exists():
            return None
        try:
            verify_checkpoint(path)
            return float(read_metadata(path)["best_value"])
        except (CheckpointError, KeyError, ValueError) as exc:
            self.log(f"warning: ignoring {BEST}: {exc}; it is replaced at the next evaluation")
            return None
