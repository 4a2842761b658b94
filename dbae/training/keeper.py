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
    verify_checkpoint,
)

#: writes one checkpoint file: ``write(path, step, before_replace, extra_metadata)``
Writer = Callable[[Path, int, Callable[[str], None], "dict[str, str] | None"], Path]

BEST = "best.safetensors"
BEST_METRIC = "eval_mse"


class CheckpointKeeper:
    def __init__(self, directory: Path, keep_last: int | None, log: Callable[[str], None] = print,
                 check: Callable[[Path], Any] = verify_checkpoint) -> None:  # fmt: skip
        """``keep_last`` None keeps every periodic checkpoint; ``check`` raises CheckpointError
        unless a file is an intact checkpoint of the run's kind."""
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.log = log
        self.check = check
        self.best: float | None = None

    # ----- writing -----
    def _write(self, name: str, step: int, write: Writer, extra: dict[str, str] | None = None) -> Path:
        path = self.directory / name
        write(path, step, lambda tmp: manifest.record(self.directory, name, tmp, step), extra)
        return path

    def save(self, step: int, write: Writer) -> Path:
        """Write the checkpoint of ``step`` with ``write``, then delete all but the newest ``keep_last``."""
        path = self._write(checkpoint_name(step), step, write)
        if self.keep_last is None:
            return path
        old = list_checkpoints(self.directory)[: -self.keep_last]
        for _, p in old:
            p.unlink(missing_ok=True)
        manifest.forget(self.directory, [p.name for _, p in old])
        return path

    def offer_best(self, step: int, value: float, write: Writer) -> bool:
        """Write ``best.safetensors`` when ``value`` (lower is better) beats the best so far."""
        if not math.isfinite(value) or (self.best is not None and value >= self.best):
            return False
        self._write(BEST, step, write, {"best_metric": BEST_METRIC, "best_value": repr(float(value))})
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
        path = latest_valid_checkpoint(self.directory, warn=self.log, check=self.check)
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
            self.check(path)
            return float(read_metadata(path)["best_value"])
        except (CheckpointError, KeyError, ValueError) as exc:
            self.log(f"warning: ignoring {BEST}: {exc}; it is replaced at the next evaluation")
            return None
