"""Benchmark of the fused training ops of dbae.kernels (not a test).

On CUDA, for each op, size and dtype: the fused op's time and achieved bandwidth (the
bytes it must move: each input read once, each output written once) as a fraction of the
device-to-device copy bandwidth measured in the same run, and its speedup over the eager
PyTorch composite of dbae.model.DBAE.loss and over torch.compile of that composite.

    python benchmarks/bench_triton_train.py [--dtypes float32 bfloat16] [--json out.json]
    python benchmarks/bench_triton_train.py --configs 4:10 8:10 8:7   # warps:Philox rounds
    python benchmarks/bench_triton_train.py --smoke   # no CUDA: tiny run on the Triton interpreter

Ops and what each side computes (N values per image tensor, e bytes per value):

    input_fwd   (x0, x_T) -> (x_t, x_in)                       4 N e
    input_bwd   grad x_in -> grad x_T (x_t unused, x0 data)     2 N e
    loss_fwd    (F, x0, x_T) -> loss; the composite reads x_t   3 N e
    loss_bwd    -> grads of F and x_T (the composite: F, x_t)   5 N e
    noise       () -> eps, float32 (float32 rows only)          4 N
                (a diagnostic: the Philox and Box-Muller work alone, against torch.randn;
                when it takes longer than a copy of its bytes, the noise bounds the ops)

The composite materialises eps with torch.randn and keeps x_t for the loss, as
DBAE.loss does; the fused ops make eps in-kernel and regenerate x_t from the seed.
The compiled composite uses inductor (aot_eager in the smoke run, whose times mean nothing).

Two times per op and implementation:
- GPU time (``*_gpu_ms``): the summed duration of the CUDA kernels one call launches, read
  by the torch profiler over repeated calls, with the L2 cache flushed between calls. GB/s
  and the speedups come from it: it is what the kernels cost inside a captured (CUDA-graph)
  or compiled training step, where no host overhead shows.
- Call time (``*_ms``): triton.testing.do_bench's median per call (L2 flushed), which
  includes the host-side cost of launching: the Python op dispatch of the fused ops, one
  launch per operator of the composite. At small sizes the host side dominates both.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

SIZES = [(1, 64), (16, 64), (128, 64), (1, 128), (16, 128), (128, 128)]  # (batch, image side)
CHANNELS = 3
SMOKE_SIZES = [(2, 8), (3, 7)]
COPY_BYTES = 1 << 30  # 1 GiB copied for the reference bandwidth
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----- the eager composite that the fused ops replace (dbae.model.DBAE.loss) -----
# Its per-sample coefficients come precomputed as (B, 1, 1, 1) tensors of the images' dtype.
def composite_input(x0: torch.Tensor, x_T: torch.Tensor, a, b, sqrt_v, c_in) -> tuple[torch.Tensor, torch.Tensor]:
    x_t = a * x_T + b * x0 + sqrt_v * torch.randn_like(x0)
    return x_t, c_in * x_t


def composite_loss(F: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, c_skip, c_out, weight) -> torch.Tensor:
    per_sample = ((c_skip * x_t + c_out * F).float() - x0.float()).square().flatten(1).mean(1)
    return (weight * per_sample).mean()


# ----- timing -----
def _timer(smoke: bool) -> Callable[[Callable[[], object]], float]:
    """Milliseconds per call of fn."""
    if smoke:

        def wall(fn):
            fn()
            start = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - start)

        return wall
    from triton.testing import do_bench

    return lambda fn: do_bench(fn, warmup=25, rep=200, return_mode="median")


FLUSH_BYTES = 1 << 28  # written between profiled calls: evicts the 50-60 MB L2 of an H100/H200
GPU_TIME_CALLS = 20


def gpu_ms(fn: Callable[[], object]) -> float | None:
    """Milliseconds of CUDA kernel time per call of fn (profiler), L2 flushed before each call.

    The flushes are fills (``zero_``); the fill kernels are left out of the sum. None when the
    profiler records no kernels (no CUPTI).
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(GPU_TIME_CALLS):
            flush.zero_()
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA and "FillFunctor" not in e.name]
    if not kernels:
        return None
    return sum(e.time_range.elapsed_us() for e in kernels) / GPU_TIME_CALLS / 1e3


