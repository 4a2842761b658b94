"""Checkpoints: safetensors tensors plus JSON metadata, never pickle, written atomically.

One file per checkpoint, ``<run>/checkpoints/step-00001000.safetensors``, holding

- tensors ``model.*`` (raw weights), ``ema.*`` (EMA weights) and ``optim.<i>.<key>``
  (optimizer state),
- metadata (strings): ``format``, ``preset`` (the full typed config as JSON), ``step``,
  ``optim`` (the optimizer's non-tensor state as JSON), ``scaler`` (AMP loss-scaler state).

Files are written atomically (:mod:`dbae.checkpoints.atomic`), so a crash can never leave a
half-written checkpoint under a checkpoint's name. Every file carries the sha256 of its
tensor data and of its metadata in its header (:mod:`dbae.checkpoints.integrity`), checked on
every load; the trainer also records every checkpoint's sha256 in
``checkpoints/manifest.json`` (:mod:`dbae.checkpoints.manifest`) before that rename, checked
on every load too, and :func:`latest_valid_checkpoint` skips a file that fails either check.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import Preset, dumps, preset_from_dict
from ..errors import CheckpointError, ConfigError
from .integrity import read_header, read_safetensors, write_safetensors

FORMAT = "dbae-checkpoint/1"
#: the package's other safetensors files (their ``format`` tag; the constants live in modules that import this
#: one), named in the message when one is given where a DBAE checkpoint is expected
OTHER_KINDS = {
    "dbae-diffae-checkpoint/1": "a DiffAE checkpoint",
    "dbae-pdae-checkpoint/1": "a PDAE checkpoint",
    "dbae-prior/1": "a latent prior (from `dbae train-prior`)",
    "dbae-latents/1": "a latent set (from `dbae infer-latents`)",
    "dbae-attribute-classifier/1": "an attribute classifier (from `dbae train-classifier`)",
}
_NAME = re.compile(r"^step-(\d{8,})\.safetensors$")


@dataclass
class Checkpoint:
    """A training checkpoint of any method, read and checked (:func:`read_weights_file`)."""

    path: Path
    #: the method's typed preset (:class:`Preset` for DBAE)
    preset: Any
    step: int
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optim: dict[str, Any] | None
    scaler: dict[str, Any] | None = None
    #: the file's string metadata
    metadata: dict[str, str] = field(default_factory=dict)
    #: the training stage of a method that trains in stages (PDAE's ``ddpm`` or ``pdae``)
    stage: str | None = None


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.safetensors"


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, pstate in state["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def write_weights_file(
    path: Path,
    metadata: dict[str, str],
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor],
    optim: dict[str, Any] | None = None,
    before_replace: Callable[[str], None] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a safetensors file atomically: tensors ``model.*``, ``ema.*`` and the optimizer's
    ``optim.<i>.<key>`` (its non-tensor state as JSON in metadata ``optim``), plus ``metadata``
    (and ``tensors``, more tensors under their own names, e.g. the prior's latent statistics).
    The layout of every training checkpoint of the package (read back by :func:`split_weights`)."""
    tensors = {**(tensors or {}), **{f"model.{k}": v for k, v in model.items()}}
    tensors.update({f"ema.{k}": v for k, v in ema.items()})
    metadata = dict(metadata)
    if optim is not None:
        optim_tensors, optim_meta = _flatten_optimizer(optim)
        tensors.update(optim_tensors)
        metadata["optim"] = json.dumps(optim_meta)
    return write_safetensors(path, tensors, metadata, before_replace)


def split_weights(
    path: Path, tensors: dict[str, torch.Tensor], optim_meta: dict[str, Any] | None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any] | None]:
    """(model, ema, optimizer state) of the tensors of a file written by
    :func:`write_weights_file` (optimizer state None when ``optim_meta`` is None);
    CheckpointError for a tensor of no known group."""
    groups: dict[str, dict[str, torch.Tensor]] = {"model": {}, "ema": {}, "optim": {}}
    for name, value in tensors.items():
        head, _, rest = name.partition(".")
        if head not in groups:
            raise CheckpointError(f"{path} holds an unexpected tensor {name!r}")
        groups[head][rest if head != "optim" else name] = value
    optim = _unflatten_optimizer(groups["optim"], optim_meta) if optim_meta is not None else None
    return groups["model"], groups["ema"], optim


