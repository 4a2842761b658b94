"""Convert a folder (or a .zip) of images into an LMDB in the DiffAE layout.

Every image is centre-cropped to a square and resized to ``size`` x ``size`` (the
shorter side is scaled to ``size`` with antialiased bicubic resampling, then the central
square kept: what DiffAE's preparation scripts do), encoded (JPEG, WEBP or PNG) and
stored under ``{size}-{index:05d}``; ``length`` holds the count as ASCII digits and
``names`` a JSON list of the source file names (sorted, like
:class:`~dbae.data.ImageFolderDataset`). Read it with :class:`~dbae.data.LMDBDataset`,
or with DiffAE's own ``BaseLMDB(path, size, zfill=5)``.

The LMDB is written under a temporary name beside ``out`` and renamed at the end, so
``out`` is never half-written: a failure (an unreadable source image, Ctrl-C) leaves
nothing behind.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import DataError
from ..imageio import (
    PathLike,
    check_image_size,
    decode_rgb,
    file_in_the_way,
    find_images,
    max_image_pixels,
    open_rgb,
    resize_square,
)
from .lmdb_dataset import INDEX_KEY, LENGTH_KEY, NAMES_KEY, import_lmdb
from .zip_dataset import open_zip, zip_image_names

FORMATS = ("jpeg", "webp", "png")
DEFAULT_KEY_FORMAT = "{size}-{index:05d}"
_BATCH = 256  # images per write transaction
_INITIAL_MAP_SIZE = 1 << 30  # grows by doubling when full


@dataclass(frozen=True)
class BuildReport:
    out: Path
    count: int
    size: int
    image_format: str
    key_format: str  # for reading back, e.g. "128-{index:05d}"
    nbytes: int  # encoded image bytes in total


class _Encoder:
    """Reads source image ``index``, resizes and encodes it (picklable, for worker
    processes; a zip source is reopened once per process)."""

    def __init__(self, source: Path, names: list[str], is_zip: bool, size: int, center_crop: bool,
                 save_args: dict[str, Any]):
        self.source, self.names, self.is_zip = source, names, is_zip
        self.size, self.center_crop, self.save_args = size, center_crop, save_args
        self.max_pixels = max_image_pixels()  # the limit of the process that made it (workers may be spawned)
        self._zip: Any = None
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_zip": None, "_pid": None}

    def __call__(self, index: int) -> bytes:
        name = self.names[index]
        if self.is_zip:
            if self._zip is None or self._pid != os.getpid():
                self._zip, self._pid = open_zip(self.source), os.getpid()
            try:
                data = self._zip.read(name)
            except Exception as exc:  # bad CRC, truncated member, ...
                raise DataError(f"{self.source}: member {name!r} cannot be read ({exc})") from None
            im = decode_rgb(data, f"{self.source}: member {name!r}", self.max_pixels)
        else:
            im = open_rgb(self.source / name, self.max_pixels)
        im = resize_square(im, self.size, self.center_crop)
        buffer = io.BytesIO()
        im.save(buffer, **self.save_args)
        return buffer.getvalue()


_WORKER_ENCODER: _Encoder | None = None


def _init_worker(encoder: _Encoder) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = encoder


def _encode_in_worker(index: int) -> bytes:
    assert _WORKER_ENCODER is not None
    return _WORKER_ENCODER(index)


def save_arguments(image_format: str, quality: int, lossless: bool) -> dict[str, Any]:
    """Pillow ``save`` arguments of an output format (DataError for bad combinations)."""
    if image_format not in FORMATS:
        raise DataError(f"unknown image format {image_format!r}; use one of {', '.join(FORMATS)}")
    if not 1 <= quality <= 100:
        raise DataError(f"quality must lie in 1..100, got {quality}")
    if image_format == "jpeg":
        if lossless:
            raise DataError("JPEG cannot be lossless; use --format png or --format webp --lossless")
        return {"format": "JPEG", "quality": quality, "subsampling": 0}  # 4:4:4, full colour resolution
    if image_format == "webp":
        return {"format": "WEBP", "quality": quality, "lossless": lossless, "method": 4}
    return {"format": "PNG"}  # always lossless


def check_key_format(key_format: str, size: int) -> str:
    """The read-back key format (``{size}`` filled in), checked to give DiffAE-style
    keys ``{prefix}-{zero-padded index}``."""
    try:
        resolved = key_format.replace("{size}", str(size))
        first, later = resolved.format(index=0), resolved.format(index=12)
    except (KeyError, IndexError, ValueError) as exc:
        raise DataError(f"bad key format {key_format!r} ({exc}); write it like {DEFAULT_KEY_FORMAT!r}") from None
    ok = all(INDEX_KEY.match(k.encode()) for k in (first, later))
    if not ok or first == later or set(first.rsplit("-", 1)[1]) != {"0"}:
        raise DataError(f"key format {key_format!r} gives keys {first!r}, {later!r}; keys must look like "
                        "'128-00000' (a prefix without '-', a '-', then the zero-padded index)")
    return resolved


def _source_names(src: Path) -> tuple[list[str], bool]:
    if src.is_file() and src.suffix.lower() == ".zip":
        with open_zip(src) as archive:
            return zip_image_names(archive, str(src)), True
    if src.exists() and not src.is_dir():
        raise DataError(f"{src}: not a directory (the source must be a folder of images or a .zip file)")
    return [p.relative_to(src).as_posix() for p in find_images(src)], False


#: the magic number of an LMDB meta page (little-endian uint32), 16 bytes (12 on 32-bit builds) into the file
_LMDB_MAGIC = (0xBEEFC0DE).to_bytes(4, "little")


def _is_lmdb_file(path: Path) -> bool:
    """Whether ``path`` is an LMDB data file (its first meta page carries LMDB's magic number)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(32)
    except OSError:
        return False
    return _LMDB_MAGIC in (head[16:20], head[12:16])


def _replaceable(out: Path) -> bool:
    """Whether an existing ``out`` looks like an LMDB that --overwrite may delete."""
    if out.is_file():
        return _is_lmdb_file(out)
    if out.is_dir():
        entries = {p.name for p in out.iterdir()}
        return "data.mdb" in entries and entries <= {"data.mdb", "lock.mdb"}
    return False


def build_lmdb(
    src: PathLike,
    out: PathLike,
    size: int,
    *,
    image_format: str = "jpeg",
    quality: int = 95,
    lossless: bool = False,
    center_crop: bool = True,
    key_format: str = DEFAULT_KEY_FORMAT,
    overwrite: bool = False,
    progress: bool = True,
    workers: int = 1,
) -> BuildReport:
    """Write the images of ``src`` (a folder, searched recursively, or a .zip file) to
    the LMDB directory ``out`` (see the module docstring). ``key_format`` may use
    ``{size}`` and must use ``{index}`` (DBAE's CelebA layout: ``"None-{index:07d}"``).
    ``workers`` > 1 decodes and encodes in that many processes. An existing ``out`` is
    an error unless ``overwrite`` (and then it must be an LMDB, never another folder)."""
    src, out = Path(src), Path(out)
    size = check_image_size(size)
    save_args = save_arguments(image_format, quality, lossless)
    resolved_format = check_key_format(key_format, size)
    if workers < 1:
        raise DataError(f"workers must be at least 1, got {workers}")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise DataError(f"{out} already exists; pass --overwrite to replace it")
        if not _replaceable(out):
            raise DataError(f"{out} exists and is not an LMDB (a directory holding only data.mdb, or one LMDB "
                            "file); refusing to replace it")
    blocking = file_in_the_way(out)
    if blocking is not None:
        raise DataError(f"{out}: {blocking} is a file, not a folder; choose another output path")
    if not src.exists():
        raise DataError(f"{src}: no such directory")
    names, is_zip = _source_names(src)
    lmdb = import_lmdb()

    encoder = _Encoder(src, names, is_zip, size, center_crop, save_args)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.tmp")
    env = None
    nbytes = 0
    try:
        env = lmdb.open(str(tmp), map_size=_INITIAL_MAP_SIZE, subdir=True, lock=False, readahead=False,
                        meminit=False, map_async=True, sync=False)
        with _encoded(encoder, len(names), workers) as stream, _progress(len(names), progress) as bar:
            batch: list[tuple[bytes, bytes]] = []
            for index, data in enumerate(stream):
                batch.append((resolved_format.format(index=index).encode(), data))
                nbytes += len(data)
                if len(batch) == _BATCH:
                    _put_all(env, lmdb, batch)
                    bar.update(len(batch))
                    batch = []
            if batch:
                _put_all(env, lmdb, batch)
                bar.update(len(batch))
        _put_all(env, lmdb, [(LENGTH_KEY, str(len(names)).encode("ascii")),
                             (NAMES_KEY, json.dumps(names).encode("utf-8"))])
        env.sync(True)
        env.close()
        env = None
        _move_into_place(tmp, out)
    except BaseException:
        if env is not None:
            env.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return BuildReport(out, len(names), size, image_format, resolved_format, nbytes)


class _encoded:
    """Context manager: the encoded images in index order, made here or by a pool."""

    def __init__(self, encoder: _Encoder, count: int, workers: int):
        self.encoder, self.count, self.workers = encoder, count, workers
        self.pool: Any = None

    def __enter__(self) -> Iterator[bytes]:
        if self.workers == 1 or self.count < 2:
            return map(self.encoder, range(self.count))
        self.pool = multiprocessing.get_context().Pool(
            min(self.workers, self.count), initializer=_init_worker, initargs=(self.encoder,))
        chunk = max(1, min(64, self.count // (4 * self.workers)))
        return self.pool.imap(_encode_in_worker, range(self.count), chunksize=chunk)

    def __exit__(self, *exc: Any) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _progress(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="build-lmdb", unit="img", disable=not enabled, dynamic_ncols=True)


def _put_all(env: Any, lmdb: Any, items: list[tuple[bytes, bytes]]) -> None:
    """Write ``items`` in one transaction, growing the map (doubling) when it is full."""
    while True:
        try:
            with env.begin(write=True) as txn:
                for key, value in items:
                    txn.put(key, value)
            return
        except lmdb.MapFullError:
            env.set_mapsize(env.info()["map_size"] * 2)


def _move_into_place(tmp: Path, out: Path) -> None:
    old: Path | None = None
    if out.exists() or out.is_symlink():  # --overwrite (checked by the caller)
        old = out.with_name(f".{out.name}.{secrets.token_hex(4)}.old")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError as exc:
        if old is not None:
            os.replace(old, out)
        raise DataError(f"{out}: cannot move the finished LMDB into place ({exc})") from None
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def describe(report: BuildReport) -> str:
    """One line about a finished build."""
    mib = report.nbytes / 2**20
    return (f"{report.count} images of {report.size}x{report.size} ({report.image_format}, {mib:.1f} MiB) "
            f"-> {report.out} (keys {report.key_format.format(index=0)} .. "
            f"{report.key_format.format(index=report.count - 1)}, 'length' = {report.count})")

