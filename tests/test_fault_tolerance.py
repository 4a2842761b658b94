"""Fault tolerance: kill -9 and resume, hashed checkpoints, keep-last-N plus best."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dbae.cli.main import main
from dbae.config import get_preset
from dbae.errors import CheckpointError
from dbae.training import TrainOptions, Trainer, override
from dbae.checkpoints import latest_valid_checkpoint, list_checkpoints, read_metadata, verify_checkpoint
from dbae.checkpoints.manifest import read_manifest
from dbae.training.metrics_log import read_metrics


def quiet(out: Path, **kw) -> TrainOptions:
    return TrainOptions(out=out, progress=False, eval_images=8, log=lambda msg: None, **kw)


def small(steps: int, **kw):
    fields = dict(steps=steps, batch_size=8, log_every=1, sample_every=1000, ckpt_every=1000)
    fields.update(kw)
    return override(get_preset("tiny16"), **fields)


def assert_same_files(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys() and any(k.startswith("optim.") for k in ta)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def _check_visible_checkpoints(ckpt_dir: Path) -> int:
    """Verify every checkpoint-named file now in ``ckpt_dir`` (hash and full read); returns
    how many were checked. A file deleted meanwhile by keep-last is not a failure."""
    checked = 0
    for _, path in list_checkpoints(ckpt_dir):
        try:
            verify_checkpoint(path)
            load_file(str(path))
        except (FileNotFoundError, CheckpointError) as exc:
            if path.exists():
                raise AssertionError(f"{path.name} is visible but not intact: {exc}") from None
            continue
        checked += 1
    return checked


def test_kill_9_mid_run_then_resume_auto_matches_uninterrupted(tmp_path, capsys):
    """`dbae train` killed with SIGKILL after its first checkpoints, then `--resume auto`:
    the run completes with weights identical to an uninterrupted run, and no checkpoint
    file is ever visible half-written (checked continuously while it runs)."""
    argv = ["train", "--preset", "tiny16", "--steps", "60", "--batch-size", "4", "--log-every", "1",
            "--sample-every", "1000", "--ckpt-every", "4", "--keep-last", "2", "--no-progress"]
    split = tmp_path / "split"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dbae.cli.main", *argv, "--out", str(split)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpt_dir = split / "checkpoints"
    deadline = time.time() + 120
    seen = 0
    try:
        while time.time() < deadline and proc.poll() is None:
            seen += _check_visible_checkpoints(ckpt_dir)
            if list_checkpoints(ckpt_dir) and list_checkpoints(ckpt_dir)[-1][0] >= 8:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert seen > 0
    stopped_at = list_checkpoints(ckpt_dir)[-1][0]
    assert 8 <= stopped_at < 60
    _check_visible_checkpoints(ckpt_dir)

    # the rest in this process, on the killed run's one thread: float sums in the convolutions
    # depend on the thread count, and the comparison below is bit for bit
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*argv, "--out", str(split), "--resume", "auto"]) == 0
        out = capsys.readouterr().out
        assert "step 60" in out
        assert not list(split.rglob("*.tmp")), "a partial file was left behind"
        assert main([*argv, "--out", str(tmp_path / "full")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert_same_files(tmp_path / "full" / "checkpoints" / "step-00000060.safetensors",
                      ckpt_dir / "step-00000060.safetensors")
    # keep-last 2 plus the best; the manifest lists exactly the files there.
    names = sorted(p.name for p in ckpt_dir.glob("*.safetensors"))
    assert names == ["best.safetensors", "step-00000056.safetensors", "step-00000060.safetensors"]
    assert sorted(read_manifest(ckpt_dir)) == names
    steps = [r["step"] for r in read_metrics(split / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 61))


def _flip_a_data_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    header = int.from_bytes(raw[:8], "little")
    pos = 8 + header + (len(raw) - 8 - header) // 2  # inside the tensor data: the header stays valid
    raw[pos] ^= 0x40
    path.write_bytes(bytes(raw))


def test_corrupt_checkpoint_is_caught_by_its_hash_and_skipped_on_resume(tmp_path):
    """A flipped bit in the tensor data still loads as safetensors; the manifest's sha256
    catches it, resume warns and takes the previous checkpoint, and the resumed run still
    ends bit-identical to the uninterrupted one. Half-written temporary files left by a
    killed save are cleared."""
    full = Trainer(small(4, ckpt_every=2), quiet(tmp_path / "full")).fit()
    run = tmp_path / "run"
    Trainer(small(4, ckpt_every=2), quiet(run)).fit()
    ckpt_dir = run / "checkpoints"
    newest = ckpt_dir / "step-00000004.safetensors"
    _flip_a_data_byte(newest)
    load_file(str(newest))  # safetensors alone does not notice
    with pytest.raises(CheckpointError, match="sha256"):
        verify_checkpoint(newest)
    warnings: list[str] = []
    assert latest_valid_checkpoint(ckpt_dir, warn=warnings.append) == ckpt_dir / "step-00000002.safetensors"
    assert len(warnings) == 1 and "step-00000004" in warnings[0] and "sha256" in warnings[0]

    partial = ckpt_dir / ".step-00000006.safetensors.x1y2.tmp"
    partial.write_bytes(b"half a checkpoint")
    log: list[str] = []
    resumed = Trainer(small(4, ckpt_every=2), TrainOptions(out=run, resume=True, progress=False, eval_images=8,
                                                           log=log.append)).fit()
    assert any("skipping checkpoint step-00000004" in m for m in log)
    assert any("resumed from" in m and "step-00000002" in m for m in log)
    assert not partial.exists()
    assert resumed.step == 4
    assert_same_files(full.checkpoint, resumed.checkpoint)


def test_all_checkpoints_corrupt_is_a_clear_error(tmp_path):
    run = tmp_path / "run"
    Trainer(small(2, ckpt_every=1), quiet(run)).fit()
    for _, path in list_checkpoints(run / "checkpoints"):
        _flip_a_data_byte(path)
    with pytest.raises(CheckpointError, match="none of the 2 checkpoint"):
        Trainer(small(4), quiet(run, resume=True)).fit()


def test_keep_last_n_and_the_best_checkpoint(tmp_path):
    """keep_last 2 keeps the two newest periodic checkpoints; best.safetensors holds the
    state with the lowest eval MSE of all evaluations and is never pruned."""
    run = tmp_path / "run"
    Trainer(small(6, ckpt_every=1, sample_every=2, lr=5e-3), quiet(run, keep_last=2)).fit()
    ckpt_dir = run / "checkpoints"
    assert [s for s, _ in list_checkpoints(ckpt_dir)] == [5, 6]
    assert sorted(read_manifest(ckpt_dir)) == ["best.safetensors", "step-00000005.safetensors",
                                               "step-00000006.safetensors"]
    evals = [(r["step"], r["eval_mse"]) for r in read_metrics(run / "metrics.jsonl") if "eval_mse" in r]
    evals.append((6, json.loads((run / "eval.json").read_text())["mse"]))
    assert [s for s, _ in evals] == [2, 4, 6]
    best_step, best_mse = min(evals, key=lambda e: e[1])
    meta = read_metadata(ckpt_dir / "best.safetensors")
    assert meta["best_metric"] == "eval_mse" and int(meta["step"]) == best_step
    assert float(meta["best_value"]) == pytest.approx(best_mse)
    verify_checkpoint(ckpt_dir / "best.safetensors")
    # The throughput, in total and per device, is in every training record.
    records = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert all(r["images_per_s"] > 0 and r["images_per_s_per_device"] == r["images_per_s"] for r in records)


def test_cli_resume_auto_keep_last_and_user_mistakes(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--preset", "tiny16", "--batch-size", "4", "--out", str(out), "--no-progress"]
    assert main([*base, "--steps", "2", "--resume", "auto"]) == 0  # nothing to resume: a new run
    # without the bar, the throughput still reaches the console: a line per log step (and the last)
    assert re.search(r"step 2/2  loss [0-9.]+  [0-9.]+ img/s \([0-9.]+ per device, 1 device\)", capsys.readouterr().out)
    assert main([*base, "--steps", "3", "--resume", "auto"]) == 0
    assert main([*base, "--steps", "4", "--resume"]) == 0  # the old spelling still works
    assert "step 4" in capsys.readouterr().out
    for bad, words in [(["--keep-last", "0"], "--keep-last"), (["--grad-accum", "3"], "--grad-accum 3"),
                       (["--grad-accum", "0"], "--grad-accum")]:
        code = main([*base, "--steps", "5", "--resume", "auto", *bad])
        err = capsys.readouterr().err
        assert code == 2 and words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit) as info:
        main([*base, "--resume", "latest"])
    assert info.value.code == 2 and "--resume takes 'auto'" in capsys.readouterr().err
