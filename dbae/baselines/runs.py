"""Run directories of the baselines, as ``dbae train --method diffae|pdae`` writes them.

DiffAE, run directory ``<out>``:

- ``checkpoints/step-XXXXXXXX.safetensors``: :func:`.train.save_diffae` files (every
  ``ckpt_every`` steps and at the end);
- ``config.json``: the typed preset and the data set;
- ``metrics.jsonl``: one line per log window, as :class:`dbae.training.Trainer` writes them
  (``step``, ``loss`` and the other logged terms; cut back to the checkpoint on resume);
- ``checkpoints/manifest.json``: the sha256 of each checkpoint (:mod:`dbae.checkpoints.manifest`);
- ``eval.json``: reconstruction of held-out images by the EMA model, with the DDIM-inverted
  x_T and with a random x_T (:mod:`.reconstruction`).

PDAE trains in two stages (:mod:`.pdae_train`): stage 1, the unconditional DDPM, in
``<out>/ddpm`` (laid out as above, checkpoints of stage ``ddpm``), then stage 2, encoder and
gradient estimator with the DDPM frozen, in ``<out>`` itself, so that ``--ckpt <out>`` names
the finished autoencoder. ``ddpm_ckpt`` skips stage 1 and starts stage 2 from an existing
PDAE checkpoint's eps network (a stage-1 file or run, or a finished PDAE).

Resume (``resume=True``): continue from the newest intact checkpoint of the stage in
progress (an interrupted stage 1, a finished stage 1 then stage 2, or stage 2), exactly as
an uninterrupted run (:class:`dbae.training.Trainer` seeds every step); with no checkpoint a
new run starts. SIGTERM or a first Ctrl-C stops a stage gracefully after its current step, with
a checkpoint to resume from (the run ends there: no later stage, no evaluation).
Without it a directory that already holds checkpoints is refused, and a directory holding
another method's run is always refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import to_dict
from ..data import build_dataset
from ..errors import CheckpointError, ConfigError
from ..metrics import summarize
from ..checkpoints import atomic_write_text, latest_valid_checkpoint, list_checkpoints
from ..training.trainer import resolve_device
from .checkpoints import LABELS, Method, checkpoint_method, find_checkpoint, run_method
from .config import DiffAEPreset
from .ddim_autoencoder import DDIMAutoencoder
from .pdae import PDAE
from .pdae_config import PDAEPreset
from .pdae_train import PDAE_FORMAT, read_pdae_checkpoint, train_ddpm, train_pdae
from .reconstruction import reconstruct_baseline
from .train import train_diffae


@dataclass(frozen=True)
class RunOptions:
    """Run-time options of a baseline run (not part of its preset). ``dataset``: "shapes" or
    an image folder / zip / LMDB (:func:`dbae.data.build_dataset`); ``eval_images``: held-out
    images reconstructed after training (0: none)."""

    out: Path
    dataset: str = "shapes"
    resume: bool = False
    device: str = "auto"
    progress: bool = True
    eval_images: int = 16
    log: Callable[[str], None] = field(default=print, compare=False)


@dataclass
class RunResult:
    """``checkpoint``: the final checkpoint of the autoencoder; ``stages``: every stage's last
    checkpoint (PDAE: "ddpm" and "pdae"; DiffAE: "diffae"); ``losses``: (step, mean loss) of
    the log windows trained now (the last stage's); ``eval``: the post-training
    reconstruction check, per x_T mode (None with ``eval_images=0``)."""

    method: Method
    out: Path
    step: int
    checkpoint: Path
    stages: dict[str, Path]
    losses: list[tuple[int, float]]
    seconds: float
    eval: dict[str, dict[str, float]] | None
    #: the signal that stopped the run before its last step, if any
    stopped_by: int | None = None


# ----- run directories -----
def check_run_method(out: Path, method: Method) -> None:
    """ConfigError when ``out`` (or a PDAE run's ``ddpm`` stage) holds another method's run."""
    for place in (Path(out), Path(out) / "ddpm"):
        found = run_method(place)
        if found is not None and found != method:
            raise ConfigError(f"{place} holds a {LABELS[found]} run, not a {LABELS[method]} one; "
                              "choose another --out")


def _refuse_existing(out: Path, places: list[Path]) -> None:
    for ckpt_dir in places:
        found = list_checkpoints(ckpt_dir)
        if found:
            raise ConfigError(f"{out} already holds a run (checkpoint {found[-1][1].relative_to(out)}); "
                              "pass --resume auto to continue it, or choose another --out")


def _config(preset: Any, options: RunOptions, **extra: Any) -> dict[str, Any]:
    """A stage's ``config.json``: its preset, data set, method (and stage)."""
    return {"preset": to_dict(preset), "dataset": options.dataset, **extra}


# ----- evaluation -----
def held_out_images(dataset: str, image_size: int, n: int, seed: int) -> torch.Tensor:
    """The first ``n`` images of the test split (shapes) or of the data set itself (a folder is one split)."""
    data = build_dataset(dataset, image_size, seed=seed, split="test")
    n = min(n, len(data))  # type: ignore[arg-type]
    items = [data[i] for i in range(n)]
    return torch.stack([it[0] if isinstance(it, (tuple, list)) else it for it in items])


def post_training_eval(model: DDIMAutoencoder, x: torch.Tensor, seed: int) -> dict[str, dict[str, float]]:
    """MSE / PSNR / SSIM (images in [0, 1]) of the reconstructions of ``x`` from the inferred
    and from a random x_T, at the method's default step counts."""
    device = next(model.parameters()).device
    out = {}
    for mode in ("inferred", "random"):
        g = torch.Generator(device).manual_seed(seed)
        rec = reconstruct_baseline(model, x, x_T=mode, generator=g)  # type: ignore[arg-type]
        stats = summarize((rec.images + 1) / 2, (x.float() + 1) / 2)
        out[mode] = {**stats, "nfe": rec.nfe, "inversion_steps": rec.inversion_steps, "decode_steps": rec.decode_steps}
    return out


def _finish(out: Path, model: DDIMAutoencoder, step: int, options: RunOptions, seed: int, size: int
            ) -> dict[str, dict[str, float]] | None:  # fmt: skip
    if options.eval_images < 1:
        return None
    x = held_out_images(options.dataset, size, options.eval_images, seed)
    stats = post_training_eval(model.eval(), x, seed)
    atomic_write_text(out / "eval.json", json.dumps({"step": step, "images": int(x.shape[0]), **stats}, indent=2) + "\n")
    return stats


# ----- DiffAE -----
def run_diffae(preset: DiffAEPreset, options: RunOptions) -> RunResult:
    """Train (or resume) a DiffAE run in ``options.out`` (module docstring)."""
    out = Path(options.out)
    check_run_method(out, "diffae")
    data = build_dataset(options.dataset, preset.model.image_size, seed=preset.train.seed, split="train")
    result = train_diffae(preset, data, out=out, resume=options.resume, config=_config(preset, options, method="diffae"),
                          device=resolve_device(options.device), progress=options.progress, log=options.log)
    assert result.path is not None  # an output directory always gets a final checkpoint
    stats = None if result.stopped_by else _finish(out, result.ema, result.step, options, preset.train.seed,
                                                   preset.model.image_size)  # fmt: skip
    return RunResult("diffae", out, result.step, result.path, {"diffae": result.path}, result.losses,
                     result.seconds, stats, result.stopped_by)


# ----- PDAE -----
def _pretrained(path: str | Path, preset: PDAEPreset) -> Path:
    """The PDAE checkpoint (file or run directory) whose eps network stage 2 starts from."""
    try:
        found = find_checkpoint(path)
        method = checkpoint_method(found)
    except CheckpointError as exc:
        raise CheckpointError(f"--pdae-ddpm-ckpt: {exc}") from None
    if method != "pdae":
        raise ConfigError(f"--pdae-ddpm-ckpt {path} is a {LABELS[method]} checkpoint; it needs a PDAE one "
                          "(stage 1, e.g. RUN/ddpm, or a finished PDAE run)")
    ckpt = read_pdae_checkpoint(found)
    if ckpt.preset.model.unet != preset.model.unet or ckpt.preset.model.image_size != preset.model.image_size:
        raise ConfigError(f"the DDPM in {found} has another U-Net or image size (preset {ckpt.preset.name!r}) "
                          f"than preset {preset.name!r}")
    return found


def run_pdae(preset: PDAEPreset, options: RunOptions, ddpm_ckpt: str | Path | None = None) -> RunResult:
    """Train (or resume) both PDAE stages in ``options.out`` (module docstring); with
    ``ddpm_ckpt`` stage 1 is taken from that checkpoint instead."""
    out, log = Path(options.out), options.log
    check_run_method(out, "pdae")
    ddpm_dir, ckpt_dir = out / "ddpm", out / "checkpoints"
    seed, size = preset.train.seed, preset.model.image_size

    resume2 = None
    if options.resume:
        resume2 = latest_valid_checkpoint(ckpt_dir, log, check=lambda path: PDAE_FORMAT.check(path, "pdae"))
    else:
        _refuse_existing(out, [ckpt_dir, ddpm_dir / "checkpoints"])
    pretrained_path = _pretrained(ddpm_ckpt, preset) if ddpm_ckpt is not None else None
    common = dict(device=resolve_device(options.device), progress=options.progress, log=log)
    data = build_dataset(options.dataset, size, seed=seed, split="train")
    stages: dict[str, Path] = {}
    pretrained: PDAE | Path
    if resume2 is not None:
        log(f"resuming stage 2 from {resume2}")
        pretrained = resume2  # its eps network is the frozen DDPM; the rest is restored from it
    elif pretrained_path is not None:
        log(f"stage 1 (DDPM) from {pretrained_path}")
        pretrained = stages["ddpm"] = pretrained_path
    else:
        first = train_ddpm(preset, data, out=ddpm_dir, resume=options.resume,
                           config=_config(preset, options, method="pdae", stage="ddpm"), **common)  # fmt: skip
        assert first.path is not None
        stages["ddpm"] = first.path
        if first.stopped_by:
            return RunResult("pdae", out, first.step, first.path, stages, first.losses, first.seconds, None,
                             first.stopped_by)  # fmt: skip
        pretrained = first.ema
    # a resumed stage 2 keeps the config.json that names its stage 1
    config = None if resume2 is not None else _config(preset, options, method="pdae", stage="pdae",
                                                      ddpm=str(stages["ddpm"]))  # fmt: skip
    second = train_pdae(preset, data, pretrained, out=out, resume=resume2, config=config, **common)
    assert second.path is not None
    stages["pdae"] = second.path
    stats = None if second.stopped_by else _finish(out, second.ema, second.step, options, seed, size)
    return RunResult("pdae", out, second.step, second.path, stages, second.losses, second.seconds, stats,
                     second.stopped_by)


__all__ = ["RunOptions", "RunResult", "check_run_method", "held_out_images", "post_training_eval", "run_diffae",
           "run_pdae"]
