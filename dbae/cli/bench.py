"""``dbae bench latency``: end-to-end latency of the deployment runners."""

from __future__ import annotations

import argparse
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..config import PRESETS, get_preset
from ..errors import CheckpointError, ConfigError
from ..export.torch_runners import COMPILE_MODES
from ..model import DBAE
from ..sampling import SAMPLERS
from ..training.trainer import resolve_device
from .common import check_out_dir

HELP = ("benchmarks: 'dbae bench latency' times encode, decode and edit per runner; 'dbae bench compare' times "
        "DBAE against DiffAE / PDAE (the paper's Table 5, and Table 2's tractable reconstruction)")


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
    lat.add_argument("--channels-last", action="store_true",
                     help="PyTorch runners: the networks in NHWC (cuDNN's tensor-core layout)")  # fmt: skip
    lat.add_argument("--autocast", action="store_true",
                     help="PyTorch runners at bf16/fp16: autocast on the float32 weights instead of converted copies")  # fmt: skip
    lat.add_argument("--compile-mode", choices=COMPILE_MODES,
                     help="torch.compile mode of the compiled runners (max-autotune-no-cudagraphs: inductor times "
                          "its kernels against cuDNN's, many minutes more)")  # fmt: skip
    lat.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    lat.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    lat.add_argument("--runs", type=int, default=20, help="timed calls per measurement (default 20)")
    lat.add_argument("--out", type=Path, default=Path("runs/bench_latency"),
                     help="folder for latency.json and latency.png (default runs/bench_latency)")  # fmt: skip
    _add_compare(sub)


def _add_compare(sub) -> None:
    cmp = sub.add_parser(
        "compare", help="DBAE vs DiffAE / PDAE: NFE and ms to infer x_T, decode, total (Table 5); --quality: Table 2",
        description="The paper's Table 5 measured here: per method and setting, the NFE and the milliseconds to "
        "infer x_T, to decode, and in total (median and p95), at one preset and batch. With --quality, Table 2's "
        "tractable setting: reconstruction from one encoder pass (DiffAE / PDAE from random x_T).",
    )  # fmt: skip
    cmp.add_argument("--preset", choices=sorted(PRESETS),
                     help="random weights of this preset for every method without a checkpoint (timing only)")  # fmt: skip
    cmp.add_argument("--ckpt", help="DBAE checkpoint file or run directory (EMA weights)")
    cmp.add_argument("--diffae-ckpt", help="DiffAE checkpoint (dbae.baselines.train.save_diffae)")
    cmp.add_argument("--pdae-ckpt", help="PDAE checkpoint (when dbae.baselines.pdae provides a loader)")
    cmp.add_argument("--methods", nargs="+", help="methods to compare (default: dbae diffae pdae, those available)")
    cmp.add_argument("--settings", choices=["authors", "equal-nfe", "both"], default="both",
                     help="authors' step counts, every method at DBAE's total NFE, or both (default)")  # fmt: skip
    cmp.add_argument("--nfe", type=int, default=10, help="DBAE's decode NFE (default 10)")
    cmp.add_argument("--sampler", choices=SAMPLERS, default="euler", help="DBAE's sampler (default euler)")
    cmp.add_argument("--equal-nfe", type=int, help="total NFE of the equal-NFE rows (default: DBAE's total NFE)")
    cmp.add_argument("--inversion-steps", nargs="+", type=int,
                     help="replace the baselines' authors' inversion steps (DiffAE 250; PDAE 1000 500 100)")  # fmt: skip
    cmp.add_argument("--decode-steps", nargs="+", type=int,
                     help="replace the baselines' authors' decode steps (DiffAE 20 100; PDAE 100)")  # fmt: skip
    cmp.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    cmp.add_argument("--precision", choices=["fp32", "bf16"],
                     help="fp32, or bf16 autocast (default bf16 on CUDA, fp32 on the CPU)")  # fmt: skip
    cmp.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    cmp.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    cmp.add_argument("--runs", type=int, default=10, help="timed calls per measurement (default 10)")
    cmp.add_argument("--quality", type=int, default=0, metavar="N",
                     help="also reconstruct N shapes test images with tractable inference (Table 2 setting)")  # fmt: skip
    cmp.add_argument("--quality-nfe", type=int, help="NFE of the --quality reconstructions (default: --nfe)")
    cmp.add_argument("--seed", type=int, default=0)
    cmp.add_argument("--out", type=Path, default=Path("runs/bench_compare"),
                     help="folder for compare.json, compare.md and compare.png (default runs/bench_compare)")  # fmt: skip


def _model(args: argparse.Namespace, device: torch.device) -> tuple[DBAE, str]:
    if args.ckpt:
        from ..inference import load_model

        loaded = load_model(args.ckpt, device=device)
        return loaded.model, f"{loaded.preset.name} checkpoint {loaded.path} (step {loaded.step})"
    torch.manual_seed(0)
    return DBAE(get_preset(args.preset).model).to(device).eval(), f"{args.preset} (random weights)"


