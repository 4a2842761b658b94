"""Other projects' released checkpoints: recognise a file, convert it, and write it as a run.

:func:`read_foreign` reads a PyTorch file safely (:mod:`.foreign`), recognises whose layout
it has and converts it in memory; :func:`import_run` writes the result as an ordinary run
directory (``config.json``, ``checkpoints/step-*.safetensors`` with its manifest, and
``import.json``: where the weights came from and what was done to them), which every
``--ckpt`` takes and which loads without any conversion.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import Preset, dumps
from ..errors import CheckpointError, DataError
from . import manifest, official_dbae
from .atomic import atomic_write_text
from .foreign import is_torch_pickle, load_weights_only, tensor_dict
from .native import checkpoint_name, list_checkpoints, save_checkpoint

#: the run directory's record of an import
IMPORT_RECORD = "import.json"
#: metadata key of a checkpoint written by an import: the same record, as JSON
IMPORTED_KEY = "imported"
#: kinds of files recognised, as recorded
OFFICIAL_DBAE = "official-dbae"


@dataclass
class ForeignCheckpoint:
    """A converted foreign checkpoint: the preset and EMA weights of a :class:`dbae.model.DBAE`."""

    path: Path
    preset: Preset
    state: dict[str, torch.Tensor]
    step: int
    #: source file, its sha256 and size, what it was recognised as, what was converted
    provenance: dict[str, Any]


def _step_of(path: Path) -> int:
    """The training step in the authors' file names (``ema_0.9999_1020000.pt``: 1020000), else 0."""
    m = re.search(r"_(\d+)\.[A-Za-z]+$", path.name)
    return int(m.group(1)) if m else 0


def read_foreign(
    path: str | Path, *, num_head_channels: int | None = None, dtype: torch.dtype = torch.float32,
    hash_source: bool = False,
) -> ForeignCheckpoint:  # fmt: skip
    """Read and convert a released checkpoint of another code base (today: the authors' DBAE
    files). ``num_head_channels``: the U-Net's channels per attention head, which shapes do
    not tell (default: the authors' 64). ``dtype``: of the tensors the conversion computes
    (float64 to keep every digit, e.g. for parity checks). ``hash_source``: record the file's
    sha256 in the provenance (a second read of the whole file). CheckpointError for a file
    that is unreadable, needs arbitrary unpickling, or has no known layout."""
    path = Path(path)
    if not is_torch_pickle(path):
        raise CheckpointError(f"{path} is neither a dbae safetensors file nor a PyTorch checkpoint")
    obj = load_weights_only(path)
    if isinstance(obj, dict) and official_dbae.looks_like(obj):
        state = tensor_dict(obj, path, official_dbae.KIND)
        heads = official_dbae.HEAD_CHANNELS if num_head_channels is None else num_head_channels
        preset = official_dbae.recognise(state, path, heads)
        conv = official_dbae.convert(state, preset, path, dtype=dtype)
        provenance = {
            "source": path.name,
            **({"source_sha256": manifest.sha256_file(path)} if hash_source else {}),
            "source_bytes": path.stat().st_size,
            "kind": OFFICIAL_DBAE,
            "recognised_as": f"{official_dbae.KIND}: {_describe(preset)}",
            "preset": preset.name,
            "num_head_channels": heads,
            "converted": conv.notes,
            "weights": "EMA (the authors save the EMA parameters; their buffers are the live model's)",
        }
        return ForeignCheckpoint(path, preset, conv.state, _step_of(path), provenance)
    raise CheckpointError(_unknown(path, obj))


def foreign_kind(path: str | Path) -> str:
    """What a PyTorch file was recognised as (:data:`OFFICIAL_DBAE`), from its keys only (the
    tensors stay on disk where the file can be memory-mapped); CheckpointError otherwise."""
    path = Path(path)
    obj = load_weights_only(path)
    if isinstance(obj, dict) and official_dbae.looks_like(obj):
        return OFFICIAL_DBAE
    raise CheckpointError(_unknown(path, obj))


def _describe(preset: Preset) -> str:
    m = preset.model
    kind = "stochastic (DBAE)" if m.encoder.stochastic else "deterministic (DBAE-d)"
    if preset.name == "official-custom":
        return f"a {m.image_size}px {kind} model of a layout they did not release"
    return f"the released {m.image_size}px {kind} model ({preset.name})"


def _unknown(path: Path, obj: object) -> str:
    if isinstance(obj, dict):
        keys = [str(k) for k in obj][:5]
        return (f"{path} has no known checkpoint layout (its first keys: {', '.join(keys) or 'none'}); "
                f"dbae imports {official_dbae.KIND} files")
    return f"{path} has no known checkpoint layout (it holds a {type(obj).__name__})"


def import_run(
    source: str | Path, out: str | Path, *, num_head_channels: int | None = None, log=print,
) -> Path:  # fmt: skip
    """Convert ``source`` and write it as the run directory ``out``; returns the checkpoint's
    path. DataError, before any work, when ``out`` already holds checkpoints."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is an existing file, not a folder; choose another --out")
    if list_checkpoints(out / "checkpoints"):
        raise DataError(f"{out} already holds checkpoints; choose another --out (nothing was written)")
    started = time.perf_counter()
    foreign = read_foreign(source, num_head_channels=num_head_channels, hash_source=True)
    record = {**foreign.provenance, "imported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": foreign.step}
    directory = out / "checkpoints"
    name = checkpoint_name(foreign.step)
    path = save_checkpoint(
        directory / name, preset=foreign.preset, step=foreign.step, model={}, ema=foreign.state,
        extra={IMPORTED_KEY: json.dumps(record)},
        before_replace=lambda tmp: manifest.record(directory, name, tmp, foreign.step),
    )
    atomic_write_text(out / "config.json", dumps(foreign.preset) + "\n")
    atomic_write_text(out / IMPORT_RECORD, json.dumps({**record, "checkpoint": str(path.relative_to(out))},
                                                       indent=2) + "\n")
    log(f"{record['recognised_as']}; step {foreign.step}; {len(foreign.state)} tensors converted in "
        f"{time.perf_counter() - started:.1f} s")
    return path


def imported_record(metadata: dict[str, str]) -> dict[str, Any] | None:
    """The import record in a checkpoint's metadata (None for a checkpoint trained here)."""
    text = metadata.get(IMPORTED_KEY)
    if text is None:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None
