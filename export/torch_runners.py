"""PyTorch runners: eager, and the whole encode / decode / edit captured as CUDA graphs.

Both run :class:`dbae.model.DBAE` itself (its samplers use the fused sampler-step ops where
built, see :mod:`dbae.fused_step`): the networks in float32, bf16 or fp16 (``precision``: converted
copies of their weights, or autocast), NCHW or NHWC, eager or compiled; the bridge and
sampler math in float32.

:class:`CUDAGraphRunner` captures one graph per operation and batch size, on first use:
the encoder pass; Dec(z) plus the ``steps`` unrolled sampler steps; and the edit (encode,
shift, decode) as one graph. A call copies its inputs into the graph's static buffers,
replays it, and returns a copy of the static output, so that a later call never overwrites
what an earlier one returned. Host work per call: three copies and one replay. cuDNN
benchmarks its convolution algorithms while a graph is warmed up (the shapes are fixed), and
the graph keeps the fastest.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from dbae.errors import ConfigError
from dbae.model import DBAE
from dbae.nn.unet import ScoreUNet

from .runner import DecodeSetting, PausingNetwork, Runner

Tensor = torch.Tensor

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast(device: torch.device, precision: str, enabled: bool = True):
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32" or not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


class CastNetwork(nn.Module):
    """A network run in ``dtype`` (and NHWC with ``channels_last``) behind float32 inputs and outputs.

    It holds its own copy of the weights, converted once, so that a call casts no weights
    (autocast casts every weight on every call). Tensors of two or more dimensions (images,
    latents) are cast to ``dtype`` on the way in; 1-D per-sample scalars such as ``c_noise``
    stay float32 (the U-Net's time embedding casts them after its sinusoids). Floating outputs
    come back as float32 in the standard (NCHW) layout, so the bridge and sampler math around
    the network stays float32 and the fused sampler steps read them without a copy."""

    def __init__(self, net: nn.Module, dtype: torch.dtype, channels_last: bool = False) -> None:
        super().__init__()
        self.net = copy.deepcopy(net).to(dtype=dtype)
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.net.to(memory_format=torch.channels_last)

    def _in(self, x):
        if not (isinstance(x, Tensor) and x.is_floating_point() and x.dim() >= 2):
            return x
        x = x.to(self.dtype)
        return x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x

    @staticmethod
    def _out(y):
        if isinstance(y, tuple):
            return tuple(CastNetwork._out(v) for v in y)
        return y.float().contiguous() if isinstance(y, Tensor) and y.is_floating_point() else y

    def forward(self, *args: Tensor):
        return self._out(self.net(*map(self._in, args)))


NETWORKS = ("encoder", "decoder", "unet")


def inference_networks(
    model: DBAE, precision: str = "fp32", *, compile: bool = False, channels_last: bool = False,
    autocast: bool = False, **compile_options,
) -> DBAE:  # fmt: skip
    """A view of ``model`` whose encoder, decoder and U-Net run as the runners run them.

    ``precision`` bf16 / fp16 (unless ``autocast``) or ``channels_last``: each network becomes a
    :class:`CastNetwork` (a converted copy of its weights; the U-Net copy computes all its
    blocks' embedding projections as one matmul, see
    :meth:`dbae.nn.unet.ScoreUNet.fuse_emb_projections`); otherwise the view shares the
    model's parameters (nothing is copied, and fp16 / bf16 come from autocast around the call).
    ``compile``: each network runs through ``torch.compile(**compile_options)``. The bridge
    math and the sampler loop stay eager Python, so only the networks are traced (once per
    input shape and dtype). The model itself is left as it was."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    cast = channels_last or (precision != "fp32" and not autocast)
    view = copy.copy(model)
    view._modules = dict(model._modules)  # copy.copy would share the dict of submodules
    for name in NETWORKS:
        net = getattr(model, name)
        if cast:  # with autocast, a float32 copy in NHWC (autocast casts it per call)
            net = CastNetwork(net, torch.float32 if autocast else PRECISIONS[precision], channels_last)
            if isinstance(net.net, ScoreUNet):  # a copy: its blocks' projections can become one matmul
                net.net.fuse_emb_projections()
        if compile:
            net = torch.compile(net, **compile_options)
        setattr(view, name, net)
    return view


#: torch.compile modes; the two that capture inductor's own CUDA graphs cannot run inside ours
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")
_GRAPHING_MODES = ("reduce-overhead", "max-autotune")


def check_options(runner: type, compile: bool, *, compile_mode: str | None = None, **_) -> None:
    """Refuse, before anything is built, a compile mode that ``runner`` cannot use."""
    _compile_options(compile, compile_mode)
    if compile_mode in _GRAPHING_MODES and issubclass(runner, CUDAGraphRunner):
        raise ConfigError(f"compile mode {compile_mode!r} captures inductor's own CUDA graphs, which cannot run "
                          "inside the CUDA-graph runners' graphs: use max-autotune-no-cudagraphs")  # fmt: skip


def _compile_options(compile: bool, compile_mode: str | None) -> dict:
    if compile_mode is None:
        return {}
    if compile_mode not in COMPILE_MODES:
        raise ConfigError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {compile_mode!r}")
    if not compile:
        raise ConfigError("a compile mode applies to the compiled runners only (eager-compiled, cuda-graph-compiled)")
    return {"mode": compile_mode}


class EagerRunner(Runner):
    """DBAE in eager PyTorch: the baseline every other runner is compared with.

    ``precision`` bf16 / fp16: the networks run on converted copies of their weights (see
    :class:`CastNetwork`), or under autocast on the model's own float32 weights with
    ``autocast=True``; the bridge and sampler math stays float32 either way.
    ``channels_last``: the networks' weights and activations in NHWC (what cuDNN's tensor-core
    convolutions read). ``compile=True`` runs the three networks through ``torch.compile``
    (inductor): fewer, fused kernels; the first call of each batch size compiles (seconds to
    minutes). ``compile_mode`` is ``torch.compile``'s mode (``max-autotune-no-cudagraphs``:
    inductor times its own kernels against cuDNN's and cuBLAS's, many minutes more)."""

    name = "eager"
    preemptible = True

    def __init__(
        self, model: DBAE, setting: DecodeSetting, *, precision: str = "fp32", compile: bool = False,
        channels_last: bool = False, autocast: bool = False, compile_mode: str | None = None,
    ) -> None:  # fmt: skip
        options = _compile_options(compile, compile_mode)
        cfg = model.config
        device = next(model.parameters()).device
        super().__init__((cfg.image_channels, cfg.image_size, cfg.image_size), cfg.z_dim, setting, device)
        model.eval()
        self.model = inference_networks(model, precision, compile=compile, channels_last=channels_last,
                                        autocast=autocast, **options)  # fmt: skip
        if self.preemptible:
            self.model.unet = PausingNetwork(self.model.unet)
        self.precision = precision
        self.autocast = autocast
        self.name += "-compiled" * compile + "-nhwc" * channels_last + "-autocast" * (autocast and precision != "fp32")

    def _context(self):
        return _autocast(self.device, self.precision, self.autocast)

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


@contextlib.contextmanager
def cudnn_benchmark():
    """cuDNN times every algorithm it has for each new convolution shape (benchmark_limit 0:
    all of them, not the first 10 of its heuristics) and keeps the fastest; both global
    settings are restored on exit."""
    cudnn = torch.backends.cudnn
    before, limit = cudnn.benchmark, cudnn.benchmark_limit
    cudnn.benchmark = True
    if limit is not None:  # None: no cuDNN in this build
        cudnn.benchmark_limit = 0
    try:
        yield
    finally:
        cudnn.benchmark = before
        if limit is not None:
            cudnn.benchmark_limit = limit


class _Captured:
    """One captured graph: static inputs, the graph, its static output."""

    def __init__(self, fn, inputs: list[Tensor], *, warmup: int = 2) -> None:
        self.inputs = [x.clone() for x in inputs]
        side = torch.cuda.Stream(device=self.inputs[0].device)
        side.wait_stream(torch.cuda.current_stream())
        # the shapes are fixed from here on, so let cuDNN time its algorithms once (warm-up) and
        # the graph keep the fastest; the global flag is restored afterwards
        with cudnn_benchmark(), torch.cuda.stream(side):  # off the capture: lazy inits, cuBLAS handles, autotuning
            for _ in range(warmup):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with cudnn_benchmark(), torch.cuda.graph(self.graph):
            self.output = fn(*self.inputs)

    def __call__(self, *inputs: Tensor) -> Tensor:
        for static, x in zip(self.inputs, inputs):
            static.copy_(x)
        self.graph.replay()
        return self.output.clone()


class CUDAGraphRunner(EagerRunner):
    """The eager runner's work captured as CUDA graphs, one per operation and batch size."""

    name = "cuda-graph"
    preemptible = False  # one graph replay per decode

    def __init__(
        self, model: DBAE, setting: DecodeSetting, *, precision: str = "bf16", compile: bool = False,
        channels_last: bool = False, autocast: bool = False, compile_mode: str | None = None,
    ) -> None:  # fmt: skip
        check_options(CUDAGraphRunner, compile, compile_mode=compile_mode)
        super().__init__(model, setting, precision=precision, compile=compile, channels_last=channels_last,
                         autocast=autocast, compile_mode=compile_mode)  # fmt: skip
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
