"""Feature extractors for the generation metrics (FID, Precision/Recall, IS; SPEC 10).

Nothing is downloaded: the Inception weights are read from a local file given by the
user (:func:`load_feature_extractor`). Three kinds of file are accepted:

1. **torchvision's ImageNet Inception-v3 state dict** ``inception_v3_google-0cc3c7bd.pth``
   (1000 classes), from https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth.
   The network below reproduces torchvision's ``Inception3`` module names, so the file
   loads strictly (the auxiliary classifier's ``AuxLogits.*`` entries are ignored).
2. **pytorch-fid's FID Inception state dict** ``pt_inception-2015-12-05-6726825d.pth``
   (1008 classes; the TensorFlow FID network of Heusel et al. 2017 ported to PyTorch), from
   https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth.
   Recognised by its 1008-way ``fc``; its blocks then follow pytorch-fid's ``FIDInceptionA/C/E``
   (average pooling without padded zeros, max pooling in the last block). This is the
   network whose features give the FID numbers reported in the literature.
3. **a TorchScript feature network**, such as NVIDIA's ``inception-2015-12-05.pt`` used by
   clean-fid and StyleGAN2-ADA, from
   https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt.
   It is called as ``net(x)`` with ``x`` float in [0, 255] of shape (B, 3, H, W):
   ``net(x, return_features=True)`` must give the (B, D) features and ``net(x)`` class
   probabilities (B, K) (their logarithm serves as logits for the Inception Score).

For files 1 and 2 images are resized to 299 x 299 (bilinear, as pytorch-fid) and mapped
from [0, 1] to [-1, 1]; the features are the 2048-d global average pool and the logits the
``fc`` output. Any object following :class:`FeatureExtractor` (e.g. a tiny network in the
tests) can be passed to the metric functions instead.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError

Tensor = torch.Tensor

INCEPTION_HELP = (
    "FID, Precision/Recall and the Inception Score need Inception-v3 weights in a local file "
    "(nothing is downloaded). Get one of:\n"
    "  - pytorch-fid's FID network (recommended, matches published FIDs):\n"
    "    https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth\n"
    "  - NVIDIA's TorchScript network used by clean-fid:\n"
    "    https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt\n"
    "  - torchvision's ImageNet Inception-v3:\n"
    "    https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth\n"
    "e.g. `curl -L -o pt_inception.pth URL`, then pass its path (--inception PATH)."
)


@dataclass
class Features:
    """Per-image features (n, D) and, when the network has a classifier, logits (n, K)."""

    features: Tensor
    logits: Tensor | None = None


@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps images (B, 3, H, W) in [0, 1] to :class:`Features` (float32, on the CPU)."""

    name: str

    def __call__(self, images: Tensor) -> Features: ...


# ----- Inception-v3 (torchvision module names; pytorch-fid's FID variant) -----
class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, kernel_size: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: Tensor, fid: bool) -> Tensor:
    # pytorch-fid: the TF network does not count padded zeros in its average pools
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=not fid)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int, fid: bool) -> None:
        super().__init__()
        self.fid = fid
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool(x, self.fid)),
        ], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int, fid: bool) -> None:
        super().__init__()
        self.fid = fid
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool(x, self.fid))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """``pool``: "avg" (torchvision), "avg_fid" (pytorch-fid FIDInceptionE_1) or "max"
    (pytorch-fid FIDInceptionE_2, the last block of the TF FID network)."""

    def __init__(self, cin: int, pool: str) -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        if self.pool == "max":
            pooled = F.max_pool2d(x, 3, stride=1, padding=1)
        else:
            pooled = _avg_pool(x, self.pool == "avg_fid")
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


class InceptionV3(nn.Module):
    """Inception-v3 (Szegedy et al. 2016) without the auxiliary classifier, with
    torchvision's parameter names. ``fid=True`` gives pytorch-fid's variant of the TF FID
    network (1008 classes). ``forward`` takes images in [-1, 1] at 299 x 299 and returns
    (pool features (B, 2048), logits (B, num_classes))."""

    def __init__(self, num_classes: int = 1000, fid: bool = False) -> None:
        super().__init__()
        self.fid = fid
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32, fid)
        self.Mixed_5c = InceptionA(256, 64, fid)
        self.Mixed_5d = InceptionA(288, 64, fid)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128, fid)
        self.Mixed_6c = InceptionC(768, 160, fid)
        self.Mixed_6d = InceptionC(768, 160, fid)
        self.Mixed_6e = InceptionC(768, 192, fid)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, "avg_fid" if fid else "avg")
        self.Mixed_7c = InceptionE(2048, "max" if fid else "avg")
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        pooled = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return pooled, self.fc(pooled)


