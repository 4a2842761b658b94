"""``dbae encode``: images -> latent codes z, saved as .npy or .safetensors."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ..checkpoints import atomic_write, write_safetensors
from .common import (
    add_checkpoint_arguments,
    add_input_arguments,
    check_batch_size,
    check_out_file,
    open_model,
    read_inputs,
)

HELP = "encode images to latent codes z (.npy or .safetensors)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(p)
    add_input_arguments(p)
    p.add_argument("--out", type=Path, required=True, help="output file: .npy or .safetensors")
    p.add_argument("--sample", action="store_true", help="sample z from a stochastic encoder (default: its mean)")
    p.add_argument("--batch-size", type=int, default=64)


def run(args: argparse.Namespace) -> int:
    check_out_file(args.out, suffixes=(".npy", ".safetensors"))
    check_batch_size(args)
    suffix = args.out.suffix.lower()
    loaded = open_model(args)
    model = loaded.model
    device = next(model.parameters()).device
    x = read_inputs(args, model.config.image_size)
    generator = torch.Generator(device).manual_seed(args.seed)
    with torch.no_grad():
        z = torch.cat([model.encode(c.to(device), sample=args.sample, generator=generator).cpu()
                       for c in x.split(args.batch_size)])
    if suffix == ".npy":
        def write(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                np.save(fh, z.numpy())

        atomic_write(args.out, write)
    else:
        write_safetensors(args.out, {"z": z}, {"checkpoint": str(loaded.path)})
    print(f"encoded {z.shape[0]} images to z of dimension {z.shape[1]}: {args.out}")
    return 0
