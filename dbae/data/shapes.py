"""A procedural dataset of one coloured shape on a grey background, with known factors.

Each image is drawn analytically from its factor vector at any resolution: every pixel
centre gets the signed distance to the shape's outline, and a linear ramp one pixel wide
turns it into coverage (anti-aliasing; exact box-filter coverage along straight edges).
Coordinates are in units of half the image width: the image spans [-1, 1] in x (to the
right) and in y (downwards).

Factors, in the column order of a factor tensor (see :data:`FACTORS`):

- shape (discrete): circle, square, triangle, cross; stored as the float index.
- colour (discrete): red, orange, yellow, green, cyan, blue, purple, magenta.
- size in [0.25, 0.45]: circumradius (the shape fits in a circle of this radius).
- x, y in [-0.45, 0.45]: centre, right of / below the image centre.
- rotation in [-pi/4, pi/4): radians, clockwise on screen. A circle looks the same at
  every angle; for the other shapes the range is shorter than the symmetry period.
- background in [0, 0.5]: grey level of the background (0 black, 1 white).

Every shape therefore lies inside [-0.9, 0.9]^2: it never touches the image border.

Two sources of factors share one transform from uniforms (:func:`factors_from_uniforms`):
:func:`sample_factors` draws fresh batches from a ``torch.Generator`` (fast training
without a DataLoader), and :class:`ShapesDataset` derives item ``i`` from a counter-based
hash of (seed, split, i), so an item does not depend on the order of access.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from ..imageio import check_image_size


@dataclass(frozen=True)
class Factor:
    """One generative factor. Discrete factors list their ``values`` and are stored as
    the float index of the value; continuous ones are uniform on [low, high)."""

    name: str
    description: str
    low: float
    high: float
    values: tuple[str, ...] = ()

    @property
    def discrete(self) -> bool:
        return bool(self.values)


SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "magenta")
PALETTE = torch.tensor(
    [
        [1.00, 0.10, 0.10],
        [1.00, 0.55, 0.00],
        [1.00, 0.95, 0.10],
        [0.15, 0.80, 0.15],
        [0.10, 0.90, 0.95],
        [0.15, 0.30, 1.00],
        [0.55, 0.15, 0.90],
        [1.00, 0.20, 0.85],
    ]
)
"""RGB colour of each entry of :data:`COLOURS`, in [0, 1]."""

FACTORS = (
    Factor("shape", "which shape is drawn", 0, len(SHAPES) - 1, SHAPES),
    Factor("colour", "hue of the shape", 0, len(COLOURS) - 1, COLOURS),
    Factor("size", "circumradius, in half image widths", 0.25, 0.45),
    Factor("x", "centre, in half image widths right of the image centre", -0.45, 0.45),
    Factor("y", "centre, in half image widths below the image centre", -0.45, 0.45),
    Factor("rotation", "clockwise rotation in radians", -math.pi / 4, math.pi / 4),
    Factor("background", "grey level of the background, 0 black to 1 white", 0.0, 0.5),
)
FACTOR_NAMES = tuple(f.name for f in FACTORS)
SPLITS = ("train", "test")


def factor_index(name: str) -> int:
    """Column of factor ``name`` in a factor tensor."""
    if name not in FACTOR_NAMES:
        raise ValueError(f"unknown shapes factor {name!r}; known: {', '.join(FACTOR_NAMES)}")
    return FACTOR_NAMES.index(name)


def factor_column(factors: torch.Tensor, name: str) -> torch.Tensor:
    """Values of one factor from factors (..., n_factors): an int64 index for discrete
    factors (e.g. ``COLOURS[factor_column(f, "colour")[k]]``), floats otherwise."""
    k = factor_index(name)
    return factors[..., k].round().long() if FACTORS[k].discrete else factors[..., k]


def factors_from_uniforms(u: torch.Tensor) -> torch.Tensor:
    """Map uniforms in [0, 1) of shape (n, n_factors) to float32 factors (n, n_factors)."""
    columns = []
    for k, f in enumerate(FACTORS):
        if f.discrete:
            columns.append((u[:, k] * len(f.values)).floor().clamp(max=len(f.values) - 1))
        else:
            columns.append(f.low + u[:, k] * (f.high - f.low))
    return torch.stack(columns, dim=1).float()


def sample_factors(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw ``n`` independent factor vectors (n, n_factors), float32, on the CPU."""
    return factors_from_uniforms(torch.rand(n, len(FACTORS), generator=generator))


