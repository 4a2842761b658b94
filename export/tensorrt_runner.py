"""TensorRT runner: engines built from an export's ONNX graphs, run on the torch CUDA stream.

Written against the Python API of TensorRT 10 and 11. Engines are strongly typed: each
precision's engine is built from the export's graph of that precision (``fp32``, ``fp16``,
``bf16``: networks in that type, sampler state and graph inputs/outputs float32), so the
types are the graph's own and TensorRT converts nothing. That is the only mode TensorRT 11
has (it removed the weak-typing FP16/BF16 builder flags; 10.x deprecated them in 10.12).
:func:`build_engine` parses an ONNX graph into a strongly typed network, adds one
optimization profile for batch 1..``max_batch`` (optimised for ``opt_batch``), reuses and
updates a timing cache file, and returns the serialized engine. :class:`TensorRTRunner`
keeps the serialized engines in a cache folder (by default ``<export>/tensorrt``), named by
the source graph (its file and sha256), profile, TensorRT version and GPU architecture
(``sm90``: a shared cache folder serves several machines), so an engine is built once. It
runs them with ``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3`` on the
current torch CUDA stream, reading and writing torch tensors in place.

``tensorrt`` is imported only when an engine is built or run; without it
:func:`require_tensorrt` raises ConfigError saying what to install.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from dbae.config import ModelConfig
from dbae.errors import ConfigError, DataError
from dbae.checkpoints import atomic_write

from .manifest import PRECISIONS, GraphInfo, read_manifest
from .onnxruntime_runner import resolve_setting
from .runner import DecodeSetting, Runner

Tensor = torch.Tensor

TRT_PRECISIONS = PRECISIONS  # one engine precision per graph precision of an export
INSTALL_HINT = "pip install tensorrt (NVIDIA's wheels, see https://pypi.nvidia.com), on a machine with a CUDA GPU"


def require_tensorrt() -> Any:
    """The ``tensorrt`` module (10 or later), or ConfigError saying what to install."""
    try:
        import tensorrt
    except ImportError:
        raise ConfigError(f"TensorRT is not installed: {INSTALL_HINT}") from None
    major = int(str(tensorrt.__version__).split(".")[0])
    if major < 10:
        raise ConfigError(f"TensorRT {tensorrt.__version__} is too old: the runner needs TensorRT 10 ({INSTALL_HINT})")
    return tensorrt


@functools.cache
def _logger(trt: Any) -> Any:
    """One logger for every builder, parser and runtime (TensorRT wants a single one)."""
    return trt.Logger(trt.Logger.WARNING)


def strongly_typed_flags(trt: Any) -> int:
    """``create_network`` flags of a strongly typed network: the STRONGLY_TYPED bit where the
    enum has it (TensorRT 10; 11 keeps it, ignored, as every network is strongly typed)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def build_engine(
    onnx_path: Path,
    *,
    max_batch: int = 64,
    opt_batch: int | None = None,
    timing_cache: Path | None = None,
    workspace_bytes: int | None = None,
) -> bytes:
    """The serialized, strongly typed TensorRT engine of an ONNX graph whose inputs have a
    dynamic batch axis (the graph's own types decide every layer's precision)."""
    trt = require_tensorrt()
    opt_batch = max_batch if opt_batch is None else opt_batch
    if not (1 <= opt_batch <= max_batch):
        raise ConfigError(f"need 1 <= opt_batch <= max_batch, got opt_batch={opt_batch}, max_batch={max_batch}")
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(strongly_typed_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ConfigError(f"TensorRT cannot parse {Path(onnx_path).name}: {errors}")
    config = builder.create_builder_config()
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = tuple(tensor.shape)[1:]
        profile.set_shape(tensor.name, (1, *rest), (opt_batch, *rest), (max_batch, *rest))
    config.add_optimization_profile(profile)
    cached = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cached), ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {Path(onnx_path).name} (see its log above)")
    if timing_cache is not None:
        data = bytes(memoryview(config.get_timing_cache().serialize()))
        atomic_write(timing_cache, lambda tmp: Path(tmp).write_bytes(data))
    return bytes(memoryview(serialized))


def device_tag() -> str:
    """``sm<major><minor>`` of the current CUDA device: engines and timing caches hold kernels and
    timings of one GPU architecture, so a cache folder shared by several machines keys them by it."""
    major, minor = torch.cuda.get_device_capability()
    return f"sm{major}{minor}"


def engine_name(graph: GraphInfo, opt_batch: int, max_batch: int, trt_version: str, device: str) -> str:
    """``<graph file stem>.b<opt>-<max>.<graph sha256[:12]>.trt<version>.<device>.engine`` (the stem
    names the graph and its precision, e.g. ``decode-euler-k10.fp16``)."""
    stem = graph.file.removesuffix(".onnx")
    return f"{stem}.b{opt_batch}-{max_batch}.{graph.sha256[:12]}.trt{trt_version}.{device}.engine"


def cached_engine(
    export_dir: Path, graph: GraphInfo, cache_dir: Path, *, max_batch: int, opt_batch: int
) -> tuple[Path, bytes]:
    """(path, serialized engine) of ``graph`` in ``cache_dir``: read from there, or built and saved
    there (with the timing cache of this TensorRT version and GPU beside it)."""
    trt = require_tensorrt()
    device = device_tag()
    path = cache_dir / engine_name(graph, opt_batch, max_batch, trt.__version__, device)
    if path.is_file():
        return path, path.read_bytes()
    data = build_engine(export_dir / graph.file, max_batch=max_batch, opt_batch=opt_batch,
                        timing_cache=cache_dir / f"timing.trt{trt.__version__}.{device}.cache")  # fmt: skip
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    return path, data


