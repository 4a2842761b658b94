"""``dbae generate``: new images from the latent prior, the decoder and the bridge sampler."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ..baselines.checkpoints import LABELS, LoadedBaseline
from ..errors import ConfigError, DataError
from ..imageio import save_grid, save_image, to_uint8
from ..prior.checkpoint import default_prior_dir, load_prior
from ..prior.generate import check_prior_fits, generate
from ..prior.identity import AutoencoderRef
from ..checkpoints import atomic_write, atomic_write_text
from . import eval_baselines
from .common import (
    add_checkpoint_arguments,
    add_sampler_arguments,
    add_zoom_argument,
    apply_sampling_options,
    check_batch_size,
    check_out_dir,
    check_sampler_arguments,
    check_zoom,
)

HELP = ("generate images: z from the latent prior (DDIM), x_T = Dec(z), then the bridge ODE/SDE (a DiffAE model with "
        "its imported latent DPM: x_T ~ N(0, I), then its DDIM in --nfe steps)")
GRID_COLUMNS = 8


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(p)
    p.add_argument("--prior", type=Path, help="prior directory or file (default: <run>/prior)")
    p.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    add_sampler_arguments(p, encodes=False)
    p.add_argument("--prior-steps", type=int, default=100,
                   help="DDIM steps of the prior (default 100; each is one cheap MLP evaluation)")
    p.add_argument("--prior-eta", type=float, default=0.0, help="DDIM eta of the prior: 0 deterministic (default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prior noise and of any SDE noise")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", type=Path, default=Path("generated"),
                   help="output folder: grid.png, images/NNNNNN.png, samples.npy, z.npy, generate.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_zoom_argument(p, "grid.png's images (images/ stay 1x)")


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array)

    atomic_write(path, write)


def run(args: argparse.Namespace) -> int:
    check_sampler_arguments(args)
    if args.n < 1:
        raise DataError(f"--n must be at least 1, got {args.n}")
    check_batch_size(args)
    if args.prior_steps < 1 or args.prior_eta < 0:  # the upper bound is the prior's (checked when it is loaded)
        raise DataError(f"--prior-steps must be at least 1 and --prior-eta >= 0, got {args.prior_steps} and "
                        f"{args.prior_eta}")  # fmt: skip
    check_zoom(args)
    check_out_dir(args.out)
    loaded = eval_baselines.open_checkpoint(args)
    model = loaded.model
    if isinstance(loaded, LoadedBaseline):
        if loaded.method != "diffae":
            raise ConfigError(f"{loaded.path} is a {LABELS[loaded.method]} checkpoint: dbae generate samples DBAE "
                              "models and DiffAE's with their latent DPM")  # fmt: skip
        if args.sampler != "euler" or args.churn != 0.0 or args.sampling_sigma_T is not None:
            raise ConfigError("--sampler, --churn and --sampling-sigma-T are DBAE options; a DiffAE model decodes "
                              "with its DDIM in --nfe steps")  # fmt: skip
        preset_name = loaded.preset_name
    else:
        apply_sampling_options(args, model)
        preset_name = loaded.preset.name
    device = next(model.parameters()).device
    ref = AutoencoderRef.of(loaded.path, ema=not args.raw_weights, step=loaded.step, preset=preset_name,
                            z_dim=model.config.z_dim)
    prior = load_prior(args.prior or default_prior_dir(loaded.path), device=device)
    check_prior_fits(prior, model, ref)
    generator = torch.Generator(device).manual_seed(args.seed)
    result = generate(model, prior, args.n, nfe=args.nfe, prior_steps=args.prior_steps, sampler=args.sampler,
                      churn=args.churn, eta=args.prior_eta, batch_size=args.batch_size, generator=generator,
                      progress=not args.no_progress)
    out: Path = args.out
    rows = list(result.images.split(GRID_COLUMNS))
    save_grid(out / "grid.png", rows, zoom=args.zoom)
    for i, image in enumerate(result.images):
        save_image(out / "images" / f"{i:06d}.png", image)
    _save_npy(out / "samples.npy", to_uint8(result.images))
    _save_npy(out / "z.npy", result.z.numpy())
    report = {
        "checkpoint": str(loaded.path), "checkpoint_sha256": ref.sha256, "step": loaded.step,
        "prior": str(prior.path), "prior_step": prior.step, "n": args.n, "seed": args.seed,
        "nfe": result.nfe, "sampler": args.sampler, "churn": args.churn,
        "prior_steps": args.prior_steps, "prior_eta": args.prior_eta, "batch_size": args.batch_size,
    }
    atomic_write_text(out / "generate.json", json.dumps(report, indent=2) + "\n")
    mode = "SDE" if args.churn > 0 else "ODE"
    decoder = (f"DiffAE's DDIM {result.nfe} steps from x_T ~ N(0, I)" if isinstance(loaded, LoadedBaseline)
               else f"decoder {result.nfe} NFE ({args.sampler} {mode})")  # fmt: skip
    print(f"{args.n} images, prior {args.prior_steps} DDIM steps, {decoder}: {out / 'grid.png'}, {out / 'images'}/, "
          f"{out / 'samples.npy'}")
    return 0
