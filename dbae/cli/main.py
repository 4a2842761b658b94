"""``dbae`` command line: one sub-command per module in this package."""

from __future__ import annotations

import argparse
import sys

from ..errors import DBAEError
from . import bench, data, encode, export, info, reconstruct, train
from . import generate, infer_latents, train_prior
from . import interpolate, manipulate, train_classifier
from . import serve
from . import import_checkpoint
from . import eval as eval_cmd
from .common import apply_image_limit

COMMANDS = {"train": train, "reconstruct": reconstruct, "encode": encode, "info": info, "bench": bench,
            "export": export,
            "infer-latents": infer_latents, "train-prior": train_prior, "generate": generate,
            "interpolate": interpolate, "train-classifier": train_classifier, "manipulate": manipulate,
            "eval": eval_cmd, "data": data, "serve": serve, "import": import_checkpoint}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dbae", description="Diffusion Bridge AutoEncoders")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        apply_image_limit(args)
        return args.run(args) or 0
    except DBAEError as exc:
        print(f"dbae {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dbae {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
