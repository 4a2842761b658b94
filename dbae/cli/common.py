"""Arguments and input handling shared by several sub-commands."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from ..data import ShapesDataset
from ..errors import CheckpointError, DataError
from ..imageio import DEFAULT_MAX_IMAGE_PIXELS, MIN_GRID_CELL, file_in_the_way, load_images, set_max_image_pixels
from ..inference import LoadedModel, load_model
from ..checkpoints import read_header
from ..sampling import SAMPLERS
from ..checkpoints import FORMAT, OTHER_KINDS, atomic_write_text
from ..training.trainer import resolve_device


def add_checkpoint_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint file, or a run directory (its newest checkpoint)")
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")


def add_image_limit_argument(p: argparse.ArgumentParser) -> None:
    """``--max-megapixels``: the pixel limit of every image the command reads
    (:func:`dbae.imageio.set_max_image_pixels`, applied by :func:`apply_image_limit`)."""
    p.add_argument("--max-megapixels", type=float, default=None, metavar="MP",
                   help=f"refuse images over MP megapixels before decoding them (default "
                        f"{DEFAULT_MAX_IMAGE_PIXELS / 1e6:g}: a guard against decompression bombs)")


def apply_image_limit(args: argparse.Namespace) -> None:
    """Set the process's image pixel limit from ``--max-megapixels`` (the default when the
    command has the option but it was not given; commands without it leave the limit as is)."""
    if not hasattr(args, "max_megapixels"):
        return
    value = args.max_megapixels
    if value is None:
        set_max_image_pixels(DEFAULT_MAX_IMAGE_PIXELS)
        return
    if not (value > 0) or value == float("inf"):
        raise DataError(f"--max-megapixels must be a positive number, got {value}")
    set_max_image_pixels(max(1, round(value * 1e6)))


def add_input_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", type=Path, help="an image file or a folder of png/jpg/webp images")
    src.add_argument("--dataset", choices=["shapes"], help="built-in data (held-out split)")
    p.add_argument("--n", type=int, default=16, help="number of built-in images to use (default 16)")
    p.add_argument(
        "--resize", action="store_true",
        help="resize and centre-crop images to the model's size (otherwise other sizes are an error)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the built-in data and of any sampling noise")
    add_image_limit_argument(p)


def add_zoom_argument(p: argparse.ArgumentParser, what: str = "the grid's images") -> None:
    """``--zoom N``: enlarge the images of a written PNG grid N times (nearest pixels); the
    default enlarges small images to at least MIN_GRID_CELL pixels a side (1 keeps 1x)."""
    p.add_argument("--zoom", type=int, default=None,
                   help=f"enlarge {what} N times with nearest pixels (default: small images to at least "
                        f"{MIN_GRID_CELL} pixels a side, e.g. 4x for 16x16 models; 1 keeps 1x)")


def check_zoom(args: argparse.Namespace) -> None:
    """DataError unless ``--zoom`` is unset (automatic) or at least 1."""
    if args.zoom is not None and args.zoom < 1:
        raise DataError(f"--zoom must be at least 1, got {args.zoom}")


def add_sampler_arguments(p: argparse.ArgumentParser, *, encodes: bool = True) -> None:
    """The sampler's options; ``encodes``: the command encodes images (``--sample-z``)."""
    p.add_argument("--nfe", type=int, default=10, help="network evaluations budget (default 10)")
    p.add_argument("--sampler", choices=SAMPLERS, default="euler", help="ODE sampler (default euler)")
    p.add_argument("--churn", type=float, default=0.0, help="stochastic churn ratio in [0, 1) (default 0)")
    p.add_argument("--sampling-sigma-T", type=float, default=None, metavar="S",
                   help="sigma_T of the preconditioning while sampling (default: the one the model was trained "
                        "with, 0.5; the authors' released scripts sample with 0)")
    if not encodes:
        return
    p.add_argument("--sample-z", action="store_true", default=None,
                   help="encode images to a sample of the stochastic encoder's posterior instead of its mean "
                        "(what the authors' scripts always do; seeded by --seed)")


def apply_sampling_options(args: argparse.Namespace, model) -> None:
    """Set ``--sampling-sigma-T`` on ``model`` (a :class:`dbae.model.DBAE`), when given."""
    value = getattr(args, "sampling_sigma_T", None)
    if value is not None:
        model.set_sampling_sigma_T(value)


def sampling_report(args: argparse.Namespace, model) -> dict:
    """The sampling settings of a run, for its JSON report."""
    return {"sampling_sigma_T": model.sampling_sigma_T, "sample_z": bool(getattr(args, "sample_z", False))}


