#!/usr/bin/env python
"""How much of the image z and the endpoint x_T = Dec(z) carry, over training (issue 22).

    OMP_NUM_THREADS=1 python benchmarks/z_information.py train       # 3 runs x 2000 steps, ~20 min on one core
    python benchmarks/z_information.py measure --ckpt runs/shapes16  # one trained run (e.g. the quick start)

``train`` trains the ``shapes16`` networks (seed 0, the preset's settings) three ways with
``dbae train``'s trainer, keeping a checkpoint every ``--every`` steps, then measures each
checkpoint's EMA weights:

- ``dbae``: the stochastic encoder as the package initialises it (sig starts at
  :data:`dbae.nn.encoder.INITIAL_SIG` for every input);
- ``dbae-default-init``: the stochastic encoder with PyTorch's default initialisation of the
  head's log-sigma half (sig starts near 1), as before issue 22: the same weights, drawn from
  the same seed, with :func:`dbae.nn.encoder.init_log_sig_head` skipped;
- ``dbae-d``: the deterministic encoder.

Measured on held-out shapes (test split, 256 images; fits on 2048 training-split images):

- ``snr``: median over z's dimensions of var(mu) / mean(sig^2), the signal-to-noise ratio of
  z = mu + sig eps (how far apart the encoder keeps different images, in units of its noise);
  ``sig``: the median sig;
- ``centre_r``: the shape's centre (x and y) regressed linearly on mu
  (:func:`dbae.metrics.probe.regression_probe`): mean held-out Pearson r;
- ``mse_x_T``: MSE(x_T, x0) against ``mse_mean`` = MSE(mean training image, x0): whether the
  endpoint looks like the image; ``readout_mse``: MSE of the best linear read-out of x0 from
  x_T (ridge regression from its pixels to the image's, fitted on training endpoints): whether
  the endpoint carries the image even where it does not look like it;
- ``mse``, ``psnr``, ``ssim``: reconstructions from x_T = Dec(z) with 10 NFE (Euler), on [0, 1].

Writes JSON (default ``docs/data/z_information_shapes16_cpu.json``, or ``--json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from bench_common import write_json

import dbae.nn.encoder as encoder_module
from dbae.apps.attributes import shapes_images
from dbae.config import get_preset
from dbae.data.shapes import FACTORS
from dbae.errors import DBAEError
from dbae.inference import load_model
from dbae.metrics import summarize
from dbae.metrics.latent import posterior_snr
from dbae.metrics.probe import regression_probe
from dbae.model import DBAE
from dbae.training import TrainOptions, Trainer, override
from dbae.checkpoints import list_checkpoints

Tensor = torch.Tensor
VARIANTS = ("dbae", "dbae-default-init", "dbae-d")
CENTRE = [i for i, f in enumerate(FACTORS) if f.name in ("x", "y")]
#: ridge of the endpoint read-out (dbae.metrics.probe.regression_probe: ridge * n * |W|^2)
READOUT_RIDGE = 1e-3


@torch.no_grad()
def measure(model: DBAE, nfe: int = 10, n_test: int = 256, n_fit: int = 2048) -> dict[str, float]:
    """The measurements of the module docstring for one model (eval mode, CPU)."""
    model.eval()
    size = model.config.image_size
    x_fit, f_fit = next(shapes_images(size, n_fit, seed=0, split="train", batch_size=n_fit))
    x, f = next(shapes_images(size, n_test, seed=0, split="test", batch_size=n_test))
    mu_fit, _ = model.encoder(x_fit)
    mu, sig = model.encoder(x)
    out: dict[str, float] = {}
    if sig is not None:
        out["sig"] = float(sig.median())
        out["snr"] = float(posterior_snr(mu, sig).median())
    out["centre_r"] = regression_probe(mu_fit, f_fit[:, CENTRE], mu, f[:, CENTRE])["mean_pearson_r"]
    x_T_fit, x_T = model.endpoint(mu_fit), model.endpoint(mu)
    to01 = lambda a: (a.double() + 1) / 2  # noqa: E731  (every MSE on [0, 1])
    out["mse_x_T"] = float((to01(x_T) - to01(x)).square().mean())
    out["mse_mean"] = float((to01(x_fit).mean(0) - to01(x)).square().mean())
    pixels_fit, pixels = to01(x_fit).flatten(1), to01(x).flatten(1)
    readout = regression_probe(to01(x_T_fit).flatten(1), pixels_fit, to01(x_T).flatten(1), pixels, ridge=READOUT_RIDGE)
    # back from the probe's standardised units to pixel values: times each pixel's variance
    out["readout_mse"] = float((torch.tensor(readout["mse"]) * pixels_fit.var(0, unbiased=False)).mean())
    rec = model.reconstruct(x, nfe)
    out.update(summarize((rec.images + 1) / 2, (x + 1) / 2))
    return out


def train_variant(name: str, steps: int, every: int, work: Path, progress: bool) -> tuple[Path, dict[str, float]]:
    """Train (or reuse) one variant in ``work/name``; returns the run and the measurements of
    its initial weights (step 0)."""
    preset = override(get_preset("shapes16"), steps=steps, sample_every=steps, ckpt_every=every)
    if name == "dbae-d":
        model = dataclasses.replace(preset.model, encoder=dataclasses.replace(preset.model.encoder, stochastic=False))
        preset = dataclasses.replace(preset, model=model)
    run = work / name
    options = TrainOptions(out=run, resume=True, progress=progress, keep_last=steps // every + 1, eval_images=256)
    skip = name == "dbae-default-init"
    saved = encoder_module.init_log_sig_head
    if skip:  # PyTorch's default head, as before issue 22 (the same random draws)
        encoder_module.init_log_sig_head = lambda head, z_dim, sig=0.0: None
    try:
        trainer = Trainer(preset, options)
    finally:
        encoder_module.init_log_sig_head = saved
    initial = {"step": 0, **measure(trainer.ema.module)}  # a copy of the initial weights (before any resume)
    began = time.perf_counter()
    trainer.fit()
    if not (run / "train_seconds.txt").exists():
        (run / "train_seconds.txt").write_text(f"{time.perf_counter() - began:.1f}\n")
    return run, initial


def trajectory(run: Path) -> list[dict[str, float]]:
    """The measurements of every checkpoint of ``run`` (EMA weights)."""
    return [{"step": step, **measure(load_model(path).model)} for step, path in list_checkpoints(run / "checkpoints")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the three variants and measure them over training")
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--every", type=int, default=250)
    t.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    t.add_argument("--work", type=Path, default=Path("runs/z_information"))
    t.add_argument("--json", type=Path, default=Path("docs/data/z_information_shapes16_cpu.json"))
    t.add_argument("--no-progress", action="store_true")
    m = sub.add_parser("measure", help="measure one trained run or checkpoint (EMA weights)")
    m.add_argument("--ckpt", required=True)
    m.add_argument("--json", type=Path, help="also write the measurements here")
    args = p.parse_args(argv)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "load_average_before": os.getloadavg()}  # fmt: skip
    try:
        if args.command == "measure":
            loaded = load_model(args.ckpt)
            result = {"ckpt": str(loaded.path), "step": loaded.step, "preset": loaded.preset.name,
                      "stochastic": loaded.preset.model.encoder.stochastic, **measure(loaded.model)}  # fmt: skip
            print(json.dumps(result, indent=2))
        else:
            if args.variants != list(dict.fromkeys(args.variants)):
                p.error("--variants lists a variant twice")
            result = {"steps": args.steps, "every": args.every, "variants": {}}
            for name in args.variants:
                print(f"== {name}", flush=True)
                run, initial = train_variant(name, args.steps, args.every, args.work, not args.no_progress)
                rows = [initial, *trajectory(run)]
                seconds = float((run / "train_seconds.txt").read_text())
                result["variants"][name] = {"train_seconds": seconds, "rows": rows}
                for r in rows:
                    print(f"{name:<18} step {r['step']:5d}  snr {r.get('snr', float('nan')):8.2f}  "
                          f"sig {r.get('sig', float('nan')):.3f}  centre r {r['centre_r']:.2f}  "
                          f"x_T {r['mse_x_T']:.4f} / mean {r['mse_mean']:.4f}  read-out {r['readout_mse']:.4f}  "
                          f"SSIM {r['ssim']:.3f}  MSE {r['mse']:.5f}", flush=True)
    except DBAEError as exc:
        print(f"z_information.py: error: {exc}", file=sys.stderr)
        return 2
    result["meta"] = {**meta, "load_average_after": os.getloadavg()}
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
