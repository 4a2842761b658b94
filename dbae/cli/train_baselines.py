"""``dbae train --method diffae|pdae``: the baselines from the same presets and options as DBAE.

The DBAE preset of the same name gives the backbone and the training settings
(:func:`dbae.baselines.diffae_preset`, :func:`dbae.baselines.pdae_preset`); ``--steps``,
``--batch-size``, ``--lr``, ``--ema-decay``, ``--seed``, ``--log-every`` and ``--ckpt-every``
override them (for PDAE in both stages; ``--pdae-ddpm-steps`` sets stage 1's steps alone).
Run directories and resume: :mod:`dbae.baselines.runs`. Options of the DBAE trainer that
the baselines' loop does not have are refused with a one-line message, as is ``torchrun``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
from pathlib import Path
from typing import Any

from ..baselines.config import DiffAETrainConfig, diffae_preset
from ..baselines.pdae_config import pdae_preset
from ..baselines.runs import RunOptions, RunResult, run_diffae, run_pdae
from ..errors import ConfigError
from ..training.distributed import all_ranks
from .common import check_out_dir

METHODS = ("dbae", "diffae", "pdae")

#: DBAE-trainer options (argparse dest -> flag) that the baselines' training loop does not have
DBAE_ONLY = {
    "grad_accum": "--grad-accum", "keep_last": "--keep-last", "precision": "--precision",
    "sample_every": "--sample-every", "num_workers": "--num-workers", "tc_weight": "--tc-weight",
    "compile": "--compile", "channels_last": "--channels-last", "zoom": "--zoom",
}
#: options of --method pdae only
PDAE_ONLY = {"pdae_ddpm_ckpt": "--pdae-ddpm-ckpt", "pdae_ddpm_steps": "--pdae-ddpm-steps"}
#: training fields that the shared options override (argparse dest -> DiffAETrainConfig field)
OVERRIDES = {"steps": "steps", "batch_size": "batch_size", "lr": "lr", "ema_decay": "ema_decay", "seed": "seed",
             "log_every": "log_every", "ckpt_every": "ckpt_every"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``dbae train`` that only the baselines have."""
    p.add_argument("--pdae-ddpm-ckpt", type=Path, metavar="PATH",
                   help="--method pdae: skip stage 1 and take the frozen DDPM from this PDAE checkpoint or run "
                        "(e.g. an earlier RUN/ddpm)")  # fmt: skip
    p.add_argument("--pdae-ddpm-steps", type=int, metavar="N",
                   help="--method pdae: steps of stage 1 (the unconditional DDPM; default: --steps, else the preset's)")


def given(args: argparse.Namespace, options: dict[str, str]) -> list[str]:
    """The flags of ``options`` set on the command line (not None / False)."""
    return [flag for dest, flag in options.items() if getattr(args, dest, None) not in (None, False)]


def check_method_options(args: argparse.Namespace) -> None:
    """ConfigError (one line) for an option that does not apply to ``args.method``."""
    method = args.method
    wrong = given(args, PDAE_ONLY) if method != "pdae" else []
    if wrong:
        raise all_ranks(ConfigError(f"{', '.join(wrong)} only appl{'ies' if len(wrong) == 1 else 'y'} to "
                                    f"--method pdae, not --method {method}"))  # fmt: skip
    if method == "dbae":
        return
    wrong = given(args, DBAE_ONLY)
    if wrong:
        raise all_ranks(ConfigError(
            f"{', '.join(wrong)} {'is an option' if len(wrong) == 1 else 'are options'} of the DBAE trainer: "
            f"--method {method} trains in fp32, one process, without them"
        ))


def world_size() -> int:
    """The number of processes of a torchrun job this process belongs to (1 without torchrun)."""
    value = os.environ.get("WORLD_SIZE", "").strip()
    try:
        return int(value) if value else 1
    except ValueError:
        raise all_ranks(ConfigError(f"environment variable WORLD_SIZE={value!r} is not an integer")) from None


def check_single_process(method: str) -> None:
    """ConfigError under torchrun with more than one process: the baselines train in one."""
    world = world_size()
    if world > 1:
        raise all_ranks(ConfigError(
            f"--method {method} trains in one process (its loop has no multi-GPU support); run it without torchrun "
            f"(this job has {world} processes)"
        ))


def _train_config(cfg: DiffAETrainConfig, args: argparse.Namespace, **fixed: Any) -> DiffAETrainConfig:
    fields = {field: getattr(args, dest) for dest, field in OVERRIDES.items() if getattr(args, dest) is not None}
    return dataclasses.replace(cfg, **{**fields, **fixed})


def _print_result(result: RunResult, name: str) -> None:
    if result.stopped_by is not None:
        print(f"stopped by {signal.Signals(result.stopped_by).name} at step {result.step}; checkpoint "
              f"{result.checkpoint}. Continue with the same command plus --resume auto")
        return
    print(f"trained {result.method} {name} to step {result.step}: checkpoint {result.checkpoint}")
    if "ddpm" in result.stages:
        print(f"  {'stage 1':12} : {result.stages['ddpm']} (the frozen DDPM)")
    if result.losses:
        print(f"  {'last loss':12} : {result.losses[-1][1]:.4f}  ({result.seconds:.1f} s)")
    for mode, s in (result.eval or {}).items():
        steps = f"{s['inversion_steps']} + {s['decode_steps']}" if mode == "inferred" else f"{s['decode_steps']}"
        print(f"  {mode + ' x_T':12} : MSE {s['mse']:.4f}  PSNR {s['psnr']:.2f} dB  SSIM {s['ssim']:.3f}  "
              f"({steps} steps, EMA weights, held-out images)")
    if result.eval is not None:
        print(f"  {'metrics':12} : {result.out / 'eval.json'}  {result.out / 'metrics.jsonl'}")


def run(args: argparse.Namespace) -> int:
    """Train ``args.method`` (diffae or pdae) from ``args`` (the ``dbae train`` namespace)."""
    check_method_options(args)
    check_single_process(args.method)
    out = args.out or Path("runs") / f"{args.preset}-{args.method}"
    check_out_dir(out)
    options = RunOptions(out=out, dataset=args.dataset or "shapes", resume=args.resume is not None,
                         device=args.device, progress=not args.no_progress,
                         **({} if args.eval_images is None else {"eval_images": args.eval_images}))  # fmt: skip
    if args.method == "diffae":
        preset = diffae_preset(args.preset)
        preset = dataclasses.replace(preset, train=_train_config(preset.train, args))
        result = run_diffae(preset, options)
    else:
        pp = pdae_preset(args.preset)
        stage1 = {} if args.pdae_ddpm_steps is None else {"steps": args.pdae_ddpm_steps}
        pp = dataclasses.replace(pp, ddpm_train=_train_config(pp.ddpm_train, args, **stage1),
                                 train=_train_config(pp.train, args))  # fmt: skip
        result = run_pdae(pp, options, args.pdae_ddpm_ckpt)
    _print_result(result, args.preset)
    return 0 if result.stopped_by is None else 128 + result.stopped_by
