"""``dbae data``: dataset tools. ``dbae data build-lmdb SRC OUT --size 128`` converts a
folder (or .zip) of images into an LMDB in the DiffAE layout (see
:mod:`dbae.data.build_lmdb`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import DataError
from .common import add_image_limit_argument

HELP = "dataset tools (build-lmdb: convert a folder of images into an LMDB)"

BUILD_LMDB_HELP = "convert a folder (or .zip) of images into an LMDB in the DiffAE layout"
BUILD_LMDB_DESCRIPTION = """\
Convert every .png/.jpg/.jpeg/.webp image under SRC_DIR (a folder, searched recursively, or a
.zip file; sorted by path) into an LMDB directory OUT.lmdb, as DiffAE and the official DBAE code
read it: each image is centre-cropped to a square and resized to --size (shorter side to
SIZE with antialiased bicubic resampling, then the central square), encoded, and stored
under the key '{size}-{index:05d}' (e.g. '128-00000'); the key 'length' holds the number of
images as ASCII digits and 'names' a JSON list of the source file names (used to match the
rows of a CelebA-style attribute file).

Train on it with --dataset OUT.lmdb (any path ending in .lmdb, or a directory holding data.mdb,
is read as an LMDB). OUT is written under a temporary name and renamed at the end, so it is
never half-written; an existing OUT is refused unless --overwrite. Needs the lmdb package
(pip install lmdb)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    b = sub.add_parser("build-lmdb", help=BUILD_LMDB_HELP, description=BUILD_LMDB_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("src", type=Path, metavar="SRC_DIR", help="folder of images (recursive), or a .zip file")
    b.add_argument("out", type=Path, metavar="OUT.lmdb", help="the LMDB directory to write")
    b.add_argument("--size", type=int, required=True, help="stored resolution in pixels, e.g. 128 or 256")
    b.add_argument("--format", dest="image_format", choices=["jpeg", "webp", "png"], default="jpeg",
                   help="encoding of the stored images (default jpeg, like DiffAE; png is lossless)")
    b.add_argument("--quality", type=int, default=95, help="JPEG/WEBP quality 1..100 (default 95)")
    b.add_argument("--lossless", action="store_true", help="lossless WEBP (with --format webp; PNG is always lossless, JPEG never)")
    b.add_argument("--no-center-crop", action="store_true",
                   help="squash the whole image to a square instead of keeping the central square")
    b.add_argument("--key-format", default="{size}-{index:05d}",
                   help="record keys (default '{size}-{index:05d}'; the official DBAE CelebA LMDB "
                        "uses 'None-{index:07d}')")
    b.add_argument("--workers", type=int, default=1, help="processes that decode and encode images (default 1)")
    b.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (it must be an LMDB)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_image_limit_argument(b)
    b.set_defaults(data_run=run_build_lmdb)


def run(args: argparse.Namespace) -> int:
    return args.data_run(args)


def run_build_lmdb(args: argparse.Namespace) -> int:
    from ..data.build_lmdb import build_lmdb, describe

    if args.size < 1:
        raise DataError(f"--size must be a positive number of pixels, got {args.size}")
    if args.workers < 1:
        raise DataError(f"--workers must be at least 1, got {args.workers}")
    report = build_lmdb(args.src, args.out, args.size, image_format=args.image_format, quality=args.quality,
                        lossless=args.lossless, center_crop=not args.no_center_crop, key_format=args.key_format,
                        overwrite=args.overwrite, progress=not args.no_progress, workers=args.workers)
    print(describe(report))
    return 0
