"""Export a DBAE model to ONNX: the graphs of :mod:`.onnx_graphs` plus ``manifest.json``.

:func:`export_onnx` traces each graph with ``torch.onnx.export`` (dynamic batch axis named
``"batch"``), checks it with ``onnx.checker.check_model`` (full check: shape inference
too) and for operators outside the standard ONNX domain (a fused ``torch.ops.dbae`` op in a
graph is a bug), hashes it, and records it in the manifest. Everything is written into a
temporary folder beside ``out_dir`` that is renamed to ``out_dir`` only once every graph and
the manifest are written, so a failed or interrupted export never leaves a folder that looks
complete.

Exporters (``exporter``): ``"torchscript"`` (``dynamo=False``, the default) traces the
unrolled K-step decode in about a second; ``"dynamo"`` (``torch.export`` based) also handles
the U-Net with a dynamic batch, but takes seconds per network evaluation in the graph (a
minute and more for a 10-step Heun decode), so it is offered, not the default.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from dbae.errors import ConfigError
from dbae.model import DBAE

from .manifest import (
    MANIFEST_NAME,
    BF16_MIN_OPSET,
    PRECISIONS,
    CheckpointInfo,
    GraphInfo,
    Manifest,
    TensorInfo,
    graph_file,
    graph_key,
    sha256_file,
)
from .onnx_graphs import DecodeGraph, DenoiserGraph, EncoderGraph, EndpointGraph, NetworkGraph
from .runner import DecodeSetting

Tensor = torch.Tensor

#: the lowest opset the graphs need (GroupNorm as InstanceNormalization, dynamic Resize, ...)
MIN_OPSET = 17
DEFAULT_OPSET = 17
EXPORTERS = ("torchscript", "dynamo")
GRAPH_KINDS = ("encoder", "endpoint", "denoiser", "network", "decode")
#: what an export holds unless told (``network`` is what the onnxruntime-step runner caches for itself)
DEFAULT_KINDS = ("encoder", "endpoint", "denoiser", "decode")
#: batch size of the example inputs that the graphs are traced with (not 1: no size-1 specialisation)
TRACE_BATCH = 2
_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_opset(precisions: Sequence[str]) -> int:
    """The opset an export uses unless told: 17, or 22 when it holds bf16 graphs."""
    return BF16_MIN_OPSET if "bf16" in precisions else DEFAULT_OPSET


def require_onnx():
    """The ``onnx`` module, or ConfigError saying what to install."""
    try:
        import onnx
    except ImportError:
        raise ConfigError("ONNX export needs the onnx package: pip install 'dbae[export]' (or pip install onnx)") from None
    return onnx


def export_onnx(
    model: DBAE,
    out_dir: str | Path,
    *,
    settings: Sequence[DecodeSetting],
    precisions: Sequence[str] = ("fp32",),
    kinds: Sequence[str] = DEFAULT_KINDS,
    preset: str = "custom",
    checkpoint: CheckpointInfo | None = None,
    opset: int | None = None,
    exporter: str = "torchscript",
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> Manifest:
    """Write the ONNX graphs of ``model`` and their manifest into ``out_dir``.

    ``kinds`` picks the graphs (a ``decode`` graph per setting in ``settings``), each at
    every precision in ``precisions``. The model itself is not modified (the fp16 and bf16
    graphs are traced from a float16 / bfloat16 copy on the CPU). ``opset`` None takes
    :func:`default_opset`; bf16 graphs need 22 or later. ``out_dir`` must not exist, or be
    empty, or ``overwrite`` must be set (it is then replaced only once the new export is complete).
    """
    onnx = require_onnx()
    opset = default_opset(precisions) if opset is None else opset
    _check_arguments(settings, precisions, kinds, opset, exporter)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(f"{out_dir} is not empty; choose another --out or pass --force to replace it")
    cfg = model.config
    manifest = Manifest(
        preset=preset,
        model_config=_config_dict(model),
        image_shape=[cfg.image_channels, cfg.image_size, cfg.image_size],
        z_dim=cfg.z_dim,
        opset=opset,
        exporter=exporter,
        torch_version=torch.__version__,
        onnx_version=onnx.__version__,
        checkpoint=checkpoint,
        sampling_sigma_T=model.sampling_sigma_T,
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    os.chmod(staging, 0o755)  # mkdtemp makes it private; the export is an ordinary folder
    try:
        for precision in precisions:
            net = copy.deepcopy(model).to(device="cpu", dtype=_TORCH_DTYPES[precision]).eval()
            for kind in kinds:
                for setting in settings if kind == "decode" else [None]:
                    module = _graph_module(kind, net, setting)
                    key = graph_key(kind, setting and setting.steps, setting and setting.sampler)
                    if log is not None:
                        log(f"exporting {key} ({precision})")
                    info = _export_one(module, kind, precision, staging / graph_file(key, precision), setting,
                                       opset=opset, exporter=exporter)  # fmt: skip
                    manifest.graphs.setdefault(precision, {})[key] = info
            del net
        (staging / MANIFEST_NAME).write_text(manifest.to_json())
        _publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _check_arguments(
    settings: Sequence[DecodeSetting], precisions: Sequence[str], kinds: Sequence[str], opset: int, exporter: str
) -> None:
    for p in precisions:
        if p not in PRECISIONS:
            raise ConfigError(f"ONNX export precision must be one of {', '.join(PRECISIONS)}, got {p!r}")
    for k in kinds:
        if k not in GRAPH_KINDS:
            raise ConfigError(f"unknown graph kind {k!r}; choose from {', '.join(GRAPH_KINDS)}")
    if not precisions or not kinds:
        raise ConfigError("nothing to export: give at least one precision and one graph kind")
    if "decode" in kinds and not settings:
        raise ConfigError("the decode graph needs at least one decode setting (steps and sampler)")
    if opset < MIN_OPSET:
        raise ConfigError(f"--opset must be >= {MIN_OPSET}, got {opset}")
    if "bf16" in precisions and opset < BF16_MIN_OPSET:
        raise ConfigError(
            f"bf16 graphs need --opset {BF16_MIN_OPSET} or later (ONNX convolutions take bfloat16 from opset "
            f"{BF16_MIN_OPSET}), got {opset}"
        )
    if exporter not in EXPORTERS:
        raise ConfigError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")


def _config_dict(model: DBAE) -> dict:
    from dbae.config import to_dict

    return to_dict(model.config)


def _graph_module(kind: str, net: DBAE, setting: DecodeSetting | None) -> nn.Module:
    if kind == "encoder":
        return EncoderGraph(net)
    if kind == "endpoint":
        return EndpointGraph(net)
    if kind == "denoiser":
        return DenoiserGraph(net)
    if kind == "network":
        return NetworkGraph(net)
    assert setting is not None
    return DecodeGraph(net, setting)


def _example_inputs(kind: str, cfg) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    B, C, S, Z = TRACE_BATCH, cfg.image_channels, cfg.image_size, cfg.z_dim
    images = torch.rand((B, C, S, S), generator=g) * 2 - 1
    z = torch.randn((B, Z), generator=g)
    if kind == "encoder":
        return (images,)
    if kind == "denoiser":
        t = torch.rand((B,), generator=g) * 0.9 + 0.05
        return (images, t, torch.rand((B, C, S, S), generator=g) * 2 - 1, z)
    if kind == "network":
        c_noise = torch.rand((B,), generator=g) * 2 - 1
        return (images, c_noise, torch.rand((B, C, S, S), generator=g) * 2 - 1, z)
    return (z,)


def _export_one(
    module: nn.Module, kind: str, precision: str, path: Path, setting: DecodeSetting | None, *, opset: int, exporter: str
) -> GraphInfo:
    onnx = require_onnx()
    module.eval()
    args = _example_inputs(kind, module.model.config)
    names_in, names_out = list(module.input_names), list(module.output_names)
    with torch.no_grad():
        expected = module(*args)
    with torch.no_grad(), _quiet_export():
        if exporter == "torchscript":
            with _expm1_symbolic(opset):
                torch.onnx.export(
                    module, args, str(path), dynamo=False, input_names=names_in, output_names=names_out,
                    dynamic_axes={n: {0: "batch"} for n in names_in + names_out}, opset_version=opset,
                    do_constant_folding=True,
                )  # fmt: skip
        else:
            batch = torch.export.Dim("batch", min=1, max=1 << 16)
            params = list(_forward_parameters(module))
            program = torch.onnx.export(
                module, args, dynamo=True, input_names=names_in, output_names=names_out,
                dynamic_shapes={p: {0: batch} for p in params}, opset_version=opset, verbose=False,
            )  # fmt: skip
            program.save(str(path))
    proto = onnx.load(str(path))
    _fix_static_shapes(proto.graph.input, args)
    _fix_static_shapes(proto.graph.output, [expected])
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    _check_standard_ops(proto, path)
    return GraphInfo(
        kind=kind,
        precision=precision,
        file=path.name,
        sha256=sha256_file(path),
        inputs=[_tensor_info(v) for v in proto.graph.input],
        outputs=[_tensor_info(v) for v in proto.graph.output],
        nfe=module.nfe,
        steps=setting.steps if setting else None,
        sampler=setting.sampler if setting else None,
    )


def _forward_parameters(module: nn.Module) -> Iterator[str]:
    import inspect

    yield from inspect.signature(module.forward).parameters


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence the exporters' deprecation and tracer warnings (the traced graphs are checked)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def _expm1_symbolic(opset: int) -> Iterator[None]:
    """TorchScript exporter: ``aten::expm1`` (used by the bridge's float64 preconditioning in
    the denoiser graph) as ``Exp(x) - 1``; in float64 that is exact to ~1e-11 relative for
    the smallest arguments it meets (t >= 1e-4), far below float32 resolution."""

    def expm1(g, x):
        one = g.op("Constant", value_t=torch.tensor(1.0))
        return g.op("Sub", g.op("Exp", x), g.op("CastLike", one, x))

    torch.onnx.register_custom_op_symbolic("aten::expm1", expm1, opset)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::expm1", opset)


def _fix_static_shapes(values, tensors: Sequence[Tensor]) -> None:
    """Graph inputs or outputs: axis 0 named ``batch``, every other axis its (static) traced
    size (the exporters leave some as made-up symbols)."""
    for value, tensor in zip(values, tensors):
        dims = value.type.tensor_type.shape.dim
        for i, size in enumerate(tensor.shape):
            dims[i].Clear()
            if i == 0:
                dims[i].dim_param = "batch"
            else:
                dims[i].dim_value = int(size)


def _check_standard_ops(proto, path: Path) -> None:
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        raise RuntimeError(f"{path.name} holds non-standard operators {foreign}; the export must trace the reference math")


def _tensor_info(value) -> TensorInfo:
    from onnx import helper

    t = value.type.tensor_type
    shape: list[int | str] = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
    return TensorInfo(name=value.name, shape=shape, dtype=str(helper.tensor_dtype_to_np_dtype(t.elem_type)))


def _publish(staging: Path, out_dir: Path) -> None:
    """Move the finished export to ``out_dir``, replacing what was there only now."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rmdir(old)
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def checkpoint_info(path: Path, step: int, ema: bool) -> CheckpointInfo:
    return CheckpointInfo(path=str(path), sha256=sha256_file(path), step=step, weights="ema" if ema else "model")
