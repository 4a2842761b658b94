"""Parity with the DBAE authors' code on their fixtures, every reference tensor (not a test).

For both tiny fixtures (tests/fixtures/official_dbae, made with the authors' code: a 64 px
stochastic and a 128 px deterministic model in their checkpoint format), convert the
checkpoint (``dbae.checkpoints.imports.read_foreign``) in float64 and in float32, compute every
tensor the authors recorded (:mod:`dbae.checkpoints.official_parity`; the sampler runs on the
whole batch here, where the tests run them on the first image), and print max |ours - theirs|
against their float64 outputs, beside the authors' own float32-vs-float64 difference where
their README records it. tests/test_official_dbae.py enforces the bounds; this records them.

    python benchmarks/official_parity.py            # JSON to docs/data/official_dbae_parity.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from bench_common import machine, write_json
from safetensors.torch import load_file

from dbae.checkpoints.imports import read_foreign
from dbae.checkpoints.official_parity import max_errors, our_outputs
from dbae.model import DBAE

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "official_dbae"
HEAD_CHANNELS = 16  # the tiny fixtures' U-Net attention heads


def measure(name: str, dtype: torch.dtype) -> dict[str, float]:
    foreign = read_foreign(FIXTURES / name / "ema_0.9999_000000.pt", num_head_channels=HEAD_CHANNELS, dtype=dtype)
    model = DBAE(foreign.preset.model).to(dtype).eval()
    model.load_state_dict(foreign.state)
    inputs = {k: v.to(dtype) for k, v in load_file(FIXTURES / name / "inputs.safetensors").items()}
    ref = load_file(FIXTURES / name / "reference_f64.safetensors")
    return max_errors(our_outputs(model, inputs, ref), ref)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=ROOT / "docs" / "data" / "official_dbae_parity.json")
    args = p.parse_args()
    result = {**machine(), "fixtures": {}}
    for name in ("tiny64_sto", "tiny128_det"):
        f64, f32 = measure(name, torch.float64), measure(name, torch.float32)
        result["fixtures"][name] = {"float64": f64, "float32": f32}
        print(f"{name}: max |ours - authors' float64|")
        print(f"  {'tensor':<26} {'float64':>10} {'float32':>10}")
        for key in f64:
            if not key.startswith("nfe_"):
                print(f"  {key:<26} {f64[key]:10.2e} {f32[key]:10.2e}")
        print(f"  NFE counts equal: {all(v == 0 for k, v in f64.items() if k.startswith('nfe_'))}")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
