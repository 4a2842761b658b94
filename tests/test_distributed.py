"""Distributed training: 2 gloo ranks on the CPU, launched by torchrun as a user would.

Each test starts a real ``torchrun --standalone --nproc_per_node 2`` job (a few seconds).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dbae.cli.main import main
from dbae.config import get_preset
from dbae.training import TrainOptions, Trainer, override
from dbae.checkpoints import list_checkpoints
from dbae.training.metrics_log import read_metrics

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="this torch build has no gloo backend",
)

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

#: a worker that trains like `dbae train` and then writes what its rank holds
WORKER = """
import sys
from pathlib import Path

from safetensors.torch import save_file

from dbae.config import get_preset
from dbae.training import TrainOptions, Trainer, override
from dbae.training.distributed import session

out, accum = Path(sys.argv[1]), int(sys.argv[2])
preset = override(get_preset("tiny16"), steps=3, batch_size=8, log_every=1, sample_every=1000, ckpt_every=1000)
with session("cpu") as dist:
    trainer = Trainer(preset, TrainOptions(out=out, progress=False, eval_images=8, log=print,
                                           grad_accum=accum, dist=dist))
    FAIL_HOOK
    trainer.fit()
    tensors = {f"model.{k}": v.contiguous() for k, v in trainer.model.state_dict().items()}
    tensors.update({f"ema.{k}": v.contiguous() for k, v in trainer.ema.state_dict().items()})
    save_file(tensors, str(out / f"rank{dist.rank}.safetensors"))