def render(factors: torch.Tensor, image_size: int) -> torch.Tensor:
    """Draw factor vectors (B, n_factors) as float32 images (B, 3, S, S) in [-1, 1],
    on the device of ``factors``."""
    f = factors.float()
    shape = factor_column(f, "shape").clamp(0, len(SHAPES) - 1)
    colour = factor_column(f, "colour").clamp(0, len(COLOURS) - 1)
    radius, cx, cy, angle, background = (
        f[:, factor_index(name), None, None]
        for name in ("size", "x", "y", "rotation", "background")
    )

    pixel = 2.0 / image_size
    coords = (torch.arange(image_size, device=f.device, dtype=f.dtype) + 0.5) * pixel - 1.0
    dx = coords[None, None, :] - cx  # (B, 1, S)
    dy = coords[None, :, None] - cy  # (B, S, 1)
    cos, sin = torch.cos(angle), torch.sin(angle)
    u = cos * dx + sin * dy  # pixel position in the shape's own frame, (B, S, S)
    v = cos * dy - sin * dx

    distances = torch.stack([sdf(u, v, radius) for sdf in _SIGNED_DISTANCES], dim=1)
    distance = distances.gather(1, shape.view(-1, 1, 1, 1).expand(-1, 1, image_size, image_size))
    coverage = (0.5 - distance / pixel).clamp(0.0, 1.0)  # (B, 1, S, S)

    fill = PALETTE.to(f.device)[colour][:, :, None, None]  # (B, 3, 1, 1)
    grey = background[:, None]  # (B, 1, 1, 1)
    return (grey + coverage * (fill - grey)) * 2.0 - 1.0


# Signed distances (negative inside) for shapes of circumradius r centred at the origin.


def _circle(u: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return torch.hypot(u, v) - r


def _box(
    u: torch.Tensor, v: torch.Tensor, half_u: torch.Tensor, half_v: torch.Tensor
) -> torch.Tensor:
    qu, qv = u.abs() - half_u, v.abs() - half_v
    return torch.hypot(qu.clamp(min=0), qv.clamp(min=0)) + torch.maximum(qu, qv).clamp(max=0)


def _square(u: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    half = r / math.sqrt(2.0)
    return _box(u, v, half, half)


def _triangle(u: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Equilateral triangle pointing up (Inigo Quilez's exact distance)."""
    k = math.sqrt(3.0)
    half_side = r * (k / 2.0)
    pu = u.abs() - half_side
    pv = -v + half_side / k  # -v: screen y points down
    fold = pu + k * pv > 0
    pu, pv = torch.where(fold, (pu - k * pv) / 2, pu), torch.where(fold, (-k * pu - pv) / 2, pv)
    pu = pu - torch.clamp(pu, min=-2.0 * half_side, max=torch.zeros_like(half_side))
    return -torch.hypot(pu, pv) * torch.sign(pv)


def _cross(u: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Plus sign with arms a third as wide as they are long."""
    arm = r * (3.0 / math.sqrt(10.0))
    width = r * (1.0 / math.sqrt(10.0))
    return torch.minimum(_box(u, v, arm, width), _box(u, v, width, arm))


_SIGNED_DISTANCES = (_circle, _square, _triangle, _cross)  # in the order of SHAPES


# Counter-based hashing: item i of (seed, split) -> uniforms, independent of access order.

_U53 = np.uint64(11)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _hashed_uniforms(seed: int, split: str, indices: np.ndarray) -> torch.Tensor:
    seed_bits = _splitmix64(np.array([seed % 2**64], dtype=np.uint64))
    key = _splitmix64(seed_bits ^ np.uint64(SPLITS.index(split)))
    n = np.uint64(len(FACTORS))
    counters = indices.astype(np.uint64)[:, None] * n + np.arange(len(FACTORS), dtype=np.uint64)
    bits = _splitmix64(counters ^ key) >> _U53
    return torch.from_numpy(bits.astype(np.float64) * 2.0**-53)


class ShapesDataset(Dataset):
    """``length`` shapes images; item ``i`` is ``(image, factors)`` with image float32
    (3, S, S) in [-1, 1] and factors float32 (n_factors,) in :data:`FACTOR_NAMES` order.

    Items are a pure function of (seed, split, i): two instances agree, and the 'train'
    and 'test' splits are independent streams.
    """

    factors = FACTORS
    factor_names = FACTOR_NAMES
    render = staticmethod(render)
    sample_factors = staticmethod(sample_factors)

    def __init__(
        self, image_size: int = 32, length: int = 50_000, seed: int = 0, split: str = "train"
    ):
        if split not in SPLITS:
            raise DataError(f"shapes dataset: unknown split {split!r}; use {' or '.join(SPLITS)}")
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise DataError(f"shapes dataset: length must be a positive integer, got {length!r}")
        self.image_size = check_image_size(image_size)
        self.length = length
        self.seed = int(seed)
        self.split = split

    def __len__(self) -> int:
        return self.length

    def factors_at(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Factor vectors (n, n_factors) of items ``indices``, without rendering."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.length):
            raise IndexError(f"shapes dataset index out of range [0, {self.length})")
        return factors_from_uniforms(_hashed_uniforms(self.seed, self.split, idx))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -self.length <= i < self.length:
            raise IndexError(f"shapes dataset index {i} out of range [0, {self.length})")
        factors = self.factors_at([i % self.length])
        return render(factors, self.image_size)[0], factors[0]
