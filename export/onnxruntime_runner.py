"""ONNX Runtime runner: an export folder's encoder graph and unrolled decode graph in ONNX Runtime.

:class:`OnnxRuntimeRunner` opens two inference sessions, ``encoder.<precision>.onnx`` and
``decode-<sampler>-k<K>.<precision>.onnx``; encode, decode, reconstruct and edit (encode,
shift, decode) all run on those two sessions. Graph inputs and outputs are float32 at every
precision (see :mod:`.manifest`).

Providers: ``"cpu"`` feeds NumPy views of CPU tensors. ``"cuda"`` (the ``onnxruntime-gpu``
build) binds torch CUDA tensors by ``data_ptr`` through an IO binding, inputs and a
preallocated output alike, so nothing is copied through the host: the current torch stream
is synchronised before a run (ONNX Runtime works on its own stream) and ONNX Runtime
synchronises its stream before ``run_with_iobinding`` returns. ``io_binding=True`` runs the
CPU provider through the same binding code (torch CPU tensors bound by pointer), which is
how the tests check that path without a GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from dbae.config import ModelConfig
from dbae.errors import ConfigError

from .manifest import GraphInfo, Manifest, read_manifest
from .runner import DecodeSetting, Runner

Tensor = torch.Tensor

#: provider name -> ONNX Runtime execution provider
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def require_onnxruntime() -> Any:
    """The ``onnxruntime`` module, or ConfigError saying what to install."""
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(
            "the onnxruntime runners need ONNX Runtime: pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA)"
        ) from None
    return onnxruntime


def check_provider(provider: str) -> torch.device:
    """The torch device a provider serves; ConfigError if it cannot run here."""
    if provider not in PROVIDERS:
        raise ConfigError(f"unknown ONNX Runtime provider {provider!r}; choose {' or '.join(PROVIDERS)}")
    ort = require_onnxruntime()
    if provider == "cpu":
        return torch.device("cpu")
    available = ort.get_available_providers()
    if PROVIDERS["cuda"] not in available:
        raise ConfigError(
            "the onnxruntime-cuda runner needs the CUDA build of ONNX Runtime (pip uninstall onnxruntime; "
            f"pip install onnxruntime-gpu); this one offers only {', '.join(available)}"
        )
    if not torch.cuda.is_available():
        raise ConfigError("the onnxruntime-cuda runner needs a CUDA GPU visible to torch")
    return torch.device("cuda", torch.cuda.current_device())


def check_precision(precision: str) -> None:
    """ConfigError unless ONNX Runtime can run an export's graphs at ``precision`` (fp32, fp16)."""
    if precision == "bf16":
        raise ConfigError(
            "ONNX Runtime has no bfloat16 convolutions: its runners run fp32 or fp16 graphs "
            "(bf16 graphs run in the tensorrt runner)"
        )
    if precision not in ("fp32", "fp16"):
        raise ConfigError(f"the ONNX Runtime runners run fp32 or fp16 graphs, not {precision!r}")


def resolve_setting(manifest: Manifest, precision: str, setting: DecodeSetting | None) -> DecodeSetting:
    """``setting``, or the export's only decode setting at ``precision`` when it is None."""
    if setting is not None:
        return setting
    available = manifest.decode_settings(precision)
    if len(available) != 1:
        have = ", ".join(f"{s} x{k}" for k, s in available) or "none"
        raise ConfigError(f"choose the decode setting: this export has {len(available)} decode graphs at {precision} ({have})")
    steps, sampler = available[0]
    return DecodeSetting(steps, sampler)


