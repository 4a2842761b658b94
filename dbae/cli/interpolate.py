"""``dbae interpolate``: latent interpolation between pairs of images (paper Figure 6a)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..apps.grids import blank_like
from ..apps.interpolate import interpolate
from ..data import ShapesDataset
from ..errors import DataError
from ..imageio import load_images, save_grid
from .common import (
    add_checkpoint_arguments,
    add_image_limit_argument,
    add_sampler_arguments,
    add_zoom_argument,
    check_batch_size,
    check_out_file,
    check_sampler_arguments,
    check_zoom,
    open_model,
    report_path,
    sampling_report,
    write_report,
)

HELP = "interpolate between pairs of images in z (rows: endpoints x_T and decoded images); no inversion"


def add_image_arguments(p: argparse.ArgumentParser, what: str) -> None:
    """Positional image files, or --dataset shapes; --resize; --seed (shared with manipulate)."""
    p.add_argument("images", nargs="*", type=Path, help=what)
    p.add_argument("--dataset", choices=["shapes"], help="use built-in held-out images instead of files")
    p.add_argument("--n", type=int, default=4, help="number of built-in images (default 4)")
    p.add_argument("--resize", action="store_true",
                   help="resize and centre-crop images to the model's size (otherwise other sizes are an error)")
    p.add_argument("--seed", type=int, default=0, help="seed of the built-in data and of any sampling noise")
    add_zoom_argument(p)
    add_image_limit_argument(p)


def read_images(args: argparse.Namespace, image_size: int) -> torch.Tensor:
    """The images named on the command line or the first --n built-in held-out images."""
    if args.images and args.dataset:
        raise DataError("give image files or --dataset, not both")
    if args.dataset is not None:
        if args.n < 1:
            raise DataError("--n must be at least 1")
        data = ShapesDataset(image_size=image_size, seed=args.seed, split="test")
        return torch.stack([data[i][0] for i in range(args.n)])
    if not args.images:
        raise DataError("no input images: give image files or --dataset shapes")
    for path in args.images:
        if not path.is_file():
            raise DataError(f"{path} does not exist or is not a file")
    return load_images(args.images, image_size, exact_size=not args.resize)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(p)
    add_image_arguments(p, "pairs of images A B [C D ...]: each pair is interpolated")
    add_sampler_arguments(p)
    p.add_argument("--steps", type=int, default=8, help="images per interpolation, both ends included (default 8)")
    p.add_argument("--out", type=Path, default=Path("interpolation.png"), help="grid PNG (default interpolation.png)")
    p.add_argument("--batch-size", type=int, default=64)


def run(args: argparse.Namespace) -> int:
    check_sampler_arguments(args)
    check_batch_size(args)
    check_out_file(args.out)
    report_path(args.out, "interpolate")
    if args.steps < 2:
        raise DataError(f"--steps must be at least 2 (both ends), got {args.steps}")
    check_zoom(args)
    loaded = open_model(args)
    model = loaded.model
    device = next(model.parameters()).device
    x = read_images(args, model.config.image_size)
    if x.shape[0] < 2 or x.shape[0] % 2:
        raise DataError(f"interpolation needs pairs of images (an even number, at least 2), got {x.shape[0]}")
    x = x.to(device)
    generator = torch.Generator(device).manual_seed(args.seed)
    res = interpolate(model, x[0::2], x[1::2], args.steps, args.nfe, sampler=args.sampler, churn=args.churn,
                      generator=generator, batch_size=args.batch_size, sample_z=bool(args.sample_z))
    rows, labels = [], []
    for p in range(res.images.shape[0]):
        a, b = x[2 * p], x[2 * p + 1]
        rows += [torch.cat([a[None], blank_like(a, args.steps - 2), b[None]]), res.x_T[p], res.images[p]]
        labels += ["inputs", "x_T", f"decoded ({res.nfe} NFE)"]
    save_grid(args.out, [r.cpu() for r in rows], labels, zoom=args.zoom)
    report = {
        "checkpoint": str(loaded.path), "step": loaded.step, "pairs": int(res.images.shape[0]),
        "lambdas": res.lambdas.tolist(), "nfe": res.nfe, "sampler": args.sampler, "churn": args.churn,
        **sampling_report(args, model),
        "inputs": [str(pth) for pth in args.images] if args.images else f"shapes test items 0..{args.n - 1}",
    }
    json_path = report_path(args.out, "interpolate")
    write_report(json_path, "interpolate", report)
    print(f"{res.images.shape[0]} interpolation(s) of {args.steps} images, {res.nfe} NFE each ({args.sampler})")
    print(f"grid: {args.out}  report: {json_path}")
    return 0
