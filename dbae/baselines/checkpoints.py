"""Checkpoints of any of the three methods: which method a file belongs to (its safetensors
``format`` tag), the newest checkpoint of a run directory, and loading one for evaluation.

Formats: ``dbae-checkpoint/1`` (DBAE, :mod:`dbae.checkpoints`),
``dbae-diffae-checkpoint/1`` (:mod:`.train`) and ``dbae-pdae-checkpoint/1`` (:mod:`.pdae_train`).
DBAE checkpoints and run directories go through :func:`dbae.inference.load_model` unchanged
(manifest checks included); the baselines' through their own readers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Union

import torch

from ..checkpoints import FORMAT as DBAE_FORMAT
from ..checkpoints import list_checkpoints, read_header, read_tagged_safetensors, resolve_checkpoint
from ..checkpoints.foreign import is_torch_pickle
from ..checkpoints.imports import METHODS, foreign_kind, read_foreign
from ..errors import CheckpointError
from ..inference import LoadedModel, load_model
from .ddim_autoencoder import DDIMAutoencoder
from .pdae_train import FORMAT as PDAE_FORMAT
from .pdae_train import load_pdae
from .train import FORMAT as DIFFAE_FORMAT
from .train import load_diffae

Method = Literal["dbae", "diffae", "pdae"]
METHOD_OF_FORMAT: dict[str, Method] = {DBAE_FORMAT: "dbae", DIFFAE_FORMAT: "diffae", PDAE_FORMAT: "pdae"}
FORMAT_OF_METHOD: dict[str, str] = {m: f for f, m in METHOD_OF_FORMAT.items()}
LABELS: dict[str, str] = {"dbae": "DBAE", "diffae": "DiffAE", "pdae": "PDAE"}


def _metadata(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file (its header only)."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    return read_header(path)


#: the method of each kind of foreign checkpoint that dbae reads (:mod:`dbae.checkpoints.imports`)
METHOD_OF_FOREIGN_KIND: dict[str, Method] = METHODS  # type: ignore[assignment]


def checkpoint_method(path: str | Path) -> Method:
    """The method whose checkpoint ``path`` is, from the ``format`` tag in its metadata (only
    the header is read), or for another code base's released file from its keys;
    CheckpointError for a missing, unreadable or foreign file."""
    if is_torch_pickle(path):
        return METHOD_OF_FOREIGN_KIND[foreign_kind(path)]
    fmt = _metadata(Path(path)).get("format")
    if fmt not in METHOD_OF_FORMAT:
        known = ", ".join(repr(f) for f in METHOD_OF_FORMAT)
        raise CheckpointError(f"{path} is not a DBAE, DiffAE or PDAE checkpoint (format {fmt!r}; known: {known})")
    return METHOD_OF_FORMAT[fmt]


def checkpoint_dir(run: Path) -> Path:
    """Where a run directory keeps its checkpoints (``<run>/checkpoints``, or ``run`` itself)."""
    return run / "checkpoints" if (run / "checkpoints").is_dir() else run


def run_method(run: Path) -> Method | None:
    """The method of the newest checkpoint whose header reads in run directory ``run`` (None:
    no checkpoint there)."""
    for _, path in reversed(list_checkpoints(checkpoint_dir(Path(run)))):
        try:
            return checkpoint_method(path)
        except CheckpointError:
            continue
    return None


def find_checkpoint(path: str | Path, warn: Callable[[str], None] = print) -> Path:
    """A checkpoint file as given, or a run directory's newest intact checkpoint of the
    method of its newest readable one (DBAE runs: :func:`dbae.inference.resolve_checkpoint`,
    manifest checks included; baseline files are read in full to check them)."""
    path = Path(path)
    if not path.is_dir():
        if not path.exists():
            raise CheckpointError(f"no checkpoint at {path}")
        return path
    method = run_method(path)
    if method is None or method == "dbae":
        return resolve_checkpoint(path)
    fmt = FORMAT_OF_METHOD[method]
    for _, candidate in reversed(list_checkpoints(checkpoint_dir(path))):
        try:
            read_tagged_safetensors(candidate, fmt, f"{LABELS[method]} checkpoint")
        except CheckpointError as exc:
            warn(f"warning: skipping checkpoint {candidate.name}: {exc}")
            continue
        return candidate
    raise CheckpointError(f"no readable checkpoint in {path}")


@dataclass
class LoadedBaseline:
    """A DiffAE or PDAE checkpoint loaded for evaluation (eval mode)."""

    method: Method
    model: DDIMAutoencoder
    preset_name: str
    step: int
    path: Path
    #: PDAE's training stage of the checkpoint ("pdae" for a usable autoencoder); None for DiffAE
    stage: str | None = None


Loaded = Union[LoadedModel, LoadedBaseline]


def load_any(path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu") -> Loaded:
    """The model of a DBAE, DiffAE or PDAE checkpoint (file or run directory), EMA weights
    unless ``ema=False``. A PDAE stage-1 checkpoint (the bare DDPM, no trained encoder) is
    refused with a pointer to the stage-2 one."""
    path = find_checkpoint(path)
    method = checkpoint_method(path)
    if method == "dbae":
        return load_model(path, ema=ema, device=device)
    if is_torch_pickle(path):  # the DiffAE or PDAE authors' own file, converted in memory
        return _load_foreign(path, ema, device)
    if method == "diffae":
        model, preset = load_diffae(path, ema=ema, device=device)
        return LoadedBaseline("diffae", model, preset.name, _step(path), path)
    pdae, pdae_preset, stage = load_pdae(path, ema=ema, device=device)
    if stage != "pdae":
        raise CheckpointError(
            f"{path} is a PDAE stage-1 checkpoint (the unconditional DDPM: no trained encoder); evaluate the "
            "stage-2 checkpoint (the run directory itself, e.g. --ckpt RUN rather than RUN/ddpm)"
        )
    return LoadedBaseline("pdae", pdae, pdae_preset.name, _step(path), path, stage)


def _load_foreign(path: Path, ema: bool, device: str | torch.device) -> LoadedBaseline:
    import sys

    from .diffae import DiffAE
    from .pdae import PDAE

    foreign = read_foreign(path)
    if not ema:
        raise CheckpointError(f"{path}: only the authors' EMA weights are read; drop --raw-weights")
    print(f"note: converted {path.name} in memory ({foreign.provenance['recognised_as']}); `dbae import {path} "
          "--out RUN` converts it once, into a run directory that records where it came from", file=sys.stderr)
    with torch.device("meta"):
        model = DiffAE(foreign.preset.model) if foreign.method == "diffae" else PDAE(foreign.preset.model)
    model.load_state_dict(foreign.state, assign=True)
    if foreign.method == "pdae":
        model.freeze_ddpm()
    return LoadedBaseline(foreign.method, model.to(device).eval(), foreign.preset.name, foreign.step, path,  # type: ignore[arg-type]
                          "pdae" if foreign.method == "pdae" else None)


def _step(path: Path) -> int:
    """The step of a checkpoint that its loader has already read and checked."""
    return int(_metadata(path)["step"])


__all__ = [
    "FORMAT_OF_METHOD", "LABELS", "Loaded", "LoadedBaseline", "METHOD_OF_FORMAT", "Method", "checkpoint_dir",
    "checkpoint_method", "find_checkpoint", "load_any", "run_method",
]