def session_options(ort: Any, threads: int | None) -> Any:
    """ONNX Runtime session options of the runners: errors only, ``threads`` intra-op threads
    (None: its default), and no busy-waiting of idle intra-op threads: each session owns a
    pool and an edit runs them one right after the other, so spinning threads of one pool
    would take the cores from the next (an edit then cost 1.6x encode + decode)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


class _Session:
    """One graph's inference session, fed NumPy views of CPU tensors or bound to torch tensors."""

    def __init__(self, ort: Any, path: Path, graph: GraphInfo, provider: str, device: torch.device,
                 options: Any, io_binding: bool) -> None:  # fmt: skip
        if len(graph.inputs) != 1 or len(graph.outputs) != 1:
            raise ConfigError(f"{graph.file}: a runner graph must have one input and one output")
        self.graph, self.device = graph, device
        self.input, self.output = graph.inputs[0].name, graph.outputs[0].name
        if provider == "cuda":
            providers: list[Any] = [(PROVIDERS["cuda"], {"device_id": device.index or 0}), PROVIDERS["cpu"]]
        else:
            providers = [PROVIDERS["cpu"]]
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        if self.session.get_providers()[0] != PROVIDERS[provider]:
            raise ConfigError(
                f"ONNX Runtime could not start its {PROVIDERS[provider]} for {graph.file} (it fell back to "
                f"{self.session.get_providers()[0]}); check the CUDA and cuDNN libraries onnxruntime-gpu needs"
            )
        self.binding = self.session.io_binding() if io_binding else None

    def __call__(self, x: Tensor, out_shape: tuple[int, ...]) -> Tensor:
        if self.binding is None:
            (out,) = self.session.run([self.output], {self.input: x.detach().numpy()})
            return torch.from_numpy(out)
        if x.dtype != torch.float32 or not x.is_contiguous() or x.device != self.device:
            raise ValueError(f"bound inputs must be contiguous float32 on {self.device}")  # the runner ensures it
        device_type, index = self.device.type, self.device.index or 0
        out = torch.empty(out_shape, dtype=torch.float32, device=self.device)
        b = self.binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        b.bind_input(name=self.input, device_type=device_type, device_id=index, element_type=np.float32,
                     shape=tuple(x.shape), buffer_ptr=x.data_ptr())  # fmt: skip
        b.bind_output(name=self.output, device_type=device_type, device_id=index, element_type=np.float32,
                      shape=out_shape, buffer_ptr=out.data_ptr())  # fmt: skip
        if device_type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # torch's writes to x are done
        self.session.run_with_iobinding(b)
        return out


class OnnxRuntimeRunner(Runner):
    """An ONNX export (see :func:`dbae.export.onnx_export.export_onnx`) served by ONNX Runtime.

    ``setting`` picks the decode graph (None: the export's only one at ``precision``);
    ``model_config``, when given, must be the configuration the export was made from;
    ``threads`` sets ONNX Runtime's intra-op threads (None: its default); ``io_binding``
    binds torch tensors by pointer (always with ``"cuda"``; None: only there).
    """

    def __init__(
        self,
        export_dir: str | Path,
        provider: str = "cpu",
        precision: str = "fp32",
        setting: DecodeSetting | None = None,
        *,
        model_config: ModelConfig | None = None,
        threads: int | None = None,
        io_binding: bool | None = None,
    ) -> None:
        ort = require_onnxruntime()
        device = check_provider(provider)
        check_precision(precision)
        if io_binding is None or provider == "cuda":
            io_binding = provider == "cuda"  # CUDA tensors reach ONNX Runtime only through a binding
        export_dir = Path(export_dir)
        manifest = read_manifest(export_dir)
        if model_config is not None:
            manifest.check_config(model_config)
        setting = resolve_setting(manifest, precision, setting)
        encoder = manifest.graph("encoder", precision)
        decoder = manifest.graph("decode", precision, steps=setting.steps, sampler=setting.sampler)
        c, h, w = manifest.image_shape
        super().__init__((c, h, w), manifest.z_dim, setting, device)
        self.name = f"onnxruntime-{provider}"
        self.manifest, self.provider, self.precision = manifest, provider, precision
        options = session_options(ort, threads)
        self._encoder = _Session(ort, export_dir / encoder.file, encoder, provider, device, options, io_binding)
        self._decoder = _Session(ort, export_dir / decoder.file, decoder, provider, device, options, io_binding)

    def _encode(self, images: Tensor) -> Tensor:
        return self._encoder(images, (images.shape[0], self.z_dim))

    def _decode(self, z: Tensor) -> Tensor:
        return self._decoder(z, (z.shape[0], *self.image_shape))