def open_model(args: argparse.Namespace) -> LoadedModel:
    loaded = load_model(args.ckpt, ema=not args.raw_weights, device=resolve_device(args.device))
    apply_sampling_options(args, loaded.model)
    return loaded


def read_inputs(args: argparse.Namespace, image_size: int) -> torch.Tensor:
    if args.images is not None:
        if not args.images.exists():
            raise DataError(f"{args.images} does not exist")
        return load_images(args.images, image_size, exact_size=not args.resize)
    if args.n < 1:
        raise DataError("--n must be at least 1")
    data = ShapesDataset(image_size=image_size, seed=args.seed, split="test")
    return torch.stack([data[i][0] for i in range(args.n)])


def check_batch_size(args: argparse.Namespace) -> None:
    """DataError unless ``--batch-size`` is at least 1."""
    if args.batch_size < 1:
        raise DataError(f"--batch-size must be at least 1, got {args.batch_size}")


def _check_parents(path: Path, flag: str) -> None:
    blocking = file_in_the_way(path)
    if blocking is not None:
        raise DataError(f"{flag} {path}: {blocking} is a file, not a folder; choose another {flag}")


def check_out_dir(path: Path, flag: str = "--out") -> None:
    """DataError, before any work, when the output folder ``path`` cannot be made: it is an
    existing file, or lies under one."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DataError(f"{flag} {path} is an existing file, not a folder; choose another {flag}")
    _check_parents(path, flag)


def check_out_file(
    path: Path, flag: str = "--out", *, suffixes: tuple[str, ...] = (), writes: str | None = None
) -> None:
    """DataError, before any work, when the output file ``path`` cannot or must not be written:
    a wrong suffix (``suffixes``, lower case), an existing folder, a file on the way, or an
    existing file of the package of another kind than the one written (``writes``: its
    ``format`` tag, None for untagged output), e.g. a checkpoint that would be lost."""
    path = Path(path)
    if suffixes and path.suffix.lower() not in suffixes:
        raise DataError(f"{flag} must end in {' or '.join(suffixes)}, got {path.name!r}")
    if path.is_dir():
        raise DataError(f"{flag} {path} is a folder; give the path of a file to write")
    _check_parents(path, flag)
    if path.is_file() and path.suffix.lower() == ".safetensors":
        try:
            fmt = read_header(path).get("format")
        except CheckpointError:  # not safetensors at all: nothing of ours to protect
            return
        if fmt is not None and fmt != writes:
            what = {FORMAT: "a DBAE checkpoint", **OTHER_KINDS}.get(fmt, f"a {fmt!r} file")
            raise DataError(f"{flag} {path} is {what}; writing there would replace it: choose another {flag}")


#: the key that names the command in the JSON reports written next to an output
REPORT_COMMAND = "dbae_command"


def report_path(out: Path, command: str) -> Path:
    """The JSON report that ``command`` writes next to its output ``out`` (``out`` with the
    suffix .json). The user did not name it, so it must not replace anything but an earlier
    report of the same command: DataError, before any work, if it exists and is not one
    (a run's eval.json, say, when --out is run/eval.png)."""
    path = Path(out).with_suffix(".json")
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = None
        if not (isinstance(data, dict) and data.get(REPORT_COMMAND) == command):
            raise DataError(f"{path} exists and is not a report of `dbae {command}`: the report written next to "
                            f"{out} would replace it; choose another --out")  # fmt: skip
    return path


def write_report(path: Path, command: str, report: dict) -> None:
    """Write ``report`` (atomically) as the JSON report of ``command``, tagged with it."""
    atomic_write_text(path, json.dumps({REPORT_COMMAND: command, **report}, indent=2) + "\n")


def check_sampler_arguments(args: argparse.Namespace) -> None:
    from ..sampling import nfe_for

    if not (0.0 <= args.churn < 1.0):
        raise DataError(f"--churn must lie in [0, 1), got {args.churn}")
    sigma_T = getattr(args, "sampling_sigma_T", None)
    if sigma_T is not None and not (math.isfinite(sigma_T) and sigma_T >= 0.0):
        raise DataError(f"--sampling-sigma-T must be a finite number >= 0, got {sigma_T}")
    least = nfe_for(1, args.sampler, args.churn)
    if args.nfe < least:
        raise DataError(f"--nfe {args.nfe} is too small for --sampler {args.sampler} --churn {args.churn}: need >= {least}")
