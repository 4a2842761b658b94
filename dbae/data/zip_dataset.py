"""A dataset over the image files inside a .zip archive."""

from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch.utils.data import Dataset

from ..errors import DataError
from ..imageio import (
    IMAGE_EXTENSIONS,
    PathLike,
    check_image_size,
    decode_rgb,
    max_image_pixels,
    pil_to_tensor,
    resize_square,
)


def zip_image_names(archive: zipfile.ZipFile, where: str) -> list[str]:
    """Sorted names of the .png/.jpg/.jpeg/.webp members (any letter case), leaving out
    directories and macOS resource forks (``__MACOSX/``, ``._*``)."""
    names = sorted(
        info.filename
        for info in archive.infolist()
        if not info.is_dir()
        and PurePosixPath(info.filename).suffix.lower() in IMAGE_EXTENSIONS
        and not info.filename.startswith("__MACOSX/")
        and not PurePosixPath(info.filename).name.startswith("._")
    )
    if not names:
        raise DataError(f"{where}: no images found in the zip file (looked for {', '.join(IMAGE_EXTENSIONS)} "
                        "files, any letter case)")
    return names


def open_zip(path: Path) -> zipfile.ZipFile:
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a zip file")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{path}: not a readable zip file ({exc})") from None


class ZipImageDataset(Dataset):
    """Every image member of the zip file ``path`` (see :func:`zip_image_names`), in
    sorted order of the member names (``item_names``).

    Items are ``(image, label)`` exactly like :class:`~dbae.data.ImageFolderDataset`:
    float32 (3, S, S) in [-1, 1] and an empty float32 label (0,). The archive is opened
    lazily, once per process (DataLoader workers open their own: a shared file handle
    would interleave reads). A corrupt member raises DataError naming it.
    """

    def __init__(self, path: PathLike, image_size: int, center_crop: bool = True):
        self.path = self.source = Path(path)
        self.image_size = check_image_size(image_size)
        self.center_crop = center_crop
        self.max_pixels = max_image_pixels()  # the limit of the process that made it (workers may be spawned)
        self._zip: zipfile.ZipFile | None = None
        self._pid: int | None = None
        self.item_names = zip_image_names(self._open(), str(self.path))

    def _open(self) -> zipfile.ZipFile:
        if self._zip is None or self._pid != os.getpid():
            self._zip, self._pid = open_zip(self.path), os.getpid()
        return self._zip

    def close(self) -> None:
        """Close this process's handle (it reopens on the next access)."""
        if self._zip is not None and self._pid == os.getpid():
            self._zip.close()
        self._zip = self._pid = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_zip"] = state["_pid"] = None
        return state

    def __len__(self) -> int:
        return len(self.item_names)

    def read_bytes(self, index: int) -> bytes:
        name = self.item_names[index]
        try:
            return self._open().read(name)
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as exc:  # bad CRC, truncated, ...
            raise DataError(f"{self.path}: member {name!r} cannot be read ({exc})") from None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        im = decode_rgb(self.read_bytes(index), f"{self.path}: member {self.item_names[index]!r}", self.max_pixels)
        return pil_to_tensor(resize_square(im, self.image_size, self.center_crop)), torch.empty(0)
