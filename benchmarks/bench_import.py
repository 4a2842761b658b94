"""Benchmark of `dbae import` on a file of a released model's real size (not a test).

The authors' real checkpoints cannot be downloaded here, so this builds a file with exactly
their layout from a key list (tests/fixtures/official_dbae/keymaps/ffhq128_sto.json by
default: 671 tensors, 162.7M parameters), random weights, written as their EMA save writes it
(``torch.save`` of the state dict; with ``--fp16-layout``, the default, every parameter a view
into one of two flat float32 storages as their fp16 training leaves it, buffers apart). Then,
each in a fresh process (so that its peak memory is its own):

- ``dbae import FILE --out RUN``: wall time and peak resident memory, against the file size
  (the target: under twice the file's size);
- loading the imported run (``dbae.inference.load_model``) and loading the authors' file
  directly (converted in memory), for the "import once, load fast" claim.

    python benchmarks/bench_import.py                       # FFHQ128, JSON to docs/data/
    python benchmarks/bench_import.py --keymap .../celeba64_det.json
    python benchmarks/bench_import.py --source some_file.pt # an existing file (no build)
    python benchmarks/bench_import.py --build-only ema.pt   # only write the file (for other benchmarks)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import torch
from bench_common import machine, write_json

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_KEYMAP = ROOT / "tests" / "fixtures" / "official_dbae" / "keymaps" / "ffhq128_sto.json"

#: run in a fresh process: what it prints last is its JSON result
CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
what, src, out = sys.argv[1:4]
if what == "import":
    from dbae.cli.main import main
    code = main(["import", src, "--out", out])
    assert code == 0, code
else:
    from dbae.inference import load_model
    loaded = load_model(src)
    assert loaded.model is not None
seconds = time.perf_counter() - t0
# VmHWM: this process image's own peak (ru_maxrss would carry the parent's size across fork + exec)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({"seconds": seconds, "peak_rss_bytes": int(status["VmHWM"].split()[0]) * 1024}))
"""


def build_file(keymap: Path, path: Path, fp16_layout: bool, seed: int = 0) -> dict:
    """The authors' layout with random weights: spectral-norm u, v from one power iteration
    (so sigma is positive), BatchNorm variances positive, counters int64."""
    data = json.loads(keymap.read_text())
    g = torch.Generator().manual_seed(seed)
    keys = data["keys"]
    buffers = {k for k, _, _ in keys if k.endswith(("running_mean", "running_var", "num_batches_tracked",
                                                      "weight_u", "weight_v"))}  # fmt: skip
    params = [(k, s) for k, s, _ in keys if k not in buffers]
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    if fp16_layout:  # two flat storages, as master_params_to_state_dict leaves them
        flat = {}
        for small in (True, False):
            group = [(k, s) for k, s in params if (len(s) <= 1) == small]
            total = sum(int(torch.Size(s).numel()) for _, s in group)
            flat[small] = torch.randn(total, generator=g) * 0.02
            offset = 0
            for k, s in group:
                n = int(torch.Size(s).numel())
                state[k] = flat[small][offset:offset + n].view(s)
                offset += n
    else:
        for k, s in params:
            state[k] = torch.randn(s, generator=g) * 0.02
    for k, s, dtype in keys:
        if k in buffers:
            if k.endswith("num_batches_tracked"):
                state[k] = torch.tensor(1000, dtype=torch.int64)
            elif k.endswith("running_var"):
                state[k] = torch.rand(s, generator=g) + 0.5
            elif k.endswith("running_mean"):
                state[k] = torch.randn(s, generator=g) * 0.1
    for k in [k for k in buffers if k.endswith("weight_u")]:
        prefix = k.removesuffix("weight_u")
        w = state[prefix + "weight_orig"]
        dim = 1 if prefix.endswith("init.init.0.") else 0
        mat = w.movedim(dim, 0).reshape(w.shape[dim], -1)
        v = torch.nn.functional.normalize(torch.randn(mat.shape[1], generator=g), dim=0)
        u = torch.nn.functional.normalize(mat @ v, dim=0)
        state[prefix + "weight_u"], state[prefix + "weight_v"] = u, v
    ordered = OrderedDict((k, state[k]) for k, _, _ in keys)
    torch.save(ordered, path)
    return {"keymap": str(keymap.relative_to(ROOT)) if keymap.is_relative_to(ROOT) else str(keymap),
            "tensors": len(ordered), "parameters": data.get("parameter_count_total"), "fp16_layout": fp16_layout}


def child(what: str, src: Path, out: Path) -> dict:
    run = subprocess.run([sys.executable, "-c", CHILD, what, str(src), str(out)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    if run.returncode != 0:
        raise SystemExit(f"{what} failed:\n{run.stdout}\n{run.stderr}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keymap", type=Path, default=DEFAULT_KEYMAP, help="key list of the layout to build")
    p.add_argument("--source", type=Path, help="an existing checkpoint of the authors' layout (no build)")
    p.add_argument("--no-fp16-layout", dest="fp16_layout", action="store_false",
                   help="one storage per tensor instead of the fp16 training's two flat storages")
    p.add_argument("--json", type=Path, default=ROOT / "docs" / "data" / "import_ffhq128_cpu.json")
    p.add_argument("--workdir", type=Path, help="where to build the file and the run (default: a temporary folder)")
    p.add_argument("--build-only", type=Path, metavar="PATH", help="write the file to PATH and stop")
    args = p.parse_args()
    if args.build_only is not None:
        print(build_file(args.keymap, args.build_only, args.fp16_layout))
        return 0

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        built = {}
        if args.source is None:
            src = tmp / "ema_0.9999_1020000.pt"
            t0 = time.perf_counter()
            built = build_file(args.keymap, src, args.fp16_layout)
            built["build_seconds"] = time.perf_counter() - t0
        else:
            src = args.source
        size = src.stat().st_size
        run = tmp / "run"
        imported = child("import", src, run)
        imported_bytes = next((run / "checkpoints").glob("step-*.safetensors")).stat().st_size
        load_run = child("load", run, run)
        load_direct = child("load", src, run)
    rows = [("dbae import FILE --out RUN", imported), ("load the imported run", load_run),
            ("load FILE directly (--ckpt FILE.pt)", load_direct)]
    print(f"file: {size / 2**20:.1f} MiB ({built.get('tensors', '?')} tensors, {built.get('parameters', '?')} parameters); "
          f"imported checkpoint {imported_bytes / 2**20:.1f} MiB")
    print(f"{'step':<40} {'seconds':>8} {'peak RSS MiB':>13} {'x file size':>12}")
    for name, r in rows:
        print(f"{name:<40} {r['seconds']:8.2f} {r['peak_rss_bytes'] / 2**20:13.1f} {r['peak_rss_bytes'] / size:12.2f}")
    result = {
        **machine(), "file_bytes": size, "imported_bytes": imported_bytes, **built,
        "import": imported, "load_run": load_run, "load_direct": load_direct,
        "import_peak_over_file": imported["peak_rss_bytes"] / size,
    }
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
