"""Where one U-Net evaluation spends its time (not a test): the kernels of a decode step.

A K-step decode is K U-Net evaluations plus a few elementwise ops, so the edit latency
target of ``dbae bench latency`` is a per-evaluation budget (K = 10 in 20 ms: under 2 ms per
evaluation at batch 1). This script runs the U-Net of a preset (random weights) under the
torch profiler and prints the kernels that take its GPU time, grouped by kind
(convolution, matmul, normalisation, attention, elementwise, other), plus the wall time per
evaluation (so that the host's share shows too) and, on CUDA, the time of one evaluation
captured as a CUDA graph and replayed (what the CUDA-graph runners pay). The options are the
runners' levers: converted weights against autocast (--cast), NHWC, cuDNN's algorithm search,
inductor with and without freezing. It writes the table as JSON.

    python benchmarks/profile_unet.py --preset ffhq128 --batch 1 --precision bf16
    python benchmarks/profile_unet.py --preset ffhq128 --compile --cast --channels-last --cudnn-benchmark
    python benchmarks/profile_unet.py --smoke          # no CUDA: tiny16 on the CPU (CPU ops)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# kernel-name patterns of each kind, tried in this order (inductor, cuDNN, cuBLAS/CUTLASS, ATen)
KINDS = (
    # inductor's generated kernels first: their names list the ops they fused (a group norm fused
    # into the input of a convolution is named "..._convolution_...", yet it is not one)
    ("normalisation", re.compile(r"^triton_(per|red)_")),
    ("elementwise", re.compile(r"^triton_poi_")),
    ("attention", re.compile(r"flash|fmha|attention|sdpa", re.I)),
    ("convolution", re.compile(r"conv|implicit_gemm|winograd|fprop|dgrad|wgrad|nhwc|nchw", re.I)),
    ("matmul", re.compile(r"gemm|matmul|cublas|nvjet|cutlass|sm90_xmma|mm_|addmm|linear", re.I)),
    ("normalisation", re.compile(r"norm|moments|welford|reduction|reduce|mean|var", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|unrolled|pointwise|triton_poi|silu|add|mul|copy|cat", re.I)),
)


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "other"


def unet_inputs(model, batch: int, device: torch.device, channels_last: bool):
    """(x_in, c_noise, x_T, z) of one evaluation at a mid-trajectory time."""
    cfg = model.config
    g = torch.Generator(device=device).manual_seed(0)
    shape = (batch, cfg.image_channels, cfg.image_size, cfg.image_size)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x_in = torch.randn(shape, generator=g, device=device).contiguous(memory_format=fmt)
    x_T = torch.randn(shape, generator=g, device=device).contiguous(memory_format=fmt)
    z = torch.randn((batch, cfg.z_dim), generator=g, device=device)
    t = torch.full((batch,), 0.5, device=device, dtype=torch.float64)
    c_noise = model.bridge.preconditioning(t).c_noise.to(torch.float32)
    return x_in, c_noise, x_T, z


def graph_replay_ms(evaluate, iters: int) -> float:
    """Milliseconds per replay of one evaluation captured as a CUDA graph: the device time the
    CUDA-graph runners pay per evaluation, without the host's launch cost."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        evaluate()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        evaluate()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def profile(args: argparse.Namespace) -> dict:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from dbae.config import get_preset
    from dbae.model import DBAE

    from dbae.export.torch_runners import CastNetwork

    device = torch.device(args.device)
    model = DBAE(get_preset(args.preset).model).to(device).eval()
    dtype = PRECISIONS[args.precision]
    if args.cast:  # what the runners do: converted weights, float32 in and out
        unet = CastNetwork(model.unet, dtype or torch.float32, args.channels_last)
    else:
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        unet = model.unet
    if args.freeze:  # inductor folds the (inference) weights into constants
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
    unet = torch.compile(unet, mode=args.compile_mode) if args.compile else unet
    inputs = unet_inputs(model, args.batch, device, args.channels_last)
    use_autocast = dtype is not None and not args.cast
    autocast = torch.autocast(device.type, dtype=dtype) if use_autocast else contextlib.nullcontext()
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    @torch.no_grad()
    def evaluate():
        with autocast:
            return unet(*inputs)

    for _ in range(args.warmup):  # compilation and cuDNN's algorithm search happen here
        evaluate()
    sync()
    start = time.perf_counter()
    for _ in range(args.iters):
        evaluate()
    sync()
    wall_ms = 1e3 * (time.perf_counter() - start) / args.iters
    graph_ms = graph_replay_ms(evaluate, args.iters) if cuda else None

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(args.iters):
            evaluate()
        sync()
    wanted = DeviceType.CUDA if cuda else DeviceType.CPU
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type != wanted or (not cuda and event.cpu_parent is not None):
            continue  # on the CPU: top-level ops only, so that nothing is counted twice
        entry = per_kernel[event.name]
        entry[0] += event.time_range.elapsed_us() / args.iters
        entry[1] += 1 / args.iters
    total_us = sum(us for us, _ in per_kernel.values())
    by_kind: dict[str, float] = defaultdict(float)
    for name, (us, _) in per_kernel.items():
        by_kind[kind_of(name)] += us
    rows = sorted(
        ({"kernel": name, "kind": kind_of(name), "us": us, "calls": calls} for name, (us, calls) in per_kernel.items()),
        key=lambda r: -r["us"],
    )
    return {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "preset": args.preset,
        "batch": args.batch,
        "precision": args.precision,
        "compile": args.compile,
        "channels_last": args.channels_last,
        "cast": args.cast,
        "cudnn_benchmark": args.cudnn_benchmark,
        "freeze": args.freeze,
        "compile_mode": args.compile_mode,
        "wall_ms_per_eval": wall_ms,
        "graph_ms_per_eval": graph_ms,
        "device_ms_per_eval": total_us / 1e3,
        "launches_per_eval": sum(calls for _, calls in per_kernel.values()),
        "by_kind_ms": {k: v / 1e3 for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "kernels": rows,
    }


def print_report(result: dict, top: int) -> None:
    what = "GPU kernels" if result["device"] != "cpu" else "CPU ops"
    print(f"{result['preset']} U-Net on {result['device']}, batch {result['batch']}, {result['precision']}, "
          f"compile={result['compile']}, channels_last={result['channels_last']}, cast={result['cast']}, "
          f"cudnn_benchmark={result['cudnn_benchmark']}, freeze={result['freeze']}")  # fmt: skip
    graph = "" if result["graph_ms_per_eval"] is None else f"; CUDA-graph replay {result['graph_ms_per_eval']:.3f} ms"
    print(f"wall {result['wall_ms_per_eval']:.3f} ms per evaluation{graph}; {what} {result['device_ms_per_eval']:.3f} "
          f"ms in {result['launches_per_eval']:.0f} launches")  # fmt: skip
    total = result["device_ms_per_eval"] or 1.0
    for kind, ms in result["by_kind_ms"].items():
        print(f"  {kind:<14}{ms:9.3f} ms  {100 * ms / total:5.1f}%")
    print(f"top {top}:")
    print(f"{'us/eval':>9} {'calls':>6} {'%':>6}  kind           kernel")
    for row in result["kernels"][:top]:
        name = row["kernel"] if len(row["kernel"]) <= 90 else row["kernel"][:87] + "..."
        print(f"{row['us']:9.1f} {row['calls']:6.0f} {100 * row['us'] / 1e3 / total:5.1f}%  {row['kind']:<14} {name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="ffhq128")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16")
    parser.add_argument("--compile", action="store_true", help="torch.compile the U-Net (inductor) first")
    parser.add_argument("--channels-last", action="store_true", help="weights and images in NHWC")
    parser.add_argument("--cast", action="store_true",
                        help="the U-Net's weights converted to the precision (the runners' way) instead of autocast")  # fmt: skip
    parser.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN time all its convolution algorithms (benchmark_limit 0)")
    parser.add_argument("--compile-mode", choices=["default", "max-autotune-no-cudagraphs"],
                        help="with --compile: torch.compile's mode (max-autotune-no-cudagraphs: inductor times "
                             "Triton templates against cuDNN and cuBLAS per convolution and matmul)")  # fmt: skip
    parser.add_argument("--freeze", action="store_true", help="with --compile: inductor freezing (weights as constants)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--top", type=int, default=25, help="kernels listed")
    parser.add_argument("--json", type=Path, default=Path("profile_unet.json"))
    parser.add_argument("--smoke", action="store_true", help="tiny16 on the CPU: checks the script, times nothing")
    args = parser.parse_args(argv)
    if args.smoke:
        args.preset, args.device, args.precision, args.iters, args.warmup = "tiny16", "cpu", "fp32", 2, 1
    elif args.device.startswith("cuda") and not torch.cuda.is_available():
        print("No CUDA device: nothing to profile (use --smoke for a CPU run of the script).", file=sys.stderr)
        return 1
    if (args.freeze or args.compile_mode) and not args.compile:
        parser.error("--freeze and --compile-mode need --compile")
    if args.batch < 1 or args.iters < 1 or args.warmup < 0:
        parser.error("--batch and --iters must be >= 1, --warmup >= 0")
    from dbae.export.torch_runners import cudnn_benchmark

    # --cudnn-benchmark: cuDNN times all its algorithms, as the CUDA-graph runners let it
    with cudnn_benchmark() if args.cudnn_benchmark else contextlib.nullcontext():
        result = profile(args)
    print_report(result, args.top)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
