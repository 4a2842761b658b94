"""The ONNX Runtime step runner (``onnxruntime-step``): one cached U-Net graph, every decode setting.

Tolerances as in test_export_onnx.py: fp32 1e-4 against the eager runner (max abs error,
images in [-1, 1]); fp16 3e-2. Heun with K = 2 is the exception: its one Heun step spans
almost the whole bridge, and eager float32 is itself 2e-4 from the float64 decode there, so
the step runner must be no further from float64 than eager is (at most twice as far).
"""

from __future__ import annotations

import copy
import os
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from conftest import perturbed_tiny16  # noqa: E402
from dbae.checkpoints.integrity import TENSORS_KEY, read_header  # noqa: E402
from dbae.config import get_preset  # noqa: E402
from dbae.errors import ConfigError  # noqa: E402
from dbae.export import onnx_export, onnxruntime_step, registry  # noqa: E402
from dbae.export.manifest import MANIFEST_NAME, read_manifest, sha256_file  # noqa: E402
from dbae.export.onnxruntime_step import (  # noqa: E402
    OnnxStepRunner,
    ensure_step_export,
    model_sha256,
    step_cache_folder,
    step_factory,
)
from dbae.export.runner import DecodeSetting, pausing  # noqa: E402
from dbae.export.torch_runners import EagerRunner  # noqa: E402
from dbae.inference import load_model  # noqa: E402
from dbae.model import DBAE  # noqa: E402
from dbae.serve.render import Renderer, resolve_runner_kind  # noqa: E402

FP32_TOL = 1e-4
FP16_TOL = 3e-2
#: Euler and Heun at two K each: all from one export
SETTINGS = [DecodeSetting(1, "euler"), DecodeSetting(4, "euler"), DecodeSetting(3, "heun"), DecodeSetting(10, "heun")]