def run_latency(args: argparse.Namespace) -> int:
    from dbae.export import latency, registry

    check_out_dir(args.out)
    for name, values, least in (("--steps", args.steps, 1), ("--batches", args.batches, 1)):
        if min(values) < least:
            raise ConfigError(f"{name} must be >= {least}, got {values}")
    if args.runs < 1 or args.warmup < 0:
        raise ConfigError("--runs must be >= 1 and --warmup >= 0")
    device = resolve_device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    kinds = args.runners or registry.default_kinds(device)
    model, source = _model(args, device)
    factories = {kind: registry.factory(kind, model, precision, channels_last=args.channels_last,
                                        autocast=args.autocast, compile_mode=args.compile_mode)
                 for kind in kinds}  # fails early, clearly
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
        "channels_last": args.channels_last, "autocast": args.autocast, "compile_mode": args.compile_mode,
    }  # fmt: skip
    json_path, png_path = args.out / "latency.json", args.out / "latency.png"
    latency.write_json(rows, meta, json_path)
    for s in latency.speedups(rows):
        k = "" if s["steps"] is None else f" K={s['steps']}"
        print(f"{s['runner']} vs eager: {s['op']}{k} batch {s['batch']}: {s['speedup']:.2f}x")
    plotted = latency.plot(rows, png_path, title=f"{source}, {meta['device']}, {precision}")
    print(f"wrote {json_path}" + (f" and {png_path}" if plotted else " (no plot: pip install matplotlib)"))
    return 0


def _method_of(path: str) -> str | None:
    """The method of checkpoint file or run directory ``path`` from its format tag (None when
    that cannot be read: the method's loader then says what is wrong)."""
    from ..baselines.checkpoints import checkpoint_method, run_method

    try:
        return run_method(Path(path)) if Path(path).is_dir() else checkpoint_method(path)
    except CheckpointError:
        return None


def run_compare(args: argparse.Namespace) -> int:
    from ..baselines import compare
    from ..baselines.checkpoints import LABELS

    check_out_dir(args.out)
    if args.batch < 1 or args.runs < 1 or args.warmup < 0:
        raise ConfigError(f"--batch and --runs must be >= 1 and --warmup >= 0, got {args.batch}, {args.runs}, "
                          f"{args.warmup}")  # fmt: skip
    if args.quality < 0:
        raise ConfigError(f"--quality must be >= 0, got {args.quality}")
    names, notes = compare.resolve_methods(args.methods)
    for note in notes:
        print(note, flush=True)
    ckpts = {"dbae": args.ckpt, "diffae": args.diffae_ckpt, "pdae": args.pdae_ckpt}
    flags = {name: "--ckpt" if name == "dbae" else f"--{name}-ckpt" for name in ckpts}
    for name, path in ckpts.items():
        if path and name not in names:
            raise ConfigError(f"{flags[name]} was given but {name} is not among the compared methods")
        if path:  # a checkpoint of another method: say which flag takes it (unreadable ones: the loader says why)
            given = _method_of(path)
            if given is not None and given != name:
                raise CheckpointError(f"{path} is a {LABELS[given]} checkpoint, not a {LABELS[name]} one (to compare "
                                      f"it, pass it as {flags[given]})")  # fmt: skip
    if not names:
        raise ConfigError("no method left to compare")
    if args.preset is None and any(not ckpts.get(n) for n in names):
        raise ConfigError("--preset is needed for every method without a checkpoint: "
                          + ", ".join(n for n in names if not ckpts.get(n)))  # fmt: skip
    device = resolve_device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    adapters = {}
    for name in names:
        spec = compare.METHODS[name]
        if ckpts.get(name):
            if spec.load is None:
                raise ConfigError(f"{name} offers no checkpoint loader")
            adapters[name] = spec.load(ckpts[name], device, sampler=args.sampler)
        else:
            adapters[name] = spec.build(args.preset, device, sampler=args.sampler)
    shapes = {(a.image_channels, a.image_size) for a in adapters.values()}
    if len(shapes) != 1:
        raise ConfigError("the methods take different image shapes ("
                          + ", ".join(f"{n}: {a.image_channels}x{a.image_size}" for n, a in adapters.items())
                          + "); compare them at one preset")  # fmt: skip
    settings = list(compare.SETTINGS) if args.settings == "both" else [args.settings]
    plan = compare.plan_settings(
        adapters, settings=settings, dbae_nfe=args.nfe, equal_nfe=args.equal_nfe,
        inversion_steps=args.inversion_steps, decode_steps=args.decode_steps,
    )  # fmt: skip
    random_weights = any(not ckpts.get(n) for n in names)
    meta = {
        "models": [a.source for a in adapters.values()], "preset": args.preset, "batch": args.batch,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(), "precision": precision, "sampler": args.sampler, "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "warmup": args.warmup, "runs": args.runs,
        "settings": settings, "equal_nfe": plan.equal_nfe, "random_weights": random_weights,
        "threads": torch.get_num_threads(), "notes": list(notes),
    }  # fmt: skip
    print("; ".join(meta["models"]) + f" on {device}, {precision}, batch {args.batch}", flush=True)
    print(compare.HEADER, flush=True)
    rows = compare.bench_compare(
        adapters, plan, batch=args.batch, device=device, precision=precision, warmup=args.warmup, runs=args.runs,
        seed=args.seed, report=lambda r: print(compare.format_row(r), flush=True),
    )  # fmt: skip
    q = None
    if args.quality:
        q_nfe = args.quality_nfe if args.quality_nfe is not None else args.nfe
        q = compare.quality(adapters, images=args.quality, nfe=q_nfe, batch=args.batch, device=device,
                            precision=precision, seed=args.seed)  # fmt: skip
        print(f"reconstruction with tractable inference, {args.quality} shapes test images "
              "(DiffAE / PDAE from random x_T):")  # fmt: skip
        print(compare.format_quality(q))
        if random_weights:
            print("(random weights: a smoke check of the pipeline, not a comparison)")
    paths = compare.write_outputs(rows, meta, args.out, q)
    extra = "" if "png" in paths else " (no plot: pip install matplotlib)"
    print("wrote " + ", ".join(str(p) for p in paths.values()) + extra)
    return 0


def run(args: argparse.Namespace) -> int:
    return {"latency": run_latency, "compare": run_compare}[args.bench](args)