"""


def _torchrun(tmp_path: Path, script: str, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    path = tmp_path / "worker.py"
    path.write_text(textwrap.dedent(script))
    return subprocess.run([*TORCHRUN, str(path), *argv], env=ENV, capture_output=True, text=True, timeout=timeout)


def _single_process_weights(out: Path, grad_accum: int = 1) -> dict[str, torch.Tensor]:
    preset = override(get_preset("tiny16"), steps=3, batch_size=8, log_every=1, sample_every=1000, ckpt_every=1000)
    trainer = Trainer(preset, TrainOptions(out=out, progress=False, eval_images=8, log=lambda m: None,
                                           grad_accum=grad_accum))
    trainer.fit()
    tensors = {f"model.{k}": v for k, v in trainer.model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in trainer.ema.state_dict().items()})
    return tensors


def test_two_gloo_ranks_hold_identical_weights_equal_to_one_process(tmp_path):
    """2 ranks x 2 accumulation micro-batches of 2 images (global batch 8), 3 steps: both
    ranks end with bit-identical weights and EMA, and those equal a single process that
    trains on the whole batch of 8 at once (float tolerance)."""
    out = tmp_path / "ddp"
    res = _torchrun(tmp_path, WORKER.replace("FAIL_HOOK", "pass"), str(out), "2")
    assert res.returncode == 0, res.stdout + res.stderr
    r0, r1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert r0.keys() == r1.keys() and any(k.startswith("ema.") for k in r0)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k

    single = _single_process_weights(tmp_path / "single")
    worst = max(float((r0[k] - single[k]).abs().max()) for k in single)
    assert worst < 1e-6, worst
    # ... and training moved the weights far beyond that tolerance (the comparison is not vacuous).
    torch.manual_seed(0)
    from dbae.model import DBAE

    init = DBAE(get_preset("tiny16").model).state_dict()
    moved = max(float((single[f"model.{k}"] - v).abs().max()) for k, v in init.items())
    assert moved > 100 * 1e-6, moved
    # Only rank 0 wrote the run directory: one metrics record per step, with the throughput.
    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["world_size"] == 2 for r in records)
    assert all(r["images_per_s_per_device"] == pytest.approx(r["images_per_s"] / 2) for r in records)


def test_gradient_accumulation_in_one_process_equals_the_full_batch(tmp_path):
    a = _single_process_weights(tmp_path / "a", grad_accum=1)
    b = _single_process_weights(tmp_path / "b", grad_accum=4)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


def test_torchrun_cli_trains_and_reports_user_mistakes_once(tmp_path, capsys):
    """`torchrun ... -m dbae.cli.main train` on 2 CPU ranks: rank 0 alone prints and writes,
    the result equals `dbae train` in one process; a global batch that does not split
    evenly is one clear error line (from rank 0 only), no traceback of ours."""
    args = ["train", "--preset", "tiny16", "--steps", "4", "--batch-size", "8", "--device", "cpu",
            "--log-every", "1", "--ckpt-every", "2", "--keep-last", "1", "--no-progress"]
    dist_out = tmp_path / "dist"
    res = subprocess.run([*TORCHRUN, "-m", "dbae.cli.main", *args, "--out", str(dist_out)],
                         env=ENV, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("trained tiny16 to step 4 on 2 ranks") == 1
    names = sorted(p.name for p in (dist_out / "checkpoints").iterdir())
    assert names == ["best.safetensors", "manifest.json", "step-00000004.safetensors"]

    single_out = tmp_path / "single"
    assert main([*args, "--out", str(single_out)]) == 0
    capsys.readouterr()
    a = load_file(str(dist_out / "checkpoints" / "step-00000004.safetensors"))
    b = load_file(str(single_out / "checkpoints" / "step-00000004.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    records = [r for r in read_metrics(dist_out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all("images_per_s_per_device" in r for r in records)

    bad = subprocess.run([*TORCHRUN, "-m", "dbae.cli.main", *args, "--batch-size", "9", "--out",
                          str(tmp_path / "bad")], env=ENV, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0
    errors = [line for line in bad.stderr.splitlines() if line.startswith("dbae train: error:")]
    assert len(errors) == 1 and "--batch-size 9" in errors[0] and "2 rank(s)" in errors[0], bad.stderr
    ours = [line for line in bad.stderr.splitlines() if line.strip().startswith("File") and "/dbae/" in line]
    assert not ours, bad.stderr  # no traceback through our code (torchrun prints its own summary)
    assert not list_checkpoints(tmp_path / "bad" / "checkpoints")


def test_an_error_in_one_rank_ends_the_whole_job(tmp_path):
    """Rank 1 fails at step 2: rank 0, waiting for it in the gradient all-reduce, stops too
    (gloo reports the closed connection; torchrun stops the remaining workers) instead of
    hanging, and torchrun exits non-zero."""
    hook = textwrap.dedent("""
        step = trainer.train_step
        def failing(x, stop=False):
            if dist.rank == 1 and trainer.step == 2:
                raise RuntimeError("injected failure on rank 1")
            return step(x, stop)
        trainer.train_step = failing
    """).strip().replace("\n", "\n    ")
    started = time.monotonic()
    res = _torchrun(tmp_path, WORKER.replace("FAIL_HOOK", hook), str(tmp_path / "run"), "1", timeout=90)
    assert res.returncode != 0
    assert time.monotonic() - started < 60
    output = res.stdout + res.stderr
    assert "injected failure on rank 1" in output
    assert not (tmp_path / "run" / "rank0.safetensors").exists()


def test_pre_drawn_loss_noise_equals_the_loss_own_draws_and_slices_by_sample():
    """The basis of the split: draw_loss_noise makes exactly the draws DBAE.loss would make,
    and a slice of a batch's draws gives that slice of the batch the same noise."""
    from dbae.model import DBAE

    torch.manual_seed(0)
    model = DBAE(get_preset("tiny16").model).eval()
    x = torch.rand(6, 3, 16, 16) * 2 - 1
    own = model.loss(x, generator=torch.Generator().manual_seed(7))
    noise = model.draw_loss_noise(6, generator=torch.Generator().manual_seed(7))
    drawn = model.loss(x, noise=noise)
    assert torch.equal(own.loss, drawn.loss)
    halves = [model.loss(x[i : i + 3], noise=noise.slice(i, i + 3)).loss for i in (0, 3)]
    torch.testing.assert_close((halves[0] + halves[1]) / 2, own.loss, rtol=1e-6, atol=0)


def test_sigterm_to_torchrun_checkpoints_and_one_process_resumes(tmp_path, capsys):
    """SIGTERM to torchrun (a pre-empted job): both ranks stop at the same step and rank 0
    writes its checkpoint; `--resume auto` in a single process then continues it and
    matches an uninterrupted single-process run (the split does not depend on the ranks)."""
    import signal

    args = ["train", "--preset", "tiny16", "--batch-size", "8", "--device", "cpu", "--log-every", "1",
            "--sample-every", "1000", "--ckpt-every", "1000", "--no-progress"]
    split = tmp_path / "split"
    proc = subprocess.Popen([*TORCHRUN, "-m", "dbae.cli.main", *args, "--steps", "300", "--out", str(split)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = split / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert out.count("stopped by SIGTERM") == 1, out + err
    saved = list_checkpoints(split / "checkpoints")
    assert len(saved) == 1 and 3 <= saved[0][0] < 300, saved
    stop = saved[0][0]

    assert main([*args, "--steps", str(stop + 2), "--out", str(split), "--resume", "auto"]) == 0
    assert main([*args, "--steps", str(stop + 2), "--out", str(tmp_path / "full")]) == 0
    capsys.readouterr()
    name = f"step-{stop + 2:08d}.safetensors"
    a = load_file(str(split / "checkpoints" / name))
    b = load_file(str(tmp_path / "full" / "checkpoints" / name))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
