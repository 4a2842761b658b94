"""The one interface of every deployment runtime: encode, decode, reconstruct, edit.

A runner serves one model at one decode setting: ``steps`` grid steps of the ``sampler``
(``euler`` or ``heun``, deterministic: no churn), fixed when the runner is made, as an
unrolled ONNX graph or a captured CUDA graph fixes it. Images are float32 tensors in
[-1, 1] of shape (B, C, H, W); latents are float32 (B, z_dim). Inputs may live on any
device: a runner moves them to its own and returns its outputs there (:attr:`device`).

    runner.encode(images)                 -> z (the encoder mean, one pass)
    runner.decode(z)                      -> images (x_T = Dec(z), then ``steps`` steps)
    runner.reconstruct(images)            -> decode(encode(images))
    runner.edit(images, direction, scale) -> decode(encode(images) + scale * direction)

Pause points: a runner whose decode runs the network one evaluation at a time from Python
(eager, onnxruntime-step: :attr:`Runner.preemptible`) calls :func:`pause_point` before each
U-Net evaluation (its U-Net behind a :class:`PausingNetwork`). Inside :func:`pausing`, a pause point calls the given hook in the same thread,
which may run other, short work on the runners (``dbae serve`` runs a waiting edit there
instead of after a whole strip, see :mod:`dbae.serve.render`); outside, it does nothing.
"""

from __future__ import annotations

import contextlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from dbae.errors import ConfigError, DataError
from dbae.sampling import SAMPLERS, nfe_for

Tensor = torch.Tensor

#: decode lengths the exported graphs and the runners support
MIN_STEPS, MAX_STEPS = 1, 10


@dataclass(frozen=True)
class DecodeSetting:
    """How a runner decodes: ``steps`` grid steps of ``sampler`` (ODE, no churn)."""

    steps: int
    sampler: str = "euler"

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if not (isinstance(self.steps, int) and MIN_STEPS <= self.steps <= MAX_STEPS):
            raise ConfigError(
                f"steps must be an integer from {MIN_STEPS} to {MAX_STEPS} (the decode is unrolled), got {self.steps!r}"
            )

    @property
    def nfe(self) -> int:
        """Network evaluations of one decode."""
        return nfe_for(self.steps, self.sampler, 0.0)


_pause = threading.local()  # .hook: what pause_point calls in this thread (None: nothing)


@contextlib.contextmanager
def pausing(hook: Callable[[], None]) -> Iterator[None]:
    """Inside, every :func:`pause_point` reached in this thread calls ``hook``; a pause point
    reached by the work ``hook`` does is not paused again (no nesting)."""
    before = getattr(_pause, "hook", None)
    _pause.hook = hook
    try:
        yield
    finally:
        _pause.hook = before


def pause_point() -> None:
    """Where a decode may give way (see the module docstring)."""
    hook = getattr(_pause, "hook", None)
    if hook is not None:
        _pause.hook = None
        try:
            hook()
        finally:
            _pause.hook = hook


class PausingNetwork(nn.Module):
    """``net`` behind a :func:`pause_point` (the U-Net of a preemptible runner)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, *args: Tensor) -> Tensor:
        pause_point()
        return self.net(*args)


class Runner(ABC):
    """Base class: input checks and the composite methods; subclasses run encode and decode."""

    #: short name for tables ("eager", "cuda-graph", "onnxruntime-cpu", ...)
    name: str = "runner"
    #: whether its decode reaches :func:`pause_point` before every U-Net evaluation
    preemptible: bool = False

    def __init__(self, image_shape: tuple[int, int, int], z_dim: int, setting: DecodeSetting, device) -> None:
        self.image_shape = tuple(image_shape)
        self.z_dim = z_dim
        self.setting = setting
        self.device = torch.device(device)

    # ----- what each runtime implements (inputs already checked, on self.device, float32) -----
    @abstractmethod
    def _encode(self, images: Tensor) -> Tensor: ...

    @abstractmethod
    def _decode(self, z: Tensor) -> Tensor: ...

    def _edit(self, images: Tensor, direction: Tensor, scale: float) -> Tensor:
        """Encode, shift, decode; runtimes that fuse the three override this."""
        return self._decode(self._encode(images) + scale * direction)

    # ----- public API -----
    def encode(self, images: Tensor) -> Tensor:
        return self._encode(self.check_images(images))

    def decode(self, z: Tensor) -> Tensor:
        return self._decode(self.check_latents(z))

    def reconstruct(self, images: Tensor) -> Tensor:
        return self._decode(self._encode(self.check_images(images)))

    def edit(self, images: Tensor, direction: Tensor, scale: float = 1.0) -> Tensor:
        """Images with their latents moved by ``scale * direction`` ((z_dim,) or (B, z_dim))."""
        images = self.check_images(images)
        direction = self._as_float(direction, "direction")
        if direction.dim() == 1:
            direction = direction.expand(images.shape[0], -1)
        if tuple(direction.shape) != (images.shape[0], self.z_dim):
            raise DataError(
                f"direction must have shape ({self.z_dim},) or ({images.shape[0]}, {self.z_dim}) for these "
                f"{images.shape[0]} images, got {tuple(direction.shape)}"
            )
        return self._edit(images, direction.contiguous(), float(scale))

    # ----- checks -----
    def _as_float(self, x: Tensor, what: str) -> Tensor:
        if not isinstance(x, Tensor):
            raise DataError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
        if not (x.is_floating_point()):
            raise DataError(f"{what} must be floating point, got {x.dtype}")
        return x.to(device=self.device, dtype=torch.float32)

    def check_images(self, images: Tensor) -> Tensor:
        images = self._as_float(images, "images")
        c, h, w = self.image_shape
        if images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape or images.shape[0] < 1:
            raise DataError(f"images must have shape (B, {c}, {h}, {w}) for this model, got {tuple(images.shape)}")
        return images.contiguous()

    def check_latents(self, z: Tensor) -> Tensor:
        z = self._as_float(z, "z")
        if z.dim() != 2 or z.shape[1] != self.z_dim or z.shape[0] < 1:
            raise DataError(f"z must have shape (B, {self.z_dim}) for this model, got {tuple(z.shape)}")
        return z.contiguous()

    def synchronize(self) -> None:
        """Wait for this runner's device work (for timing)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __repr__(self) -> str:
        s = self.setting
        return f"{type(self).__name__}({self.name}, {s.sampler} x{s.steps}, NFE {s.nfe}, {self.device})"