_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16}


class _Engine:
    """A deserialized single-input, single-output engine and its execution context."""

    def __init__(self, trt: Any, runtime: Any, data: bytes, device: torch.device, what: str) -> None:
        self.engine = runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise ConfigError(f"TensorRT could not load the {what} engine (built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        self.device, self.what = device, what
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ConfigError(f"the {what} engine must have one input and one output, has {inputs} and {outputs}")
        self.input, self.output = inputs[0], outputs[0]
        self.max_batch = int(self.engine.get_tensor_profile_shape(self.input, 0)[2][0])
        dtype = self.engine.get_tensor_dtype(self.output)
        if dtype.name not in _TORCH_DTYPES:
            raise ConfigError(f"the {what} engine's output has an unsupported dtype {dtype.name}")
        self.out_dtype = _TORCH_DTYPES[dtype.name]

    def __call__(self, x: Tensor) -> Tensor:
        if x.shape[0] > self.max_batch:
            raise DataError(f"batch {x.shape[0]} exceeds this TensorRT runner's max_batch {self.max_batch}")
        ctx = self.context
        if not ctx.set_input_shape(self.input, tuple(x.shape)):
            raise DataError(f"the {self.what} engine does not accept input shape {tuple(x.shape)}")
        ctx.set_tensor_address(self.input, x.data_ptr())
        out = torch.empty(tuple(ctx.get_tensor_shape(self.output)), dtype=self.out_dtype, device=self.device)
        ctx.set_tensor_address(self.output, out.data_ptr())
        if not ctx.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError(f"TensorRT failed to run the {self.what} engine")
        return out.float()


class TensorRTRunner(Runner):
    """An ONNX export served by TensorRT engines (encoder and one unrolled decode).

    ``precision`` ("fp32", "fp16", "bf16") picks the export's graphs that the engines are
    built from (strongly typed; an export holds fp32 and fp16 by default, bf16 with
    ``dbae export --precision bf16``). Batches of 1..``max_batch`` run (optimised for
    ``opt_batch``, default ``min(8, max_batch)``). ``cache_dir`` keeps engines and the timing
    cache (default ``<export_dir>/tensorrt``).
    """

    name = "tensorrt"

    def __init__(
        self,
        export_dir: str | Path,
        precision: str = "fp16",
        setting: DecodeSetting | None = None,
        *,
        max_batch: int = 64,
        opt_batch: int | None = None,
        cache_dir: str | Path | None = None,
        model_config: ModelConfig | None = None,
    ) -> None:
        trt = require_tensorrt()
        if not torch.cuda.is_available():
            raise ConfigError("the tensorrt runner needs a CUDA GPU visible to torch")
        if precision not in TRT_PRECISIONS:
            raise ConfigError(f"TensorRT precision must be one of {', '.join(TRT_PRECISIONS)}, got {precision!r}")
        if max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        opt_batch = min(8, max_batch) if opt_batch is None else opt_batch
        export_dir = Path(export_dir)
        manifest = read_manifest(export_dir)
        if model_config is not None:
            manifest.check_config(model_config)
        setting = resolve_setting(manifest, precision, setting)
        graphs = {
            "encoder": manifest.graph("encoder", precision),
            "decode": manifest.graph("decode", precision, steps=setting.steps, sampler=setting.sampler),
        }
        device = torch.device("cuda", torch.cuda.current_device())
        c, h, w = manifest.image_shape
        super().__init__((c, h, w), manifest.z_dim, setting, device)
        self.manifest, self.precision = manifest, precision
        cache = Path(cache_dir) if cache_dir is not None else export_dir / "tensorrt"
        cache.mkdir(parents=True, exist_ok=True)
        runtime = trt.Runtime(_logger(trt))
        self._engines = {}
        for what, g in graphs.items():
            _, data = cached_engine(export_dir, g, cache, max_batch=max_batch, opt_batch=opt_batch)
            self._engines[what] = _Engine(trt, runtime, data, device, what)

    def _encode(self, images: Tensor) -> Tensor:
        return self._engines["encoder"](images)

    def _decode(self, z: Tensor) -> Tensor:
        return self._engines["decode"](z)


def build_export_engines(
    export_dir: Path, precisions: list[str], *, max_batch: int = 64, opt_batch: int | None = None,
    log=None,
) -> list[Path]:  # fmt: skip
    """Engines of every encoder and decode graph of an export at ``precisions``
    (``dbae export --format trt``), into ``<export_dir>/tensorrt``; the paths written."""
    require_tensorrt()
    if not torch.cuda.is_available():
        raise ConfigError("--format trt builds TensorRT engines and needs a CUDA GPU visible to torch")
    manifest = read_manifest(export_dir)
    opt_batch = min(8, max_batch) if opt_batch is None else opt_batch
    cache = export_dir / "tensorrt"
    written = []
    for precision in precisions:
        for g in manifest.graphs.get(precision, {}).values():
            if g.kind not in ("encoder", "decode"):
                continue
            if log is not None:
                log(f"building TensorRT engine from {g.file}")
            path, _ = cached_engine(export_dir, g, cache, max_batch=max_batch, opt_batch=opt_batch)
            written.append(path)
    return written
