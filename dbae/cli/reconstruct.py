"""``dbae reconstruct``: encode in one pass, decode with a few steps, report quality.

DiffAE / PDAE checkpoints reconstruct as in ``dbae eval recon``: from the DDIM-inverted x_T
or a random one (``--x-T``, ``--inversion-steps``, ``--decode-steps``)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..baselines.checkpoints import LoadedBaseline
from ..imageio import save_grid
from ..metrics import summarize
from . import eval_baselines
from .common import (
    add_checkpoint_arguments,
    add_input_arguments,
    add_sampler_arguments,
    add_zoom_argument,
    apply_sampling_options,
    check_batch_size,
    check_out_file,
    check_sampler_arguments,
    check_zoom,
    read_inputs,
    report_path,
    sampling_report,
    write_report,
)

HELP = "reconstruct images; write a PNG grid and MSE/PSNR/SSIM"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(p)
    add_input_arguments(p)
    add_sampler_arguments(p)
    eval_baselines.add_recon_arguments(p)
    p.add_argument("--out", type=Path, default=Path("reconstruction.png"), help="grid PNG (default reconstruction.png)")
    p.add_argument("--json", type=Path, help="metrics JSON (default: next to the grid)")
    add_zoom_argument(p)
    p.add_argument("--batch-size", type=int, default=32)


def run(args: argparse.Namespace) -> int:
    check_out_file(args.out)
    check_zoom(args)
    if args.json is not None:
        check_out_file(args.json, "--json")  # named by the user: theirs to replace
    else:
        report_path(args.out, "reconstruct")
    check_batch_size(args)
    loaded = eval_baselines.open_checkpoint(args)
    eval_baselines.check_recon_options(args, loaded)
    if isinstance(loaded, LoadedBaseline):
        return _run_baseline(args, loaded)
    check_sampler_arguments(args)
    model = loaded.model
    apply_sampling_options(args, model)
    device = next(model.parameters()).device
    x = read_inputs(args, model.config.image_size)
    generator = torch.Generator(device).manual_seed(args.seed)
    images, endpoints, nfe = [], [], 0
    for chunk in x.split(args.batch_size):
        rec = model.reconstruct(chunk.to(device), args.nfe, sampler=args.sampler, churn=args.churn,
                                sample_z=args.sample_z, generator=generator)
        images.append(rec.images.cpu())
        endpoints.append(rec.x_T.cpu())
        nfe = rec.nfe
    recon, x_T = torch.cat(images), torch.cat(endpoints)
    n = min(16, x.shape[0])
    save_grid(args.out, [x[:n], x_T[:n], recon[:n]], ["input", "x_T", f"recon ({nfe} NFE)"], zoom=args.zoom)
    how = {"nfe": nfe, "sampler": args.sampler, "churn": args.churn, **sampling_report(args, model)}
    return _report(args, loaded, x, recon, how, f"{nfe} NFE ({args.sampler})")


def _run_baseline(args: argparse.Namespace, loaded: LoadedBaseline) -> int:
    x = read_inputs(args, loaded.model.config.image_size)
    recon, how = eval_baselines.reconstruct(args, loaded, x)
    n = min(16, x.shape[0])
    save_grid(args.out, [x[:n], recon[:n]], ["input", f"recon ({how['x_T']} x_T, {how['nfe']} steps)"],
              zoom=args.zoom)
    return _report(args, loaded, x, recon, {"method": loaded.method, **how}, f"{how['nfe']} steps ({how['x_T']} x_T)")


def _report(args: argparse.Namespace, loaded, x: torch.Tensor, recon: torch.Tensor, how: dict, what: str) -> int:
    stats = summarize((recon + 1) / 2, (x + 1) / 2)
    report = {"checkpoint": str(loaded.path), "step": loaded.step, "images": x.shape[0], **how, **stats}
    json_path = args.json or report_path(args.out, "reconstruct")
    write_report(json_path, "reconstruct", report)
    print(f"{x.shape[0]} images, {what}: MSE {stats['mse']:.5f}  PSNR {stats['psnr']:.2f} dB  SSIM {stats['ssim']:.4f}")
    print(f"grid: {args.out}  metrics: {json_path}")
    return 0
