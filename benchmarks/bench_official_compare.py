"""DBAE against DiffAE and PDAE as their authors released them, at real size (not a test).

The released files cannot be downloaded here, so this builds one file per method in its
authors' exact layout from the key lists of their released FFHQ128 models, with random
weights (cost only: nothing here measures quality):

- DBAE: ``ema_0.9999_1020000.pt`` (tests/fixtures/official_dbae/keymaps/ffhq128_sto.json, as
  benchmarks/bench_import.py builds it);
- DiffAE: ``last.ckpt`` of ``ffhq128_autoenc_130M`` (its ``ema_model.*`` networks and ``x_T``;
  official_diffae/keymaps/ffhq128_autoenc_130M.json);
- PDAE: a representation-learning ``checkpoint.pt`` (``ema_encoder``, ``ema_decoder``; the FFHQ128
  encoder and the assumed shift U-Net of official_pdae/keymaps),

imports each with ``dbae import`` (timed), and times all three in one process and runtime
at their authors' inference settings: DBAE one encoder pass, one decoder pass and K bridge
steps; DiffAE its 250-step DDIM inversion and 100-step decode; PDAE its 100-step inversion and
100-step decode (each step one pass of the shared U-Net path giving eps and G). Timed: infer
(images -> z, x_T) and decode ((z, x_T) -> images), each ``--runs`` times after ``--warmup``.

    python benchmarks/bench_official_compare.py --device cpu --runs 1   # JSON to docs/data/
    python benchmarks/bench_official_compare.py --measured-steps 10     # baselines: 10 + 10 steps, projected

On a 2-core CPU one pass of these 128 px U-Nets takes seconds, so the authors' 250 + 100
DiffAE steps take many minutes: ``--measured-steps`` times fewer steps and projects the
authors' totals from the per-step time (every DDIM step runs the same networks), and says so
in the table and the JSON (``projected``).
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
from collections import OrderedDict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import machine, write_json  # noqa: E402
from bench_import import build_file  # noqa: E402  (the DBAE layout builder)

#: the authors' inference settings: method -> (inversion steps, decode steps)
AUTHORS = {"diffae": (250, 100), "pdae": (100, 100)}


def _random(entries: list[dict], seed: int) -> "OrderedDict[str, torch.Tensor]":
    g = torch.Generator().manual_seed(seed)
    return OrderedDict((e["key"], torch.randn(e["shape"], generator=g) * 0.02) for e in entries)


def build_diffae(path: Path) -> dict:
    data = json.loads((FIXTURES / "official_diffae" / "keymaps" / "ffhq128_autoenc_130M.json").read_text())
    entries = [e for e in data["state_dict"] if e["key"].startswith("ema_model.") or e["key"] == "x_T"]
    torch.save({"state_dict": _random(entries, 1), "global_step": 0, "epoch": 0}, path)
    return {"keymap": "official_diffae/keymaps/ffhq128_autoenc_130M.json", "tensors": len(entries),
            "note": "ema_model.* and x_T only (the import reads nothing else)"}


def build_pdae(path: Path) -> dict:
    keymaps = FIXTURES / "official_pdae" / "keymaps"
    enc = json.loads((keymaps / "ffhq128_encoder.json").read_text())["state_dict"]
    dec = json.loads((keymaps / "ffhq128_ASSUMED_shift_unet_decoder.json").read_text())["state_dict"]
    torch.save({"step": 0, "ema_encoder": _random(enc, 2), "ema_decoder": _random(dec, 3)}, path)
    return {"keymaps": ["official_pdae/keymaps/ffhq128_encoder.json",
                        "official_pdae/keymaps/ffhq128_ASSUMED_shift_unet_decoder.json"],
            "tensors": len(enc) + len(dec), "note": "ema_encoder and ema_decoder only"}


def _import(src: Path, out: Path) -> float:
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "dbae.cli.main", "import", str(src), "--out", str(out)],
                         capture_output=True, text=True)  # fmt: skip
    if run.returncode != 0:
        raise SystemExit(f"dbae import {src} failed:\n{run.stderr}")
    return time.perf_counter() - t0


def _time(fn, warmup: int, runs: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


@torch.no_grad()
def measure(runs: dict[str, Path], device: torch.device, dbae_nfe: int, warmup: int, repeats: int,
            measured_steps: int | None) -> list[dict]:
    """Each method's infer (images -> z, x_T) and decode ((z, x_T) -> images) times. With
    ``measured_steps``, DiffAE and PDAE run that many inversion and decode steps and their
    totals at the authors' settings are projected from the measured per-step time (every DDIM
    step costs the same network passes); DBAE always runs its full setting."""
    from dbae.baselines.checkpoints import load_any

    rows = []
    for method, run in runs.items():
        loaded = load_any(run, device=device)
        model = loaded.model
        size = model.config.image_size
        x = (torch.rand((1, 3, size, size), generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device)
        t_enc = _time(lambda: model.encode(x), warmup, repeats)
        z = model.encode(x)
        if method == "dbae":
            infer = lambda: model.endpoint(model.encode(x))  # noqa: E731
            x_T = model.endpoint(z)
            decode = lambda: model.decode(z, dbae_nfe, x_T=x_T)  # noqa: E731
            nfe = model.decode(z, dbae_nfe, x_T=x_T).nfe
            authors, run_steps = (0, nfe), (0, nfe)
        else:
            authors = AUTHORS[method]
            run_steps = (measured_steps, measured_steps) if measured_steps else authors
            inv, dec = run_steps
            x_T = model.infer_x_T(x, z, inv).x_T
            infer = lambda: model.infer_x_T(x, model.encode(x), inv)  # noqa: E731
            decode = lambda: model.decode(z, x_T, dec)  # noqa: E731
        t_inf, t_dec = _time(infer, warmup, repeats), _time(decode, warmup, repeats)
        enc, inf, de = (statistics.median(t) for t in (t_enc, t_inf, t_dec))
        row = {"method": method, "preset": getattr(loaded, "preset_name", None) or loaded.preset.name,
               "parameters": sum(p.numel() for p in model.parameters()),
               "authors_steps": {"inversion": authors[0], "decode": authors[1]},
               "measured_steps": {"inversion": run_steps[0], "decode": run_steps[1]},
               "encode_ms": t_enc, "infer_ms": t_inf, "decode_ms": t_dec,
               "encode_median_ms": enc, "infer_median_ms": inf, "decode_median_ms": de}  # fmt: skip
        if run_steps == authors:
            row.update(at_authors_infer_ms=inf, at_authors_decode_ms=de, projected=False)
        else:  # the encoder once, then the measured per-step cost times the authors' step counts
            per_inv, per_dec = (inf - enc) / run_steps[0], de / run_steps[1]
            row.update(inversion_step_ms=per_inv, decode_step_ms=per_dec, projected=True,
                       at_authors_infer_ms=enc + per_inv * authors[0], at_authors_decode_ms=per_dec * authors[1])
        rows.append(row)
        print(f"{method:<7} {row['preset']:<18} {row['parameters'] / 1e6:7.1f}M  measured: infer {run_steps[0]:>4} steps "
              f"{inf:10.1f} ms, decode {run_steps[1]:>4} steps {de:10.1f} ms; at the authors' "
              f"{authors[0]} + {authors[1]} steps{' (projected)' if row['projected'] else ''}: "
              f"{row['at_authors_infer_ms'] + row['at_authors_decode_ms']:10.1f} ms", flush=True)  # fmt: skip
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dbae-nfe", type=int, default=10, help="DBAE's decode NFE (default 10)")
    p.add_argument("--runs", type=int, default=1, help="timed repeats of each operation (default 1)")
    p.add_argument("--warmup", type=int, default=0, help="untimed calls first (default 0)")
    p.add_argument("--measured-steps", type=int,
                   help="run DiffAE and PDAE this many inversion and decode steps (DiffAE: 10, 20, 50, ...) and "
                        "project their totals at the authors' settings from the per-step time (default: run the "
                        "authors' settings in full)")
    p.add_argument("--workdir", type=Path, help="where the files and runs go (default: a temporary folder)")
    p.add_argument("--json", type=Path, default=ROOT / "docs" / "data" / "official_compare_ffhq128_cpu.json")
    args = p.parse_args()
    device = torch.device(args.device)
    meta = machine()  # (its load average: before the imports and timings)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        files = {"dbae": tmp / "ema_0.9999_1020000.pt", "diffae": tmp / "last.ckpt", "pdae": tmp / "checkpoint.pt"}
        built = {"dbae": build_file(FIXTURES / "official_dbae" / "keymaps" / "ffhq128_sto.json", files["dbae"], True),
                 "diffae": build_diffae(files["diffae"]), "pdae": build_pdae(files["pdae"])}  # fmt: skip
        runs = {m: tmp / f"run-{m}" for m in files}
        imports = {m: _import(files[m], runs[m]) for m in files}
        for m, s in imports.items():
            print(f"dbae import ({m}, {files[m].stat().st_size / 2**20:.0f} MiB): {s:.1f} s", flush=True)
        rows = measure(runs, device, args.dbae_nfe, args.warmup, args.runs, args.measured_steps)
        sizes = {m: files[m].stat().st_size for m in files}
    result = {**meta, "device": str(device), "threads": torch.get_num_threads(), "batch": 1, "runs": args.runs,
              "warmup": args.warmup, "measured_steps": args.measured_steps, "load_average_after": os.getloadavg(),
              "built": built, "file_bytes": sizes, "import_seconds": imports, "rows": rows,
              "authors_settings": {"dbae": f"one encoder pass, one decoder pass, {args.dbae_nfe} NFE",
                                   **{m: f"{a}-step inversion + {b}-step decode" for m, (a, b) in AUTHORS.items()}}}
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
