"""``dbae eval recon|probe|tad|fid``: the paper's evaluation metrics (SPEC 10) of a
checkpoint, each written as ``<name>.json`` and a Markdown table ``<name>.md`` in ``--out``.

Labels. On the built-in shapes data, discrete factors (shape, colour) become one binary
one-vs-rest attribute per value (``colour=red``, ...): these are the multi-label targets of
the classification probe and of TAD. Continuous factors (size, x, y, rotation, background)
are the targets of the regression probe; for TAD, which needs binary attributes, each is
binarised at the middle of its range (``size>0.35``, ...). With ``--attributes FILE`` (the
CelebA ``list_attr_celeba.txt`` format) the file's binary attributes are used, with the
images from ``--images DIR``; the first ``--n-train`` rows train the probe and the next
``--n-test`` rows test it.

Checkpoints. ``recon``, ``probe`` and ``tad`` take DBAE, DiffAE and PDAE checkpoints (told
apart by their format tag); the baselines' reconstruction options: :mod:`.eval_baselines`.
``fid`` takes DBAE checkpoints, and DiffAE / PDAE ones for ``--fake recon``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Callable

import torch

from ..apps.attributes import (
    BINARY,
    AttributeLabels,
    attribute_file_images,
    encode_all,
    encode_shapes,
    read_attribute_file,
    shapes_binary_labels,
    shapes_images,
    shapes_labels,
)
from ..baselines.checkpoints import Loaded
from ..errors import ConfigError, DataError
from ..inference import LoadedModel
from ..metrics import summarize
from ..metrics.disentangle import tad
from ..metrics.features import extract, load_feature_extractor
from ..metrics.fid import fid, inception_score, precision_recall
from ..metrics.lpips import load_lpips
from ..metrics.probe import classification_probe, regression_probe
from ..checkpoints import atomic_write_text
from ..training.trainer import resolve_device
from . import eval_baselines
from .common import (
    add_checkpoint_arguments,
    add_image_limit_argument,
    add_input_arguments,
    add_sampler_arguments,
    apply_sampling_options,
    check_batch_size,
    check_out_dir,
    check_sampler_arguments,
    read_inputs,
    sampling_report,
)

HELP = "evaluate a checkpoint: recon (MSE/PSNR/SSIM/LPIPS), probe (AP, Pearson r), tad (TAD/ATTRS), fid (FID/PR/IS)"


# ----- output -----
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if math.isinf(v) else f"{v:.4f}")
    return str(v)


def write_report(out: Path, name: str, report: dict[str, Any], summary: dict[str, Any],
                 table: tuple[list[str], list[list[Any]]] | None = None) -> tuple[Path, Path]:
    """``out/name.json`` (the whole report) and ``out/name.md`` (summary table, optional detail table)."""
    lines = [f"# dbae eval {name}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in summary.items()]
    if table is not None:
        header, rows = table
        lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    atomic_write_text(json_path, json.dumps(report, indent=2, default=float) + "\n")
    atomic_write_text(md_path, "\n".join(lines) + "\n")
    print("\n".join(lines[2:2 + 2 + len(summary)]))
    print(f"wrote {json_path} and {md_path}")
    return json_path, md_path


def _header(loaded: Loaded | None) -> dict[str, Any]:
    return eval_baselines.header(loaded)


# ----- labelled latents -----
def add_label_arguments(p: argparse.ArgumentParser, n_train: int, n_test: int) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--dataset", choices=["shapes"], default=None, help="built-in shapes factors (default)")
    src.add_argument("--attributes", type=Path, help="CelebA-style attribute file (list_attr_celeba.txt)")
    p.add_argument("--images", type=Path, help="image folder of the --attributes file")
    p.add_argument("--resize", action="store_true", help="resize images to the model's size")
    add_image_limit_argument(p)
    p.add_argument("--attrs", nargs="+", help="use only these attributes (default: all)")
    p.add_argument("--n-train", type=int, default=n_train, help=f"training samples (default {n_train})")
    p.add_argument("--n-test", type=int, default=n_test, help=f"test samples (default {n_test})")
    p.add_argument("--seed", type=int, default=0, help="seed of the built-in data")


def labelled_latents(args: argparse.Namespace, loaded: Loaded, *, binarise: bool) -> tuple[
        torch.Tensor, AttributeLabels, torch.Tensor, AttributeLabels, str]:
    """(z_train, labels_train, z_test, labels_test, source description)."""
    model = loaded.model
    size = model.config.image_size
    if args.n_train < 2 or args.n_test < 2:
        raise DataError("--n-train and --n-test must be at least 2")
    if args.attributes is not None:
        if args.images is None:
            raise DataError("--attributes needs --images DIR (the folder its file names refer to)")
        table = read_attribute_file(args.attributes, limit=args.n_train + args.n_test)
        if len(table.files) < args.n_train + 2:
            raise DataError(f"{args.attributes} has {len(table.files)} rows: fewer than --n-train {args.n_train} "
                            "plus 2 test rows")
        z = encode_all(model, attribute_file_images(table, args.images, size, resize=args.resize))
        labels = table.labels
        split = args.n_train
        train = AttributeLabels(labels.names, labels.kinds, labels.values[:split])
        test = AttributeLabels(labels.names, labels.kinds, labels.values[split:])
        source = f"{args.attributes} (rows 1-{split} train, {split + 1}-{len(table.files)} test)"
        z_train, z_test = z[:split], z[split:]
    else:
        if args.images is not None:
            raise DataError("--images is for --attributes; the built-in shapes need no images")
        parts = []
        for split_name, n in (("train", args.n_train), ("test", args.n_test)):
            z, factors = encode_shapes(model, n, args.seed, split_name)
            labels = shapes_binary_labels(factors) if binarise else shapes_labels(factors)
            parts.append((z, labels))
        (z_train, train), (z_test, test) = parts
        source = f"shapes (seed {args.seed}; train split {args.n_train}, test split {args.n_test})"
    if args.attrs:
        train, test = train.select(args.attrs), test.select(args.attrs)
    return z_train, train, z_test, test, source


def _columns(labels: AttributeLabels, kind: str) -> list[int]:
    return [i for i, k in enumerate(labels.kinds) if k == kind]


# ----- sub-commands -----
def _dbae_recon(args: argparse.Namespace, model: Any, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(args.seed)
    recon, nfe = [], 0
    for chunk in x.split(args.batch_size):
        rec = model.reconstruct(chunk.to(device), args.nfe, sampler=args.sampler, churn=args.churn,
                                sample_z=args.sample_z, generator=generator)
        recon.append(rec.images.cpu())
        nfe = rec.nfe
    return torch.cat(recon), {"nfe": nfe, "sampler": args.sampler, "churn": args.churn, **sampling_report(args, model)}


def run_recon(args: argparse.Namespace) -> int:
    check_batch_size(args)
    loaded = eval_baselines.open_checkpoint(args)
    eval_baselines.check_recon_options(args, loaded)
    baseline = not isinstance(loaded, LoadedModel)
    if not baseline:
        check_sampler_arguments(args)
        apply_sampling_options(args, loaded.model)
    model = loaded.model
    device = next(model.parameters()).device
    lp = load_lpips(args.lpips_weights, args.lpips_lin, device) if args.lpips_weights or args.lpips_lin else None
    x = read_inputs(args, model.config.image_size)
    if baseline:
        images, how = eval_baselines.reconstruct(args, loaded, x)  # type: ignore[arg-type]
    else:
        images, how = _dbae_recon(args, model, x)
    a, b = (images + 1) / 2, (x + 1) / 2
    stats: dict[str, Any] = summarize(a, b)
    if lp is not None:
        stats["lpips"] = float(torch.cat([lp(u.to(device), v.to(device)).cpu()
                                          for u, v in zip(a.split(args.batch_size), b.split(args.batch_size))]).mean())
        if min(a.shape[-2:]) < lp.min_size:
            stats["lpips_note"] = f"images upsampled to at least {lp.min_size} px for LPIPS"
    report = {**_header(loaded), "images": int(x.shape[0]), **how, **stats}
    summary = {k: v for k, v in stats.items() if k != "lpips_note"}
    shown = {k: how[k] for k in ("x_T", "nfe") if k in how}
    write_report(args.out, "recon", report, {"images": int(x.shape[0]), **shown, **summary})
    return 0


def run_probe(args: argparse.Namespace) -> int:
    if not args.C > 0:
        raise DataError(f"--C (inverse regularisation strength) must be > 0, got {args.C}")
    if not args.ridge >= 0:
        raise DataError(f"--ridge must be >= 0, got {args.ridge}")
    loaded = eval_baselines.open_checkpoint(args)
    z_tr, y_tr, z_te, y_te, source = labelled_latents(args, loaded, binarise=False)
    report: dict[str, Any] = {**_header(loaded), "data": source, "n_train": int(z_tr.shape[0]),
                              "n_test": int(z_te.shape[0]), "z_dim": int(z_tr.shape[1])}
    summary: dict[str, Any] = {}
    rows: list[list[Any]] = []
    binary, cont = _columns(y_tr, BINARY), _columns(y_tr, "continuous")
    if binary:
        names = [y_tr.names[i] for i in binary]
        res = classification_probe(z_tr, y_tr.values[:, binary], z_te, y_te.values[:, binary], C=args.C, names=names)
        report["classification"] = {"C": args.C, "map": res["map"],
                                    "ap": dict(zip(names, res["ap"])), "accuracy": dict(zip(names, res["accuracy"]))}
        summary["mAP"] = res["map"]
        rows += [[n, "AP", ap] for n, ap in zip(names, res["ap"])]  # type: ignore[arg-type]
    if cont:
        res = regression_probe(z_tr, y_tr.values[:, cont], z_te, y_te.values[:, cont], ridge=args.ridge)
        names = [y_tr.names[i] for i in cont]
        report["regression"] = {"ridge": args.ridge, "mean_pearson_r": res["mean_pearson_r"],
                                "mean_mse": res["mean_mse"], "pearson_r": dict(zip(names, res["pearson_r"])),
                                "mse": dict(zip(names, res["mse"]))}
        summary["pearson_r"] = res["mean_pearson_r"]
        summary["mse (standardised)"] = res["mean_mse"]
        rows += [[n, "Pearson r / MSE", f"{r:.4f} / {m:.4f}"] for n, r, m in zip(names, res["pearson_r"], res["mse"])]  # type: ignore[arg-type]
    write_report(args.out, "probe", report, summary, (["attribute", "metric", "value"], rows))
    return 0


def run_tad(args: argparse.Namespace) -> int:
    loaded = eval_baselines.open_checkpoint(args)
    # TAD is measured on one set (the paper: 1000 CelebA samples): the "test" samples here
    _, _, z, labels, source = labelled_latents(args, loaded, binarise=True)
    binary = _columns(labels, BINARY)
    names = [labels.names[i] for i in binary]
    res = tad(z, labels.values[:, binary], names)
    report = {**_header(loaded), "data": source, "n": int(z.shape[0]), "z_dim": int(z.shape[1]), **res}
    per = res["per_attribute"]
    rows = [[n, v["best_auroc"], v["second_auroc"], v["best_dim"], v["entropy_reduction"], v["kept"], v["captured"]]
            for n, v in per.items()]  # type: ignore[union-attr]
    write_report(args.out, "tad", report, {"TAD": res["tad"], "ATTRS": res["attrs"], "attributes": len(names)},
                 (["attribute", "best AUROC", "2nd AUROC", "best dim", "entropy reduction", "kept", "captured"], rows))
    return 0


def _fid_images(args: argparse.Namespace, loaded: LoadedModel | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(real, fake) in [0, 1] and a description of the fake set."""
    if args.real == "shapes":
        if loaded is None:
            raise DataError("--real shapes needs --ckpt (for the image size) or use an image folder")
        real = read_inputs(argparse.Namespace(images=None, n=args.n, seed=args.seed, resize=False),
                           loaded.model.config.image_size)
    else:
        real = _folder(Path(args.real), args.n, args.resize, loaded)
    if args.fake in ("recon", "samples"):
        if loaded is None:
            raise DataError(f"--fake {args.fake} needs --ckpt")
        model = loaded.model
        device = next(model.parameters()).device
        generator = torch.Generator(device).manual_seed(args.seed + 1)
        if args.fake == "recon":
            # reconstructions of a disjoint set of images (the paper's 'AE' row)
            src = _shapes_train_images(model.config.image_size, args.n, args.seed) if args.real == "shapes" else real
            if not isinstance(loaded, LoadedModel):  # DiffAE / PDAE: from an inferred or a random x_T
                fake, how = eval_baselines.reconstruct(args, loaded, src)
                return (real.float() + 1) / 2, (fake.float() + 1) / 2, f"reconstructions ({how['x_T']} x_T)"
            outs = [model.reconstruct(c.to(device), args.nfe, sampler=args.sampler, churn=args.churn,
                                      sample_z=args.sample_z, generator=generator).images.cpu()
                    for c in src.split(args.batch_size)]
            fake, what = torch.cat(outs), "reconstructions"
        else:
            from ..prior.checkpoint import default_prior_dir, load_prior
            from ..prior.generate import check_prior_fits, generate
            from ..prior.identity import AutoencoderRef

            ref = AutoencoderRef.of(loaded.path, ema=not args.raw_weights, step=loaded.step,
                                    preset=loaded.preset.name, z_dim=model.config.z_dim)
            prior = load_prior(args.prior or default_prior_dir(loaded.path), device=device)
            check_prior_fits(prior, model, ref)
            fake = generate(model, prior, args.n, nfe=args.nfe, prior_steps=args.prior_steps, sampler=args.sampler,
                            churn=args.churn, eta=0.0, batch_size=args.batch_size, generator=generator,
                            progress=False).images.cpu()
            what = "samples (prior, decoder, bridge)"
    else:
        fake, what = _folder(Path(args.fake), args.n, args.resize, loaded, like=real), f"folder {args.fake}"
    return (real.float() + 1) / 2, (fake.float() + 1) / 2, what


