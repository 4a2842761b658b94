"""``dbae eval`` with DiffAE / PDAE checkpoints: which checkpoint a ``--ckpt`` is (its format
tag), the options that apply to it, and the baselines' reconstruction.

``recon``: the baselines reconstruct from the DDIM-inverted x_T (``--x-T inferred``, the
default) or from a random x_T (``--x-T random``: one encoder pass, the DBAE paper's
"tractable inference" setting, Table 2), with ``--inversion-steps`` / ``--decode-steps``
(default: the authors' counts, DiffAE 250 / 100, PDAE 100 / 100). DBAE's ``--nfe``,
``--sampler`` and ``--churn`` do not apply to them, nor the baselines' options to DBAE.
``probe`` and ``tad`` only need the encoder and take any of the three; ``fid --fake recon``
takes the baselines' reconstructions with the same options as ``recon``.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from ..baselines.checkpoints import LABELS, Loaded, LoadedBaseline, load_any
from ..baselines.reconstruction import X_T_MODES, reconstruct_baseline
from ..errors import ConfigError
from ..training.trainer import resolve_device

#: recon options of the baselines only (argparse dest -> flag)
BASELINE_ONLY = {"x_T": "--x-T", "inversion_steps": "--inversion-steps", "decode_steps": "--decode-steps"}
#: DBAE's sampler options (argparse dest -> flag) and their defaults
DBAE_SAMPLER = {"nfe": "--nfe", "sampler": "--sampler", "churn": "--churn",
                "sampling_sigma_T": "--sampling-sigma-T", "sample_z": "--sample-z"}
DBAE_SAMPLER_DEFAULTS = {"nfe": 10, "sampler": "euler", "churn": 0.0, "sample_z": False}


def add_recon_arguments(p: argparse.ArgumentParser) -> None:
    """The baselines' recon options; DBAE's sampler options become None by default, so that
    giving them with a baseline checkpoint can be told apart (:func:`check_recon_options`)."""
    p.add_argument("--x-T", dest="x_T", choices=X_T_MODES,
                   help="DiffAE / PDAE checkpoints: decode from the DDIM-inverted x_T (inferred, default) or from "
                        "x_T ~ N(0, I) (random: tractable inference only, one encoder pass)")  # fmt: skip
    p.add_argument("--inversion-steps", type=int,
                   help="DiffAE / PDAE: DDIM inversion steps of --x-T inferred (default DiffAE 250, PDAE 100)")
    p.add_argument("--decode-steps", type=int, help="DiffAE / PDAE: DDIM decoding steps (default 100)")
    p.set_defaults(**{dest: None for dest in DBAE_SAMPLER})


def open_checkpoint(args: argparse.Namespace) -> Loaded:
    """The DBAE, DiffAE or PDAE model of ``--ckpt`` (EMA weights unless ``--raw-weights``)."""
    return load_any(args.ckpt, ema=not args.raw_weights, device=resolve_device(args.device))


def _given(args: argparse.Namespace, options: dict[str, str]) -> list[str]:
    return [flag for dest, flag in options.items() if getattr(args, dest, None) is not None]


def check_recon_options(args: argparse.Namespace, loaded: Loaded | None) -> None:
    """ConfigError (one line) for an option of the other kind of model; fills in DBAE's
    sampler defaults for a DBAE checkpoint (or none: ``dbae eval fid`` of two folders)."""
    if isinstance(loaded, LoadedBaseline):
        wrong = _given(args, DBAE_SAMPLER)
        if wrong:
            raise ConfigError(f"{', '.join(wrong)} {'is a DBAE option' if len(wrong) == 1 else 'are DBAE options'}; "
                              f"{loaded.path} is a {LABELS[loaded.method]} checkpoint: use --x-T, "
                              "--inversion-steps and --decode-steps")  # fmt: skip
        if args.x_T == "random" and args.inversion_steps is not None:
            raise ConfigError("--inversion-steps applies to --x-T inferred; a random x_T is not inferred")
        return
    wrong = _given(args, BASELINE_ONLY)
    if wrong:
        where = f"{loaded.path} is a DBAE checkpoint" if loaded is not None else "no --ckpt was given"
        raise ConfigError(f"{', '.join(wrong)} only appl{'ies' if len(wrong) == 1 else 'y'} to DiffAE / PDAE "
                          f"checkpoints; {where} (DBAE: x_T = Dec(z); use --nfe, --sampler, --churn)")  # fmt: skip
    for dest, value in DBAE_SAMPLER_DEFAULTS.items():
        if getattr(args, dest, None) is None:
            setattr(args, dest, value)


def header(loaded: Loaded | None) -> dict[str, Any]:
    """What every report says about its checkpoint (the method too for a baseline)."""
    if loaded is None:
        return {}
    out: dict[str, Any] = {"checkpoint": str(loaded.path), "step": loaded.step}
    if isinstance(loaded, LoadedBaseline):
        out["method"] = loaded.method
    return out


def reconstruct(args: argparse.Namespace, loaded: LoadedBaseline, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """(reconstructions of ``x`` in [-1, 1] on the CPU, the report's fields about how)."""
    device = next(loaded.model.parameters()).device
    rec = reconstruct_baseline(
        loaded.model, x, x_T=args.x_T or "inferred", inversion_steps=args.inversion_steps,
        decode_steps=args.decode_steps, batch_size=args.batch_size,
        generator=torch.Generator(device).manual_seed(args.seed),
    )  # fmt: skip
    return rec.images, {"x_T": rec.x_T, "inversion_steps": rec.inversion_steps, "decode_steps": rec.decode_steps,
                        "nfe": rec.nfe, "network_evals": rec.network_evals}  # fmt: skip
