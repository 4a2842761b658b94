"""Reading and writing images: files <-> tensors in [-1, 1] of shape (3, H, W).

Every problem with an input file raises :class:`~dbae.errors.DataError` whose message
names the file and says what is wrong. Images are converted to RGB: grayscale is
replicated, palette images are expanded, and transparent images are composited over a
white background. Resizing (``resize_square``) scales the shorter side to the target
size with Pillow's antialiased bicubic filter and keeps the central square.

Every read has a pixel limit (width x height, default :data:`DEFAULT_MAX_IMAGE_PIXELS`,
64 megapixels): a larger image, or a file that claims to be one (a decompression bomb),
is a DataError before its pixels are decoded, never a warning and a full decode. The
limit is per process: :func:`set_max_image_pixels`, or ``--max-megapixels`` on the
command line.

Untrusted uploads (``dbae serve``) go through :func:`decode_reduced`: PNG, JPEG and WebP
only (by content), each decoded straight to 8 bits and reduced by a whole factor towards the
size it is needed at (JPEG at 1/2 to 1/8 scale while decoding), so that no decode holds more
than a few bytes per pixel of the file's image; it can be called off between blocks of input.

Writes (``save_image``, ``save_grid``) are atomic: the file is written next to its
destination under a temporary name and then renamed over it; parent folders are created.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import threading
import warnings
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from .errors import DataError

PathLike = Union[str, "os.PathLike[str]"]

#: extensions (lower case) recognised as images when scanning a folder; matching ignores case
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")

_WHITE = (255, 255, 255, 255)

#: the default pixel limit of an image read (64 megapixels: an 8000 x 8000 image, or a 48 MP
#: phone photo, passes; a 12000 x 12000 one does not)
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
_max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS
#: Pillow's limit is a module global: decodes hold this lock while they set it to ours
_DECODE_LOCK = threading.Lock()

#: the formats :func:`decode_reduced` opens (Pillow's names), and what the errors call them
WEB_FORMATS = ("PNG", "JPEG", "WEBP")
WEB_FORMAT_NAMES = "PNG, JPEG or WebP"
#: :func:`decode_reduced` keeps at least this many times the size asked for before resizing
REDUCE_MARGIN = 4
#: bytes of compressed input per decoder call in :func:`decode_reduced` (how soon a decode stops when called off)
DECODE_BLOCK = 8192
#: magic bytes of formats that are refused, for a message that names them
_OTHER_FORMATS = ((b"GIF8", "GIF"), (b"BM", "BMP"), (b"II*\0", "TIFF"), (b"MM\0*", "TIFF"), (b"\0\0\1\0", "ICO"),
                  (b"%!PS", "PostScript / EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"), (b"qoif", "QOI"), (b"8BPS", "PSD"),
                  (b"%PDF", "PDF"), (b"\x0a", "PCX"), (b"\xff\x4f\xff\x51", "JPEG 2000"),
                  (b"\0\0\0\x0cjP  ", "JPEG 2000"), (b"icns", "ICNS"), (b"DDS ", "DDS"))  # fmt: skip

#: the smallest side, in pixels, that :func:`save_grid` enlarges a grid's images to by default
MIN_GRID_CELL = 64


def file_in_the_way(path: PathLike) -> Path | None:
    """The file that stops ``path`` from being made: its nearest existing ancestor, when that
    is a file rather than a folder (None when the folders can be made)."""
    for parent in Path(path).parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def check_image_size(image_size: int) -> int:
    """Return ``image_size`` if it is a positive int, else raise DataError."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"image size must be a positive integer, got {image_size!r}")
    return image_size