def _shapes_train_images(image_size: int, n: int, seed: int) -> torch.Tensor:
    """``n`` shapes images of the train split (disjoint from the test split used as real data)."""
    return torch.cat([images for images, _ in shapes_images(image_size, n, seed, "train")])


def _folder(path: Path, n: int, resize: bool, loaded: LoadedModel | None, like: torch.Tensor | None = None) -> torch.Tensor:
    from ..imageio import find_images, load_images

    if not path.is_dir():
        raise DataError(f"{path} is not an image folder (use 'shapes' for the built-in data)")
    files = find_images(path)[:n]
    if not files:
        raise DataError(f"no images in {path}")
    size = loaded.model.config.image_size if loaded is not None else (like.shape[-1] if like is not None else None)
    return load_images(files, size, exact_size=not resize and size is not None)


def run_fid(args: argparse.Namespace) -> int:
    check_batch_size(args)
    loaded = eval_baselines.open_checkpoint(args) if args.ckpt else None
    eval_baselines.check_recon_options(args, loaded)
    if isinstance(loaded, LoadedModel) or loaded is None:
        check_sampler_arguments(args)
        if loaded is not None:
            apply_sampling_options(args, loaded.model)
    elif args.fake == "samples":
        raise ConfigError(f"--fake samples draws from a DBAE latent prior; {loaded.path} is not a DBAE checkpoint "
                          "(its reconstructions: --fake recon)")  # fmt: skip
    extractor = load_feature_extractor(args.inception, device=resolve_device(args.device))
    real, fake, what = _fid_images(args, loaded)  # type: ignore[arg-type]
    fr, fg = extract(extractor, real, args.batch_size), extract(extractor, fake, args.batch_size)
    stats: dict[str, Any] = {"fid": fid(fr.features, fg.features)}
    stats.update(precision_recall(fr.features, fg.features, k=args.k))
    if fg.logits is not None:
        mean, std = inception_score(fg.logits, splits=args.splits)
        stats["inception_score"], stats["inception_score_std"] = mean, std
    report = {**_header(loaded), "extractor": extractor.name, "real": args.real, "fake": what,
              "n_real": int(real.shape[0]), "n_fake": int(fake.shape[0]), "k": args.k, "is_splits": args.splits, **stats}
    write_report(args.out, "fid", report, {"n_real": int(real.shape[0]), "n_fake": int(fake.shape[0]), **stats})
    return 0


