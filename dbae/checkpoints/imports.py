"""Other projects' released checkpoints: recognise a file, convert it, and write it as a run.

:func:`read_foreign` reads a PyTorch file safely (:mod:`.foreign`), recognises whose layout
it has (the DBAE, DiffAE or PDAE authors') and converts it in memory; :func:`import_run` writes
the result as an ordinary run directory of that method (``config.json``,
``checkpoints/step-*.safetensors`` with its manifest, ``import.json``: where the weights came
from and what was done to them; a DiffAE latent DPM also as the run's ``prior/``), which every
``--ckpt`` takes and which loads without any conversion. The writers of the DiffAE and PDAE
formats, and the networks whose names the converters fill, are imported when used.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import Preset, to_dict
from ..errors import CheckpointError, DataError
from . import manifest, official_dbae, official_diffae, official_pdae
from .atomic import atomic_write_text
from .foreign import is_torch_pickle, load_weights_only, tensor_dict
from .native import checkpoint_name, list_checkpoints, save_checkpoint

#: the run directory's record of an import
IMPORT_RECORD = "import.json"
#: metadata key of a checkpoint written by an import: the same record, as JSON
IMPORTED_KEY = "imported"
#: kinds of files recognised, as recorded
OFFICIAL_DBAE = "official-dbae"
OFFICIAL_DIFFAE = "official-diffae"
OFFICIAL_PDAE = "official-pdae"
#: the method of each kind
METHODS = {OFFICIAL_DBAE: "dbae", OFFICIAL_DIFFAE: "diffae", OFFICIAL_PDAE: "pdae"}


@dataclass
class ForeignPrior:
    """A latent DPM that came with an autoencoder (DiffAE's latent presets)."""

    preset: Any  # dbae.prior.config.PriorPreset
    state: dict[str, torch.Tensor]  # the MLPSkipNet's
    mean: torch.Tensor
    std: torch.Tensor
    notes: list[str]


@dataclass
class ForeignCheckpoint:
    """A converted foreign checkpoint: its method, preset (a DBAE :class:`~dbae.config.Preset`,
    a DiffAE or a PDAE preset) and EMA weights, and the latent prior it came with."""

    path: Path
    method: str
    preset: Any
    state: dict[str, torch.Tensor]
    step: int
    #: source file, its sha256 and size, what it was recognised as, what was converted
    provenance: dict[str, Any]
    prior: ForeignPrior | None = None


def _step_of(path: Path) -> int:
    """The training step in the authors' file names (``ema_0.9999_1020000.pt``: 1020000), else 0."""
    m = re.search(r"_(\d+)\.[A-Za-z]+$", path.name)
    return int(m.group(1)) if m else 0


def read_foreign(
    path: str | Path, *, num_head_channels: int | None = None, num_heads: int | None = None,
    dtype: torch.dtype = torch.float32, hash_source: bool = False,
) -> ForeignCheckpoint:  # fmt: skip
    """Read and convert a released checkpoint of the DBAE, DiffAE or PDAE authors.
    ``num_head_channels`` (DBAE) / ``num_heads`` (PDAE): the U-Net's attention, which shapes
    do not tell (defaults: what their scripts use). ``dtype``: of the tensors the conversion
    computes (float64 to keep every digit, e.g. for parity checks). ``hash_source``: record
    the file's sha256 in the provenance (a second read of the whole file). CheckpointError for
    a file that is unreadable, needs arbitrary unpickling, or has no known layout."""
    path = Path(path)
    if not is_torch_pickle(path):
        raise CheckpointError(f"{path} is neither a dbae safetensors file nor a PyTorch checkpoint")
    obj = load_weights_only(path, stand_ins=official_diffae.STAND_INS)
    base = {"source": path.name, **({"source_sha256": manifest.sha256_file(path)} if hash_source else {}),
            "source_bytes": path.stat().st_size}  # fmt: skip
    if isinstance(obj, dict) and official_dbae.looks_like(obj):
        state = tensor_dict(obj, path, official_dbae.KIND)
        heads = official_dbae.HEAD_CHANNELS if num_head_channels is None else num_head_channels
        preset = official_dbae.recognise(state, path, heads)
        conv = official_dbae.convert(state, preset, path, dtype=dtype)
        provenance = {**base, "kind": OFFICIAL_DBAE, "recognised_as": f"{official_dbae.KIND}: {_describe(preset)}",
                      "preset": preset.name, "num_head_channels": heads, "converted": conv.notes,
                      "weights": "EMA (the authors save the EMA parameters; their buffers are the live model's)"}
        return ForeignCheckpoint(path, "dbae", preset, conv.state, _step_of(path), provenance)
    if official_diffae.looks_like(obj):
        return _diffae(path, obj, base)
    if official_pdae.looks_like(obj):
        return _pdae(path, obj, base, num_heads)
    raise CheckpointError(_unknown(path, obj))


def _diffae(path: Path, obj: dict, base: dict[str, Any]) -> ForeignCheckpoint:
    from ..baselines.config import DiffAEPreset, DiffAETrainConfig
    from ..prior.config import LatentDiffusionConfig, PriorPreset

    layout = official_diffae.infer_layout(obj, path)
    auto, latent = official_diffae.convert(obj, layout, path)
    name = official_diffae.recognised_name(layout.model)
    preset = DiffAEPreset(name, layout.model, DiffAETrainConfig())
    prior = None
    if latent is not None:
        state = dict(latent.state)
        mean, std = state.pop("latent_mean"), state.pop("latent_std")
        prior_preset = PriorPreset(f"diffae-{name}", layout.latent, LatentDiffusionConfig(spacing="diffae"))
        prior = ForeignPrior(prior_preset, state, mean, std, latent.notes)
    what = f"the {layout.model.image_size}px autoencoder" + (" with its latent DPM" if latent else "")
    released = "" if name == "official-custom" else f" ({name})"
    provenance = {**base, "kind": OFFICIAL_DIFFAE, "recognised_as": f"{official_diffae.KIND}: {what}{released}",
                  "preset": name, "converted": auto.notes + (latent.notes if latent else []),
                  "weights": "EMA (ema_model.*: what all their inference uses)"}
    return ForeignCheckpoint(path, "diffae", preset, auto.state, layout.step, provenance, prior)


def _pdae(path: Path, obj: dict, base: dict[str, Any], num_heads: int | None) -> ForeignCheckpoint:
    from ..baselines.config import DiffAETrainConfig
    from ..baselines.pdae_config import PDAEPreset

    layout = official_pdae.infer_layout(obj, path, num_heads)
    conv = official_pdae.convert(obj, layout, path)
    name = f"official-{layout.model.image_size}px"
    preset = PDAEPreset(name, layout.model, DiffAETrainConfig(), DiffAETrainConfig())
    provenance = {**base, "kind": OFFICIAL_PDAE, "num_heads": layout.model.unet.num_heads,
                  "recognised_as": f"{official_pdae.KIND}: the {layout.model.image_size}px autoencoder",
                  "preset": name, "converted": conv.notes,
                  "weights": "EMA (ema_encoder, ema_decoder: what their samplers read)"}
    return ForeignCheckpoint(path, "pdae", preset, conv.state, layout.step, provenance)


def foreign_kind(path: str | Path) -> str:
    """What a PyTorch file was recognised as (:data:`OFFICIAL_DBAE`), from its keys only (the
    tensors stay on disk where the file can be memory-mapped); CheckpointError otherwise."""
    path = Path(path)
    obj = load_weights_only(path, stand_ins=official_diffae.STAND_INS)
    if isinstance(obj, dict) and official_dbae.looks_like(obj):
        return OFFICIAL_DBAE
    if official_diffae.looks_like(obj):
        return OFFICIAL_DIFFAE
    if official_pdae.looks_like(obj):
        return OFFICIAL_PDAE
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
                "dbae imports the DBAE, DiffAE and PDAE authors' released checkpoints")
    return f"{path} has no known checkpoint layout (it holds a {type(obj).__name__})"


