"""The runner kinds by name, and how to make each one for a model (used by ``dbae bench``).

A factory is a function of the decode setting (runners fix their decode length when
made). Asking for a kind that cannot run here raises :class:`dbae.errors.ConfigError`
that says why and what to install.

The ``onnxruntime-step`` factory exports the encoder, the endpoint decoder and the U-Net
once, into a cache keyed by the model's sha256 (see :mod:`.onnxruntime_step`), and serves
every decode setting from them. The other ONNX Runtime and the TensorRT factories export
the model (encoder and the unrolled decode for the requested setting) into a temporary
folder, build the runner from it and delete the folder (the runtimes hold the graphs in memory). TensorRT engines and the timing cache
are kept in ``$DBAE_CACHE_DIR/tensorrt`` (default ``~/.cache/dbae/tensorrt``), keyed by the
graph's sha256, so repeated benchmarks do not rebuild them.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from dbae.errors import ConfigError
from dbae.model import DBAE

from .runner import DecodeSetting, Runner
from .torch_runners import CUDAGraphRunner, EagerRunner, check_options

RunnerFactory = Callable[[DecodeSetting], Runner]


def _eager(compile: bool) -> Callable[..., RunnerFactory]:
    def make(model: DBAE, precision: str, **options) -> RunnerFactory:
        check_options(EagerRunner, compile, **options)
        return lambda setting: EagerRunner(model, setting, precision=precision, compile=compile, **options)

    return make


def _cuda_graph(compile: bool) -> Callable[..., RunnerFactory]:
    def make(model: DBAE, precision: str, **options) -> RunnerFactory:
        if next(model.parameters()).device.type != "cuda":
            raise ConfigError("runner cuda-graph needs a CUDA device (pass --device cuda on a machine with a GPU)")
        check_options(CUDAGraphRunner, compile, **options)
        return lambda setting: CUDAGraphRunner(model, setting, precision=precision, compile=compile, **options)

    return make


def _onnx_export(model: DBAE, setting: DecodeSetting, precision: str, folder: Path) -> Path:
    from .onnx_export import export_onnx

    out = folder / "export"
    export_onnx(model, out, settings=[setting], precisions=[precision], kinds=("encoder", "decode"))
    return out


def _onnxruntime(provider: str) -> Callable[[DBAE, str], RunnerFactory]:
    def make(model: DBAE, precision: str) -> RunnerFactory:
        from .onnx_export import require_onnx
        from .onnxruntime_runner import OnnxRuntimeRunner, check_precision, check_provider

        require_onnx()
        check_provider(provider)
        check_precision(precision)

        def factory(setting: DecodeSetting) -> Runner:
            with tempfile.TemporaryDirectory(prefix="dbae-onnx-") as tmp:
                export = _onnx_export(model, setting, precision, Path(tmp))
                return OnnxRuntimeRunner(export, provider, precision, setting)

        return factory

    return make


def _onnxruntime_step(model: DBAE, precision: str, weights_id: str | None = None) -> RunnerFactory:
    from .onnx_export import require_onnx
    from .onnxruntime_step import step_factory

    require_onnx()
    # ONNX Runtime's threads follow torch's (dbae serve --threads): eleven session runs per
    # 10-step decode, each waking the intra-op pool, where the unrolled graph runs once
    return step_factory(model, precision, threads=torch.get_num_threads(), log=lambda line: print(line, flush=True),
                        weights_id=weights_id)  # fmt: skip


def tensorrt_cache_dir() -> Path:
    return Path(os.environ.get("DBAE_CACHE_DIR") or Path.home() / ".cache" / "dbae") / "tensorrt"


def _tensorrt(model: DBAE, precision: str) -> RunnerFactory:
    from .onnx_export import require_onnx
    from .tensorrt_runner import TensorRTRunner, require_tensorrt

    require_onnx()
    require_tensorrt()
    if next(model.parameters()).device.type != "cuda":
        raise ConfigError("runner tensorrt needs a CUDA device (pass --device cuda on a machine with a GPU)")

    def factory(setting: DecodeSetting) -> Runner:
        with tempfile.TemporaryDirectory(prefix="dbae-onnx-") as tmp:
            export = _onnx_export(model, setting, precision, Path(tmp))
            return TensorRTRunner(export, precision, setting, cache_dir=tensorrt_cache_dir())

    return factory


#: kind -> (make a factory for (model, precision), one-line description)
KINDS: dict[str, tuple[Callable[..., RunnerFactory], str]] = {
    "eager": (_eager(False), "DBAE in eager PyTorch (the baseline)"),
    "eager-compiled": (_eager(True), "eager, with the networks compiled by torch.compile (inductor)"),
    "cuda-graph": (_cuda_graph(False), "encode / decode / edit captured as CUDA graphs (GPU)"),
    "cuda-graph-compiled": (_cuda_graph(True), "CUDA graphs of the torch.compile'd networks (GPU)"),
    "onnxruntime": (_onnxruntime("cpu"), "ONNX export in ONNX Runtime, CPU provider (fp32 or fp16)"),
    "onnxruntime-step": (_onnxruntime_step, "ONNX Runtime, CPU: one cached U-Net graph driven by the sampler (any K)"),
    "onnxruntime-cuda": (_onnxruntime("cuda"), "ONNX export in ONNX Runtime, CUDA provider with IO binding"),
    "tensorrt": (_tensorrt, "TensorRT engines built from the ONNX export (GPU)"),
}


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def default_kinds(device: torch.device) -> list[str]:
    """What ``dbae bench latency`` compares when no runner is named: on the CPU, the two ONNX
    Runtime runners (unrolled graphs, and the step runner) too where onnx and onnxruntime import (not on CUDA, where the bench's default precision,
    bf16, has no ONNX Runtime kernels; name ``onnxruntime-cuda`` with --precision fp16 or fp32)."""
    if device.type == "cuda":
        return ["eager", "cuda-graph"]
    if _importable("onnx") and _importable("onnxruntime"):
        return ["eager", "onnxruntime", "onnxruntime-step"]
    return ["eager"]


#: the runner kinds that run the PyTorch model (and take the PyTorch options below)
TORCH_KINDS = ("eager", "eager-compiled", "cuda-graph", "cuda-graph-compiled")


def factory(
    kind: str, model: DBAE, precision: str, *, channels_last: bool = False, autocast: bool = False,
    compile_mode: str | None = None, weights_id: str | None = None,
) -> RunnerFactory:  # fmt: skip
    """The factory of runner ``kind``. ``channels_last``, ``autocast`` and ``compile_mode`` are
    options of the PyTorch runners (see :class:`dbae.export.torch_runners.EagerRunner`); the
    exported runtimes refuse them (their graphs fix their own layouts and precisions).
    ``weights_id``: :attr:`dbae.inference.LoadedModel.weights_id` of ``model``, so that the
    onnxruntime-step cache key need not hash its weights (the other kinds ignore it)."""
    if kind not in KINDS:
        raise ConfigError(f"unknown runner {kind!r}; choose from: {', '.join(KINDS)}")
    options = {"channels_last": channels_last, "autocast": autocast, "compile_mode": compile_mode}
    if kind in TORCH_KINDS:
        return KINDS[kind][0](model, precision, **options)
    named = [f"--{name.replace('_', '-')}" for name, on in options.items() if on]
    if named:
        raise ConfigError(f"{' and '.join(named)} {'apply' if len(named) > 1 else 'applies'} to the PyTorch "
                          f"runners ({', '.join(TORCH_KINDS)}), not to {kind}")  # fmt: skip
    if kind == "onnxruntime-step":
        return _onnxruntime_step(model, precision, weights_id)
    return KINDS[kind][0](model, precision)
