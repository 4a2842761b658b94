"""CelebA-style attribute files and datasets whose labels come from one.

The ``list_attr_celeba.txt`` format (also used by CelebAMask-HQ's attribute file)::

    202599
    5_o_Clock_Shadow Arched_Eyebrows ... Young
    000001.jpg -1  1  1 -1 ...
    000002.jpg -1 -1 -1  1 ...

Line 1 is the number of images, line 2 the attribute names, then one row per image: a
file name and one value per attribute, -1/1 (0/1 is accepted too; 1 means present).
Labels are float32 0/1 tensors with one entry per attribute, in the file's order.

:class:`AttributeDataset` wraps an image dataset (folder, zip or LMDB) so that item ``i``
is ``(image, labels)``. Items are matched to rows by name (see :func:`match_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Sequence

import torch
from torch.utils.data import Dataset

from ..errors import DataError
from ..imageio import PathLike


#: CelebA's 40 binary attributes in the order of ``list_attr_celeba.txt`` (the columns of the
#: attribute classifiers trained on CelebA / CelebA-HQ, e.g. the DBAE authors' ``best.pt``)
CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin",
    "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open",
    "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)


@dataclass(frozen=True)
class AttributeTable:
    """A parsed attribute file: row ``r`` is image ``files[r]`` with labels
    ``values[r]`` (float32 0/1, one column per entry of ``names``)."""

    path: Path
    files: tuple[str, ...]
    names: tuple[str, ...]
    values: torch.Tensor  # (n, k) float32, 0/1

    def __len__(self) -> int:
        return len(self.files)

    @cached_property
    def mapping(self) -> dict[str, torch.Tensor]:
        """``{file name: labels (k,) float32 0/1}``."""
        return {f: self.values[r] for r, f in enumerate(self.files)}


def read_attribute_table(path: PathLike, limit: int | None = None) -> AttributeTable:
    """Parse a ``list_attr_celeba.txt``-style file (see the module docstring).
    ``limit``: read only the first rows. Every problem raises DataError naming the file
    (and the line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"attribute file {path} does not exist")
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read attribute file {path} ({exc})") from None
    if len(lines) < 3:
        raise DataError(f"{path}: expected a count line, a line of attribute names and at least one image row")
    try:
        count = int(lines[0].split()[0])
    except ValueError:
        raise DataError(f"{path}: line 1 should be the number of images, got {lines[0][:60]!r}") from None
    names = tuple(lines[1].split())
    if len(set(names)) != len(names):
        raise DataError(f"{path}: attribute names repeat on line 2")
    rows = lines[2:]
    if len(rows) != count:
        raise DataError(f"{path}: line 1 announces {count} images but {len(rows)} rows follow")
    if limit is not None:
        rows = rows[:limit]
    files, values = [], []
    for lineno, row in enumerate(rows, start=3):
        parts = row.split()
        if len(parts) != len(names) + 1:
            raise DataError(f"{path}:{lineno}: expected a file name and {len(names)} values, got {len(parts)} fields")
        try:
            vals = [int(v) for v in parts[1:]]
        except ValueError:
            raise DataError(f"{path}:{lineno}: attribute values must be -1/1 or 0/1 integers") from None
        if any(v not in (-1, 0, 1) for v in vals):
            raise DataError(f"{path}:{lineno}: attribute values must be -1/1 or 0/1")
        files.append(parts[0])
        values.append([1.0 if v == 1 else 0.0 for v in vals])
    return AttributeTable(path, tuple(files), names, torch.tensor(values, dtype=torch.float32))


def read_celeba_attributes(path: PathLike) -> tuple[tuple[str, ...], dict[str, torch.Tensor]]:
    """``(attribute names, {file name: labels (k,) float32 0/1})`` of an attribute file."""
    table = read_attribute_table(path)
    return table.names, table.mapping


def match_rows(item_names: Sequence[str] | None, count: int, table: AttributeTable, what: str) -> list[int]:
    """Row of ``table`` for each of ``count`` dataset items.

    An item name (a path relative to the folder, a zip member, or a name stored in the
    LMDB) matches the row with the same path, else the same file name, else the same
    file name without extension (CelebA lists ``000001.jpg``; a folder of ``000001.png``
    files matches). Items without names (an LMDB written by another tool) match rows by
    position, which needs as many rows as items. Items may be a subset of the rows; an
    item without a row is an error that names it. ``what`` names the dataset in errors.
    """
    if item_names is None:
        if len(table) != count:
            raise DataError(
                f"{what} does not store image names, so its {count} images are matched to the rows of "
                f"{table.path} by position, but that file has {len(table)} rows"
            )
        return list(range(count))
    exact = {f: r for r, f in enumerate(table.files)}
    by_name = _unique_index(PurePosixPath(f).name for f in table.files)
    by_stem = _unique_index(PurePosixPath(f).stem for f in table.files)
    rows, missing = [], []
    for name in item_names:
        p = PurePosixPath(name)
        r = exact.get(name, by_name.get(p.name, by_stem.get(p.stem)))
        if r is None:
            missing.append(name)
        rows.append(r)
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise DataError(f"{len(missing)} image(s) of {what} have no row in {table.path}: "
                        f"{', '.join(missing[:3])}{more}")
    return rows


def _unique_index(keys) -> dict[str, int]:
    index: dict[str, int] = {}
    repeated: set[str] = set()
    for r, key in enumerate(keys):
        if key in index:
            repeated.add(key)
        index[key] = r
    for key in repeated:  # ambiguous: match only by the full path
        del index[key]
    return index


class AttributeDataset(Dataset):
    """``dataset`` (items ``(image, _)``) with labels from an attribute file: item ``i``
    is ``(image, labels)``, labels float32 (k,) 0/1 in the order of ``names``.

    ``dataset`` should have an ``item_names`` attribute (a list of names, or None for
    position matching); see :func:`match_rows`."""

    def __init__(self, dataset: Dataset, table: AttributeTable | PathLike):
        self.dataset = dataset
        self.table = table if isinstance(table, AttributeTable) else read_attribute_table(table)
        self.names = self.table.names
        what = str(getattr(dataset, "source", type(dataset).__name__))
        rows = match_rows(getattr(dataset, "item_names", None), len(dataset), self.table, what)
        self.labels = self.table.values[rows]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, _ = self.dataset[i]
        return image, self.labels[i]
