"""LPIPS (Zhang et al. 2018, "The unreasonable effectiveness of deep features as a
perceptual metric"), version 0.1, AlexNet trunk, from local weight files only.

    LPIPS(x, y) = sum_l mean_{h,w} sum_c w_{l,c} (f^l_{chw}(x)/|f^l_{hw}(x)| - f^l_{chw}(y)/|f^l_{hw}(y)|)^2

where f^l are the five ReLU outputs of AlexNet's convolutional trunk applied to the
"scaled" input ((x - shift) / scale with the package's constants, x in [-1, 1]), the norm is
over channels (plus 1e-10), and w_l are the learned non-negative 1x1 "lin" weights.

This module reimplements the ``lpips`` package's forward pass (``lpips.LPIPS(net='alex')``,
checked against it in the tests) instead of calling it, because the package builds its
trunk with ``torchvision.models.alexnet(pretrained=True)``, which downloads the weights,
and because torchvision must match the installed torch build exactly. Two files are needed:

- the AlexNet trunk: torchvision's ImageNet weights ``alexnet-owt-7be5be79.pth``
  (https://download.pytorch.org/models/alexnet-owt-7be5be79.pth); only ``features.*`` is used;
- the lin weights ``alex.pth`` of LPIPS v0.1: shipped inside the ``lpips`` pip package
  (``lpips/weights/v0.1/alex.pth``, used automatically when that package is installed;
  ``pip install --no-deps lpips`` is enough) or from
  https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/alex.pth.

The ``lpips`` package upsamples nothing: AlexNet's strides need images of at least 32 pixels
a side, so smaller images are upsampled (bilinear) to ``min_size`` = 64 first; the
reported value then refers to the upsampled images.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError

Tensor = torch.Tensor

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
CHANNELS = (64, 192, 384, 256, 256)
#: AlexNet ``features`` indices that end each of the five LPIPS slices (after a ReLU)
SLICE_ENDS = (2, 5, 8, 10, 12)

ALEXNET_HELP = (
    "LPIPS needs AlexNet ImageNet weights in a local file (nothing is downloaded): "
    "get https://download.pytorch.org/models/alexnet-owt-7be5be79.pth "
    "(e.g. `curl -L -o alexnet-owt-7be5be79.pth URL`) and pass its path (--lpips-weights PATH)."
)
LIN_HELP = (
    "LPIPS also needs its v0.1 'lin' weights alex.pth: `pip install --no-deps lpips` (the file ships "
    "inside the package and is then found automatically), or download "
    "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/alex.pth "
    "and pass it with --lpips-lin PATH."
)


def alexnet_features() -> nn.Sequential:
    """torchvision's ``AlexNet.features`` (same layout and parameter names)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2),
    )


def packaged_lin_weights() -> Path | None:
    """``lpips/weights/v0.1/alex.pth`` of an installed ``lpips`` package (found without importing it)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / "weights" / "v0.1" / "alex.pth"
        if path.is_file():
            return path
    return None


class LPIPS(nn.Module):
    """LPIPS v0.1 with an AlexNet trunk; ``forward(x, y)`` takes images in [0, 1] of shape
    (B, 3, H, W) and returns the distance per pair, (B,)."""

    def __init__(self, features: nn.Sequential, lin: list[Tensor], min_size: int = 64) -> None:
        super().__init__()
        if len(lin) != len(CHANNELS) or any(w.numel() != c for w, c in zip(lin, CHANNELS)):
            raise ConfigError(f"LPIPS lin weights must have {CHANNELS} entries per layer")
        self.features = features
        self.register_buffer("lin", torch.cat([w.flatten() for w in lin]).float())
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.min_size = min_size
        self.eval()

    def _layers(self, x: Tensor) -> list[Tensor]:
        h = (x - self.shift) / self.scale
        out, start = [], 0
        for end in SLICE_ENDS:
            for layer in self.features[start:end]:
                h = layer(h)
            out.append(h)
            start = end
        return out

    @torch.no_grad()
    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise DataError(f"LPIPS takes two RGB batches of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        x, y = x.float() * 2 - 1, y.float() * 2 - 1
        if min(x.shape[-2:]) < self.min_size:
            size = _upsampled_size(x.shape[-2], x.shape[-1], self.min_size)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        total = torch.zeros(x.shape[0], device=x.device)
        offsets = [0]
        for c in CHANNELS:
            offsets.append(offsets[-1] + c)
        for l, (fx, fy) in enumerate(zip(self._layers(x), self._layers(y))):
            nx = fx / (fx.square().sum(1, keepdim=True).sqrt() + 1e-10)
            ny = fy / (fy.square().sum(1, keepdim=True).sqrt() + 1e-10)
            w = self.lin[offsets[l]:offsets[l + 1]].view(1, -1, 1, 1)
            total += ((nx - ny).square() * w).sum(1).mean(dim=(1, 2))
        return total


def _upsampled_size(h: int, w: int, min_size: int) -> tuple[int, int]:
    s = min_size / min(h, w)
    return max(min_size, round(h * s)), max(min_size, round(w * s))


def _load(path: Path, what: str, help_text: str) -> dict[str, Tensor]:
    if not path.is_file():
        raise ConfigError(f"{what} file {path} does not exist. {help_text}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise ConfigError(f"{path}: not a readable {what} file ({type(exc).__name__}: {exc}). {help_text}") from None
    if not isinstance(state, dict):
        raise ConfigError(f"{path}: expected a state dict of {what}. {help_text}")
    return state


def load_lpips(alexnet_weights: str | Path | None, lin_weights: str | Path | None = None,
               device: str | torch.device = "cpu", min_size: int = 64) -> LPIPS:
    """LPIPS from local files: torchvision's AlexNet state dict and LPIPS v0.1 ``alex.pth``
    (default: the one inside an installed ``lpips`` package). Missing files raise
    :class:`ConfigError` saying where to get them."""
    if alexnet_weights is None:
        raise ConfigError(ALEXNET_HELP)
    trunk = _load(Path(alexnet_weights), "AlexNet weights", ALEXNET_HELP)
    features = alexnet_features()
    wanted = {k: v for k, v in trunk.items() if k.startswith("features.")}
    try:
        features.load_state_dict({k[len("features."):]: v for k, v in wanted.items()}, strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"{alexnet_weights}: not torchvision AlexNet weights ({str(exc).splitlines()[0]}). "
                          f"{ALEXNET_HELP}") from None
    if lin_weights is None:
        lin_weights = packaged_lin_weights()
        if lin_weights is None:
            raise ConfigError(LIN_HELP)
    lin_state = _load(Path(lin_weights), "LPIPS lin weights", LIN_HELP)
    try:
        lin = [lin_state[f"lin{i}.model.1.weight"] for i in range(len(CHANNELS))]
    except KeyError as exc:
        raise ConfigError(f"{lin_weights}: no entry {exc} (expected LPIPS v0.1 alex.pth). {LIN_HELP}") from None
    return LPIPS(features, lin, min_size=min_size).to(device)
