"""Datasets: the built-in procedural shapes (:mod:`.shapes`, which also has the batched
``render`` / ``sample_factors`` path and factor metadata), folders of image files
(:mod:`.folder`), .zip files of images (:mod:`.zip_dataset`), LMDBs in the DiffAE layout
(:mod:`.lmdb_dataset`, written by :mod:`.build_lmdb` / ``dbae data build-lmdb``) and
labels from CelebA-style attribute files (:mod:`.attributes`).

Every dataset's item is ``(image, label)`` with ``image`` float32 (3, S, S) in [-1, 1].
The file-backed ones open their files lazily, once per process, so they work with any
number of DataLoader workers (fork or spawn).
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from ..errors import DataError
from ..imageio import PathLike
from .attributes import AttributeDataset, AttributeTable, read_attribute_table, read_celeba_attributes
from .folder import ImageFolderDataset
from .lmdb_dataset import LMDBDataset, is_lmdb
from .shapes import ShapesDataset
from .zip_dataset import ZipImageDataset

__all__ = [
    "AttributeDataset",
    "AttributeTable",
    "ImageFolderDataset",
    "LMDBDataset",
    "ShapesDataset",
    "ZipImageDataset",
    "build_dataset",
    "dataset_kind",
    "read_attribute_table",
    "read_celeba_attributes",
]


def dataset_kind(spec: str) -> str:
    """What :func:`build_dataset` makes of ``spec``: ``"shapes"``, ``"lmdb"`` (a name
    ending in .lmdb, or a directory holding data.mdb), ``"zip"`` (a name ending in .zip)
    or ``"folder"`` (anything else)."""
    if spec == "shapes":
        return "shapes"
    if is_lmdb(spec):
        return "lmdb"
    if Path(spec).suffix.lower() == ".zip":
        return "zip"
    return "folder"


def build_dataset(
    spec: str,
    image_size: int,
    seed: int = 0,
    split: str = "train",
    *,
    attributes: PathLike | None = None,
) -> Dataset:
    """The dataset named by ``spec`` (see :func:`dataset_kind`).

    ``"shapes"`` gives :class:`ShapesDataset` (its default length, this seed and split);
    an LMDB gives :class:`LMDBDataset` (key format found from its keys), a .zip file
    :class:`ZipImageDataset`, anything else is a folder of images
    (:class:`ImageFolderDataset`). ``seed`` and ``split`` only apply to shapes: a
    folder, zip or LMDB is one split. The word ``shapes`` wins over a folder of that
    name: write ``./shapes`` for the folder.

    ``attributes``: a ``list_attr_celeba.txt``-style file; items then carry its 0/1
    labels instead of an empty label (:class:`AttributeDataset`).
    """
    kind = dataset_kind(spec)
    if kind == "shapes":
        if attributes is not None:
            raise DataError("the shapes dataset carries its own factors as labels; attribute files are for "
                            "folders, zip files and LMDBs")
        return ShapesDataset(image_size=image_size, seed=seed, split=split)
    if kind == "lmdb":
        dataset: Dataset = LMDBDataset(spec, image_size)
    elif kind == "zip":
        dataset = ZipImageDataset(spec, image_size)
    else:
        dataset = ImageFolderDataset(spec, image_size)
    return dataset if attributes is None else AttributeDataset(dataset, attributes)
