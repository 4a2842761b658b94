"""Images stored in an LMDB, in the layout of DiffAE and the official DBAE code.

Layout (one LMDB environment: a directory holding ``data.mdb``, or a single file):

- ``length``: the number of images, as ASCII digits (``b"70000"``);
- ``{prefix}-{index}``: the encoded image (JPEG, WEBP, PNG, ...) of item ``index``, the
  index zero-padded to a fixed width. DiffAE writes ``128-00000`` (prefix: the stored
  resolution, width 5); the official DBAE CelebA LMDB has ``None-0000000`` (width 7).
  One LMDB may hold several prefixes (one per resolution);
- ``names`` (optional; written by ``dbae data build-lmdb``): a JSON list with the source
  file name of each item, used to match rows of an attribute file.

The key format is found by looking at the keys (one seek per prefix), or given
explicitly as a format string such as ``"256-{index:05d}"``. With several prefixes the
automatic choice is the one equal to the requested image size, else the smallest larger
resolution, else the largest one.

The environment is opened read-only, without a lock file and without read-ahead, lazily
and once per process (shared by the datasets of that process; LMDB allows no more): a
DataLoader worker, forked or spawned, opens its own on first access and never uses its
parent's.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..errors import DataError
from ..imageio import PathLike, check_image_size, decode_rgb, max_image_pixels, pil_to_tensor, resize_square

LENGTH_KEY = b"length"
NAMES_KEY = b"names"
INDEX_KEY = re.compile(rb"^([^-]+)-(\d+)$")  # "{prefix}-{digits}"


def import_lmdb() -> Any:
    """The ``lmdb`` module, or DataError saying how to install it."""
    try:
        import lmdb
    except ImportError:
        raise DataError("LMDB datasets need the lmdb package: pip install lmdb "
                        "(or pip install 'dbae[lmdb]')") from None
    return lmdb


def is_lmdb(path: PathLike) -> bool:
    """Whether ``path`` names an LMDB: a name ending in ``.lmdb`` (file or directory,
    existing or not) or a directory holding ``data.mdb``."""
    path = Path(path)
    return path.suffix.lower() == ".lmdb" or (path.is_dir() and (path / "data.mdb").is_file())


def key_format_for(prefix: str, width: int) -> str:
    """The key format string of keys ``{prefix}-{index zero-padded to width}``."""
    return f"{prefix}-{{index:0{width}d}}"


def open_env(path: Path) -> Any:
    """Open the LMDB at ``path`` read-only, lock-free and without read-ahead (a new
    environment; most callers want :func:`shared_env`)."""
    lmdb = import_lmdb()
    if not path.exists():
        raise DataError(f"{path}: no such LMDB")
    subdir = path.is_dir()
    if subdir and not (path / "data.mdb").is_file():
        raise DataError(f"{path}: not an LMDB (a directory without data.mdb)")
    try:
        return lmdb.open(str(path), subdir=subdir, readonly=True, lock=False, readahead=False,
                         meminit=False, max_readers=2048)
    except lmdb.Error as exc:
        raise DataError(f"{path}: cannot open the LMDB ({exc})") from None


# LMDB allows one environment per file and process (py-lmdb refuses a second open), so
# the datasets of one process share it: {resolved path: (file identity, pid, env)}. An
# entry inherited through fork() belongs to the parent: the child closes its copy (only
# its own mapping and descriptors: with lock=False there are no locks) and opens anew.
_ENVS: dict[str, tuple[tuple[int, int] | None, int, Any]] = {}


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = (path / "data.mdb" if path.is_dir() else path).stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def shared_env(path: Path, *, refresh: bool = False) -> Any:
    """This process's read-only environment of the LMDB at ``path``, opened on first
    use. ``refresh``: reopen if the files at ``path`` were replaced since."""
    key = os.path.realpath(path)
    pid = os.getpid()
    entry = _ENVS.get(key)
    if entry is not None:
        ident, owner, env = entry
        if owner == pid and not (refresh and ident != _identity(path)):
            return env
        del _ENVS[key]
        env.close()
    env = open_env(path)
    _ENVS[key] = (_identity(path), pid, env)
    return env


def close_envs() -> None:
    """Close this process's LMDB environments (they reopen on the next access)."""
    for key, (_, owner, env) in list(_ENVS.items()):
        if owner == os.getpid():
            del _ENVS[key]
            env.close()


