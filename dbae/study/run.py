"""The study end to end: train every method of a :class:`~dbae.study.config.StudyConfig`
(:mod:`.train`), measure each from its final checkpoint (:mod:`.measure`), and gather the
results and the claims they decide (:mod:`.report`)."""

from __future__ import annotations

import dataclasses
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from ..baselines.checkpoints import load_any
from ..baselines.runs import held_out_images
from ..training.trainer import resolve_device
from .config import StudyConfig
from .measure import latency, reconstructions, shapes_representation
from .report import claims
from .train import train_method


@dataclass
class Study:
    """``results``: everything the JSON holds; ``grid_inputs`` / ``grid_rows``: the images of
    the reconstruction grid ((label, images) per method and setting)."""

    results: dict[str, Any]
    grid_inputs: torch.Tensor
    grid_rows: list[tuple[str, torch.Tensor]]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def run_study(cfg: StudyConfig, out: Path, *, progress: bool = True, log: Callable[[str], None] = print) -> Study:
    """Train (or reuse, see :mod:`.train`) and measure every method of ``cfg`` under ``out``."""
    began = time.perf_counter()
    trained = []
    for name in cfg.methods:
        log(f"== training {name} ({cfg.steps} steps)")
        trained.append(train_method(name, cfg, out, progress=progress, log=log))
    device = resolve_device(cfg.device)
    x = None
    recon_rows, latency_rows, grid_rows = [], [], []
    representation: dict[str, Any] | None = {} if cfg.dataset == "shapes" else None
    for t in trained:
        log(f"== measuring {t.label}")
        loaded = load_any(t.checkpoint, device=device)
        if x is None:
            x = held_out_images(cfg.dataset, loaded.model.config.image_size, cfg.recon_images, cfg.seed)
        for row, images in reconstructions(t.name, t.label, loaded, x, cfg):
            recon_rows.append(dataclasses.asdict(row))
            grid_rows.append((f"{t.label} {'Dec(z)' if row.x_T == 'Dec(z)' else row.setting}", images[: cfg.grid_images]))
        if representation is not None:
            representation[t.name] = shapes_representation(loaded, cfg)
        latency_rows.append(dataclasses.asdict(latency(t.name, t.label, loaded, x, cfg)))
    assert x is not None
    results: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "meta": {"device": _device_name(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
                 "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "seconds": time.perf_counter() - began},  # fmt: skip
        "training": [{**dataclasses.asdict(t), "run": str(t.run), "checkpoint": str(t.checkpoint)} for t in trained],
        "reconstruction": recon_rows,
        "representation": representation,
        "latency": latency_rows,
    }
    results["claims"] = claims(results)
    return Study(results, x[: cfg.grid_images], grid_rows)


__all__ = ["Study", "run_study"]
