"""ONNX export (``dbae export``), the ONNX Runtime runner and the TensorRT runner's error paths.

Tolerances (max abs error against PyTorch float32, images and D in [-1, 1]-ish units):

- one network pass (encoder, endpoint, denoiser): fp32 1e-4; fp16 1e-2 (float16 has a
  relative resolution of 1e-3, and the networks stack some twenty layers).
- the unrolled K-step decode: fp32 1e-4 too, and no further from the float64 decode than
  PyTorch's own float32 decode is (at most twice as far). (This holds since the sampler
  evaluates its drift as k_x (x - x_T) + k_D (D - x_T) + k_sum x_T: summed term by term, the
  coefficients of about 5e3 near t = T cancelled in float32 and moved a decode by 2e-4 to
  1e-3, see dbae/sampling.py.) fp16: 3e-2.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import sys
import types

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import onnx  # noqa: E402

from conftest import perturbed_tiny16  # noqa: E402
from dbae.cli.main import main  # noqa: E402
from dbae.config import get_preset  # noqa: E402
from dbae.errors import ConfigError, DataError  # noqa: E402
from dbae.export import onnx_export, registry  # noqa: E402
from dbae.export.manifest import MANIFEST_NAME, read_manifest, sha256_file  # noqa: E402
from dbae.export.onnx_export import export_onnx  # noqa: E402
from dbae.export.onnxruntime_runner import OnnxRuntimeRunner  # noqa: E402
from dbae.export.runner import DecodeSetting  # noqa: E402
from dbae.export.torch_runners import EagerRunner  # noqa: E402
from dbae.model import DBAE  # noqa: E402
from dbae.checkpoints import save_checkpoint  # noqa: E402

FP32_TOL = 1e-4
FP16_TOL = 1e-2
DECODE_FP32_TOL = 1e-4
DECODE_FP16_TOL = 3e-2
SETTINGS = [DecodeSetting(3, "euler"), DecodeSetting(3, "heun")]


def _session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    graph = path if isinstance(path, bytes) else str(path)  # a file, or a serialized graph
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def _max_err(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


@pytest.fixture(scope="module")
def model() -> DBAE:
    return perturbed_tiny16(0)


@pytest.fixture(scope="module")
def export_dir(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "tiny16"
    export_onnx(model, out, settings=SETTINGS, precisions=("fp32", "fp16"), preset="tiny16")
    return out


@pytest.fixture
def reference_decode(monkeypatch):
    """DBAE.decode on the pure-PyTorch reference sampler (as DBAE_KERNELS=reference)."""
    monkeypatch.setattr("dbae.model.fused_sampling", lambda device, dtype=None: False)


def _inputs(model: DBAE, kind: str, batch: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(100 + batch)
    cfg = model.config
    images = torch.rand((batch, cfg.image_channels, cfg.image_size, cfg.image_size), generator=g) * 2 - 1
    z = torch.randn((batch, cfg.z_dim), generator=g)
    if kind == "encoder":
        return (images,)
    if kind == "denoiser":
        t = torch.rand((batch,), generator=g) * 0.98 + 0.01
        with torch.no_grad():
            return (images, t, model.endpoint(z), z)
    return (z,)


# ----- graphs -----
@pytest.mark.parametrize("precision, tol", [("fp32", FP32_TOL), ("fp16", FP16_TOL)])
@pytest.mark.parametrize("kind", ["encoder", "endpoint", "denoiser"])
def test_single_pass_graphs_match_pytorch(model, export_dir, kind, precision, tol):
    graph = read_manifest(export_dir).graph(kind, precision)
    session = _session(export_dir / graph.file)
    torch_fn = {"encoder": model.encode, "endpoint": model.endpoint, "denoiser": model.denoise}[kind]
    for batch in (1, 3):
        inputs = _inputs(model, kind, batch)
        with torch.no_grad():
            expected = torch_fn(*inputs)
        (out,) = session.run(None, {name: x.numpy() for name, x in zip(graph.input_names, inputs)})
        assert out.shape == tuple(expected.shape) and out.dtype == np.float32
        assert _max_err(out, expected) < tol, (kind, precision, batch)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_unrolled_decode_matches_dbae_decode(model, export_dir, reference_decode, sampler):
    manifest = read_manifest(export_dir)
    model64 = copy.deepcopy(model).double()
    for precision in ("fp32", "fp16"):
        graph = manifest.graph("decode", precision, steps=3, sampler=sampler)
        assert graph.nfe == DecodeSetting(3, sampler).nfe == (3 if sampler == "euler" else 5)
        session = _session(export_dir / graph.file)
        for batch in (1, 3):
            (z,) = _inputs(model, "decode", batch)
            expected = model.decode(z, graph.nfe, sampler=sampler).images
            (out,) = session.run(None, {"z": z.numpy()})
            if precision == "fp16":
                assert _max_err(out, expected) < DECODE_FP16_TOL
                continue
            assert _max_err(out, expected) < DECODE_FP32_TOL
            exact = model64.decode(z.double(), graph.nfe, sampler=sampler).images
            assert _max_err(out, exact) <= 2 * _max_err(expected, exact) + 1e-5


def test_unrolled_decode_matches_the_fused_sampler_too(model, export_dir):
    graph = read_manifest(export_dir).graph("decode", "fp32", steps=3, sampler="heun")
    (z,) = _inputs(model, "decode", 3)
    (out,) = _session(export_dir / graph.file).run(None, {"z": z.numpy()})
    assert _max_err(out, model.decode(z, graph.nfe, sampler="heun").images) < DECODE_FP32_TOL


def _widened(path) -> bytes:
    """An ONNX graph with every bfloat16 tensor, cast and type made float32 (so that ONNX Runtime,
    which has no bfloat16 convolutions, runs it): the graph's structure and rounded weights alone."""
    from onnx import AttributeProto, TensorProto, numpy_helper

    proto = onnx.load(str(path))

    def widen(t) -> None:
        if t.data_type == TensorProto.BFLOAT16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))

    for init in proto.graph.initializer:
        widen(init)
    for node in proto.graph.node:
        for a in node.attribute:
            if a.name == "to" and a.i == TensorProto.BFLOAT16:
                a.i = TensorProto.FLOAT
            if a.type == AttributeProto.TENSOR:
                widen(a.t)
    for v in [*proto.graph.value_info, *proto.graph.input, *proto.graph.output]:
        if v.type.tensor_type.elem_type == TensorProto.BFLOAT16:
            v.type.tensor_type.elem_type = TensorProto.FLOAT
    return proto.SerializeToString()


