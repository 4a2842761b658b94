"""The CPU runners side by side: eager, unrolled ONNX Runtime, ONNX Runtime step runner (not a test).

Two parts, every runner measured in the same run, round-robin (round r times every runner
before round r + 1 starts), so that the load of a shared machine falls on all of them alike:

1. **In process** (``--runs`` timed calls per round): start-up of each runner kind (its
   factory: for ``onnxruntime-step`` the export into an empty cache, then again with the cache
   filled), the first decode at each new decode setting (the unrolled runner exports its
   graph then), and the latency of a batch-1 decode (what a slider move costs the runner) at
   --steps with Euler and Heun.
2. **dbae serve** (``--serve-seconds`` > 0): ``benchmarks/bench_serve.py --clients 1
   --cycles 0 --runner KIND`` for each kind, one client dragging sliders for
   --serve-seconds, --serve-rounds times; reported: p50 / p95 slider-to-frame and the
   server's overhead share (everything outside the runner calls, against the runner time).

Torch's CPU threads are what ``dbae serve`` uses (half the cores, at least 1) unless
--threads; ONNX Runtime keeps its default thread count, as in ``dbae serve``.

    python benchmarks/bench_runners_cpu.py --ckpt runs/shapes16 --json docs/data/runners_cpu_shapes16.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import machine, write_json  # noqa: E402

KINDS = ("eager", "onnxruntime", "onnxruntime-step")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="run directory or checkpoint (e.g. runs/shapes16)")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), help=f"runner kinds (default {' '.join(KINDS)})")
    p.add_argument("--steps", nargs="+", type=int, default=[4, 10], help="decode steps K to time (default 4 10)")
    p.add_argument("--samplers", nargs="+", default=["euler", "heun"], help="samplers to time (default euler heun)")
    p.add_argument("--rounds", type=int, default=3, help="round-robin rounds of the in-process part (default 3)")
    p.add_argument("--runs", type=int, default=30, help="timed batch-1 decodes per setting and round (default 30)")
    p.add_argument("--threads", type=int, help="torch's CPU threads (default: dbae serve's, half the cores)")
    p.add_argument("--unrolled-threads", action="store_true",
                   help="also time the unrolled graphs with ONNX Runtime at torch's thread count")
    p.add_argument("--serve-seconds", type=float, default=10.0, help="seconds per bench_serve run (0: skip part 2)")
    p.add_argument("--serve-rounds", type=int, default=3, help="bench_serve runs per kind, round-robin (default 3)")
    p.add_argument("--json", type=Path, default=Path("runs/bench_runners_cpu.json"))
    return p.parse_args(argv)


def in_process(args: argparse.Namespace) -> dict:
    from dbae.export.runner import DecodeSetting
    from dbae.inference import load_model
    from dbae.serve.server import default_cpu_threads

    torch.set_num_threads(args.threads or default_cpu_threads())
    loaded = load_model(args.ckpt, device="cpu")
    model = loaded.model
    settings = [DecodeSetting(k, s) for s in args.samplers for k in args.steps]
    out: dict = {"model": f"{loaded.preset.name} step {loaded.step}", "torch_threads": torch.get_num_threads(),
                 "startup_s": {}, "first_decode_s": {}, "decode_ms": {}}  # fmt: skip
    saved = os.environ.get("DBAE_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="dbae-bench-cache-") as cache:
        os.environ["DBAE_CACHE_DIR"] = cache  # a cold cache: the step runner exports once here
        try:
            _time_runners(args, model, settings, out)
        finally:
            if saved is None:
                del os.environ["DBAE_CACHE_DIR"]
            else:
                os.environ["DBAE_CACHE_DIR"] = saved
    return out


def _time_runners(args: argparse.Namespace, model, settings: list, out: dict) -> None:
    from dbae.export import registry

    factories, runners = {}, {}
    cfg = model.config
    z = model.encode(torch.zeros(1, cfg.image_channels, cfg.image_size, cfg.image_size)).detach()
    for kind in args.kinds:
        t0 = time.perf_counter()
        factories[kind] = registry.factory(kind, model, "fp32")
        out["startup_s"][kind] = time.perf_counter() - t0
        if kind == "onnxruntime-step":  # a second start-up: the cache is reused
            t0 = time.perf_counter()
            factories[kind] = registry.factory(kind, model, "fp32")
            out["startup_s"]["onnxruntime-step (cached)"] = time.perf_counter() - t0
        for s in settings:
            t0 = time.perf_counter()
            runners[kind, s] = factories[kind](s)
            runners[kind, s].decode(z)
            out["first_decode_s"][f"{kind} {s.sampler} x{s.steps}"] = time.perf_counter() - t0
    kinds = list(args.kinds)
    if args.unrolled_threads:
        kinds.append(_unrolled_at_torch_threads(model, settings, runners, out))
    times: dict = {(kind, s): [] for kind in kinds for s in settings}
    with torch.no_grad():
        for r in range(args.rounds):
            for s in settings:
                for kind in kinds:
                    runner = runners[kind, s]
                    runner.decode(z)  # warm
                    for _ in range(args.runs):
                        t0 = time.perf_counter()
                        runner.decode(z)
                        times[kind, s].append((time.perf_counter() - t0) * 1e3)
    for (kind, s), ms in times.items():
        out["decode_ms"][f"{kind} {s.sampler} x{s.steps}"] = {
            "kind": kind, "sampler": s.sampler, "steps": s.steps, "runs": len(ms),
            "p50": statistics.median(ms), "p95": percentile(ms, 95), "mean": statistics.fmean(ms)}  # fmt: skip


def _unrolled_at_torch_threads(model, settings: list, runners: dict, out: dict) -> str:
    """The unrolled runner again, with ONNX Runtime at torch's thread count (as the step runner
    runs), added to ``runners``; its kind name."""
    from dbae.export.onnx_export import export_onnx
    from dbae.export.onnxruntime_runner import OnnxRuntimeRunner

    n = torch.get_num_threads()
    kind = f"onnxruntime ({n} thread{'s' if n > 1 else ''})"
    with tempfile.TemporaryDirectory(prefix="dbae-bench-unrolled-") as tmp:
        t0 = time.perf_counter()
        export_onnx(model, Path(tmp) / "export", settings=settings, precisions=["fp32"], kinds=("encoder", "decode"))
        out["startup_s"][f"{kind}: export of every setting"] = time.perf_counter() - t0
        for s in settings:
            runners[kind, s] = OnnxRuntimeRunner(Path(tmp) / "export", "cpu", "fp32", s, threads=n)
    return kind


def serve_part(args: argparse.Namespace) -> dict:
    script = Path(__file__).resolve().parent / "bench_serve.py"
    results: dict = {kind: [] for kind in args.kinds}
    with tempfile.TemporaryDirectory(prefix="dbae-bench-serve-") as tmp:
        # the servers' ONNX cache: empty before the first round (the step runner exports at its
        # first start-up and reuses the export in later rounds)
        env = {**os.environ, "DBAE_CACHE_DIR": str(Path(tmp) / "cache")}
        for r in range(args.serve_rounds):
            for kind in args.kinds:
                path = Path(tmp) / f"{kind}-{r}.json"
                cmd = [sys.executable, str(script), "--ckpt", str(args.ckpt), "--clients", "1", "--cycles", "0",
                       "--seconds", str(args.serve_seconds), "--runner", kind, "--json", str(path)]  # fmt: skip
                print("$", " ".join(cmd[1:]), flush=True)
                subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, env=env)
                data = json.loads(path.read_text())
                run = data["runs"][0] if data.get("runs") else {}
                lat = run.get("latency_ms", {})
                results[kind].append({
                    "ok": data.get("ok"), "runner": data.get("info", {}).get("runner"),
                    "startup_s": data.get("server", {}).get("startup_s"), "p50": lat.get("p50"), "p95": lat.get("p95"),
                    "frames_per_s": run.get("frames_per_s"), "overhead_share": run.get("overhead_share"),
                    "frame_runner_ms": run.get("frame_runner_ms"), "frame_overhead_ms": run.get("frame_overhead_ms"),
                    "server_cpu": run.get("server_cpu"), "client_cpu": run.get("client_cpu"),
                    "load_average": data["meta"].get("load_average_at_start"),
                })  # fmt: skip
                print(f"  {kind}: {results[kind][-1]}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result: dict = {"meta": {**machine(), "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])}}
    print(f"{result['meta']['date']}  cpus {result['meta']['cpu_count']}  load {result['meta']['load_average']}", flush=True)
    result["in_process"] = ip = in_process(args)
    print("\nstart-up s: " + ", ".join(f"{k} {v:.2f}" for k, v in ip["startup_s"].items()))
    print("first decode at a new setting s: " + ", ".join(f"{k} {v:.2f}" for k, v in ip["first_decode_s"].items()))
    print(f"\n{'runner':<18} {'setting':<10} {'p50 ms':>8} {'p95 ms':>8} {'x eager p50':>12} {'x unrolled p50':>15}")
    rows = ip["decode_ms"]
    for row in rows.values():
        key = f"{row['sampler']} x{row['steps']}"
        eager, unrolled = rows.get(f"eager {key}"), rows.get(f"onnxruntime {key}")
        vs_eager = f"{row['p50'] / eager['p50']:.2f}" if eager else "-"
        vs_unrolled = f"{row['p50'] / unrolled['p50']:.2f}" if unrolled else "-"
        print(f"{row['kind']:<18} {key:<10} {row['p50']:8.2f} {row['p95']:8.2f} {vs_eager:>12} {vs_unrolled:>15}")
    if args.serve_seconds > 0:
        result["serve"] = sv = serve_part(args)
        print(f"\n{'runner (serve, 1 client)':<26} {'p50 ms':>8} {'p95 ms':>8} {'frames/s':>9} {'runner ms':>10} "
              f"{'overhead ms':>12} {'overhead':>9} {'start s':>8} {'ok':>4}")  # fmt: skip
        for kind, runs in sv.items():
            for r in runs:
                fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
                print(f"{kind:<26} {fmt(r['p50'], '8.1f')} {fmt(r['p95'], '8.1f')} {fmt(r['frames_per_s'], '9.1f')} "
                      f"{fmt(r['frame_runner_ms'], '10.2f')} {fmt(r['frame_overhead_ms'], '12.2f')} "
                      f"{fmt(r['overhead_share'], '9.1%')} {fmt(r['startup_s'], '8.1f')} {str(r['ok']):>4}")  # fmt: skip
    result["meta"]["load_average_at_end"] = os.getloadavg()
    print(f"load at the end {result['meta']['load_average_at_end']}")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
