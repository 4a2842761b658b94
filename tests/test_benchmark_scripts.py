"""The benchmark scripts run (their numbers mean nothing on the CPU): a smoke run each."""

from __future__ import annotations

import json
import os
import statistics
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


def test_bench_serve_smoke_measures_every_edit_frame(trained_tiny, tmp_path):
    """The serve benchmark against the real server (a subprocess on a loopback port): one
    client dragging sliders for about a second, then a few connect / upload / disconnect
    cycles. Its accounting must add up: every edit is either rendered or coalesced, the
    server's runner rows are the frames the client received, the latencies are those of
    the frames; and the server it started is gone afterwards."""
    out = tmp_path / "serve.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_serve.py"), "--smoke", "--ckpt",
                          str(trained_tiny), "--json", str(out)], capture_output=True, text=True, timeout=240)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    assert result["ok"] and result["errors"] == 0
    [r] = result["runs"]
    assert r["clients"] == 1 and r["errors"] == 0 and r["failure_count"] == 0 and r["server_errors"] == 0
    assert r["frames"] > 0 and all(r["checks"].values()), r["checks"]
    # every edit is either rendered or folded into a later one (the last one is always rendered)
    assert r["edits_sent"] >= r["frames"] and r["edits_sent"] == r["frames"] + r["coalesced"]
    lat = r["latencies_ms"]
    assert len(lat) == r["frames"] and all(x > 0 for x in lat)
    p = r["latency_ms"]
    assert 0 < p["p50"] <= p["p95"] <= p["max"] and p["max"] == pytest.approx(max(lat), abs=1e-3)
    assert p["p50"] == pytest.approx(statistics.median(lat), abs=0.01)  # the latencies listed are the frames'
    assert r["frames_per_s"] == pytest.approx(r["frames"] / r["seconds"])
    # one row per edit frame; a call serves one or more rows
    assert 1 <= r["runner_calls"] <= r["frames"] == r["runner_rows"]
    assert r["rows_per_call"] == pytest.approx(r["runner_rows"] / r["runner_calls"])
    assert r["frame_runner_ms"] > 0 and 0 <= r["overhead_share"] < 10
    for key in ("rss_mb_before", "rss_mb_after"):
        assert isinstance(r[key], float) and r[key] > 10
    m = result["memory"]
    assert m["failure_count"] == 0 and m["cycles"] > 0 and m["connections_open_after"] == 0
    assert m["uploads"] == m["connections_total"] == m["cycles"] + m["warmup_cycles"]
    assert all(isinstance(m[k], float) and m[k] > 10 for k in ("rss_mb_start", "rss_mb_after_warmup", "rss_mb_after_cycles"))
    assert "p95 ms" in run.stdout and "memory:" in run.stdout
    meta = result["meta"]
    assert meta["cpu_count"] >= 1 and meta["torch"] and "--smoke" in meta["argv"]
    # the server subprocess was stopped and reaped (and logged no traceback)
    server = result["server"]
    assert server["exit_code"] is not None and "Traceback" not in server["stderr_tail"]
    pid = server["pid"]
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        cmdline = b""
    assert b"serve" not in cmdline, f"the server (pid {pid}) still runs"


def test_real_photos_smoke_splits_by_photograph_and_compares_with_pca(tmp_path):
    """The real-data check end to end with 2 training steps: crops of every bundled photograph
    at every scale, the held-out photographs only in the test folder, and one row per method
    measured on the test crops (PCA's rank-16 code beats the mean image even here)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from real_photos import HELD_OUT, PHOTOS, SCALES
    finally:
        sys.path.pop(0)
    out, grid = tmp_path / "rp.json", tmp_path / "rp.png"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "real_photos.py"), "--steps", "2", "--crops", "1",
                          "--work", str(tmp_path / "work"), "--json", str(out), "--grid", str(grid), "--no-progress"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    photos = result["config"]["photos"]
    assert sorted(photos["train"] + photos["test"]) == sorted(PHOTOS) and photos["test"] == list(HELD_OUT)
    stems = {p.split(".")[0] for p in HELD_OUT}
    test_files = sorted(f.name for f in (tmp_path / "work" / "test").iterdir())
    train_files = sorted(f.name for f in (tmp_path / "work" / "train").iterdir())
    assert len(test_files) == result["config"]["test_crops"] == len(HELD_OUT) * len(SCALES)
    assert len(train_files) == result["config"]["train_crops"] == (len(PHOTOS) - len(HELD_OUT)) * len(SCALES)
    assert {f.split("-s")[0] for f in test_files} == stems and not {f.split("-s")[0] for f in train_files} & stems
    rows = {r["method"].split(" ")[0]: r for r in result["reconstruction"]}
    assert set(rows) == {"DBAE", "PCA", "mean"}
    assert rows["PCA"]["mse"] < rows["mean"]["mse"] and rows["PCA"]["ssim"] > rows["mean"]["ssim"]
    assert [p["photo"] for p in result["per_photo"]] == sorted(stems)
    assert grid.stat().st_size > 0 and "PCA (d = 16)" in run.stdout


def test_z_information_measure_on_the_shared_run(trained_tiny, tmp_path):
    """benchmarks/z_information.py measure: the quantities it reports, on the shared 300-step run."""
    out = tmp_path / "z.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "z_information.py"), "measure", "--ckpt",
                          str(trained_tiny), "--json", str(out)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    r = json.loads(out.read_text())
    assert r["stochastic"] and r["step"] == 300 and 0.01 < r["sig"] < 1
    assert r["snr"] > 1 and 0 < r["centre_r"] <= 1 and 0 < r["ssim"] <= 1
    assert 0 < r["readout_mse"] < r["mse_mean"] and r["mse_x_T"] > 0