def test_bf16_graphs_run_the_networks_in_bfloat16(model, tmp_path, reference_decode):
    """bf16 graphs (TensorRT's strongly typed bf16 engines are built from them): opset 22, float32
    inputs and outputs, bfloat16 weights and activations. ONNX Runtime has no bfloat16
    convolutions, so the graphs are checked widened to float32 (the same graph and rounded
    weights: it must match the model with its weights rounded to bfloat16) and, as they are,
    in ONNX's reference evaluator."""
    from onnx import TensorProto
    from onnx.reference import ReferenceEvaluator

    out = tmp_path / "bf16"
    manifest = export_onnx(model, out, settings=[DecodeSetting(3, "heun")], precisions=("bf16",),
                           kinds=("encoder", "decode"))  # fmt: skip
    assert manifest.opset == 22 and sorted(manifest.graphs) == ["bf16"]
    encoder, decode = manifest.graph("encoder", "bf16"), manifest.graph("decode", "bf16", steps=3, sampler="heun")
    for graph in (encoder, decode):
        proto = onnx.load(str(out / graph.file))
        assert {init.data_type for init in proto.graph.initializer if len(init.dims) == 4} == {TensorProto.BFLOAT16}
        assert {v.type.tensor_type.elem_type for v in [*proto.graph.input, *proto.graph.output]} == {TensorProto.FLOAT}
    rounded = copy.deepcopy(model).bfloat16().float()  # the weights the bf16 graphs hold
    images, = _inputs(model, "encoder", 3)
    with torch.no_grad():
        z_fp32 = model.encode(images)
        (z,) = _session(_widened(out / encoder.file)).run(None, {"images": images.numpy()})
        assert _max_err(z, rounded.encode(images)) < FP32_TOL < _max_err(z, z_fp32)
        (decoded,) = _session(_widened(out / decode.file)).run(None, {"z": z_fp32.numpy()})
        assert _max_err(decoded, rounded.decode(z_fp32, 5, sampler="heun").images) < DECODE_FP32_TOL
    # as exported, in bfloat16 throughout (the evaluator accumulates in bfloat16 too): errors of a
    # few percent of |z| <= 0.7, where a wrong graph is off by the values themselves
    (z,) = ReferenceEvaluator(str(out / encoder.file)).run(None, {"images": images.numpy()})
    assert z.dtype == np.float32 and _max_err(z, z_fp32) < 0.05
    with pytest.raises(ConfigError, match="bfloat16"):
        OnnxRuntimeRunner(out, "cpu", "bf16", DecodeSetting(3, "heun"))
    with pytest.raises(ConfigError, match="opset 22"):
        export_onnx(model, tmp_path / "old", settings=[DecodeSetting(2)], precisions=("bf16",), opset=17)


