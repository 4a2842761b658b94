"""A dataset over a folder of image files (see :mod:`dbae.imageio` for decoding rules)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..imageio import PathLike, check_image_size, find_images, load_image, max_image_pixels


class ImageFolderDataset(Dataset):
    """Every .png/.jpg/.jpeg/.webp file under ``root`` (recursive, extensions in any
    letter case), in sorted order of the path relative to ``root``.

    Item ``i`` is ``(image, label)``: ``image`` is float32 (3, S, S) in [-1, 1], resized
    with :func:`dbae.imageio.resize_square` (shorter side to S then centre crop, or a plain
    squash to S x S with ``center_crop=False``); ``label`` is an empty float32 tensor of
    shape (0,) because a folder carries no known factors (batches collate to (B, 0)). The
    file of item ``i`` is ``paths[i]`` (``item_names[i]`` relative to ``root``). Files are
    decoded on access, so a corrupt file raises :class:`~dbae.errors.DataError` naming it
    when it is first read.
    """

    def __init__(self, root: PathLike, image_size: int, center_crop: bool = True):
        self.root = Path(root)
        self.image_size = check_image_size(image_size)
        self.center_crop = center_crop
        self.max_pixels = max_image_pixels()  # the limit of the process that made it (workers may be spawned)
        self.paths = find_images(self.root)
        self.source = self.root

    @property
    def item_names(self) -> list[str]:
        """The path of each item relative to ``root``, with ``/`` separators."""
        return [p.relative_to(self.root).as_posix() for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = load_image(self.paths[i], self.image_size, center_crop=self.center_crop, max_pixels=self.max_pixels)
        return image, torch.empty(0)
