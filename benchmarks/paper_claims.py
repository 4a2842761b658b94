#!/usr/bin/env python
"""The DBAE paper's claims at small scale: DBAE, DBAE-d, DiffAE and PDAE trained with one
budget (steps x batch) on one preset's networks, then compared on reconstruction with
tractable inference (and DiffAE / PDAE with DDIM-inverted x_T for reference), a linear probe
and TAD / ATTRS on the shapes factors, and latency. Prints a table and the claims' verdicts;
writes paper_claims.json, paper_claims.md and PNG plots into --out.

    python benchmarks/paper_claims.py                 # the default study (about 10-15 min on 2 CPU cores)
    python benchmarks/paper_claims.py --smoke         # seconds: the whole pipeline on tiny16, a few steps
    python benchmarks/paper_claims.py --dataset DIR   # an image folder (no probe / TAD: no labels)

Rerunning with the same --out reuses (or continues) the trained runs in <out>/runs; choose
another --out for another budget. Library: :mod:`dbae.study`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dbae.config import PRESETS
from dbae.errors import DBAEError
from dbae.study import METHODS, StudyConfig, format_claims, format_table, run_study, smoke_config, write_outputs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="paper_claims.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="a seconds-long run of the whole pipeline (tiny16, 3 steps)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="networks of every method (default shapes16)")
    p.add_argument("--steps", type=int, help="optimisation steps per method and PDAE stage (default 2000)")
    p.add_argument("--batch-size", type=int, help="images per step (default: the preset's)")
    p.add_argument("--dataset", help="'shapes' (default) or an image folder / zip / LMDB")
    p.add_argument("--seed", type=int)
    p.add_argument("--methods", nargs="+", choices=METHODS, help="default: all four")
    p.add_argument("--recon-images", type=int, help="held-out images reconstructed (default 256)")
    p.add_argument("--probe-train", type=int, help="latents fitting the probe (default 2000)")
    p.add_argument("--probe-test", type=int, help="latents testing the probe and measuring TAD (default 1000)")
    p.add_argument("--dbae-nfe", type=int, help="DBAE's decode NFE (default 10)")
    p.add_argument("--decode-steps", type=int, help="DiffAE / PDAE DDIM decode steps (default 100)")
    p.add_argument("--device", help="cpu (default) or cuda[:N]")
    p.add_argument("--out", type=Path, help="output folder (default runs/paper_claims, or runs/paper_claims_smoke)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    began = time.perf_counter()
    try:
        base = smoke_config() if args.smoke else StudyConfig()
        cfg = base.replace(
            preset=args.preset, steps=args.steps, batch_size=args.batch_size, dataset=args.dataset, seed=args.seed,
            methods=tuple(args.methods) if args.methods else None, recon_images=args.recon_images,
            probe_train=args.probe_train, probe_test=args.probe_test, dbae_nfe=args.dbae_nfe,
            decode_steps=args.decode_steps, device=args.device,
        )  # fmt: skip
        out = args.out or Path("runs") / ("paper_claims_smoke" if args.smoke else "paper_claims")
        study = run_study(cfg, out, progress=not args.no_progress)
        paths = write_outputs(study.results, out, study.grid_inputs, study.grid_rows)
    except DBAEError as exc:
        print(f"paper_claims.py: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(study.results))
    print()
    print(format_claims(study.results))
    print(f"\nwrote {', '.join(str(p) for p in paths.values())} ({time.perf_counter() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