# ----- parser -----
def _common(p: argparse.ArgumentParser, ckpt_required: bool = True) -> None:
    if ckpt_required:
        add_checkpoint_arguments(p)
    else:
        p.add_argument("--ckpt", help="checkpoint file or run directory (needed for --fake recon/samples)")
        p.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA weights")
        p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    p.add_argument("--out", type=Path, default=Path("eval"), help="output folder for <command>.json/.md (default eval)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="eval_command", required=True, metavar="METRIC")
    commands: dict[str, tuple[str, Callable[[argparse.Namespace], int]]] = {
        "recon": ("reconstruction MSE/PSNR/SSIM (and LPIPS with --lpips-weights)", run_recon),
        "probe": ("linear probe on frozen z: mAP of binary attributes, Pearson r/MSE of continuous ones", run_probe),
        "tad": ("TAD and ATTRS disentanglement scores of z", run_tad),
        "fid": ("FID, Precision/Recall and Inception Score (local Inception weights)", run_fid),
    }
    parsers = {}
    for name, (help_text, fn) in commands.items():
        q = sub.add_parser(name, help=help_text, description=help_text)
        q.set_defaults(eval_run=fn)
        parsers[name] = q
    q = parsers["recon"]
    _common(q)
    add_input_arguments(q)
    add_sampler_arguments(q)
    eval_baselines.add_recon_arguments(q)
    q.add_argument("--batch-size", type=int, default=32)
    q.add_argument("--lpips-weights", type=Path, help="torchvision AlexNet weights alexnet-owt-7be5be79.pth")
    q.add_argument("--lpips-lin", type=Path, help="LPIPS v0.1 alex.pth (default: from the installed lpips package)")
    q = parsers["probe"]
    _common(q)
    add_label_arguments(q, 2000, 1000)
    q.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the logistic probe (default 1)")
    q.add_argument("--ridge", type=float, default=0.0, help="ridge penalty of the regression probe (default 0)")
    q = parsers["tad"]
    _common(q)
    add_label_arguments(q, 2, 1000)
    q.set_defaults(n_train=2)
    q = parsers["fid"]
    _common(q, ckpt_required=False)
    q.add_argument("--inception", type=Path, help="local Inception weights (see `dbae eval fid --help` notes)")
    q.add_argument("--real", default="shapes", help="'shapes' (test split) or an image folder (default shapes)")
    q.add_argument("--fake", default="recon", help="'recon', 'samples' (needs a trained prior) or an image folder")
    q.add_argument("--prior", type=Path, help="prior directory or file for --fake samples (default: <run>/prior)")
    q.add_argument("--prior-steps", type=int, default=50)
    q.add_argument("--n", type=int, default=1000, help="images per set (default 1000)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--resize", action="store_true", help="resize folder images to the model's size")
    add_image_limit_argument(q)
    q.add_argument("--k", type=int, default=3, help="neighbours of the precision/recall manifolds (default 3)")
    q.add_argument("--splits", type=int, default=1, help="Inception Score splits (default 1)")
    q.add_argument("--batch-size", type=int, default=50)
    add_sampler_arguments(q)
    eval_baselines.add_recon_arguments(q)  # DiffAE / PDAE checkpoints: how --fake recon reconstructs


def run(args: argparse.Namespace) -> int:
    check_out_dir(args.out)  # made by write_report, so that a failed evaluation leaves no empty folder
    return args.eval_run(args)
