"""What every connection of one server shares: the model's renderer, the attribute
directions, the held-out images, the limits, the upload decoders, and the counters of
``/api/stats``.

Uploads are decoded in a pool of :data:`DECODE_WORKERS` threads (in parallel up to that
many, the others waiting their turn; no lock between them), by
:func:`dbae.imageio.decode_reduced`: PNG, JPEG and WebP only, in 8 bits, reduced towards the
model's size while decoding, so one decode holds at most about 5 bytes per pixel of the
file's image (320 MB at the 64-megapixel limit) and the pool at most that many times that.
A decode whose connection closed is called off (:meth:`Studio.decode_upload`)."""

from __future__ import annotations

import asyncio
import os
import re
import struct
import threading
import time
import weakref
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from ..apps.attributes import AttributeClassifier
from ..data import ShapesDataset
from ..errors import DataError
from ..imageio import DecodeAbandoned, decode_reduced, max_image_pixels, pil_to_tensor, resize_square
from ..inference import LoadedModel
from . import align
from .latents import attribute_directions
from .render import Renderer

Tensor = torch.Tensor

#: the default upload limit (bytes of the file)
DEFAULT_MAX_UPLOAD_BYTES = 10_000_000
#: held-out images offered by the page's picker
HELDOUT = 24
#: uploads decoded at once (threads); more wait for a free one
DECODE_WORKERS = 2
#: an upload to align is decoded at no less than 4x this side (the face detector's input)
ALIGN_MIN_SIDE = 128


def png_bytes(x: Tensor) -> bytes:
    """PNG of one image (C, H, W) in [-1, 1] (clamped), or of a row of images (L, C, H, W)
    side by side: the pixels of :func:`dbae.imageio.to_uint8` (the same float32 arithmetic,
    in NumPy) in 8-bit grey or RGB, the Up row filter, zlib level 1. These are sent, not stored:
    this writes the few bytes PNG needs itself, about 3x faster than Pillow for a 16x16 frame
    on a cold cache (0.1 against 0.3 ms on the 2-core CPU, a third of the server's own time
    per frame; see docs/benchmarks.md)."""
    a = x.detach().to(device="cpu", dtype=torch.float32).numpy()
    a = np.clip(a, -1.0, 1.0)  # (a copy: the tensor is left as it is)
    a += 1.0
    a *= 127.5
    a = np.rint(a).astype(np.uint8)
    if a.ndim == 4:  # (L, C, H, W) -> (C, H, L * W)
        a = np.concatenate(list(a), axis=2)
    c, h, w = a.shape
    if c not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels, got {c}")
    flat = a.transpose(1, 2, 0).reshape(h, w * c)
    rows = np.empty((h, 1 + w * c), dtype=np.uint8)
    rows[:, 0] = 2  # filter type Up: each row minus the row above (modulo 256)
    rows[0, 1:] = flat[0]
    np.subtract(flat[1:], flat[:-1], out=rows[1:, 1:])
    header = struct.pack(">IIBBBBB", w, h, 8, 2 if c == 3 else 0, 0, 0, 0)
    return b"".join((_PNG_SIGNATURE, _png_chunk(b"IHDR", header), _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 1)),
                     _png_chunk(b"IEND", b"")))  # fmt: skip


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def rss_mb() -> float | None:
    """Resident set size of this process in MB (Linux), else None."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class Stats:
    """Counters over the server's life (``GET /api/stats``)."""

    connections_total: int = 0
    frames: int = 0
    edit_frames: int = 0
    coalesced: int = 0
    errors: int = 0
    uploads: int = 0
    uploads_abandoned: int = 0  # decodes called off because their connection closed
    #: per edit frame: the runner call it waited for, and everything else it took on the server
    #: except waiting for other connections' runner calls
    frame_runner_ms: float = 0.0
    frame_overhead_ms: float = 0.0
    frame_image_ms: float = 0.0
    started: float = field(default_factory=time.time)