def find_images(root: PathLike) -> list[Path]:
    """All image files under ``root`` (recursive), sorted by their path relative to root."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such directory")
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    paths = sorted(
        (p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not paths:
        looked_for = ", ".join(IMAGE_EXTENSIONS)
        raise DataError(
            f"{root}: no images found (looked recursively for {looked_for} files, any letter case)"
        )
    return paths


def open_rgb(path: PathLike, max_pixels: int | None = None) -> Image.Image:
    """Decode the whole file into an RGB image (EXIF orientation applied).

    Truncated files are an error: they are never loaded partially. So is an image of over
    ``max_pixels`` pixels (default: the process's limit, :func:`max_image_pixels`).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not an image file")
    return _decode_rgb(path, str(path), max_pixels)


def decode_rgb(data: bytes, name: str, max_pixels: int | None = None) -> Image.Image:
    """Decode encoded image bytes (a record of an LMDB or a member of a zip file) into
    an RGB image, like :func:`open_rgb`; errors name ``name`` (e.g. ``file.lmdb: record
    '128-00005'``)."""
    return _decode_rgb(io.BytesIO(data), name, max_pixels)


class DecodeAbandoned(Exception):
    """A :func:`decode_reduced` was called off (its ``cancel`` event was set)."""


class _Cancellable(io.BytesIO):
    """Bytes whose reads raise DecodeAbandoned once ``cancel`` is set."""

    def __init__(self, data: bytes, cancel: threading.Event | None) -> None:
        super().__init__(data)
        self.cancel = cancel

    def read(self, size: int | None = -1) -> bytes:
        if self.cancel is not None and self.cancel.is_set():
            raise DecodeAbandoned
        return super().read(size)


def sniff_format(data: bytes) -> str | None:
    """The name of a refused image format that ``data`` starts like (for an error message)."""
    if data[4:8] == b"ftyp":
        return "HEIF / AVIF" if data[8:12] in (b"heic", b"heix", b"mif1", b"avif", b"avis") else "MP4 / ISO media"
    return next((name for magic, name in _OTHER_FORMATS if data.startswith(magic)), None)


def decode_reduced(
    data: bytes,
    name: str,
    min_side: int,
    *,
    max_pixels: int | None = None,
    formats: Sequence[str] = WEB_FORMATS,
    cancel: threading.Event | None = None,
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode an untrusted image file's bytes into an RGB image whose shorter side is at least
    ``REDUCE_MARGIN * min_side`` pixels (or the file's own, when smaller): the pixels that a
    resize to ``min_side`` needs, in bounded memory and time; and the file's own size
    (width, height; EXIF orientation applied).

    Only ``formats`` are opened (by content, whatever the name; others are a DataError that
    says which formats are read). The pixel limit is checked from the header. A JPEG is
    decoded at 1/2, 1/4 or 1/8 scale (``draft``); any other image is reduced by a whole
    factor (box filter, in 8 bits) right after decoding, 16-bit greyscale converted to 8
    bits in integers first. At most about 5 bytes per pixel of the file's image are held
    (4 for RGBA), never a float copy. ``cancel``: set from another thread, the decode stops
    with DecodeAbandoned at its next block of input (:data:`DECODE_BLOCK` bytes).
    """
    limit = _max_image_pixels if max_pixels is None else max_pixels
    target = REDUCE_MARGIN * check_image_size(min_side)
    source = _Cancellable(data, cancel)
    try:
        with _DECODE_LOCK:  # (only while the header is read: Pillow's limit is a module global)
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                im = Image.open(source, formats=list(formats))
            finally:
                Image.MAX_IMAGE_PIXELS = saved
        with im:
            w, h = im.size
            if w * h > limit:
                raise _too_large(name, w * h, (w, h), limit)
            if im.format == "JPEG":
                im.draft(im.mode, (target, target))  # decode at the smallest DCT scale that keeps target
            im.decodermaxblock = DECODE_BLOCK
            im.load()
            out = _reduce_8bit(im, target, cancel)
        turned = ImageOps.exif_transpose(out)
        swapped = turned.size != out.size
        return _to_rgb(turned), ((h, w) if swapped else (w, h))
    except DecodeAbandoned:
        raise
    except Image.UnidentifiedImageError:
        other = sniff_format(data)
        if other:
            raise DataError(f"{name}: its format ({other}) is not read here; only PNG, JPEG and WebP images are") from None
        raise DataError(f"{name}: not a {WEB_FORMAT_NAMES} image (only those are read)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DataError(f"{name}: not a readable image ({exc})") from exc


def _reduce_8bit(im: Image.Image, target: int, cancel: threading.Event | None) -> Image.Image:
    """``im`` in an 8-bit mode, reduced by the largest whole factor that keeps its shorter side
    at least ``target`` (a copy; ``im`` itself when there is nothing to do)."""
    if im.mode == "I" or im.mode.startswith("I;16"):
        im = _sixteen_to_8bit(im)
    elif im.mode == "1":
        im = im.convert("L")
    elif im.mode in ("P", "PA"):  # (a palette cannot be averaged)
        im = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
    factor = min(im.size) // target
    if cancel is not None and cancel.is_set():
        raise DecodeAbandoned
    return im.reduce(factor) if factor > 1 else im


def _sixteen_to_8bit(im: Image.Image, rows: int = 256) -> Image.Image:
    """16-bit greyscale (or 32-bit "I") as 8-bit "L": round(v / 257) clipped to 0..255, in
    integers, a band of rows at a time (no full-size copy beside the 8-bit result)."""
    w, h = im.size
    out = np.empty((h, w), dtype=np.uint8)
    for r in range(0, h, rows):
        block = np.asarray(im.crop((0, r, w, min(h, r + rows)))).astype(np.int64)
        out[r:r + rows] = ((2 * block + 257) // 514).clip(0, 255)  # round(v / 257): v / 257 is never k + 1/2
    return Image.fromarray(out)


def max_image_pixels() -> int:
    """The pixel limit (width x height) of every image read in this process."""
    return _max_image_pixels


def set_max_image_pixels(pixels: int) -> None:
    """Set the pixel limit of every image read in this process (``--max-megapixels``)."""
    global _max_image_pixels
    if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels < 1:
        raise DataError(f"the image pixel limit must be a positive number of pixels, got {pixels!r}")
    _max_image_pixels = pixels


def _too_large(name: str, pixels: int, size: tuple[int, int] | None, limit: int) -> DataError:
    shape = f"{size[0]}x{size[1]} pixels, " if size else ""
    return DataError(
        f"{name}: image is {shape}{pixels / 1e6:.1f} megapixels, over the limit of "
        f"{limit / 1e6:g} megapixels (a decompression bomb, or a larger image than expected); "
        "if the file is trusted, raise the limit with --max-megapixels"
    )


def _decode_rgb(source, name: str, max_pixels: int | None) -> Image.Image:
    limit = _max_image_pixels if max_pixels is None else max_pixels
    with _DECODE_LOCK, warnings.catch_warnings():
        # Opening reads the header only: its size is checked here. While decoding, Pillow's own
        # guard (frames of animations, icons) runs at our limit, its warning an error.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            with Image.open(source) as im:
                w, h = im.size
                if w * h > limit:
                    raise _too_large(name, w * h, (w, h), limit)
                Image.MAX_IMAGE_PIXELS = limit
                im.load()
                return _to_rgb(ImageOps.exif_transpose(im))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            pixels = re.search(r"\((\d+) pixels\)", str(exc))
            raise _too_large(name, int(pixels.group(1)) if pixels else limit + 1, None, limit) from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise DataError(f"{name}: not a readable image ({exc})") from exc
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "I" or im.mode.startswith("I;16"):  # 16-bit grayscale
        im = _sixteen_to_8bit(im)
    if im.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info:
        background = Image.new("RGBA", im.size, _WHITE)
        return Image.alpha_composite(background, im.convert("RGBA")).convert("RGB")
    return im.convert("RGB")


def resize_square(im: Image.Image, image_size: int, center_crop: bool = True) -> Image.Image:
    """Resize to ``image_size`` x ``image_size``.

    With ``center_crop`` the shorter side is scaled to ``image_size`` and the central
    square kept (aspect ratio preserved); without it the whole image is scaled to a
    square (aspect ratio not preserved). Cropping and resampling happen in one
    antialiased bicubic resize, so there is no intermediate rounding.
    """
    w, h = im.size
    if center_crop:
        side = min(w, h)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    else:
        box = (0, 0, w, h)
    return im.resize((image_size, image_size), Image.Resampling.BICUBIC, box=box)


def pil_to_tensor(im: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) in [-1, 1]."""
    array = np.array(im, dtype=np.uint8)  # a writable copy
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def load_image(
    path: PathLike,
    image_size: int | None = None,
    *,
    exact_size: bool = False,
    center_crop: bool = True,
    max_pixels: int | None = None,
) -> torch.Tensor:
    """Load one image as a float32 tensor (3, H, W) in [-1, 1].

    ``image_size=None`` keeps the file's size. Otherwise the image is resized to
    ``image_size`` squared (see :func:`resize_square`), unless ``exact_size`` is set: then
    a file of any other size raises DataError instead. ``max_pixels``: see :func:`open_rgb`.
    """
    im = open_rgb(path, max_pixels)
    if image_size is None:
        if exact_size:
            raise ValueError("exact_size=True needs an image_size")
        return pil_to_tensor(im)
    check_image_size(image_size)
    if exact_size:
        if im.size != (image_size, image_size):
            w, h = im.size
            raise DataError(f"{path}: image is {w}x{h} pixels, expected {image_size}x{image_size}")
        return pil_to_tensor(im)
    return pil_to_tensor(resize_square(im, image_size, center_crop))


def load_images(
    source: PathLike | Iterable[PathLike],
    image_size: int | None = None,
    *,
    exact_size: bool = False,
    center_crop: bool = True,
) -> torch.Tensor:
    """Load a folder (recursive, see :func:`find_images`), one file, or a list of files
    as a float32 batch (B, 3, H, W) in [-1, 1]. Without ``image_size`` all images must
    already share one size."""
    if isinstance(source, (str, os.PathLike)):
        paths = find_images(source) if Path(source).is_dir() else [Path(source)]
    else:
        paths = [Path(p) for p in source]
    if not paths:
        raise DataError("no image files given")
    images = [
        load_image(p, image_size, exact_size=exact_size, center_crop=center_crop) for p in paths
    ]
    for path, image in zip(paths, images):
        if image.shape != images[0].shape:
            raise DataError(
                f"{path}: image is {_size_text(image)} pixels but {paths[0]} is "
                f"{_size_text(images[0])}; give an image size to resize them all to one size"
            )
    return torch.stack(images)


def _size_text(image: torch.Tensor) -> str:
    return f"{image.shape[-1]}x{image.shape[-2]}"


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Tensor (..., C, H, W) in [-1, 1] (clamped) -> uint8 numpy array (..., H, W, C)."""
    x = x.detach().float().clamp(-1.0, 1.0).add(1.0).mul(127.5).round()
    return x.to(torch.uint8).movedim(-3, -1).cpu().numpy()


def _to_pil(x: torch.Tensor) -> Image.Image:
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"expected an image tensor (1 or 3, H, W), got shape {tuple(x.shape)}")
    array = to_uint8(x)
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).convert("RGB")


def save_image(path: PathLike, x: torch.Tensor) -> None:
    """Write one image tensor (C, H, W) in [-1, 1] (clamped); format from the extension."""
    _save_atomic(_to_pil(x), Path(path))


def grid_zoom(height: int, width: int) -> int:
    """The default enlargement of a grid's ``height`` x ``width`` images: the smallest
    whole factor that makes their longer side at least :data:`MIN_GRID_CELL` pixels."""
    return max(1, -(-MIN_GRID_CELL // max(height, width)))


def save_grid(
    path: PathLike,
    rows: Sequence[torch.Tensor],
    row_labels: Sequence[str] | None = None,
    padding: int = 2,
    zoom: int | None = None,
) -> None:
    """Write a grid with one row per batch (B_i, C, H, W) in [-1, 1] (values clamped, so
    endpoints x_T outside [-1, 1] are shown saturated). Optional labels are drawn left of
    each row with Pillow's default font. The background and padding are white.

    Every image is enlarged ``zoom`` times with nearest-neighbour pixels; the default
    (None) is :func:`grid_zoom`: small images (a 16x16 model's) grow to at least
    :data:`MIN_GRID_CELL` pixels a side, 64 pixels and more stay 1x. ``zoom=1`` keeps 1x.

    Size: width = padding + label_width + max_i(B_i) * (zoom * W + padding), height =
    padding + len(rows) * (zoom * H + padding), where label_width is 0 without labels and
    the widest label plus ``padding`` with them.
    """
    if not rows:
        raise ValueError("save_grid needs at least one row")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"got {len(row_labels)} row labels for {len(rows)} rows")
    height, width = rows[0].shape[-2:]
    for row in rows:
        if row.ndim != 4 or row.shape[-2:] != (height, width):
            raise ValueError(
                f"every row must be a batch (B, C, {height}, {width}); got shape {tuple(row.shape)}"
            )
    zoom = grid_zoom(height, width) if zoom is None else zoom
    if isinstance(zoom, bool) or not isinstance(zoom, int) or zoom < 1:
        raise ValueError(f"zoom must be a positive integer, got {zoom!r}")
    height, width = height * zoom, width * zoom

    font = ImageFont.load_default()
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [scratch.textbbox((0, 0), label, font=font) for label in row_labels or ()]
    label_width = max(right - left for left, _, right, _ in boxes) + padding if boxes else 0

    columns = max(row.shape[0] for row in rows)
    grid_size = (
        padding + label_width + columns * (width + padding),
        padding + len(rows) * (height + padding),
    )
    grid = Image.new("RGB", grid_size, _WHITE[:3])
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        top = padding + r * (height + padding)
        if boxes:
            left, upper, _, lower = boxes[r]
            text_top = top + (height - (lower - upper)) // 2 - upper
            draw.text((padding - left, text_top), row_labels[r], fill=(0, 0, 0), font=font)
        for c, image in enumerate(row):
            tile = _to_pil(image)
            if zoom > 1:
                tile = tile.resize((width, height), Image.Resampling.NEAREST)
            grid.paste(tile, (padding + label_width + c * (width + padding), top))
    _save_atomic(grid, Path(path))


def _save_atomic(im: Image.Image, path: Path) -> None:
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        raise DataError(f"{path}: cannot save an image with extension {path.suffix!r} (use .png)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_then_rename(im, path, image_format)
    except OSError as exc:
        raise DataError(f"{path}: cannot write the image ({exc})") from exc


def _write_then_rename(im: Image.Image, path: Path, image_format: str) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        im.save(tmp, format=image_format)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
