"""PyTorch runners (eager, CUDA graphs) and the latency benchmark."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
import torch

from dbae.cli.main import main
from dbae.config import get_preset
from dbae.errors import ConfigError, DataError
from dbae.export import latency
from dbae.export.runner import DecodeSetting, pause_point, pausing
from dbae.export.torch_runners import CUDAGraphRunner, EagerRunner
from dbae.model import DBAE


@pytest.fixture(scope="module")
def model() -> DBAE:
    torch.manual_seed(0)
    return DBAE(get_preset("tiny16").model).eval()


def _images(n: int, seed: int = 0, size: int = 16) -> torch.Tensor:
    return torch.rand((n, 3, size, size), generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_eager_runner_is_the_model(model, sampler):
    setting = DecodeSetting(3, sampler)
    runner = EagerRunner(model, setting)
    x = _images(2)
    z = runner.encode(x)
    torch.testing.assert_close(z, model.encode(x))
    want = model.decode(z, setting.nfe, sampler=sampler)
    assert want.steps == 3
    torch.testing.assert_close(runner.decode(z), want.images)
    torch.testing.assert_close(runner.reconstruct(x), want.images)
    # a pause point before every U-Net evaluation, where other work may run (dbae serve's edits)
    assert runner.preemptible and not CUDAGraphRunner.preemptible
    paused, inner = [], []

    def other_work():  # a whole decode of other latents, at each pause point
        paused.append(1)
        inner.append(runner.decode(-z[:1]))
        pause_point()  # (the hook's own work is not paused again)

    with pausing(other_work):
        got = runner.decode(z)
    torch.testing.assert_close(got, want.images)  # resumed where it stopped, unchanged
    assert len(paused) == setting.nfe == len(inner)
    torch.testing.assert_close(inner[0], model.decode(-z[:1], setting.nfe, sampler=sampler).images)
    runner.decode(z)
    assert len(paused) == setting.nfe  # (nothing outside `pausing`)


def test_edit_moves_the_latent(model):
    runner = EagerRunner(model, DecodeSetting(2))
    x = _images(3, seed=1)
    d = torch.randn(model.config.z_dim, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(runner.edit(x, d, 0.0), runner.reconstruct(x))
    moved = runner.edit(x, d, 3.0)
    torch.testing.assert_close(moved, runner.decode(runner.encode(x) + 3.0 * d))
    assert (moved - runner.reconstruct(x)).abs().max() > 1e-3
    per_image = torch.stack([d, -d, 2 * d])
    torch.testing.assert_close(runner.edit(x, per_image), runner.decode(runner.encode(x) + per_image))


def test_compiled_networks_share_the_weights(model):
    """The compiled view traces the same networks with the same parameters; the model itself
    is left as it was. (aot_eager: the tracing without inductor's code generation, which the
    GPU check script and `dbae bench latency --runners eager-compiled` exercise.)"""
    from dbae.export.torch_runners import inference_networks

    view = inference_networks(model, compile=True, backend="aot_eager")
    assert type(model.unet).__name__ == "ScoreUNet" and type(view.unet).__name__ == "OptimizedModule"
    assert view.unet._orig_mod is model.unet and view.bridge is model.bridge
    x = _images(2, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(view.encode(x), model.encode(x), rtol=1e-5, atol=1e-5)
        z = model.encode(x)
        want = model.decode(z, 2).images
        torch.testing.assert_close(view.decode(z, 2).images, want, rtol=1e-4, atol=1e-4)
    assert EagerRunner(model, DecodeSetting(1), compile=True).name == "eager-compiled"


def test_cast_networks_are_converted_copies(model):
    """bf16 / NHWC runners run converted copies of the networks behind float32 inputs and
    outputs: the model keeps its float32 NCHW weights, NHWC in float32 gives the model's images
    (same math, another layout), and bf16 weights stay close to them (bf16 keeps 8 bits of
    mantissa: the tiny model's 3-step decode measured within about 0.02 of float32)."""
    from dbae.export.torch_runners import CastNetwork, inference_networks

    before = {k: v.clone() for k, v in model.state_dict().items()}
    view = inference_networks(model, "bf16")
    assert isinstance(view.unet, CastNetwork) and view.unet.net.out[2].weight.dtype == torch.bfloat16
    assert view.unet.net is not model.unet and model.unet.out[2].weight.dtype == torch.float32
    nhwc = inference_networks(model, "fp32", channels_last=True)
    w = nhwc.unet.net.input_blocks[0][0].weight
    assert w.dtype == torch.float32 and w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    x = _images(3, seed=4)
    with torch.no_grad():
        z = model.encode(x)
        want = model.decode(z, 3).images
        torch.testing.assert_close(nhwc.encode(x), z, rtol=1e-5, atol=1e-5)
        x_T = nhwc.decoder(z)
        assert x_T.is_contiguous() and nhwc.unet(x, torch.zeros(3), x_T, z).is_contiguous()  # back in NCHW
        torch.testing.assert_close(nhwc.decode(z, 3).images, want, rtol=1e-4, atol=1e-4)
        z16 = view.encode(x)
        assert z16.dtype == torch.float32 and (z16 - z).abs().max() < 0.05
        got = EagerRunner(model, DecodeSetting(3), precision="bf16").decode(z)
    assert got.dtype == torch.float32 and 0 < (got - want).abs().max() < 0.1
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    runner = EagerRunner(model, DecodeSetting(1), precision="bf16", channels_last=True, autocast=True)
    assert runner.name == "eager-nhwc-autocast" and runner.model.unet.net.dtype == torch.float32


def test_compile_modes_are_checked_before_anything_is_built():
    from dbae.export.torch_runners import check_options

    check_options(CUDAGraphRunner, True, compile_mode="max-autotune-no-cudagraphs")
    check_options(EagerRunner, True, compile_mode="reduce-overhead")  # inductor's graphs alone: fine
    for mode in ("reduce-overhead", "max-autotune"):  # inductor's graphs inside ours: refused
        with pytest.raises(ConfigError, match="use max-autotune-no-cudagraphs"):
            check_options(CUDAGraphRunner, True, compile_mode=mode)
    with pytest.raises(ConfigError, match="compiled runners only"):
        check_options(EagerRunner, False, compile_mode="default")
    with pytest.raises(ConfigError, match="compile mode must be one of"):
        check_options(EagerRunner, True, compile_mode="fastest")


@pytest.mark.parametrize("steps", [0, 11, 2.5])
def test_unsupported_decode_lengths(steps):
    with pytest.raises(ConfigError, match="steps must be an integer from 1 to 10"):
        DecodeSetting(steps)


def test_bad_inputs_are_clear(model):
    runner = EagerRunner(model, DecodeSetting(1))
    with pytest.raises(DataError, match=r"images must have shape \(B, 3, 16, 16\).*\(2, 3, 32, 32\)"):
        runner.encode(_images(2, size=32))
    with pytest.raises(DataError, match="floating point"):
        runner.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(DataError, match=r"z must have shape \(B, 16\)"):
        runner.decode(torch.zeros(2, 7))
    with pytest.raises(DataError, match="direction must have shape"):
        runner.edit(_images(2), torch.zeros(2, 5))
    with pytest.raises(ConfigError, match="precision"):
        EagerRunner(model, DecodeSetting(1), precision="fp8")
    with pytest.raises(ConfigError, match="CUDA device"):
        CUDAGraphRunner(model, DecodeSetting(1))


def test_percentile_matches_numpy():
    values = list(np.random.default_rng(0).exponential(size=37))
    for q in (0, 50, 95, 100):
        assert latency.percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert latency.percentile([3.0], 95) == 3.0


def test_time_calls_counts_and_syncs():
    calls, syncs = [], []
    times = latency.time_calls(lambda: calls.append(1), lambda: syncs.append(1), warmup=2, runs=5)
    assert len(times) == 5 and len(calls) == 7 and len(syncs) == 6 and min(times) >= 0


def test_bench_latency_rows(model):
    made = []

    def make(setting):
        made.append(setting)
        return EagerRunner(model, setting)

    rows = latency.bench_latency({"eager": make}, steps=[1, 2], batches=[1, 2], warmup=0, runs=2)
    assert made == [DecodeSetting(1), DecodeSetting(2)]
    keys = [(r.op, r.batch, r.steps) for r in rows]
    assert keys == [("encode", 1, None), ("decode", 1, 1), ("edit", 1, 1), ("encode", 2, None),
                    ("decode", 2, 1), ("edit", 2, 1), ("decode", 1, 2), ("edit", 1, 2), ("decode", 2, 2),
                    ("edit", 2, 2)]  # fmt: skip
    for r in rows:
        assert r.runs == 2 and 0 < r.median_ms <= r.p95_ms
    # a decode of 2 steps costs more than one of 1 step (two U-Net evaluations instead of one)
    by_key = {(r.op, r.batch, r.steps): r for r in rows}
    assert by_key[("decode", 2, 2)].nfe == 2 and by_key[("decode", 2, 1)].nfe == 1
    fake = [latency.LatencyRow("eager", "edit", 1, 4, 4, 10.0, 12.0, 10.5, 3),
            latency.LatencyRow("fast", "edit", 1, 4, 4, 2.5, 3.0, 2.6, 3)]  # fmt: skip
    assert latency.speedups(fake) == [{"runner": "fast", "op": "edit", "batch": 1, "steps": 4, "speedup": 4.0}]
    assert statistics.median([1.0, 3.0]) == 2.0


def test_cli_bench_latency(tmp_path, capsys):
    out = tmp_path / "lat"
    args = ["bench", "latency", "--preset", "tiny16", "--steps", "1", "--batches", "2", "--runs", "2",
            "--warmup", "0", "--out", str(out), "--device", "cpu", "--runners", "eager"]  # fmt: skip
    assert main(args) == 0
    data = json.loads((out / "latency.json").read_text())
    assert [(r["runner"], r["op"], r["batch"]) for r in data["rows"]] == [
        ("eager", "encode", 2), ("eager", "decode", 2), ("eager", "edit", 2)]  # fmt: skip
    assert data["meta"]["precision"] == "fp32" and "tiny16" in data["meta"]["model"]
    assert "median ms" in capsys.readouterr().out
    assert main([*args, "--channels-last", "--precision", "bf16"]) == 0
    data = json.loads((out / "latency.json").read_text())
    assert {r["runner"] for r in data["rows"]} == {"eager"} and data["meta"]["channels_last"]  # the options: meta
    assert data["meta"]["precision"] == "bf16" and not data["meta"]["autocast"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--runners", "cuda-graph"], "needs a CUDA device"),
        (["--runners", "nope"], "unknown runner 'nope'"),
        (["--steps", "12"], "steps must be an integer from 1 to 10"),
        (["--batches", "0"], "--batches must be >= 1"),
        (["--runners", "onnxruntime", "--channels-last"], "--channels-last applies to the PyTorch runners"),
        (["--runners", "eager", "--compile-mode", "max-autotune-no-cudagraphs"],
         "a compile mode applies to the compiled runners only"),
    ],
)
def test_cli_bench_latency_bad_arguments(tmp_path, capsys, extra, message):
    args = ["bench", "latency", "--preset", "tiny16", "--runs", "1", "--device", "cpu", "--out", str(tmp_path), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# ----- CUDA graphs (run where a GPU is present) -----
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_cuda_graph_runner_matches_eager(model, sampler):
    gpu_model = DBAE(model.config).cuda().eval()
    gpu_model.load_state_dict(model.state_dict())
    setting = DecodeSetting(4, sampler)
    eager, graphed = EagerRunner(gpu_model, setting), CUDAGraphRunner(gpu_model, setting, precision="fp32")
    d = torch.randn(model.config.z_dim, device="cuda")
    for seed in (0, 1):  # the second call replays the captured graphs on new inputs
        x = _images(3, seed=seed).cuda()
        torch.testing.assert_close(graphed.encode(x), eager.encode(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(graphed.reconstruct(x), eager.reconstruct(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(graphed.edit(x, d, 1.5), eager.edit(x, d, 1.5), rtol=1e-4, atol=1e-4)
    assert graphed.captured == [("decode", 3), ("edit", 3), ("encode", 3)]
    first = graphed.decode(torch.zeros(3, model.config.z_dim, device="cuda"))
    kept = first.clone()
    graphed.decode(torch.randn(3, model.config.z_dim, device="cuda"))
    assert torch.equal(first, kept)  # a later replay does not overwrite what was returned


@cuda
def test_compiled_cuda_graph_runner_matches_eager(model):
    """Inductor's kernels captured in the graphs: the same images as eager, to float32
    reordering and FMA contraction (inductor fuses the group norms and picks its own
    convolution algorithms: measured up to 1.6e-4 apart on an H100, 2026-11-26)."""
    gpu_model = DBAE(model.config).cuda().eval()
    gpu_model.load_state_dict(model.state_dict())
    setting = DecodeSetting(2)
    eager = EagerRunner(gpu_model, setting)
    graphed = CUDAGraphRunner(gpu_model, setting, precision="fp32", compile=True)
    assert graphed.name == "cuda-graph-compiled"
    x = _images(2, seed=5).cuda()
    torch.testing.assert_close(graphed.encode(x), eager.encode(x), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(graphed.reconstruct(x), eager.reconstruct(x), rtol=2e-3, atol=2e-3)


@cuda
def test_bf16_nhwc_cuda_graph_runner_matches_its_eager_twin(model):
    """The deployment setting (bf16 weight copies in NHWC, captured): the graphs replay what
    the eager runner with the same options computes, to bf16 rounding (cuDNN may time and
    pick other algorithms for the graphs), and stay near the float32 model. The global cuDNN
    flags are as they were after the capture."""
    gpu_model = DBAE(model.config).cuda().eval()
    gpu_model.load_state_dict(model.state_dict())
    setting = DecodeSetting(3)
    flags = (torch.backends.cudnn.benchmark, torch.backends.cudnn.benchmark_limit)
    eager = EagerRunner(gpu_model, setting, precision="bf16", channels_last=True)
    graphed = CUDAGraphRunner(gpu_model, setting, precision="bf16", channels_last=True)
    assert graphed.name == "cuda-graph-nhwc"
    x = _images(3, seed=6).cuda()
    got = graphed.reconstruct(x)
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.benchmark_limit) == flags
    assert got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got, eager.reconstruct(x), rtol=0, atol=5e-2)
    fp32 = EagerRunner(gpu_model, setting).reconstruct(x)
    assert (got - fp32).abs().max() < 0.1
    assert gpu_model.unet.out[2].weight.dtype == torch.float32  # the model itself is untouched