def import_run(
    source: str | Path, out: str | Path, *, num_head_channels: int | None = None, num_heads: int | None = None,
    log=print,
) -> Path:  # fmt: skip
    """Convert ``source`` and write it as the run directory ``out`` of its method; returns the
    checkpoint's path. DataError, before any work, when ``out`` already holds checkpoints."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is an existing file, not a folder; choose another --out")
    if list_checkpoints(out / "checkpoints"):
        raise DataError(f"{out} already holds checkpoints; choose another --out (nothing was written)")
    started = time.perf_counter()
    foreign = read_foreign(source, num_head_channels=num_head_channels, num_heads=num_heads, hash_source=True)
    record = {**foreign.provenance, "method": foreign.method, "imported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "step": foreign.step}  # fmt: skip
    directory = out / "checkpoints"
    name = checkpoint_name(foreign.step)
    kwargs = dict(preset=foreign.preset, step=foreign.step, model={}, ema=foreign.state,
                  extra={IMPORTED_KEY: json.dumps(record)},
                  before_replace=lambda tmp: manifest.record(directory, name, tmp, foreign.step))
    if foreign.method == "diffae":
        from ..baselines.train import save_diffae

        path = save_diffae(directory / name, **kwargs)
    elif foreign.method == "pdae":
        from ..baselines.pdae_train import save_pdae

        path = save_pdae(directory / name, stage="pdae", **kwargs)
    else:
        path = save_checkpoint(directory / name, **kwargs)
    atomic_write_text(out / "config.json", json.dumps(to_dict(foreign.preset), indent=2, sort_keys=True) + "\n")
    files = {"checkpoint": str(path.relative_to(out))}
    if foreign.prior is not None:
        files["prior"] = str(_write_prior(foreign, path, out).relative_to(out))
    atomic_write_text(out / IMPORT_RECORD, json.dumps({**record, **files}, indent=2) + "\n")
    log(f"{record['recognised_as']}; step {foreign.step}; {len(foreign.state)} tensors converted in "
        f"{time.perf_counter() - started:.1f} s")
    return path


def _write_prior(foreign: ForeignCheckpoint, checkpoint: Path, out: Path) -> Path:
    """The latent DPM that came with an autoencoder, as the run's prior (``RUN/prior``), bound to
    the imported checkpoint (whose identity is the source file's)."""
    from ..prior.checkpoint import FILE_NAME, default_prior_dir, save_prior
    from ..prior.identity import AutoencoderRef

    prior = foreign.prior
    assert prior is not None
    ref = AutoencoderRef.of(checkpoint, ema=True, step=foreign.step, preset=foreign.preset.name,
                            z_dim=int(prior.mean.shape[0]))  # fmt: skip
    latents = {"imported_from": foreign.path.name, "statistics": "the authors' conds_mean / conds_std"}
    return save_prior(default_prior_dir(checkpoint) / FILE_NAME, preset=prior.preset, step=foreign.step, model={},
                      ema=prior.state, mean=prior.mean, std=prior.std, autoencoder=ref, latents=latents,
                      extra={"converted": prior.notes})  # fmt: skip


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