class InceptionExtractor:
    """:class:`FeatureExtractor` over :class:`InceptionV3`: resize to 299 (bilinear,
    ``align_corners=False``, as pytorch-fid), map [0, 1] to [-1, 1], run in float32."""

    def __init__(self, net: InceptionV3, name: str, device: str | torch.device = "cpu", batch_size: int = 50):
        self.net = net.to(device).eval()
        self.name = name
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Features:
        _check_images(images)
        feats, logits = [], []
        for chunk in images.split(self.batch_size):
            x = chunk.to(self.device, torch.float32)
            if x.shape[-2:] != (299, 299):
                x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            f, lg = self.net(2.0 * x - 1.0)
            feats.append(f.cpu())
            logits.append(lg.cpu())
        return Features(torch.cat(feats), torch.cat(logits))


class ScriptedExtractor:
    """:class:`FeatureExtractor` over a TorchScript network with the NVIDIA/clean-fid
    calling convention (see the module notes): input float in [0, 255]."""

    def __init__(self, net: torch.jit.ScriptModule, name: str, device: str | torch.device = "cpu",
                 batch_size: int = 50):
        self.net = net.to(device).eval()
        self.name = name
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Features:
        _check_images(images)
        feats, logits = [], []
        for chunk in images.split(self.batch_size):
            x = chunk.to(self.device, torch.float32) * 255.0
            feats.append(self.net(x, return_features=True).float().flatten(1).cpu())
            probs = self.net(x).float().flatten(1).cpu()
            logits.append(probs.clamp(min=1e-30).log())
        return Features(torch.cat(feats), torch.cat(logits))


def _check_images(images: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise DataError(f"feature extractors take RGB batches (B, 3, H, W), got {tuple(images.shape)}")


def extract(extractor: FeatureExtractor, images: Tensor, batch_size: int = 256) -> Features:
    """Features of ``images`` (n, 3, H, W) in [0, 1], fed in chunks of ``batch_size``."""
    parts = [extractor(chunk) for chunk in images.split(batch_size)]
    logits = None if any(p.logits is None for p in parts) else torch.cat([p.logits for p in parts])  # type: ignore[misc]
    return Features(torch.cat([p.features for p in parts]).float(), logits)


def load_feature_extractor(path: str | Path | None, device: str | torch.device = "cpu") -> FeatureExtractor:
    """The Inception feature network stored in the local file ``path`` (see the module
    notes for the three accepted files). A missing path raises :class:`ConfigError`
    explaining how to obtain one; nothing is ever downloaded."""
    if path is None:
        raise ConfigError(INCEPTION_HELP)
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Inception weights file {path} does not exist.\n{INCEPTION_HELP}")
    if _is_torchscript(path):
        try:
            net = torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(f"{path}: cannot load the TorchScript network ({exc})\n{INCEPTION_HELP}") from None
        return ScriptedExtractor(net, f"torchscript:{path.name}", device)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise ConfigError(f"{path}: not a readable weights file ({type(exc).__name__}: {exc})\n{INCEPTION_HELP}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise ConfigError(f"{path}: not an Inception-v3 state dict (no 'fc.weight' entry)\n{INCEPTION_HELP}")
    num_classes = int(state["fc.weight"].shape[0])
    fid = num_classes == 1008
    net = InceptionV3(num_classes=num_classes, fid=fid)
    state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"{path}: the weights do not fit Inception-v3 ({str(exc).splitlines()[0]})\n"
                          f"{INCEPTION_HELP}") from None
    kind = "pytorch-fid FID Inception" if fid else "torchvision Inception-v3"
    return InceptionExtractor(net, f"{kind}:{path.name}", device)


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives hold ``*/code/`` and ``*/constants.pkl``; ``torch.save`` zips do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())
