"""PyTorch runners: eager, and the whole encode / decode / edit captured as CUDA graphs.

Both run :class:`dbae.model.DBAE` itself (its samplers use the fused sampler-step ops where
built, see :mod:`dbae.fused_step`), in float32 or under autocast (``precision``).

:class:`CUDAGraphRunner` captures one graph per operation and batch size, on first use:
the encoder pass; Dec(z) plus the ``steps`` unrolled sampler steps; and the edit (encode,
shift, decode) as one graph. A call copies its inputs into the graph's static buffers,
replays it, and returns a copy of the static output, so that a later call never overwrites
what an earlier one returned. Host work per call: three copies and one replay.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from dbae.errors import ConfigError
from dbae.model import DBAE

from .runner import DecodeSetting, Runner

Tensor = torch.Tensor

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast(device: torch.device, precision: str):
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


def compiled_networks(model: DBAE, **compile_options) -> DBAE:
    """A view of ``model`` whose encoder, decoder and U-Net run through ``torch.compile``.

    The parameters are shared (nothing is copied); the bridge math and the sampler loop stay
    eager Python, so only the networks are traced (once per input shape and dtype)."""
    view = copy.copy(model)
    view._modules = dict(model._modules)  # copy.copy would share the dict of submodules
    for name in ("encoder", "decoder", "unet"):
        setattr(view, name, torch.compile(getattr(model, name), **compile_options))
    return view


class EagerRunner(Runner):
    """DBAE in eager PyTorch: the baseline every other runner is compared with.

    ``compile=True`` runs the three networks through ``torch.compile`` (inductor): fewer,
    fused kernels; the first call of each batch size compiles (seconds to minutes)."""

    name = "eager"

    def __init__(self, model: DBAE, setting: DecodeSetting, *, precision: str = "fp32", compile: bool = False) -> None:
        cfg = model.config
        device = next(model.parameters()).device
        super().__init__((cfg.image_channels, cfg.image_size, cfg.image_size), cfg.z_dim, setting, device)
        _autocast(device, precision)  # validates precision
        model.eval()
        self.model = compiled_networks(model) if compile else model
        self.precision = precision
        if compile:
            self.name = f"{self.name}-compiled"

    def _context(self):
        return _autocast(self.device, self.precision)

    @torch.no_grad()
    def _encode(self, images: Tensor) -> Tensor:
        with self._context():
            return self.model.encode(images).float()

    @torch.no_grad()
    def _decode(self, z: Tensor) -> Tensor:
        with self._context():
            s = self.setting
            return self.model.decode(z, s.nfe, sampler=s.sampler).images.float()

    @torch.no_grad()
    def _edit(self, images: Tensor, direction: Tensor, scale: float) -> Tensor:
        with self._context():
            z = self.model.encode(images).float() + scale * direction
            s = self.setting
            return self.model.decode(z, s.nfe, sampler=s.sampler).images.float()


class _Captured:
    """One captured graph: static inputs, the graph, its static output."""

    def __init__(self, fn, inputs: list[Tensor], *, warmup: int = 2) -> None:
        self.inputs = [x.clone() for x in inputs]
        side = torch.cuda.Stream(device=self.inputs[0].device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: lazy inits, cuBLAS handles, autotuning
            for _ in range(warmup):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = fn(*self.inputs)

    def __call__(self, *inputs: Tensor) -> Tensor:
        for static, x in zip(self.inputs, inputs):
            static.copy_(x)
        self.graph.replay()
        return self.output.clone()


class CUDAGraphRunner(EagerRunner):
    """The eager runner's work captured as CUDA graphs, one per operation and batch size."""

    name = "cuda-graph"

    def __init__(self, model: DBAE, setting: DecodeSetting, *, precision: str = "bf16", compile: bool = False) -> None:
        super().__init__(model, setting, precision=precision, compile=compile)
        if self.device.type != "cuda":
            raise ConfigError(f"the CUDA-graph runner needs the model on a CUDA device, not {self.device}")
        self._graphs: dict[tuple[str, int], _Captured] = {}

    def _graph(self, op: str, inputs: list[Tensor]) -> _Captured:
        key = (op, inputs[0].shape[0])
        if key not in self._graphs:
            fn = {"encode": super()._encode, "decode": super()._decode, "edit": self._edit_eager}[op]
            self._graphs[key] = _Captured(fn, inputs)
        return self._graphs[key]

    def _edit_eager(self, images: Tensor, direction: Tensor, scale: Tensor) -> Tensor:
        # scale as a (1,) tensor: a captured Python float would be frozen into the graph
        return EagerRunner._edit(self, images, direction * scale, 1.0)

    def _encode(self, images: Tensor) -> Tensor:
        return self._graph("encode", [images])(images)

    def _decode(self, z: Tensor) -> Tensor:
        return self._graph("decode", [z])(z)

    def _edit(self, images: Tensor, direction: Tensor, scale: float) -> Tensor:
        s = torch.full((1, 1), scale, dtype=torch.float32, device=self.device)
        return self._graph("edit", [images, direction, s])(images, direction, s)

    @property
    def captured(self) -> list[tuple[str, int]]:
        """(operation, batch size) of every graph captured so far."""
        return sorted(self._graphs)
