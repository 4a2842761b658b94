"""``dbae manipulate``: move images along a classifier's attribute direction (SPEC 8)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..apps.attributes import load_classifier
from ..apps.manipulate import MODE_TITLES, MODES, manipulate
from ..imageio import save_grid
from ..prior.identity import AutoencoderRef
from .common import (
    add_checkpoint_arguments,
    add_sampler_arguments,
    check_batch_size,
    check_out_file,
    check_sampler_arguments,
    check_zoom,
    open_model,
    report_path,
    sampling_report,
    write_report,
)
from .interpolate import add_image_arguments, read_images

HELP = "edit images along an attribute direction at several scales (endpoint+condition and condition-only)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(p)
    add_image_arguments(p, "images to edit")
    add_sampler_arguments(p)
    p.add_argument("--classifier", type=Path, required=True, help="file written by `dbae train-classifier`")
    p.add_argument("--attr", required=True, help="attribute name (e.g. colour=red, x, Smiling)")
    p.add_argument("--scale", type=float, nargs="+", default=[-1.0, -0.5, 0.5, 1.0],
                   help="one or more scales s: z' = denorm(norm(z) + s sqrt(d) w/|w|) (default -1 -0.5 0.5 1)")
    p.add_argument("--mode", choices=[*MODES, "all"], default="all",
                   help="both: edit endpoint and condition; condition: condition only; all: both rows (default)")
    p.add_argument("--out", type=Path, default=Path("manipulation.png"), help="grid PNG (default manipulation.png)")
    p.add_argument("--batch-size", type=int, default=64)


def run(args: argparse.Namespace) -> int:
    check_sampler_arguments(args)
    check_batch_size(args)
    check_out_file(args.out)
    report_path(args.out, "manipulate")
    check_zoom(args)
    clf = load_classifier(args.classifier)
    clf.index(args.attr)  # an unknown name fails before the model is loaded
    loaded = open_model(args)
    model = loaded.model
    ref = AutoencoderRef.of(loaded.path, ema=not args.raw_weights, step=loaded.step, preset=loaded.preset.name,
                            z_dim=model.config.z_dim)  # fmt: skip
    clf.check_model(model, ref, args.classifier)
    device = next(model.parameters()).device
    x = read_images(args, model.config.image_size).to(device)
    scales = sorted({0.0, *args.scale})  # s = 0 (the plain reconstruction) is always shown
    modes = MODES if args.mode == "all" else (args.mode,)
    generator = torch.Generator(device).manual_seed(args.seed)
    res = manipulate(model, x, clf, args.attr, scales, args.nfe, modes=modes, sampler=args.sampler,
                     churn=args.churn, generator=generator, batch_size=args.batch_size,
                     sample_z=bool(args.sample_z))
    order = list(range(len(scales)))
    rows, labels = [], []
    for b in range(x.shape[0]):
        for mode in modes:
            rows.append(torch.cat([x[b:b + 1], res.images[mode][order, b]]))
            labels.append(MODE_TITLES[mode])
    save_grid(args.out, [r.cpu() for r in rows], labels, zoom=args.zoom)
    col = clf.index(args.attr)
    report = {
        "checkpoint": str(loaded.path), "step": loaded.step, "classifier": str(args.classifier),
        "attribute": args.attr, "kind": clf.kinds[col], "columns": ["input"] + [scales[i] for i in order],
        "nfe": res.nfe, "sampler": args.sampler, "churn": args.churn, **sampling_report(args, model),
        "mean_score": {mode: {str(s): float(res.scores[mode][i].mean()) for i, s in enumerate(scales)}
                       for mode in modes},
    }
    json_path = report_path(args.out, "manipulate")
    write_report(json_path, "manipulate", report)
    what = "probability" if clf.kinds[col] == "binary" else "value"
    print(f"{x.shape[0]} image(s), attribute {args.attr!r}, {res.nfe} NFE ({args.sampler}); "
          f"classifier {what} of the re-encoded results, mean over images:")
    for mode in modes:
        cells = "  ".join(f"s={scales[i]:+g}: {float(res.scores[mode][i].mean()):.3f}" for i in order)
        print(f"  {MODE_TITLES[mode]:<20} {cells}")
    print(f"grid (columns: input, s = {', '.join(f'{scales[i]:g}' for i in order)}): {args.out}  report: {json_path}")
    return 0
