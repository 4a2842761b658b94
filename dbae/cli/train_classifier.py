"""``dbae train-classifier``: linear attribute models on normalized z (SPEC 8).

Labels come from the built-in shapes factors (``--dataset shapes``) or from a CelebA-style
attribute file next to an image folder (``--attr-file list_attr_celeba.txt --image-dir DIR``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..apps.attributes import FORMAT as CLASSIFIER_FORMAT
from ..apps.attributes import (
    BINARY,
    AttributeLabels,
    attribute_file_images,
    encode_all,
    encode_shapes,
    fit_classifier,
    read_attribute_file,
    save_classifier,
    shapes_labels,
)
from ..errors import DataError
from ..prior.identity import AutoencoderRef
from .common import (
    add_checkpoint_arguments,
    add_image_limit_argument,
    check_batch_size,
    check_out_file,
    open_model,
    report_path,
    write_report,
)

HELP = "train linear attribute classifiers on normalized z (shapes factors or a CelebA-style attribute file)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", choices=["shapes"], help="labels from the built-in shapes factors")
    src.add_argument("--attr-file", type=Path, help="a list_attr_celeba.txt-style file (-1/1 labels)")
    p.add_argument("--image-dir", type=Path, help="folder holding the images named in --attr-file")
    p.add_argument("--resize", action="store_true", help="resize --image-dir images to the model's size")
    add_image_limit_argument(p)
    p.add_argument("--limit", type=int, help="use only the first N rows of --attr-file")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="last fraction of --attr-file rows held out for the metrics (default 0.1)")
    p.add_argument("--n", type=int, default=2000, help="shapes training images (default 2000)")
    p.add_argument("--n-val", type=int, default=500, help="shapes held-out images (test split, default 500)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shapes data")
    p.add_argument("--attrs", nargs="+", help="only these attributes (default: all)")
    p.add_argument("--l2", type=float, default=1e-3, help="ridge penalty on the weights (default 1e-3)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", type=Path, default=Path("classifier.safetensors"),
                   help="classifier file (default classifier.safetensors; a JSON summary goes next to it)")


def run(args: argparse.Namespace) -> int:
    check_out_file(args.out, suffixes=(".safetensors",), writes=CLASSIFIER_FORMAT)
    report_path(args.out, "train-classifier")
    check_batch_size(args)
    if args.l2 < 0:
        raise DataError(f"--l2 must be >= 0, got {args.l2}")
    loaded = open_model(args)
    model = loaded.model
    size = model.config.image_size
    if args.dataset == "shapes":
        if args.n < 2 or args.n_val < 2:
            raise DataError("--n and --n-val must be at least 2")
        z, train_f = encode_shapes(model, args.n, args.seed, "train", args.batch_size)
        z_val, val_f = encode_shapes(model, args.n_val, args.seed, "test", args.batch_size)
        labels, labels_val = shapes_labels(train_f), shapes_labels(val_f)
        source = {"data": "shapes", "seed": args.seed, "train_images": args.n, "val_images": args.n_val}
    else:
        if args.image_dir is None:
            raise DataError("--attr-file needs --image-dir, the folder holding its images")
        if args.limit is not None and args.limit < 2:
            raise DataError("--limit must be at least 2")
        if not (0.0 < args.val_fraction < 1.0):
            raise DataError(f"--val-fraction must lie in (0, 1), got {args.val_fraction}")
        table = read_attribute_file(args.attr_file, args.limit)
        n = len(table.files)
        n_val = max(1, int(round(n * args.val_fraction)))
        if n - n_val < 2:
            raise DataError(f"{args.attr_file}: {n} images are too few to train and hold out {n_val}")
        z_all = encode_all(model, attribute_file_images(table, args.image_dir, size, resize=args.resize,
                                                        batch_size=args.batch_size))
        z, z_val = z_all[: n - n_val], z_all[n - n_val:]
        values = table.labels.values
        labels = AttributeLabels(table.labels.names, table.labels.kinds, values[: n - n_val])
        labels_val = AttributeLabels(table.labels.names, table.labels.kinds, values[n - n_val:])
        source = {"data": str(args.attr_file), "image_dir": str(args.image_dir), "train_images": n - n_val,
                  "val_images": n_val}
    if args.attrs:
        labels, labels_val = labels.select(args.attrs), labels_val.select(args.attrs)
    clf = fit_classifier(z, labels, z_val=z_val, labels_val=labels_val, l2=args.l2)
    clf.source = {"checkpoint": str(loaded.path), "step": loaded.step, **source}
    clf.autoencoder = AutoencoderRef.of(loaded.path, ema=not args.raw_weights, step=loaded.step,
                                        preset=loaded.preset.name, z_dim=model.config.z_dim)  # fmt: skip
    save_classifier(args.out, clf)
    summary = {"names": list(clf.names), "kinds": list(clf.kinds), "metrics": clf.metrics, "source": clf.source}
    json_path = report_path(args.out, "train-classifier")
    write_report(json_path, "train-classifier", summary)
    print(f"{len(clf.names)} attribute(s) on {clf.z_dim}-d normalized z, {len(z)} training images; "
          f"held-out ({len(z_val)} images):")
    for name, kind in zip(clf.names, clf.kinds):
        m = clf.metrics[name]
        if kind == BINARY:
            print(f"  {name:<24} binary      accuracy {m['accuracy']:.3f}  AP {m['ap']:.3f}")
        else:
            print(f"  {name:<24} continuous  Pearson r {m['pearson_r']:.3f}  R^2 {m['r2']:.3f}")
    print(f"classifier: {args.out}  summary: {json_path}")
    return 0
