"""``dbae bench latency``: end-to-end latency of the deployment runners."""

from __future__ import annotations

import argparse
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..config import PRESETS, get_preset
from ..errors import ConfigError
from ..model import DBAE
from ..sampling import SAMPLERS
from ..training.trainer import resolve_device

HELP = "benchmarks: 'dbae bench latency' times encode, decode and edit per runner"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    lat = sub.add_parser("latency", help="encode / decode / edit latency per runner, batch and K",
                         description=__doc__.splitlines()[0].strip("`"))  # fmt: skip
    src = lat.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="checkpoint file or run directory (EMA weights)")
    src.add_argument("--preset", choices=sorted(PRESETS), help="random weights of a preset (timing only)")
    lat.add_argument("--runners", nargs="+", help="runner kinds (default: eager, and cuda-graph on CUDA)")
    lat.add_argument("--steps", nargs="+", type=int, default=[1, 2, 4, 10], help="decode steps K (default 1 2 4 10)")
    lat.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64], help="batch sizes (default 1 8 64)")
    lat.add_argument("--sampler", choices=SAMPLERS, default="euler")
    lat.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                     help="PyTorch runners' precision (default bf16 on CUDA, fp32 on the CPU)")  # fmt: skip
    lat.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    lat.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    lat.add_argument("--runs", type=int, default=20, help="timed calls per measurement (default 20)")
    lat.add_argument("--out", type=Path, default=Path("runs/bench_latency"),
                     help="folder for latency.json and latency.png (default runs/bench_latency)")  # fmt: skip


def _model(args: argparse.Namespace, device: torch.device) -> tuple[DBAE, str]:
    if args.ckpt:
        from ..inference import load_model

        loaded = load_model(args.ckpt, device=device)
        return loaded.model, f"{loaded.preset.name} checkpoint {loaded.path} (step {loaded.step})"
    torch.manual_seed(0)
    return DBAE(get_preset(args.preset).model).to(device).eval(), f"{args.preset} (random weights)"


def run_latency(args: argparse.Namespace) -> int:
    from dbae.export import latency, registry

    for name, values, least in (("--steps", args.steps, 1), ("--batches", args.batches, 1)):
        if min(values) < least:
            raise ConfigError(f"{name} must be >= {least}, got {values}")
    if args.runs < 1 or args.warmup < 0:
        raise ConfigError("--runs must be >= 1 and --warmup >= 0")
    device = resolve_device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    kinds = args.runners or registry.default_kinds(device)
    model, source = _model(args, device)
    factories = {kind: registry.factory(kind, model, precision) for kind in kinds}  # fails early, clearly
    print(f"{source} on {device}, {precision}, sampler {args.sampler}")
    print(latency.HEADER, flush=True)
    rows = latency.bench_latency(
        factories, steps=args.steps, batches=args.batches, sampler=args.sampler, warmup=args.warmup, runs=args.runs,
        report=lambda row: print(latency.format_row(row), flush=True),
    )  # fmt: skip
    meta = {
        "model": source, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(), "precision": precision, "sampler": args.sampler, "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "warmup": args.warmup, "runs": args.runs,
    }  # fmt: skip
    json_path, png_path = args.out / "latency.json", args.out / "latency.png"
    latency.write_json(rows, meta, json_path)
    for s in latency.speedups(rows):
        k = "" if s["steps"] is None else f" K={s['steps']}"
        print(f"{s['runner']} vs eager: {s['op']}{k} batch {s['batch']}: {s['speedup']:.2f}x")
    plotted = latency.plot(rows, png_path, title=f"{source}, {meta['device']}, {precision}")
    print(f"wrote {json_path}" + (f" and {png_path}" if plotted else " (no plot: pip install matplotlib)"))
    return 0


def run(args: argparse.Namespace) -> int:
    return {"latency": run_latency}[args.bench](args)
