"""``dbae info``: configuration and parameter counts of a checkpoint or a preset."""

from __future__ import annotations

import argparse

import torch

from ..config import PRESETS, dumps, get_preset
from ..model import DBAE
from ..checkpoints import load_checkpoint, resolve_checkpoint
from ..checkpoints.foreign import is_torch_pickle
from ..checkpoints.imports import imported_record, read_foreign

HELP = "print the configuration and parameter counts of a checkpoint or preset"


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="checkpoint file or run directory")
    src.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("--no-config", action="store_true", help="only the summary and parameter counts")


def _millions(n: int) -> str:
    return f"{n / 1e6:9.2f}M"


def run(args: argparse.Namespace) -> int:
    record = None
    if args.ckpt:
        path = resolve_checkpoint(args.ckpt)
        if is_torch_pickle(path):  # the authors' file, converted in memory
            foreign = read_foreign(path)
            preset, step, record = foreign.preset, foreign.step, foreign.provenance
        else:
            ckpt = load_checkpoint(path, with_optimizer=False)
            preset, step, record = ckpt.preset, ckpt.step, imported_record(ckpt.metadata)
        header = f"checkpoint {path} (step {step}, preset {preset.name})"
    else:
        preset, header = get_preset(args.preset), f"preset {args.preset}"
    with torch.device("meta"):
        counts = DBAE(preset.model).parameter_counts()
    m = preset.model
    print(header)
    print(f"  image {m.image_size}x{m.image_size}x{m.image_channels}, z_dim {m.z_dim}, "
          f"{'stochastic' if m.encoder.stochastic else 'deterministic'} encoder")
    print("  parameters:")
    for part in ("unet", "encoder", "decoder", "total"):
        print(f"    {part:<8} {_millions(counts[part])}  ({counts[part]:,})")
    if record is not None:
        print(f"  imported from {record.get('source')} (sha256 {str(record.get('source_sha256'))[:16]}...): "
              f"{record.get('recognised_as')}")
        for line in record.get("converted", []):
            print(f"    - {line}")
    if not args.no_config:
        print("configuration:")
        print(dumps(preset))
    return 0