def same_size_copy_ms(bytes_moved: int) -> float | None:
    """GPU milliseconds of a device-to-device copy that moves ``bytes_moved`` bytes (half read,
    half written), timed like the ops: the bandwidth a kernel of this size can reach, launch
    and ramp-up included (the 1 GiB copy gives the steady-state peak)."""
    src = torch.empty(bytes_moved // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return gpu_ms(lambda: dst.copy_(src))


def copy_bandwidth(bench) -> float:
    """Device-to-device copy bandwidth in GB/s (read + write of a 1 GiB tensor)."""
    src = torch.empty(COPY_BYTES // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * COPY_BYTES / (ms * 1e-3) / 1e9


def bench_size(
    batch: int, side: int, dtype: torch.dtype, device: str, bench, compiler: str, configs: list
) -> list[dict]:
    """One row per op and launch config: the fused op's times, and (measured once) those of
    the eager composite and the compiled composite."""
    from dbae.bridge import VPBridge
    from dbae.kernels import bridge_input, bridge_loss, bridge_noise, bridge_table
    from dbae.kernels import table as col
    from dbae.kernels.bridge_train import launched_with

    shape = (batch, CHANNELS, side, side)
    n_bytes = torch.finfo(dtype).bits // 8 * batch * CHANNELS * side * side
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.rand(shape, generator=g, device=device).mul(2).sub(1).to(dtype)
    x_T = torch.randn(shape, generator=g, device=device).to(dtype).requires_grad_()
    F = torch.randn(shape, generator=g, device=device).to(dtype).requires_grad_()
    grad_x_in = torch.randn(shape, generator=g, device=device).to(dtype)
    table = bridge_table(VPBridge(), VPBridge().sample_t(batch, device=device))
    seed = 17
    column = {i: table[:, i].to(dtype).view(-1, 1, 1, 1) for i in range(col.NUM_COLUMNS)}
    input_coefficients = [column[i] for i in (col.A, col.B, col.SQRT_V, col.C_IN)]
    loss_coefficients = (column[col.C_SKIP], column[col.C_OUT], table[:, col.WEIGHT])
    torch._dynamo.reset()  # compile the composite afresh for this shape and dtype (static shapes)
    compiled_input = torch.compile(composite_input, backend=compiler)
    compiled_loss = torch.compile(composite_loss, backend=compiler)

    def input_side(kind):
        if kind == "fused":
            return lambda: bridge_input(x0, x_T, table, seed)
        fn = composite_input if kind == "eager" else compiled_input
        return lambda: fn(x0, x_T, *input_coefficients)

    def loss_side(kind, x_t):
        if kind == "fused":
            return lambda: bridge_loss(F, x0, x_T, table, seed).loss
        fn = composite_loss if kind == "eager" else compiled_loss
        return lambda: fn(F, x0, x_t, *loss_coefficients)

    times: dict[str, dict[str, float]] = {}
    gpu: dict[str, dict[str, float | None]] = {}
    gpu_time = gpu_ms if device == "cuda" else (lambda fn: None)

    def measure(kind: str, label: str) -> None:
        fwd = input_side(kind)
        x_t, x_in = fwd()
        # the composite's loss reads the materialised x_t (a leaf, to time its backward alone)
        x_t_leaf = x_t.detach().requires_grad_()
        loss_fwd = loss_side(kind, x_t_leaf)
        loss = loss_fwd()
        loss_inputs = (F, x_T) if kind == "fused" else (F, x_t_leaf)
        calls = {
            "input_fwd": fwd,
            "input_bwd": lambda: torch.autograd.grad(x_in, x_T, grad_x_in, retain_graph=True),
            "loss_fwd": loss_fwd,
            "loss_bwd": lambda: torch.autograd.grad(loss, loss_inputs, retain_graph=True),
        }
        if dtype == torch.float32:  # the noise alone (float32 whatever the images' dtype)
            randn = torch.Generator(device=device).manual_seed(seed)
            calls["noise"] = ((lambda: bridge_noise(shape, seed, device)) if kind == "fused"
                              else (lambda: torch.randn(shape, generator=randn, device=device)))  # fmt: skip
        times[label] = {op: bench(call) for op, call in calls.items()}
        gpu[label] = {op: gpu_time(call) for op, call in calls.items()}

    for kind in ("eager", "compiled"):
        measure(kind, kind)
    for config in configs:
        with launched_with(config):
            measure("fused", config)
    moved = {"input_fwd": 4 * n_bytes, "input_bwd": 2 * n_bytes, "loss_fwd": 3 * n_bytes, "loss_bwd": 5 * n_bytes}
    if dtype == torch.float32:
        moved["noise"] = 4 * batch * CHANNELS * side * side
    same_size_copy = {op: same_size_copy_ms(bytes_moved) if device == "cuda" else None for op, bytes_moved in moved.items()}
    rows = []
    for config in configs:
        for op, bytes_moved in moved.items():
            # GB/s from the kernel time where the profiler gave one, else from the call time
            fused = gpu[config][op] or times[config][op]
            rows.append({
                "op": op, "batch": batch, "side": side, "dtype": str(dtype).removeprefix("torch."),
                "num_warps": config.num_warps, "philox_rounds": config.philox_rounds,
                "bytes": bytes_moved, "fused_ms": times[config][op], "eager_ms": times["eager"][op],
                "compiled_ms": times["compiled"][op], "fused_gpu_ms": gpu[config][op],
                "eager_gpu_ms": gpu["eager"][op], "compiled_gpu_ms": gpu["compiled"][op],
                "fused_GBps": bytes_moved / (fused * 1e-3) / 1e9,
                "same_size_copy_gpu_ms": same_size_copy[op],
                "same_size_copy_GBps": bytes_moved / (same_size_copy[op] * 1e-3) / 1e9 if same_size_copy[op] else None,
            })  # fmt: skip
    return rows


def print_table(rows: list[dict], copy_gbps: float | None) -> None:
    """GPU (kernel) times with GB/s and speedups; then the call times, host side included."""
    columns = ("op", "B", "HxW", "dtype", "warps:rounds", "fused us", "GB/s", "% copy", "% same", "eager us",
               "x eager", "comp us", "x comp", "| call us:", "fused", "eager", "comp")  # fmt: skip
    widths = (10, 4, 8, 9, 12, 9, 7, 7, 7, 9, 8, 8, 7, 9, 8, 8, 8)
    line = lambda cells: " ".join(f"{c:{'<' if i == 0 else '>'}{w}}" for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731

    def us(ms):
        return "-" if ms is None else f"{1e3 * ms:.1f}"

    def ratio(slow, fast):
        return "-" if slow is None or fast is None else f"{slow / fast:.2f}x"

    print("Times in microseconds; GB/s, % of copy and the speedups from GPU kernel time. % copy: of the 1 GiB")
    print("copy's bandwidth (steady state); % same: of a copy moving the op's bytes, timed the same way.")
    print(line(columns))
    for r in rows:
        fused_gpu = r["fused_gpu_ms"]
        cells = (
            r["op"], r["batch"], f"{r['side']}x{r['side']}", r["dtype"], f"{r['num_warps']}:{r['philox_rounds']}",
            us(fused_gpu),
            f"{r['fused_GBps']:.1f}", f"{100 * r['fused_GBps'] / copy_gbps:.1f}%" if copy_gbps else "-",
            f"{100 * r['fused_GBps'] / r['same_size_copy_GBps']:.1f}%" if r["same_size_copy_GBps"] else "-",
            us(r["eager_gpu_ms"]), ratio(r["eager_gpu_ms"], fused_gpu),
            us(r["compiled_gpu_ms"]), ratio(r["compiled_gpu_ms"], fused_gpu),
            "", us(r["fused_ms"]), us(r["eager_ms"]), us(r["compiled_ms"]),
        )  # fmt: skip
        print(line(cells))


def _size(text: str) -> tuple[int, int]:
    try:
        batch, side = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BATCHxSIDE such as 16x64, got {text!r}") from None
    return batch, side


def _config(text: str) -> tuple[int, int]:
    # checked by LaunchConfig later: dbae.kernels must not be imported before TRITON_INTERPRET is set
    try:
        warps, rounds = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WARPS:ROUNDS such as 4:10, got {text!r}") from None
    return warps, rounds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16"])
    parser.add_argument("--json", type=Path, default=Path("bench_triton_train.json"), help="where to write the results")
    parser.add_argument("--smoke", action="store_true", help="without CUDA: a tiny run on the Triton interpreter")
    parser.add_argument(
        "--sizes", nargs="+", type=_size, default=SIZES, metavar="BxS", help="batch x image side, e.g. 16x64 128x128"
    )
    parser.add_argument(
        "--configs", nargs="+", type=_config, default=None, metavar="WARPS:ROUNDS",
        help="launch settings of the fused kernels to compare (default: the package's own)",
    )  # fmt: skip
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("No CUDA device: nothing to benchmark (use --smoke for a tiny run on the Triton interpreter).")
        return 0
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"  # before dbae.kernels imports triton
    os.environ["DBAE_KERNELS"] = "triton"  # the fused rows must be the kernels, never the fallback

    from dbae import kernels

    device = "cuda" if cuda else "cpu"
    if not kernels.available(device):
        print(f"The Triton kernels cannot run on {device} here (is triton installed?).")
        return 0 if args.smoke else 1
    bench = _timer(smoke=not cuda)
    compiler = "inductor" if cuda else "aot_eager"  # the smoke run checks the code path, not speed
    copy_gbps = copy_bandwidth(bench) if cuda else None
    if cuda:
        print(f"{torch.cuda.get_device_name()}: device-to-device copy {copy_gbps:.1f} GB/s")
    rows = []
    from dbae.kernels.bridge_train import LaunchConfig, launch_config

    try:
        configs = [LaunchConfig(*c) for c in args.configs] if args.configs else [launch_config()]
    except ValueError as error:
        parser.error(str(error))
    for name in args.dtypes:
        for batch, side in args.sizes if cuda else SMOKE_SIZES:
            rows += bench_size(batch, side, DTYPES[name], device, bench, compiler, configs)
    print_table(rows, copy_gbps)
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter smoke run)",
        "torch": torch.__version__,
        "copy_GBps": copy_gbps,
        "rows": rows,
    }
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