def test_manifest_describes_every_graph(model, export_dir):
    manifest = read_manifest(export_dir)
    assert manifest.preset == "tiny16" and manifest.checkpoint is None
    assert manifest.image_shape == [3, 16, 16] and manifest.z_dim == 16
    assert manifest.opset >= 17 and manifest.exporter == "torchscript" and manifest.torch_version == torch.__version__
    assert manifest.decode_settings("fp16") == [(3, "euler"), (3, "heun")]
    for precision in ("fp32", "fp16"):
        assert set(manifest.graphs[precision]) == {"encoder", "endpoint", "denoiser", "decode-euler-k3", "decode-heun-k3"}
        for graph in manifest.graphs[precision].values():
            proto = onnx.load(str(export_dir / graph.file))
            assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
            assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)  # no torch.ops.dbae.*
            for info in graph.inputs + graph.outputs:
                assert info.shape[0] == "batch" and info.dtype == "float32"
            assert [v.name for v in proto.graph.input] == graph.input_names
        decode = manifest.graph("decode", precision, steps=3, sampler="euler")
        assert decode.outputs[0].shape == ["batch", 3, 16, 16] and decode.inputs[0].shape == ["batch", 16]
    # the graphs a runtime builds engines from hold no float64 (TensorRT has none)
    for key in ("encoder", "decode-heun-k3"):
        proto = onnx.load(str(export_dir / manifest.graphs["fp32"][key].file))
        casts = [a.i for n in proto.graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"]
        assert onnx.TensorProto.DOUBLE not in casts
        assert all(t.data_type != onnx.TensorProto.DOUBLE for t in proto.graph.initializer)


def test_dynamo_exporter_gives_the_same_encoder(model, tmp_path):
    manifest = export_onnx(model, tmp_path / "dyn", settings=[], kinds=("encoder",), exporter="dynamo")
    graph = manifest.graph("encoder", "fp32")
    assert manifest.exporter == "dynamo" and graph.inputs[0].shape == ["batch", 3, 16, 16]
    for batch in (1, 3):
        (images,) = _inputs(model, "encoder", batch)
        (out,) = _session(tmp_path / "dyn" / graph.file).run(None, {"images": images.numpy()})
        assert _max_err(out, model.encode(images).detach()) < FP32_TOL


# ----- runner -----
def test_onnxruntime_runner_matches_eager(model, export_dir, reference_decode):
    setting = DecodeSetting(3, "heun")
    runner = OnnxRuntimeRunner(export_dir, "cpu", "fp32", setting, model_config=model.config, threads=1)
    eager = EagerRunner(model, setting)
    assert runner.name == "onnxruntime-cpu" and runner.device == torch.device("cpu") and runner.setting.nfe == 5
    g = torch.Generator().manual_seed(7)
    images = torch.rand((3, 3, 16, 16), generator=g) * 2 - 1
    direction = torch.randn(16, generator=g)
    assert _max_err(runner.encode(images), eager.encode(images)) < FP32_TOL
    z = eager.encode(images)
    assert _max_err(runner.decode(z), eager.decode(z)) < DECODE_FP32_TOL
    assert _max_err(runner.reconstruct(images), eager.reconstruct(images)) < DECODE_FP32_TOL
    edited = runner.edit(images, direction, 2.0)
    assert _max_err(edited, eager.edit(images, direction, 2.0)) < DECODE_FP32_TOL
    assert _max_err(edited, runner.reconstruct(images)) > 1e-3  # the shift does something
    fp16 = OnnxRuntimeRunner(export_dir, "cpu", "fp16", setting, threads=1)
    assert _max_err(fp16.decode(z), eager.decode(z)) < DECODE_FP16_TOL


def test_io_binding_path_gives_the_same_outputs_on_the_cpu(export_dir):
    """The binding code of the CUDA provider (tensors bound by pointer, outputs preallocated),
    run here with CPU tensors: the same numbers as feeding NumPy arrays, at batch 1 and 3."""
    setting = DecodeSetting(3, "heun")
    plain = OnnxRuntimeRunner(export_dir, "cpu", "fp32", setting, threads=1)
    bound = OnnxRuntimeRunner(export_dir, "cpu", "fp32", setting, threads=1, io_binding=True)
    assert plain._encoder.binding is None and bound._encoder.binding is not None
    g = torch.Generator().manual_seed(11)
    direction = torch.randn(16, generator=g)
    for batch in (1, 3):
        images = torch.rand((batch, 3, 16, 16), generator=g) * 2 - 1
        z = bound.encode(images)
        assert z.shape == (batch, 16) and torch.equal(z, plain.encode(images))
        decoded = bound.decode(z)
        assert decoded.shape == (batch, 3, 16, 16) and torch.equal(decoded, plain.decode(z))
        assert torch.equal(bound.edit(images, direction, 2.0), plain.edit(images, direction, 2.0))
    # a non-contiguous or wrongly typed input is made contiguous float32 before it is bound
    z = bound.encode(images)
    assert torch.equal(bound.decode(z.double().t().contiguous().t()), plain.decode(z))


def test_registry_onnxruntime_kind(model, reference_decode):
    assert "onnxruntime" in registry.default_kinds(torch.device("cpu"))
    runner = registry.factory("onnxruntime", model, "fp32")(DecodeSetting(1, "euler"))
    eager = EagerRunner(model, DecodeSetting(1, "euler"))
    z = torch.randn(2, 16, generator=torch.Generator().manual_seed(3))
    assert _max_err(runner.decode(z), eager.decode(z)) < DECODE_FP32_TOL
    with pytest.raises(ConfigError, match="fp32 or fp16"):
        registry.factory("onnxruntime", model, "bf16")


# ----- user mistakes: one clear message each -----
def test_export_of_another_preset_is_refused(export_dir):
    other = get_preset("shapes32").model
    with pytest.raises(ConfigError, match="made for preset 'tiny16'.*does not match"):
        OnnxRuntimeRunner(export_dir, "cpu", "fp32", SETTINGS[0], model_config=other)
    with pytest.raises(ConfigError, match="made for preset 'tiny16'"):
        read_manifest(export_dir).check_config(other, "the checkpoint")


def test_unsupported_steps(export_dir):
    for k in (0, 11):
        with pytest.raises(ConfigError, match="steps must be an integer from 1 to 10"):
            DecodeSetting(k, "euler")
    with pytest.raises(ConfigError, match="has no euler decode with 4 steps at fp32"):
        OnnxRuntimeRunner(export_dir, "cpu", "fp32", DecodeSetting(4, "euler"))
    with pytest.raises(ConfigError, match="choose the decode setting"):
        OnnxRuntimeRunner(export_dir, "cpu", "fp32")  # two decode graphs: which one?


def test_wrong_image_size(export_dir):
    runner = OnnxRuntimeRunner(export_dir, "cpu", "fp32", SETTINGS[0], threads=1)
    with pytest.raises(DataError, match=r"images must have shape \(B, 3, 16, 16\).*got \(1, 3, 32, 32\)"):
        runner.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(DataError, match=r"z must have shape \(B, 16\)"):
        runner.decode(torch.zeros(2, 8))


def test_missing_onnxruntime_cuda_provider(model, export_dir):
    if "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available():
        pytest.skip("the CUDA provider is available here")
    with pytest.raises(ConfigError, match="onnxruntime-gpu|CUDA GPU"):
        OnnxRuntimeRunner(export_dir, "cuda", "fp32", SETTINGS[0])
    with pytest.raises(ConfigError, match="onnxruntime-gpu|CUDA GPU"):
        registry.factory("onnxruntime-cuda", model, "fp32")


def test_missing_tensorrt(model, export_dir, tmp_path, capsys):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed")
    from dbae.export.tensorrt_runner import TensorRTRunner

    with pytest.raises(ConfigError, match="TensorRT is not installed: pip install tensorrt"):
        TensorRTRunner(export_dir, "fp16", SETTINGS[0])
    with pytest.raises(ConfigError, match="pip install tensorrt"):
        registry.factory("tensorrt", model, "fp16")
    code = main(["export", "--ckpt", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "o"), "--format", "trt"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "pip install tensorrt" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


class _TensorRT11:
    """A stand-in for the ``tensorrt`` module with the build API of TensorRT 11 as documented
    (no FP16/BF16 builder flags: they were removed), recording what the build asks of it.
    It checks that :func:`build_engine` uses that API as documented; not TensorRT itself."""

    __version__ = "11.4.0"

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            self.severity = severity

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 0  # kept by 11, ignored

    class MemoryPoolType:
        WORKSPACE = 0

    class BuilderFlag:  # what is left of it in 11 (TF32 and others; no FP16, BF16, INT8)
        TF32 = 0

    class Network:
        inputs: list = []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            graph = onnx.load(path, load_external_data=False).graph
            self.network.inputs = [
                types.SimpleNamespace(name=i.name, shape=tuple(d.dim_value or -1 for d in i.type.tensor_type.shape.dim))
                for i in graph.input
            ]
            return True

    class Builder:
        def __init__(self, logger):
            self.log = _TensorRT11.calls

        def create_network(self, flags):
            self.log["network flags"] = flags
            return _TensorRT11.Network()

        def create_optimization_profile(self):
            shapes = self.log.setdefault("profile", {})
            return types.SimpleNamespace(set_shape=lambda name, lo, opt, hi: shapes.__setitem__(name, (lo, opt, hi)))

        def create_builder_config(self):
            log = self.log
            cache = types.SimpleNamespace(serialize=lambda: b"timings")
            return types.SimpleNamespace(
                set_memory_pool_limit=lambda pool, size: log.__setitem__("workspace", size),
                add_optimization_profile=lambda profile: 0,
                create_timing_cache=lambda data: log.__setitem__("timing cache read", bytes(data)) or cache,
                set_timing_cache=lambda c, ignore_mismatch: True,
                get_timing_cache=lambda: cache,
            )

        def build_serialized_network(self, network, config):
            return memoryview(b"engine of " + ",".join(i.name for i in network.inputs).encode())

    calls: dict = {}


def test_tensorrt_build_uses_the_strongly_typed_api(export_dir, tmp_path, monkeypatch):
    from dbae.export import tensorrt_runner

    trt = types.ModuleType("tensorrt")
    for name, value in vars(_TensorRT11).items():
        if not name.startswith("__") or name == "__version__":
            setattr(trt, name, value)
    _TensorRT11.calls = {}
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    graph = read_manifest(export_dir).graph("decode", "fp16", steps=3, sampler="euler")
    cache = tmp_path / "timing.cache"
    data = tensorrt_runner.build_engine(export_dir / graph.file, max_batch=8, opt_batch=2, timing_cache=cache)
    calls = _TensorRT11.calls
    assert data == b"engine of z" and calls["network flags"] == 1  # the STRONGLY_TYPED bit
    assert calls["profile"] == {"z": ((1, 16), (2, 16), (8, 16))}
    assert calls["timing cache read"] == b"" and cache.read_bytes() == b"timings"
    tensorrt_runner.build_engine(export_dir / graph.file, max_batch=8, timing_cache=cache)
    assert calls["timing cache read"] == b"timings" and calls["profile"]["z"][1] == (8, 16)  # opt = max by default
    with pytest.raises(ConfigError, match="opt_batch"):
        tensorrt_runner.build_engine(export_dir / graph.file, max_batch=4, opt_batch=5)
    monkeypatch.setattr(trt, "__version__", "8.6.1")
    with pytest.raises(ConfigError, match="TensorRT 8.6.1 is too old"):
        tensorrt_runner.build_engine(export_dir / graph.file)


def test_incomplete_or_damaged_export(export_dir, tmp_path):
    import shutil

    copy_dir = tmp_path / "copy"
    shutil.copytree(export_dir, copy_dir)
    with open(copy_dir / "encoder.fp32.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ConfigError, match="damaged: encoder.fp32.onnx"):
        read_manifest(copy_dir)
    (copy_dir / MANIFEST_NAME).unlink()
    with pytest.raises(ConfigError, match="not a complete dbae export"):
        OnnxRuntimeRunner(copy_dir, "cpu", "fp32", SETTINGS[0])


# ----- the command line -----
@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "step-00000007.safetensors"
    ema = {k: v + 0.01 for k, v in model.state_dict().items()}  # EMA differs from the raw weights
    return save_checkpoint(path, preset=get_preset("tiny16"), step=7, model=model.state_dict(), ema=ema)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_export_from_a_checkpoint(capsys, checkpoint, tmp_path):
    out = tmp_path / "exp"
    code, stdout, _ = _run(capsys, "export", "--ckpt", str(checkpoint), "--out", str(out), "--steps", "1", "3",
                           "--sampler", "heun", "--precision", "fp32")  # fmt: skip
    assert code == 0 and "wrote 5 ONNX graphs of tiny16 (step 7, EMA weights)" in stdout
    data = json.loads((out / MANIFEST_NAME).read_text())
    assert data["checkpoint"] == {"path": str(checkpoint), "sha256": sha256_file(checkpoint), "step": 7, "weights": "ema"}
    manifest = read_manifest(out)
    assert sorted(manifest.graphs["fp32"]) == ["decode-heun-k1", "decode-heun-k3", "denoiser", "encoder", "endpoint"]
    assert manifest.graph("decode", "fp32", steps=3, sampler="heun").nfe == 5
    # the EMA weights were exported, not the raw ones
    z = torch.randn(2, 16, generator=torch.Generator().manual_seed(1))
    (x_T,) = _session(out / manifest.graph("endpoint", "fp32").file).run(None, {"z": z.numpy()})
    from dbae.inference import load_model

    ema = load_model(checkpoint).model
    assert _max_err(x_T, ema.endpoint(z).detach()) < FP32_TOL
    assert _max_err(x_T, load_model(checkpoint, ema=False).model.endpoint(z).detach()) > 1e-3
    # an existing export is replaced only with --force
    code, _, err = _run(capsys, "export", "--ckpt", str(checkpoint), "--out", str(out), "--steps", "1")
    assert code == 2 and "not empty" in err and "--force" in err and err.count("\n") == 1
    code, _, _ = _run(capsys, "export", "--ckpt", str(checkpoint), "--out", str(out), "--steps", "2",
                      "--precision", "fp32", "--force")  # fmt: skip
    assert code == 0 and read_manifest(out).decode_settings("fp32") == [(2, "euler")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]  # no staging folders left behind


def test_cli_bf16_export_takes_opset_22(capsys, checkpoint, tmp_path):
    code, stdout, _ = _run(capsys, "export", "--ckpt", str(checkpoint), "--out", str(tmp_path / "b"), "--steps", "1",
                           "--precision", "fp16", "bf16")  # fmt: skip
    manifest = read_manifest(tmp_path / "b")
    assert code == 0 and manifest.opset == 22 and sorted(manifest.graphs) == ["bf16", "fp16"]
    # the fp16 graphs of an opset-22 export still run in ONNX Runtime
    runner = OnnxRuntimeRunner(tmp_path / "b", "cpu", "fp16", DecodeSetting(1), threads=1)
    assert runner.reconstruct(torch.zeros(1, 3, 16, 16)).isfinite().all()


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "steps must be an integer from 1 to 10"),
    (["--steps", "11"], "steps must be an integer from 1 to 10"),
    (["--opset", "13"], "--opset must be >= 17"),
    (["--max-batch", "0"], "--max-batch must be >= 1"),  # checked for every format, not only trt
    (["--precision", "bf16", "--opset", "17"], "bf16 graphs need --opset 22"),
])  # fmt: skip
def test_cli_bad_arguments_give_one_line(capsys, checkpoint, tmp_path, argv, message):
    code, _, err = _run(capsys, "export", "--ckpt", str(checkpoint), "--out", str(tmp_path / "o"), *argv)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_cli_checkpoint_errors(capsys, tmp_path):
    code, _, err = _run(capsys, "export", "--ckpt", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert code == 2 and "no checkpoint" in err


def test_failed_export_leaves_nothing_that_looks_complete(model, tmp_path, monkeypatch):
    real = onnx_export._export_one

    def fail_on_decode(module, kind, *args, **kwargs):
        if kind == "decode":
            raise RuntimeError("simulated failure")
        return real(module, kind, *args, **kwargs)

    monkeypatch.setattr(onnx_export, "_export_one", fail_on_decode)
    with pytest.raises(RuntimeError, match="simulated"):
        export_onnx(model, tmp_path / "exp", settings=[DecodeSetting(1)], kinds=("encoder", "decode"))
    assert os.listdir(tmp_path) == []


# ----- GPU runtimes (skipped without a GPU, onnxruntime-gpu or tensorrt) -----
def _cuda_inputs(model: DBAE) -> tuple[DBAE, torch.Tensor]:
    images = (torch.rand((3, 3, 16, 16), generator=torch.Generator().manual_seed(5)) * 2 - 1).cuda()
    return copy.deepcopy(model).cuda(), images


def test_onnxruntime_cuda_runner_matches_eager(model, export_dir, reference_decode):
    if not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs a CUDA GPU and onnxruntime-gpu")
    gpu_model, images = _cuda_inputs(model)
    setting = DecodeSetting(3, "heun")
    runner = OnnxRuntimeRunner(export_dir, "cuda", "fp32", setting)
    eager = EagerRunner(gpu_model, setting)
    z = runner.encode(images)
    assert z.device.type == "cuda" and _max_err(z.cpu(), eager.encode(images).cpu()) < 1e-3
    assert _max_err(runner.decode(z).cpu(), eager.decode(z).cpu()) < 1e-2  # TF32 convolutions on either side
    direction = torch.randn(16, device="cuda")
    assert _max_err(runner.edit(images, direction, 2.0).cpu(), eager.edit(images, direction, 2.0).cpu()) < 1e-2


def test_tensorrt_runner_matches_eager(model, export_dir, tmp_path, reference_decode):
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from dbae.export.tensorrt_runner import TensorRTRunner

    gpu_model, images = _cuda_inputs(model)
    setting = DecodeSetting(3, "euler")
    runner = TensorRTRunner(export_dir, "fp32", setting, max_batch=4, cache_dir=tmp_path / "trt")
    eager = EagerRunner(gpu_model, setting)
    z = runner.encode(images)
    assert _max_err(z.cpu(), eager.encode(images).cpu()) < 1e-3
    assert _max_err(runner.decode(z).cpu(), eager.decode(z).cpu()) < 1e-2
    cache = tmp_path / "trt"
    assert len(list(cache.glob("*.sm*.engine"))) == 2 and len(list(cache.glob("timing.trt*.sm*.cache"))) == 1
    with pytest.raises(DataError, match="max_batch 4"):
        runner.encode(torch.zeros(5, 3, 16, 16, device="cuda"))
    fp16 = TensorRTRunner(export_dir, "fp16", setting, max_batch=4, cache_dir=tmp_path / "trt")
    assert _max_err(fp16.decode(z).cpu(), eager.decode(z).cpu()) < DECODE_FP16_TOL
    # bf16: strongly typed from the bf16 graphs (eager bf16 on the CPU is 0.017 from fp32 here)
    export_onnx(model, tmp_path / "bf16", settings=[setting], precisions=("bf16",), kinds=("encoder", "decode"))
    bf16 = TensorRTRunner(tmp_path / "bf16", "bf16", setting, max_batch=4, cache_dir=tmp_path / "trt")
    assert _max_err(bf16.decode(z).cpu(), eager.decode(z).cpu()) < 0.1
    with pytest.raises(ConfigError, match="no bf16 graphs.*--precision bf16"):
        TensorRTRunner(export_dir, "bf16", setting, max_batch=4, cache_dir=tmp_path / "trt")
