"""What the study measures on each trained method (EMA weights, eval mode):

- reconstruction of held-out images, MSE / PSNR / SSIM on [0, 1] (:func:`dbae.metrics.summarize`):
  ``tractable`` (one encoder pass only: DBAE from x_T = Dec(z); DiffAE / PDAE from a random
  x_T ~ N(0, I), the paper's Table 2 setting) and, for DiffAE / PDAE, ``inverted`` (x_T from
  DDIM inversion, their usual autoencoding);
- on the shapes data: a linear probe on z (:mod:`dbae.metrics.probe`: mean AP of the one-vs-rest
  attributes of shape and colour, mean Pearson r of the continuous factors) and TAD / ATTRS
  (:mod:`dbae.metrics.disentangle`, on the binary attributes of ``dbae eval tad``);
- latency, ms per image: ``encode`` (z = Enc(x)), ``infer`` (images -> (z, x_T): DBAE one
  encoder and one endpoint-decoder pass, DiffAE / PDAE the encoder and DDIM inversion) and
  ``decode`` ((z, x_T) -> images).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..apps.attributes import BINARY, CONTINUOUS, encode_shapes, shapes_binary_labels, shapes_labels
from ..baselines.checkpoints import Loaded, LoadedBaseline
from ..baselines.reconstruction import reconstruct_baseline
from ..metrics import summarize
from ..metrics.disentangle import tad
from ..metrics.probe import classification_probe, regression_probe
from .config import StudyConfig

Tensor = torch.Tensor


@dataclass(frozen=True)
class ReconRow:
    method: str
    label: str
    setting: str  # "tractable" or "inverted"
    x_T: str  # how x_T was obtained
    inversion_steps: int
    decode_nfe: int
    nfe: int  # denoising-network sampler steps per image in total
    images: int
    mse: float
    psnr: float
    ssim: float


@dataclass(frozen=True)
class LatencyRow:
    method: str
    label: str
    batch: int
    inversion_steps: int
    decode_nfe: int
    encode_ms: float  # per image, median over the timed calls
    infer_ms: float
    decode_ms: float


def _inversion_steps(cfg: StudyConfig, method: str) -> int:
    return cfg.pdae_inversion_steps if method == "pdae" else cfg.diffae_inversion_steps


@torch.no_grad()
def reconstructions(name: str, label: str, loaded: Loaded, x: Tensor, cfg: StudyConfig, batch: int = 64
                    ) -> list[tuple[ReconRow, Tensor]]:  # fmt: skip
    """(row, reconstructions in [-1, 1]) per setting of method ``name`` on images ``x``."""
    model = loaded.model
    device = next(model.parameters()).device
    target = (x.float() + 1) / 2
    out = []
    if isinstance(loaded, LoadedBaseline):
        inv = _inversion_steps(cfg, loaded.method)
        for setting, mode in (("tractable", "random"), ("inverted", "inferred")):
            g = torch.Generator(device).manual_seed(cfg.seed)
            rec = reconstruct_baseline(model, x, x_T=mode, inversion_steps=inv if mode == "inferred" else None,
                                       decode_steps=cfg.decode_steps, batch_size=batch, generator=g)  # type: ignore[arg-type]
            stats = summarize((rec.images + 1) / 2, target)
            how = "random N(0, I)" if mode == "random" else f"DDIM inversion ({inv} steps)"
            row = ReconRow(name, label, setting, how, rec.inversion_steps, rec.decode_steps, rec.nfe, x.shape[0],
                           **stats)  # fmt: skip
            out.append((row, rec.images))
        return out
    images, nfe = [], 0
    for chunk in x.split(batch):
        rec = model.reconstruct(chunk.to(device), cfg.dbae_nfe)
        images.append(rec.images.float().cpu())
        nfe = int(rec.nfe)
    rec_all = torch.cat(images)
    stats = summarize((rec_all + 1) / 2, target)
    out.append((ReconRow(name, label, "tractable", "Dec(z)", 0, nfe, nfe, x.shape[0], **stats), rec_all))
    return out


def shapes_representation(loaded: Loaded, cfg: StudyConfig) -> dict[str, Any]:
    """Probe and TAD of the encoder's z on the shapes factors (module docstring)."""
    z, factors = {}, {}
    for split, n in (("train", cfg.probe_train), ("test", cfg.probe_test)):
        z[split], factors[split] = encode_shapes(loaded.model, n, cfg.seed, split)
    y_tr, y_te = shapes_labels(factors["train"]), shapes_labels(factors["test"])
    binary = [i for i, k in enumerate(y_tr.kinds) if k == BINARY]
    cont = [i for i, k in enumerate(y_tr.kinds) if k == CONTINUOUS]
    names = [y_tr.names[i] for i in binary]
    cls = classification_probe(z["train"], y_tr.values[:, binary], z["test"], y_te.values[:, binary], names=names)
    reg = regression_probe(z["train"], y_tr.values[:, cont], z["test"], y_te.values[:, cont])
    tad_labels = shapes_binary_labels(factors["test"])
    dis = tad(z["test"], tad_labels.values, list(tad_labels.names))
    return {
        "map": cls["map"], "ap": dict(zip(names, cls["ap"])),  # type: ignore[arg-type]
        "mean_pearson_r": reg["mean_pearson_r"],
        "pearson_r": dict(zip([y_tr.names[i] for i in cont], reg["pearson_r"])),  # type: ignore[arg-type]
        "tad": dis["tad"], "attrs": dis["attrs"], "tad_attributes": len(tad_labels.names),
        "n_train": int(z["train"].shape[0]), "n_test": int(z["test"].shape[0]), "z_dim": int(z["test"].shape[1]),
    }  # fmt: skip


def _median_ms(fn: Callable[[], object], device: torch.device, cfg: StudyConfig) -> float:
    from dbae.export.latency import time_calls

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    return statistics.median(time_calls(fn, sync, warmup=cfg.latency_warmup, runs=cfg.latency_runs))


@torch.no_grad()
def latency(name: str, label: str, loaded: Loaded, x: Tensor, cfg: StudyConfig) -> LatencyRow:
    """Per-image milliseconds of encode, infer x_T and decode on a batch of ``x`` (module docstring)."""
    model = loaded.model
    device = next(model.parameters()).device
    b = cfg.latency_batch
    x = x[:b].to(device)
    if x.shape[0] < b:
        x = x.repeat((b + x.shape[0] - 1) // x.shape[0], 1, 1, 1)[:b]
    encode = lambda: model.encode(x)  # noqa: E731
    if isinstance(loaded, LoadedBaseline):
        inv = _inversion_steps(cfg, loaded.method)
        z = model.encode(x)
        x_T = model.infer_x_T(x, z, inv).x_T  # type: ignore[operator]
        infer = lambda: model.infer_x_T(x, model.encode(x), inv)  # noqa: E731
        decode = lambda: model.decode(z, x_T, cfg.decode_steps)  # noqa: E731
        decode_nfe = cfg.decode_steps
    else:
        inv = 0
        z = model.encode(x)
        x_T = model.endpoint(z)
        infer = lambda: model.endpoint(model.encode(x))  # noqa: E731
        decode = lambda: model.decode(z, cfg.dbae_nfe, x_T=x_T)  # noqa: E731
        decode_nfe = int(model.decode(z, cfg.dbae_nfe, x_T=x_T).nfe)
    ms = [_median_ms(fn, device, cfg) / b for fn in (encode, infer, decode)]
    return LatencyRow(name, label, b, inv, decode_nfe, *ms)


__all__ = ["LatencyRow", "ReconRow", "latency", "reconstructions", "shapes_representation"]
