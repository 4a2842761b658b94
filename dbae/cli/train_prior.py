"""``dbae train-prior``: train the latent DDIM prior on the inferred latents of a checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..prior.checkpoint import default_prior_dir
from ..prior.config import PRIOR_PRESETS, default_prior_preset, get_prior_preset, override_prior
from ..prior.identity import check_same_autoencoder, identify_checkpoint
from ..prior.latents import default_latents_path, load_latents
from ..prior.train import train_prior
from ..training.trainer import resolve_device
from .common import check_out_dir

HELP = "train the latent prior (MLP-skip latent DDIM) on the latents from infer-latents"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="the autoencoder checkpoint file, or its run directory")
    p.add_argument("--raw-weights", action="store_true", help="the latents were inferred with --raw-weights")
    p.add_argument("--latents", type=Path, help="latents file (default: the one beside the checkpoint)")
    p.add_argument("--preset", choices=sorted(PRIOR_PRESETS),
                   help="prior preset (default: the one matching the autoencoder's preset)")
    p.add_argument("--steps", type=int, help="optimisation steps")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--out", type=Path, help="prior directory (default: <run>/prior)")
    p.add_argument("--force", action="store_true", help="replace an existing prior in --out")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.out is not None:
        check_out_dir(args.out)
    ref = identify_checkpoint(args.ckpt, ema=not args.raw_weights)
    ckpt = Path(ref.path)
    latents_path = args.latents or default_latents_path(ckpt)
    latents = load_latents(latents_path, checkpoint_hint=str(ckpt))
    check_same_autoencoder(latents.info.autoencoder, ref, "the latent set", latents_path)
    preset = get_prior_preset(args.preset or default_prior_preset(ref.preset))
    preset = override_prior(preset, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    out = args.out or default_prior_dir(ckpt)
    print(f"prior preset {preset.name!r} on {latents.z.shape[0]} latents (d = {latents.z_dim}) of {ckpt}")
    result = train_prior(latents, preset, out, device=resolve_device(args.device),
                         progress=not args.no_progress, overwrite=args.force)
    first, last = result.losses[0][1], result.final_loss
    print(f"loss {first:.4f} (first {preset.train.log_every} steps) -> {last:.4f} (last)")
    return 0