class LMDBDataset(Dataset):
    """Images of an LMDB in the DiffAE layout (see the module docstring).

    Item ``i`` is ``(image, label)`` exactly like :class:`~dbae.data.ImageFolderDataset`:
    ``image`` float32 (3, S, S) in [-1, 1], resized with
    :func:`dbae.imageio.resize_square` (no-op when the record is already S x S), and an
    empty float32 label of shape (0,). ``key_format``: e.g. ``"256-{index:05d}"``; None
    finds it from the keys. A missing or malformed ``length`` key, a missing record or an
    undecodable one raise DataError naming the LMDB and the key.
    """

    def __init__(self, path: PathLike, image_size: int, center_crop: bool = True,
                 key_format: str | None = None):
        self.path = self.source = Path(path)
        self.image_size = check_image_size(image_size)
        self.center_crop = center_crop
        self.max_pixels = max_image_pixels()  # the limit of the process that made it (workers may be spawned)
        with shared_env(self.path, refresh=True).begin(buffers=False) as txn:
            self.length = self._read_length(txn)
            self.key_format = key_format or self._detect_key_format(txn)
            self._check_format(txn)
            self.item_names = self._read_names(txn)

    # ----- layout -----
    def _read_length(self, txn: Any) -> int:
        raw = txn.get(LENGTH_KEY)
        if raw is None:
            raise DataError(f"{self.path}: no 'length' key; an LMDB dataset needs key 'length' holding the "
                            "number of images as ASCII digits (DiffAE layout)")
        try:
            length = int(raw.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise DataError(f"{self.path}: the 'length' key holds {raw[:40]!r}, not a number of images") from None
        if length < 1:
            raise DataError(f"{self.path}: the 'length' key says {length} images; the dataset is empty")
        return length

    def index_prefixes(self, txn: Any) -> dict[str, int]:
        """``{prefix: index width}`` of every ``{prefix}-{digits}`` key family, found
        with one cursor seek per family (keys sort, so a family is contiguous)."""
        found: dict[str, int] = {}
        cursor = txn.cursor()
        ok = cursor.first()
        while ok:
            m = INDEX_KEY.match(cursor.key())
            if m is None:
                ok = cursor.next()
                continue
            prefix = m.group(1)
            found.setdefault(prefix.decode("utf-8", "replace"), len(m.group(2)))
            ok = cursor.set_range(prefix + b"-:")  # ':' sorts right after '9': past this family
        return found

    def _detect_key_format(self, txn: Any) -> str:
        found = self.index_prefixes(txn)
        if not found:
            raise DataError(f"{self.path}: no image keys like '128-00000' or 'None-0000000' found "
                            "(DiffAE layout: '{prefix}-{zero-padded index}')")
        prefix = _choose_prefix(list(found), self.image_size)
        if prefix is None:
            raise DataError(f"{self.path}: several key families ({', '.join(found)}); choose one with "
                            "a key format such as 'None-{index:07d}'")
        return key_format_for(prefix, found[prefix])

    def _check_format(self, txn: Any) -> None:
        try:
            keys = {self.key(0), self.key(self.length - 1)}
        except (KeyError, IndexError, ValueError) as exc:
            raise DataError(f"bad LMDB key format {self.key_format!r} ({exc}); "
                            "write it like '256-{index:05d}'") from None
        for key in sorted(keys):
            if txn.get(key.encode()) is None:
                families = ", ".join(key_format_for(p, w) for p, w in self.index_prefixes(txn).items()) or "none"
                raise DataError(f"{self.path}: key {key!r} is missing although the 'length' key says "
                                f"{self.length} images (key format {self.key_format!r}; key families "
                                f"present: {families})")

    def _read_names(self, txn: Any) -> list[str] | None:
        raw = txn.get(NAMES_KEY)
        if raw is None:
            return None
        try:
            names = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            names = None
        if not isinstance(names, list) or len(names) != self.length or not all(isinstance(n, str) for n in names):
            raise DataError(f"{self.path}: the 'names' key is not a JSON list of {self.length} file names")
        return names

    def key(self, index: int) -> str:
        """The key of item ``index``."""
        return self.key_format.format(index=index)

    # ----- items -----
    def __len__(self) -> int:
        return self.length

    def read_bytes(self, index: int) -> bytes:
        """The encoded image of item ``index``, as stored."""
        if not -self.length <= index < self.length:
            raise IndexError(f"LMDB dataset index {index} out of range [0, {self.length})")
        key = self.key(index % self.length)
        with shared_env(self.path).begin(buffers=False) as txn:
            data = txn.get(key.encode())
        if data is None:
            raise DataError(f"{self.path}: key {key!r} is missing although the 'length' key says "
                            f"{self.length} images")
        return data

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        data = self.read_bytes(index)
        im = decode_rgb(data, f"{self.path}: record {self.key(index % self.length)!r}", self.max_pixels)
        return pil_to_tensor(resize_square(im, self.image_size, self.center_crop)), torch.empty(0)


def _choose_prefix(prefixes: list[str], image_size: int) -> str | None:
    if len(prefixes) == 1:
        return prefixes[0]
    sizes = {int(p): p for p in prefixes if p.isdigit()}
    if image_size in sizes:
        return sizes[image_size]
    larger = [s for s in sizes if s > image_size]
    if larger:
        return sizes[min(larger)]
    return sizes[max(sizes)] if sizes else None
