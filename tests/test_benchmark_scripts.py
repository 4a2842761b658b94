"""The benchmark scripts run (their numbers mean nothing on the CPU): a smoke run each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_profile_unet_smoke_accounts_for_every_op(tmp_path):
    out = tmp_path / "profile.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_unet.py"), "--smoke", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    rows = result["kernels"]
    # the kinds partition the ops: their times add up to the total, which the rows add up to
    assert sum(r["us"] for r in rows) / 1e3 == pytest.approx(result["device_ms_per_eval"], rel=1e-9)
    assert sum(result["by_kind_ms"].values()) == pytest.approx(result["device_ms_per_eval"], rel=1e-9)
    # a U-Net evaluation is mostly convolutions (tiny16: 27 conv2d calls), all seen
    conv = [r for r in rows if r["kernel"] == "aten::conv2d"]
    assert conv and conv[0]["kind"] == "convolution" and conv[0]["calls"] >= 10
    assert "convolution" in run.stdout and result["wall_ms_per_eval"] > 0


def test_profile_unet_without_cuda_says_so():
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_unet.py"), "--device", "cuda"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert run.returncode == 1 and "No CUDA device" in run.stderr and "Traceback" not in run.stderr
