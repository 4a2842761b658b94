"""The benchmark scripts run (their numbers mean nothing on the CPU): a smoke run each."""

from __future__ import annotations

import json
import os
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


def test_bench_triton_train_smoke_accounts_bytes_per_op(tmp_path):
    """The training-kernel benchmark on the Triton interpreter: every op per size and dtype,
    the noise diagnostic on the float32 rows only, and each op's bytes as the docstring's
    table states them (N values of e bytes per image tensor)."""
    out = tmp_path / "bench.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_triton_train.py"), "--smoke",
                          "--json", str(out)], capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr
    rows = json.loads(out.read_text())["rows"]
    per_value = {"input_fwd": 4, "input_bwd": 2, "loss_fwd": 3, "loss_bwd": 5}
    for r in rows:
        n = r["batch"] * 3 * r["side"] ** 2
        e = {"float32": 4, "bfloat16": 2, "float16": 2}[r["dtype"]]
        assert r["bytes"] == (4 * n if r["op"] == "noise" else per_value[r["op"]] * n * e), r
        assert r["fused_ms"] > 0 and r["eager_ms"] > 0
    ops = {(r["op"], r["dtype"]) for r in rows}
    assert ("noise", "float32") in ops and not any(op == "noise" and dt != "float32" for op, dt in ops)
    assert {op for op, _ in ops} == {*per_value, "noise"}
