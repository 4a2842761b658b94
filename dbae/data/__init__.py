"""Datasets: the built-in procedural shapes (:mod:`.shapes`, which also has the batched
``render`` / ``sample_factors`` path and factor metadata) and folders of image files."""

from __future__ import annotations

from torch.utils.data import Dataset

from .folder import ImageFolderDataset
from .shapes import ShapesDataset

__all__ = ["ImageFolderDataset", "ShapesDataset", "build_dataset"]


def build_dataset(spec: str, image_size: int, seed: int = 0, split: str = "train") -> Dataset:
    """``"shapes"`` gives :class:`ShapesDataset` (its default length, this seed and split);
    anything else is a path to an image folder, for which ``seed`` and ``split`` are
    ignored (a folder is one split). The word ``shapes`` wins over a folder of that name:
    write ``./shapes`` for the folder."""
    if spec == "shapes":
        return ShapesDataset(image_size=image_size, seed=seed, split=split)
    return ImageFolderDataset(spec, image_size)
