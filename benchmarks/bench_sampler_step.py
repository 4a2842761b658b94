"""Benchmark of the fused sampler steps of dbae.fused_step (not a test).

For each device (CPU, and CUDA when available), step, dtype and batch of 3-channel images: the
time of the fused op, of the eager PyTorch composite that dbae.sampling runs today (denoiser
clamp, drift and update as separate ops, in the storage dtype; torch.randn for the churn noise)
and of torch.compile of the pure-PyTorch reference, with the speedups of the fused op; on CUDA
also its bandwidth (the bytes it must move: each input read once, each output written once) as
a fraction of the device-to-device copy bandwidth measured in the same run.

    python benchmarks/bench_sampler_step.py                   # everything, CPU and CUDA
    python benchmarks/bench_sampler_step.py --device cpu --batches 16 --sizes 64 --no-compile

Steps: the units of work between two network evaluations of dbae.sampling, and the tensors
each fused op moves (N values per tensor):

    euler    x, F, x_T -> x_next                                  4 N
    predict  x, F, x_T -> x_pred, d          (Heun predictor)     5 N
    correct  x, d, x_pred, F, x_T -> x_next  (Heun corrector)     6 N
    churn    x, F, x_T -> x_next             (noise in-kernel)    4 N

The compiled churn reference draws its Philox noise eagerly in int64 tensor ops (a graph break,
see dbae.fused_step.philox_normal), hence its time. Times are medians over repeats of
back-to-back calls (CPU: torch's intra-op threads, see --threads). Run on an otherwise idle
machine: other busy processes stall the parallel regions, the eager composite's many most.

On glibc the mmap threshold is pinned (64 MiB) first: otherwise freed tensors of a few hundred
KiB and more are unmapped and every call faults their pages in again, which costs the eager
composite (about ten temporaries) up to ten times its time and the fused ops their outputs'.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dbae import fused_step as fs
from dbae.bridge import VPBridge
from dbae.sampling import BridgeSampler, drift

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHANNELS = 3
COPY_BYTES = 1 << 28  # 256 MiB copied for the reference bandwidth on CUDA
T, DT = 0.5, -0.05  # a mid-trajectory step


def steady_malloc() -> bool:
    """Pins glibc's mmap and trim thresholds so that freed buffers are reused, not re-faulted."""
    m_trim_threshold, m_mmap_threshold = -1, -3
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(m_mmap_threshold, 1 << 26)) and bool(mallopt(m_trim_threshold, 1 << 28))


def scalars() -> dict[str, fs.FusedScalars]:
    sampler = BridgeSampler(VPBridge())
    ode, sde = sampler.scalars([T], "ode")[0], sampler.scalars([T], "sde")[0]
    return {name: fs.FusedScalars.at(sampler.bridge, T, k, DT) for name, k in (("ode", ode), ("sde", sde))}


# ----- the eager composite of dbae.sampling (denoise clamps, then drift and update) -----


def _drift(x, F, x_T, s):
    return drift(x, (s.c_skip * x + s.c_out * F).clamp(-1.0, 1.0), x_T, s.k)


def eager_euler(x, F, x_T, s):
    return x + s.dt * _drift(x, F, x_T, s)


def eager_predict(x, F, x_T, s):
    d = _drift(x, F, x_T, s)
    return x + s.dt * d, d


def eager_correct(x, d, x_pred, F, x_T, s):
    return x + s.dt * 0.5 * (d + _drift(x_pred, F, x_T, s))


def eager_churn(x, F, x_T, s):
    noise = torch.randn(x.shape, device=x.device, dtype=x.dtype)
    return x + s.dt * _drift(x, F, x_T, s) + s.noise_scale * noise


# name -> (number of input tensors, {implementation: fn(*inputs, scalars)})
STEPS: dict[str, tuple[int, dict[str, Callable]]] = {
    "euler": (3, {"fused": fs.euler_step, "eager": eager_euler, "reference": fs.euler_step_reference}),
    "predict": (3, {"fused": fs.heun_predict, "eager": eager_predict, "reference": fs.heun_predict_reference}),
    "correct": (5, {"fused": fs.heun_correct, "eager": eager_correct, "reference": fs.heun_correct_reference}),
    "churn": (
        3,
        {
            "fused": lambda x, F, x_T, s: fs.churn_step(x, F, x_T, s, 0, 0),
            "eager": eager_churn,
            "reference": lambda x, F, x_T, s: fs.churn_step_reference(x, F, x_T, s, 0, 0),
        },
    ),
}
TENSORS_MOVED = {"euler": 4, "predict": 5, "correct": 6, "churn": 4}