def read_weights_file(path: str | Path, file_format: str, what: str, preset: Callable[[dict[str, Any]], Any], *,
                      with_optimizer: bool = True) -> Checkpoint:  # fmt: skip
    """Read and check a training checkpoint of ``file_format`` (:func:`write_weights_file`'s
    layout; ``what`` names it in messages, e.g. "DiffAE checkpoint"): ``preset(dict)`` makes
    the typed preset of its metadata ``preset`` (may raise KeyError, ValueError or
    ConfigError). CheckpointError for a missing, corrupt or foreign file, or unreadable metadata."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no {what} at {path}")
    meta, tensors = read_tagged_safetensors(path, file_format, what)
    try:
        typed = preset(json.loads(meta["preset"]))
        step = int(meta["step"])
        optim_meta = json.loads(meta["optim"]) if with_optimizer and "optim" in meta else None
        scaler = json.loads(meta["scaler"]) if "scaler" in meta else None
    except (KeyError, ValueError, ConfigError) as exc:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f"{path} has unreadable metadata ({exc})") from None
    model, ema, optim = split_weights(path, tensors, optim_meta)
    return Checkpoint(path, typed, step, model, ema, optim, scaler, meta)


def load_weights(module: torch.nn.Module, model: dict[str, torch.Tensor], ema: dict[str, torch.Tensor], ema_wanted: bool,
                 what: str, source: Path) -> torch.nn.Module:  # fmt: skip
    """Load a checkpoint's EMA weights into ``module`` (its raw ``model`` weights unless
    ``ema_wanted`` and the file has EMA weights), checked by :func:`load_state_strict`."""
    weights = ema if ema_wanted and ema else model
    load_state_strict(module, weights, f"{what} EMA" if weights is ema else what, source)
    return module


def save_checkpoint(
    path: Path,
    *,
    preset: Preset,
    step: int,
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor],
    optim: dict[str, Any] | None = None,
    scaler: dict[str, Any] | None = None,
    extra: dict[str, str] | None = None,
    before_replace: Callable[[str], None] | None = None,
) -> Path:
    """``extra``: more string metadata (e.g. the best checkpoint's metric);
    ``before_replace``: see :func:`atomic_write`."""
    metadata = {**(extra or {}), "format": FORMAT, "preset": dumps(preset), "step": str(step)}
    if scaler:
        metadata["scaler"] = json.dumps(scaler)
    return write_weights_file(path, metadata, model, ema, optim, before_replace)


def read_tagged_safetensors(path: Path, file_format: str, what: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file whose metadata ``format`` is ``file_format``.

    CheckpointError when the file is of another format (``what`` names the kind of file in
    the message, e.g. "dbae prior"), or fails a check of :func:`dbae.checkpoints.integrity.read_safetensors`
    (corrupt, truncated, not safetensors, its bytes differ from its own sha256 or from its
    folder's manifest).
    """
    path = Path(path)
    fmt = read_header(path).get("format")
    if fmt != file_format:
        raise CheckpointError(f"{path} is not a {what} (format {fmt!r}, expected {file_format!r})")
    return read_safetensors(path)


def read_metadata(path: Path) -> dict[str, str]:
    """The header metadata of DBAE checkpoint ``path`` (nothing else is read or checked);
    CheckpointError for a missing or unreadable file, or a file of another kind."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    meta = read_header(path)
    fmt = meta.get("format")
    if fmt in OTHER_KINDS:
        raise CheckpointError(f"{path} is {OTHER_KINDS[fmt]}, not a DBAE checkpoint; this needs a DBAE checkpoint "
                              "(written by `dbae train`) or its run directory")
    if fmt != FORMAT:
        raise CheckpointError(f"{path} is not a dbae checkpoint (format {fmt!r}, expected {FORMAT!r})")
    return meta


def load_checkpoint(path: Path, *, with_optimizer: bool = True) -> Checkpoint:
    """A DBAE checkpoint, after every check of :func:`dbae.checkpoints.integrity.read_safetensors`."""
    read_metadata(Path(path))  # another kind of file is named as such before it is read in full
    return read_weights_file(path, FORMAT, "dbae checkpoint", preset_from_dict, with_optimizer=with_optimizer)


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint-named file in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def verify_checkpoint(path: Path) -> None:
    """CheckpointError unless ``path`` is an intact DBAE checkpoint: it reads back in full,
    and its bytes match its own embedded sha256 and its run's manifest
    (:func:`dbae.checkpoints.integrity.read_safetensors`; a file passed here is not hashed again when it
    is loaded next in the same process)."""
    path = Path(path)
    read_metadata(path)
    read_safetensors(path)


def latest_valid_checkpoint(directory: Path, warn=print, check: Callable[[Path], Any] | None = None) -> Path | None:
    """The newest intact checkpoint: one that ``check`` accepts (default
    :func:`verify_checkpoint`; a check raises CheckpointError); the others are skipped with
    a warning."""
    check = verify_checkpoint if check is None else check
    for step, path in reversed(list_checkpoints(directory)):
        try:
            check(path)
        except CheckpointError as exc:
            warn(f"warning: skipping checkpoint {path.name}: {exc}")
            continue
        return path
    return None


def load_state_strict(
    module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, source: Path, *, assign: bool = False
) -> None:
    """``load_state_dict`` with one clear message for every kind of mismatch. ``assign``: the
    tensors of ``state`` become the module's (no copy: for a module built on the meta device)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} with other shapes (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise CheckpointError(
            f"the {what} weights in {source} do not fit this model's configuration: " + "; ".join(parts)
        )
    module.load_state_dict(state, assign=assign)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory (its newest readable checkpoint)."""
    path = Path(path)
    if path.is_dir():
        warnings: list[str] = []
        errors: list[CheckpointError] = []  # why each newer checkpoint was passed over, newest first

        def check(candidate: Path) -> None:
            try:
                verify_checkpoint(candidate)
            except CheckpointError as exc:
                errors.append(exc)
                raise

        found = latest_valid_checkpoint(path / "checkpoints" if (path / "checkpoints").is_dir() else path,
                                        warn=warnings.append, check=check)
        if found is None:
            if errors:  # the newest one's reason says what is wrong (e.g. a DiffAE run)
                more = f" ({len(errors) - 1} older one(s) unusable too)" if len(errors) > 1 else ""
                raise CheckpointError(f"no usable checkpoint in {path}: {errors[0]}{more}")
            raise CheckpointError(f"no checkpoint in {path} (no step-*.safetensors files in it or in its "
                                  "checkpoints/ folder)")
        for line in warnings:  # on stderr: the fallback is a warning, not part of a command's output
            print(line, file=sys.stderr)
        return found
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    return path