def _max_err(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


@pytest.fixture(scope="module")
def model() -> DBAE:
    return perturbed_tiny16(0)


@pytest.fixture
def exports(monkeypatch):
    """Counts the exports (export_onnx still runs: this only records its calls)."""
    calls: list[str] = []
    real = onnx_export.export_onnx

    def counted(model, out_dir, **kwargs):
        calls.append(str(out_dir))
        return real(model, out_dir, **kwargs)

    monkeypatch.setattr(onnx_export, "export_onnx", counted)
    return calls


def test_every_setting_from_one_export_matches_eager(model, tmp_path, exports):
    make = step_factory(model, "fp32", cache_dir=tmp_path, threads=1)
    assert len(exports) == 1
    g = torch.Generator().manual_seed(7)
    images = torch.rand((3, 3, 16, 16), generator=g) * 2 - 1
    direction = torch.randn(16, generator=g)
    evaluations = []
    for setting in SETTINGS:
        runner, eager = make(setting), EagerRunner(model, setting)
        assert isinstance(runner, OnnxStepRunner) and runner.name == "onnxruntime-step" and runner.setting == setting
        hook = runner.graphs.model.unet.register_forward_hook(lambda *_: evaluations.append(1))
        z = runner.encode(images)
        assert _max_err(z, eager.encode(images)) < FP32_TOL
        evaluations.clear()
        pauses = []
        with pausing(lambda: pauses.append(1)):
            decoded = runner.decode(z)
        assert len(evaluations) == setting.nfe  # one graph call per network evaluation
        assert runner.preemptible and len(pauses) == setting.nfe  # a pause point before each (dbae serve)
        hook.remove()
        assert decoded.shape == (3, 3, 16, 16) and float(decoded.abs().max()) <= 1.0
        assert _max_err(decoded, eager.decode(z)) < FP32_TOL, setting
        edited = runner.edit(images, direction, 2.0)
        assert _max_err(edited, eager.edit(images, direction, 2.0)) < FP32_TOL, setting
        assert _max_err(edited, decoded) > 1e-3  # the shift does something
    # Heun K = 2: against the float64 decode (see the module docstring)
    setting = DecodeSetting(2, "heun")
    z = EagerRunner(model, setting).encode(images)
    exact = copy.deepcopy(model).double().decode(z.double(), setting.nfe, sampler="heun").images
    eager_err = _max_err(EagerRunner(model, setting).decode(z), exact)
    assert _max_err(make(setting).decode(z), exact) <= 2 * eager_err
    assert len(exports) == 1  # five settings, both samplers: still the one export
    # the runners share the sessions; a batch of one runs through the same dynamic-batch graphs
    assert make(SETTINGS[0]).graphs is make(SETTINGS[1]).graphs
    one = make(SETTINGS[1]).decode(z[:1])
    assert _max_err(one, EagerRunner(model, SETTINGS[1]).decode(z[:1])) < FP32_TOL
    assert next(model.parameters()).requires_grad and model.unet is not runner.graphs.model.unet  # model untouched


def test_fp16_graphs(model, tmp_path):
    setting = DecodeSetting(3, "heun")
    runner = step_factory(model, "fp16", cache_dir=tmp_path, threads=1)(setting)
    z = torch.randn(2, 16, generator=torch.Generator().manual_seed(5))
    assert _max_err(runner.decode(z), EagerRunner(model, setting).decode(z)) < FP16_TOL
    assert step_cache_folder(model, "fp16", tmp_path).name == "step-fp16"


def test_the_cache_is_reused_and_keyed_by_the_model(model, tmp_path, exports):
    folder, _, exported = ensure_step_export(model, "fp32", cache_dir=tmp_path)
    assert exported and len(exports) == 1
    assert folder == tmp_path / "onnx" / model_sha256(model) / "step-fp32"
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert {"encoder.fp32.onnx", "endpoint.fp32.onnx", "network.fp32.onnx", MANIFEST_NAME} <= set(stamps)
    # a second start-up (same weights, another copy of the model) reuses it without exporting
    again, _, exported = ensure_step_export(copy.deepcopy(model), "fp32", cache_dir=tmp_path)
    assert again == folder and not exported and len(exports) == 1
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    step_factory(model, "fp32", cache_dir=tmp_path, threads=1)
    assert len(exports) == 1
    # other weights: another folder; the first one stays
    other = perturbed_tiny16(1)
    other_folder, _, exported = ensure_step_export(other, "fp32", cache_dir=tmp_path)
    assert exported and other_folder != folder and other_folder.parent.name == model_sha256(other)
    assert model_sha256(other) != model_sha256(model) and read_manifest(folder)
    # the sampling preconditioning stays on the host: the same graphs serve another sigma_T
    changed = copy.deepcopy(model)
    changed.set_sampling_sigma_T(0.0)
    assert step_cache_folder(changed, "fp32", tmp_path) == folder
    setting = DecodeSetting(2, "euler")
    z = torch.randn(2, 16, generator=torch.Generator().manual_seed(9))
    out = step_factory(changed, "fp32", cache_dir=tmp_path, threads=1)(setting).decode(z)
    assert len(exports) == 2 and _max_err(out, EagerRunner(changed, setting).decode(z)) < FP32_TOL


@pytest.mark.parametrize("damage", ["bytes", "manifest", "missing"])
def test_a_damaged_cache_is_exported_again(model, tmp_path, exports, damage):
    folder, _, _ = ensure_step_export(model, "fp32", cache_dir=tmp_path)
    graph = folder / "network.fp32.onnx"
    if damage == "bytes":
        with open(graph, "r+b") as fh:
            fh.seek(100)
            fh.write(b"\xff\xff\xff\xff")
    elif damage == "manifest":
        (folder / MANIFEST_NAME).write_text("{not json")
    else:
        graph.unlink()
    again, manifest, exported = ensure_step_export(model, "fp32", cache_dir=tmp_path)
    assert again == folder and exported and len(exports) == 2
    assert sha256_file(graph) == manifest.graph("network", "fp32").sha256
    setting = DecodeSetting(3, "heun")
    z = torch.randn(2, 16, generator=torch.Generator().manual_seed(4))
    runner = step_factory(model, "fp32", cache_dir=tmp_path, threads=1)(setting)
    assert len(exports) == 2 and _max_err(runner.decode(z), EagerRunner(model, setting).decode(z)) < FP32_TOL
    assert not [p for p in folder.parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_an_unwritable_cache_exports_for_this_process_only(model, tmp_path, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    folder, _, exported = ensure_step_export(model, "fp32", cache_dir=blocker)
    assert exported and not str(folder).startswith(str(blocker)) and read_manifest(folder)
    err = capsys.readouterr().err
    assert "cannot write the ONNX cache" in err and "DBAE_CACHE_DIR" in err and err.count("\n") == 1
    import shutil

    shutil.rmtree(folder.parent)  # (the process would remove it when it exits)


def test_a_loaded_checkpoint_keys_the_cache_by_its_checked_sha256(trained_tiny, tmp_path, monkeypatch):
    """A checkpoint's weights are not hashed again for the cache key: the sha256 of its tensor
    data (checked when it was read) and which weights (EMA or raw) stand for them."""
    ema, raw = load_model(trained_tiny), load_model(trained_tiny, ema=False)
    digest = read_header(ema.path)[TENSORS_KEY]
    assert (ema.weights_id, raw.weights_id) == (f"{digest}/EMA", f"{digest}/model")
    hashed = step_cache_folder(ema.model, "fp32", tmp_path)
    monkeypatch.setattr(onnxruntime_step, "tensors_sha256", None)  # (hashing the weights would fail now)
    keyed = step_cache_folder(ema.model, "fp32", tmp_path, ema.weights_id)
    assert keyed.parent.name == model_sha256(ema.model, ema.weights_id) and keyed != hashed
    assert step_cache_folder(raw.model, "fp32", tmp_path, raw.weights_id) != keyed
    monkeypatch.setenv("DBAE_CACHE_DIR", str(tmp_path))
    renderer = Renderer(ema.model, "onnxruntime-step", "fp32", DecodeSetting(2), weights_id=ema.weights_id)
    try:  # (what dbae serve passes)
        assert renderer.runner().graphs.folder == keyed
    finally:
        renderer.close()


def test_registry_kind_and_the_default_cache_folder(model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DBAE_CACHE_DIR", str(tmp_path))
    assert "onnxruntime-step" in registry.KINDS
    assert registry.default_kinds(torch.device("cpu")) == ["eager", "onnxruntime", "onnxruntime-step"]
    runner = registry.factory("onnxruntime-step", model, "fp32")(DecodeSetting(3, "euler"))
    assert runner.graphs.folder == tmp_path / "onnx" / model_sha256(model) / "step-fp32"
    assert "exporting the ONNX step graphs" in capsys.readouterr().out
    registry.factory("onnxruntime-step", model, "fp32")
    assert "exporting" not in capsys.readouterr().out  # the second start reuses the cache
    with pytest.raises(ConfigError, match="fp32 or fp16"):
        registry.factory("onnxruntime-step", model, "bf16")
    with pytest.raises(ConfigError, match="--channels-last applies to the PyTorch runners"):
        registry.factory("onnxruntime-step", model, "fp32", channels_last=True)


def test_auto_picks_the_step_runner_on_the_cpu_when_onnxruntime_imports(model, tmp_path, monkeypatch):
    monkeypatch.setenv("DBAE_CACHE_DIR", str(tmp_path))
    cpu = torch.device("cpu")
    assert resolve_runner_kind("auto", cpu) == "onnxruntime-step"
    renderer = Renderer(model, resolve_runner_kind("auto", cpu), "fp32", DecodeSetting(4, "euler"))
    try:  # the server's renderer: every setting from the one export made at start-up
        assert renderer.name == "onnxruntime-step"
        assert renderer.runner(DecodeSetting(7, "heun")).graphs is renderer.runner().graphs
    finally:
        renderer.close()
    assert resolve_runner_kind("auto", torch.device("cuda", 0)) == "cuda-graph"
    assert resolve_runner_kind("eager", cpu) == "eager" and resolve_runner_kind("onnxruntime", cpu) == "onnxruntime"
    assert resolve_runner_kind("auto", cpu, "fp32") == resolve_runner_kind("auto", cpu, "fp16") == "onnxruntime-step"
    assert resolve_runner_kind("auto", cpu, "bf16") == "eager"  # ONNX Runtime has no bfloat16 convolutions
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    assert resolve_runner_kind("auto", cpu) == "eager"
    assert resolve_runner_kind("auto", torch.device("cuda", 0)) == "cuda-graph"
    monkeypatch.delitem(sys.modules, "onnxruntime")
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert resolve_runner_kind("auto", cpu) == "eager"


def test_the_cache_defaults_to_the_home_cache(monkeypatch, tmp_path):
    from dbae.export.onnxruntime_step import dbae_cache_dir

    monkeypatch.delenv("DBAE_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert dbae_cache_dir() == tmp_path / ".cache" / "dbae"
    monkeypatch.setenv("DBAE_CACHE_DIR", str(tmp_path / "c"))
    assert dbae_cache_dir() == tmp_path / "c" and os.fspath(dbae_cache_dir()).endswith("c")


def test_the_runner_benchmark_script_runs(model, tmp_path):
    """benchmarks/bench_runners_cpu.py, cut to one setting and one call (its timings are not checked)."""
    import json
    import subprocess
    from pathlib import Path

    from dbae.checkpoints import save_checkpoint

    ckpt = save_checkpoint(tmp_path / "step-00000001.safetensors", preset=get_preset("tiny16"), step=1,
                           model=model.state_dict(), ema=model.state_dict())  # fmt: skip
    out = tmp_path / "runners.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_runners_cpu.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(script), "--ckpt", str(ckpt), "--kinds", "eager", "onnxruntime-step",
                          "--steps", "2", "--samplers", "heun", "--rounds", "1", "--runs", "2", "--serve-seconds", "0",
                          "--json", str(out)], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    data = json.loads(out.read_text())
    rows = data["in_process"]["decode_ms"]
    assert set(rows) == {"eager heun x2", "onnxruntime-step heun x2"} and all(r["runs"] == 2 for r in rows.values())
    assert data["in_process"]["startup_s"]["onnxruntime-step (cached)"] >= 0 and "load_average" in data["meta"]