def seconds_per_call(fn: Callable[[], object], device: torch.device, min_time: float, repeats: int = 7) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run(n: int) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return time.perf_counter() - start

    run(3)  # warm-up (and compilation)
    n = 1
    while run(n) < min_time / repeats and n < 1 << 16:
        n *= 2
    return statistics.median(run(n) / n for _ in range(repeats))


def copy_bandwidth(device: torch.device, min_time: float) -> float:
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * COPY_BYTES / seconds_per_call(lambda: dst.copy_(src), device, min_time)


def bench_device(device: torch.device, args) -> tuple[list[dict], float | None]:
    copy_bw = copy_bandwidth(device, args.min_time) if device.type == "cuda" else None
    sc = scalars()
    compiled = {name: torch.compile(impls["reference"], dynamic=True) for name, (_, impls) in STEPS.items()}
    rows = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for side in args.sizes:
            for batch in args.batches:
                shape = (batch, CHANNELS, side, side)
                g = torch.Generator(device=device).manual_seed(0)
                tensors = [2 * torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(5)]
                for step in args.steps:
                    count, impls = STEPS[step]
                    inputs, s = tensors[:count], sc["sde" if step == "churn" else "ode"]
                    impls = {**impls, **({"compiled": compiled[step]} if args.compile else {})}
                    times = {
                        name: seconds_per_call(lambda f=fn: f(*inputs, s), device, args.min_time)
                        for name, fn in impls.items()
                        if name != "reference"
                    }
                    row = {"device": device.type, "dtype": dtype_name, "step": step, "shape": list(shape)}
                    row.update({f"{name}_us": t * 1e6 for name, t in times.items()})
                    row["speedup_vs_eager"] = times["eager"] / times["fused"]
                    if "compiled" in times:
                        row["speedup_vs_compiled"] = times["compiled"] / times["fused"]
                    gbps = TENSORS_MOVED[step] * tensors[0].nbytes / times["fused"] / 1e9
                    row["fused_GBps"] = gbps
                    if copy_bw:
                        row["fraction_of_copy_bw"] = gbps * 1e9 / copy_bw
                    rows.append(row)
                    print(format_row(row), flush=True)
    return rows, copy_bw


HEADER = (
    f"{'device':6} {'dtype':8} {'step':7} {'shape':16} {'fused us':>9} {'eager us':>9} {'compiled':>9} "
    f"{'x eager':>7} {'x comp':>7} {'GB/s':>7} {'of copy':>7}"
)


def format_row(r: dict) -> str:
    def opt(key, fmt):
        return format(r[key], fmt) if key in r else "-"

    shape = "x".join(map(str, r["shape"]))
    return (
        f"{r['device']:6} {r['dtype']:8} {r['step']:7} {shape:16} {r['fused_us']:9.1f} {r['eager_us']:9.1f} "
        f"{opt('compiled_us', '9.1f'):>9} {r['speedup_vs_eager']:7.2f} {opt('speedup_vs_compiled', '7.2f'):>7} "
        f"{r['fused_GBps']:7.1f} {opt('fraction_of_copy_bw', '7.0%'):>7}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16"])
    parser.add_argument("--steps", nargs="+", choices=list(STEPS), default=list(STEPS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16, 64, 128])
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 128], help="image sides")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU intra-op threads")
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds of timed calls per measurement")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    parser.add_argument("--json", type=Path, default=Path("runs/bench_sampler_step.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    malloc_pinned = steady_malloc()
    devices = [torch.device("cpu")] if args.device in ("cpu", "all") else []
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    elif args.device == "cuda":
        raise SystemExit("no CUDA device")
    meta = {
        "torch": torch.__version__,
        "backends": {d.type: fs.backend(d) for d in devices},
        "report": fs.report(),
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "malloc_thresholds_pinned": malloc_pinned,
        "load_average_at_start": os.getloadavg()[0],
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    print(meta)
    print(HEADER)
    results = {"meta": meta, "rows": [], "copy_GBps": {}}
    for device in devices:
        rows, copy_bw = bench_device(device, args)
        results["rows"] += rows
        if copy_bw:
            results["copy_GBps"][device.type] = copy_bw / 1e9
            print(f"{device.type} copy bandwidth: {copy_bw / 1e9:.0f} GB/s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