class Studio:
    """The state of one ``dbae serve``."""

    def __init__(
        self,
        loaded: LoadedModel,
        renderer: Renderer,
        classifier: AttributeClassifier | None,
        *,
        classifier_note: str = "",
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        max_pixels: int | None = None,
        heldout: int = HELDOUT,
    ) -> None:
        self.loaded = loaded
        self.renderer = renderer
        cfg = loaded.model.config
        self.image_size = cfg.image_size
        self.z_dim = cfg.z_dim
        self.classifier = classifier
        self.classifier_note = classifier_note
        if classifier is not None:
            self.attributes, self.directions = attribute_directions(classifier)
            self.kinds = tuple(classifier.kinds[classifier.index(n)] for n in self.attributes)
        else:
            self.attributes, self.directions, self.kinds = (), torch.zeros(0, self.z_dim), ()
        self.max_upload_bytes = max_upload_bytes
        self.max_pixels = max_pixels
        self.face = align.is_face_model(loaded.preset.name, classifier.names if classifier is not None else ())
        self.align_available = self.face and align.alignment_available()
        self.heldout = self._heldout_images(heldout)
        self._heldout_png: dict[int, bytes] = {}
        self.sessions: weakref.WeakSet = weakref.WeakSet()
        self.stats = Stats()
        self._decoders = ThreadPoolExecutor(max_workers=DECODE_WORKERS, thread_name_prefix="dbae-decode")

    def _heldout_images(self, n: int) -> Tensor:
        """The built-in shapes test split for models trained on shapes; none otherwise."""
        if self.loaded.preset.train.dataset != "shapes" or n < 1:
            return torch.zeros(0, 3, self.image_size, self.image_size)
        data = ShapesDataset(self.image_size, seed=0, split="test")
        return torch.stack([data[i][0] for i in range(n)])

    def heldout_png(self, index: int) -> bytes:
        if index not in self._heldout_png:
            self._heldout_png[index] = png_bytes(self.heldout[index])
        return self._heldout_png[index]

    def hello(self) -> dict:
        """What the page needs to build itself (the first message of every connection)."""
        r = self.renderer
        return {
            "type": "hello",
            "preset": self.loaded.preset.name,
            "step": self.loaded.step,
            "image_size": self.image_size,
            "z_dim": self.z_dim,
            "runner": r.name,
            "device": str(r.device),
            "precision": r.precision,
            "batching": r.max_batch,
            "steps": r.default.steps,
            "sampler": r.default.sampler,
            "attributes": [{"name": n, "kind": k} for n, k in zip(self.attributes, self.kinds)],
            "classifier_note": self.classifier_note,
            "heldout": int(self.heldout.shape[0]),
            "max_upload_bytes": self.max_upload_bytes,
            "max_megapixels": self.pixel_limit() / 1e6,
            "face": self.face,
            "align": self.align_available,
            "align_note": "" if not self.face or self.align_available else align.why_unavailable(),
        }

    def pixel_limit(self) -> int:
        return self.max_pixels if self.max_pixels is not None else max_image_pixels()

    async def decode_upload(self, data: bytes, want_align: bool) -> tuple[Tensor, str]:
        """:meth:`prepare_upload` in the decode pool. If the awaiting task is cancelled (its
        connection closed), a decode still waiting for a thread never starts and one that
        runs stops at its next block of input."""
        cancel = threading.Event()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._decoders, self.prepare_upload, data, want_align, cancel)
        try:
            return await future
        except asyncio.CancelledError:
            cancel.set()
            self.stats.uploads_abandoned += 1
            raise

    def prepare_upload(self, data: bytes, want_align: bool,
                       cancel: threading.Event | None = None) -> tuple[Tensor, str]:  # fmt: skip
        """The uploaded file's bytes as the model's input (1, 3, S, S) and a note of what was
        done to it. Decoded in memory by :func:`~dbae.imageio.decode_reduced` with the pixel
        limit (DataError for anything that is not a PNG, JPEG or WebP image, is truncated,
        or claims too many pixels); an image of another size is resized and centre-cropped
        as ``--resize`` does, or FFHQ-aligned for a face model when asked and available.
        ``cancel`` set: DecodeAbandoned."""
        if len(data) == 0:
            raise DataError("the uploaded file is empty")
        if len(data) > self.max_upload_bytes:
            raise DataError(self.too_large(len(data)))
        try:
            aligning = want_align and self.face and self.align_available  # (the detector needs more pixels)
            side = max(self.image_size, ALIGN_MIN_SIDE) if aligning else self.image_size
            im, (w, h) = decode_reduced(data, "the uploaded file", side, max_pixels=self.pixel_limit(),
                                        cancel=cancel)  # fmt: skip
        except DataError as exc:  # Pillow names the in-memory stream (<_io.BytesIO object at 0x...>)
            raise DataError(re.sub(r"\s*<[\w.]+ object at 0x[0-9a-f]+>", "", str(exc))) from None
        s = self.image_size
        note = ""
        if want_align and self.face:
            if self.align_available:
                aligned, how = align.align_face(im, s)
                if aligned is not None:
                    return pil_to_tensor(aligned)[None], f"{w}x{h}: {how}"
                note = f"{how}: "
            else:
                note = align.why_unavailable().split(";")[0] + ": "
        if cancel is not None and cancel.is_set():
            raise DecodeAbandoned
        if (w, h) != (s, s):
            im = resize_square(im, s, center_crop=True)  # (from the reduced image)
            note += f"resized from {w}x{h} to {s}x{s} (shorter side, then centre-cropped)"
        elif note:
            note += "used as it is"
        return pil_to_tensor(im)[None], note

    def too_large(self, n: int) -> str:
        limit = self.max_upload_bytes  # (bytes too: 10.04 MB over 10 MB would read "10.0 MB over 10 MB")
        return (f"the uploaded file is {n:,} bytes ({n / 1e6:.1f} MB), over the limit of {limit:,} bytes "
                f"({limit / 1e6:g} MB; raise it with dbae serve --max-upload-mb)")  # fmt: skip

    def stats_dict(self) -> dict:
        s, r = self.stats, self.renderer.stats
        return {
            "connections_open": len(self.sessions),
            "connections_total": s.connections_total,
            "frames": s.frames,
            "edit_frames": s.edit_frames,
            "coalesced": s.coalesced,
            "errors": s.errors,
            "uploads": s.uploads,
            "uploads_abandoned": s.uploads_abandoned,
            "runner_calls": r.calls,
            "runner_rows": r.rows,
            "runner_jobs": r.jobs,
            "runner_busy_ms": r.busy_ms,
            "frame_runner_ms": s.frame_runner_ms,
            "frame_overhead_ms": s.frame_overhead_ms,
            "frame_image_ms": s.frame_image_ms,
            "rss_mb": rss_mb(),
            "uptime_s": time.time() - s.started,
        }
