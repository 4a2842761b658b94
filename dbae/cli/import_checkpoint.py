"""``dbae import``: a released checkpoint of the DBAE, DiffAE or PDAE authors as a run directory.

``dbae import ema_0.9999_1020000.pt --out runs/ffhq128`` recognises the file by its keys and
shapes (whose, which model, stochastic or deterministic), converts it exactly and writes a run
directory that every ``--ckpt`` takes (DiffAE's ``last.ckpt`` with a latent DPM: also the run's
``prior/``, for ``dbae generate``). ``dbae import best.pt --classifier --for runs/ffhq128
--out celeba40.safetensors`` turns the DBAE authors' 40-attribute linear classifier into a
classifier file for ``dbae manipulate`` and ``dbae serve``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..apps.attributes import BINARY, AttributeClassifier, save_classifier
from ..apps.attributes import FORMAT as CLASSIFIER_FORMAT
from ..checkpoints import official_dbae, resolve_checkpoint
from ..checkpoints.imports import import_run
from ..checkpoints.manifest import sha256_file
from ..data.attributes import CELEBA_ATTRIBUTES
from ..errors import DataError
from ..prior.identity import identify_checkpoint
from .common import check_out_dir, check_out_file

HELP = ("convert a released checkpoint of the DBAE, DiffAE or PDAE authors (or the DBAE authors' attribute "
        "classifier) into a run directory")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", type=Path, help="the authors' file, e.g. ema_0.9999_1020000.pt (or best.pt with --classifier)")
    p.add_argument("--out", type=Path, required=True,
                   help="run directory to write (with --classifier: the classifier file, .safetensors)")
    p.add_argument("--num-head-channels", type=int, default=None,
                   help="DBAE: channels per attention head of the U-Net (default: the authors' 64; shapes cannot "
                        "tell it, so give it for a model trained with another num_head_channels)")
    p.add_argument("--num-heads", type=int, default=None,
                   help="PDAE: attention heads of the U-Net (default 1, the assumed config of their FFHQ128 DPM; "
                        "shapes cannot tell it)")
    p.add_argument("--classifier", action="store_true",
                   help="SOURCE is the authors' attribute classifier (nn.Linear(512, 40) state dict, best.pt)")
    p.add_argument("--for", dest="for_ckpt", metavar="RUN",
                   help="with --classifier: the imported model (run directory or checkpoint) it belongs to")


def run(args: argparse.Namespace) -> int:
    if args.classifier:
        return _import_classifier(args)
    if args.for_ckpt is not None:
        raise DataError("--for goes with --classifier (it names the model a classifier belongs to)")
    for flag, value in (("--num-head-channels", args.num_head_channels), ("--num-heads", args.num_heads)):
        if value is not None and value < 1:
            raise DataError(f"{flag} must be at least 1, got {value}")
    check_out_dir(args.out)
    path = import_run(args.source, args.out, num_head_channels=args.num_head_channels, num_heads=args.num_heads)
    print(f"run directory: {args.out} (checkpoint {path.name}; where it came from: {args.out / 'import.json'})")
    method = json.loads((args.out / "import.json").read_text())["method"]
    hint = {"dbae": " (add --sampling-sigma-T 0 --sample-z for the authors' released inference settings)",
            "diffae": "; dbae generate --ckpt RUN samples from its latent DPM where it came with one",
            "pdae": ""}[method]  # fmt: skip
    print(f"use it with any --ckpt, e.g. dbae reconstruct --ckpt {args.out} --images DIR --resize{hint}")
    return 0


def _import_classifier(args: argparse.Namespace) -> int:
    if args.for_ckpt is None:
        raise DataError("--classifier needs --for RUN: the imported model whose latents it classifies")
    check_out_file(args.out, suffixes=(".safetensors",), writes=CLASSIFIER_FORMAT)
    ref = identify_checkpoint(resolve_checkpoint(args.for_ckpt))
    weight, bias = official_dbae.read_classifier(args.source)
    k, d = weight.shape
    if d != ref.z_dim:
        raise DataError(f"{args.source} classifies {d}-dimensional latents but {args.for_ckpt} has a "
                        f"{ref.z_dim}-dimensional z")
    if k != len(CELEBA_ATTRIBUTES):
        raise DataError(f"{args.source} has {k} outputs; the authors' classifier has CelebA's "
                        f"{len(CELEBA_ATTRIBUTES)} attributes")
    clf = AttributeClassifier(
        names=CELEBA_ATTRIBUTES, kinds=(BINARY,) * k, weight=weight.float(), bias=bias.float(),
        # the authors' directions act on raw z: z' = z + s sqrt(d) w / |w| (dbae_manipulation.py does not
        # normalise z), which is this package's rule with mean 0 and standard deviation 1
        z_mean=torch.zeros(d), z_std=torch.ones(d), target_mean=torch.zeros(k), target_std=torch.ones(k),
        source={"imported_from": args.source.name, "source_sha256": sha256_file(args.source),
                "kind": "the DBAE authors' CelebA-HQ attribute classifier (nn.Linear(512, 40))",
                "directions": "raw z (z_mean 0, z_std 1): the authors move z by s * sqrt(512) * w / |w| "
                              "without normalising it", "attributes": "CelebA's list_attr_celeba.txt order"},
        autoencoder=ref,
    )
    save_classifier(args.out, clf)
    print(f"{k} CelebA attributes on raw z, for {ref.path} (step {ref.step}): {args.out}")
    print(f"use it with dbae manipulate --ckpt {args.for_ckpt} --classifier {args.out} --attr Smiling ..., "
          f"or dbae serve --ckpt {args.for_ckpt} --classifier {args.out}")
    return 0
