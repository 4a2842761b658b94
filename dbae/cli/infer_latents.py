"""``dbae infer-latents``: encode a dataset and store z with its statistics next to the checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..data import build_dataset
from ..errors import DataError
from ..prior.identity import AutoencoderRef
from ..prior.latents import FORMAT as LATENTS_FORMAT
from ..prior.latents import LatentInfo, LatentSet, default_latents_path, infer_latents, save_latents
from .common import (
    add_checkpoint_arguments,
    add_image_limit_argument,
    check_batch_size,
    check_out_file,
    open_model,
)

HELP = "encode a dataset to latents z and store them with per-dimension statistics (for train-prior)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(p)
    p.add_argument("--dataset",
                   help="'shapes' (built-in), a folder of images, a .zip file or an LMDB "
                        "(default: the checkpoint's training data)")
    p.add_argument("--split", choices=["train", "test"], default="train",
                   help="split of the built-in data (default train)")
    p.add_argument("--seed", type=int, help="seed of the built-in data (default: the checkpoint's training seed)")
    p.add_argument("--n", type=int, help="number of images to encode (default: the whole dataset)")
    p.add_argument("--sample", action="store_true", help="sample z from a stochastic encoder (default: its mean)")
    p.add_argument("--out", type=Path, help="latents file (default: <checkpoint stem>.latents.safetensors beside it)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_image_limit_argument(p)


def run(args: argparse.Namespace) -> int:
    check_batch_size(args)
    if args.out is not None:
        check_out_file(args.out, suffixes=(".safetensors",), writes=LATENTS_FORMAT)
    loaded = open_model(args)
    model = loaded.model
    train_cfg = loaded.preset.train
    spec = args.dataset or train_cfg.dataset
    seed = train_cfg.seed if args.seed is None else args.seed
    if spec != "shapes" and not Path(spec).exists():
        raise DataError(f"--dataset {spec!r} is neither 'shapes' nor a folder of images, a .zip file or an LMDB")
    dataset = build_dataset(spec, model.config.image_size, seed=seed, split=args.split)
    count = len(dataset) if args.n is None else args.n
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    z = infer_latents(model, dataset, count, batch_size=args.batch_size, sample=args.sample,
                      generator=generator, progress=not args.no_progress)
    ref = AutoencoderRef.of(loaded.path, ema=not args.raw_weights, step=loaded.step, preset=loaded.preset.name,
                            z_dim=model.config.z_dim)
    info = LatentInfo(ref, spec, args.split if spec == "shapes" else "folder", seed, count, args.sample)
    latents = LatentSet.from_latents(z, info)
    out = save_latents(args.out or default_latents_path(loaded.path), latents)
    lo, hi, top = float(latents.std.min()), float(latents.std.max()), float(latents.mean.abs().max())
    print(f"{count} latents of dimension {latents.z_dim} from {spec} ({info.split}): per-dimension std "
          f"{lo:.3f}..{hi:.3f}, |mean| <= {top:.3f}")
    print(f"latents: {out}  summary: {out.with_suffix('.json')}")
    return 0
