"""The websocket protocol of ``dbae serve`` (one socket per page, at ``/ws``).

Client to server:

- text messages, JSON objects with a ``type``:

  - ``{"type": "edit", "seq": n, "scales": [s_1, ..., s_k], "alpha": a, "steps": K, "sampler": "euler"}``:
    render image A edited by the k attribute sliders (in the order of the ``hello``
    message's ``attributes``), moved ``a`` in [0, 1] of the way to image B first; ``steps``
    and ``sampler`` are optional (the server's defaults). Newest wins: an edit that is
    still waiting when a newer one arrives is dropped (counted in the next frame's
    ``coalesced``).
  - ``{"type": "recon", "seq": n, "steps": K, "sampler": ...}``: the plain reconstruction
    of A again (after the decode setting changed). Newest wins.
  - ``{"type": "strip", "seq": n, "count": L, "steps": K, "sampler": ...}``: the
    interpolation path from A to B, L images (2 to 16), as one frame. Newest wins too.
  - ``{"type": "pick", "seq": n, "slot": "a" | "b", "index": i, ...}``: use held-out
    image i (0 <= i < ``hello.heldout``) as image A or B; ``steps`` / ``sampler`` as for edit.
  - ``{"type": "ping", "seq": n}``: answered by ``{"type": "pong", "seq": n}`` after the
    messages before it have been read.

- binary messages, uploads: a 4-byte big-endian length L, L bytes of a UTF-8 JSON header
  ``{"type": "upload", "seq": n, "slot": "a" | "b", "align": false, ...}`` (``steps`` /
  ``sampler`` as for edit), then the image file's bytes (PNG, JPEG or WebP).

Server to client:

- text: ``{"type": "hello", ...}`` once (the model, the attributes, the limits),
  ``{"type": "error", "message": ..., "seq": n | null, "about": <message type>}`` for a
  message that could not be served (the connection stays open), ``{"type": "pong", "seq": n}``.
- binary frames, with the same envelope: a JSON header ``{"type": "frame", "kind":
  "input" | "recon" | "edit" | "strip", "seq": n, "slot": ..., "width": w, "height": h,
  "timings": {...}, ...}`` then PNG bytes. ``timings``: ``encode_ms`` (the runner's encode
  of the image in use), ``decode_ms`` (the runner's decode call), ``image_ms`` (PNG
  encoding), ``queue_ms`` (waiting for the runner), ``server_ms`` (from taking the request
  to sending), ``batch`` (rows of the runner call).
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

from ..errors import DBAEError
from ..export.runner import MAX_STEPS, MIN_STEPS, DecodeSetting
from ..sampling import SAMPLERS

#: client message types (text) and the upload (binary)
TEXT_TYPES = ("edit", "recon", "strip", "pick", "ping")
SLOTS = ("a", "b")
#: the largest text message read (a few hundred sliders fit)
MAX_TEXT_BYTES = 64 * 1024
#: the largest upload header
MAX_HEADER_BYTES = 4096
#: slider scales beyond this many sqrt(d) standard deviations are refused
MAX_SCALE = 10.0
MIN_STRIP, MAX_STRIP = 2, 16
MAX_SEQ = 2**53 - 1  # what a JavaScript number holds exactly


class BadMessage(DBAEError):
    """A client message that cannot be served; the message goes back to the client."""

    def __init__(self, message: str, *, seq: int | None = None, about: str | None = None) -> None:
        super().__init__(message)
        self.seq = seq
        self.about = about


def pack(header: dict, payload: bytes = b"") -> bytes:
    """An envelope: 4-byte big-endian header length, the JSON header, the payload."""
    h = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    return struct.pack(">I", len(h)) + h + payload


def unpack(data: bytes) -> tuple[dict, bytes]:
    """(header, payload) of an envelope; BadMessage if it is not one."""
    if len(data) < 4:
        raise BadMessage(f"binary message of {len(data)} bytes is too short for an upload (4-byte header length, "
                         "JSON header, image bytes)", about="upload")  # fmt: skip
    (n,) = struct.unpack(">I", data[:4])
    if n > MAX_HEADER_BYTES or 4 + n > len(data):
        raise BadMessage(f"upload header length {n} is invalid (at most {MAX_HEADER_BYTES} bytes, within the "
                         f"{len(data)}-byte message)", about="upload")  # fmt: skip
    try:
        header = loads(data[4:4 + n].decode("utf-8"))
    except ValueError as exc:  # also a UnicodeDecodeError
        raise BadMessage(f"upload header is not JSON ({exc})", about="upload") from None
    if not isinstance(header, dict):
        raise BadMessage("upload header must be a JSON object", about="upload")
    return header, data[4 + n:]


#: what a field that is not in a message is shown as
MISSING = object()


def parse_text(text: str) -> dict:
    """The JSON object of a text message with a known ``type``; BadMessage otherwise."""
    if len(text) > MAX_TEXT_BYTES:
        raise BadMessage(f"message of {len(text)} characters is too long (at most {MAX_TEXT_BYTES})")
    try:
        msg = loads(text)
    except ValueError as exc:
        raise BadMessage(f"malformed message: not JSON ({exc})") from None
    if not isinstance(msg, dict):
        raise BadMessage(f"malformed message: expected a JSON object, got {type(msg).__name__}")
    seq = _seq(msg)
    kind = msg.get("type")
    if kind not in TEXT_TYPES:
        what = "message has no type" if "type" not in msg else f"unknown message type {_show(kind)}"
        raise BadMessage(f"{what}; expected one of {', '.join(TEXT_TYPES)} (uploads are binary messages)",
                         seq=seq)  # fmt: skip
    return msg


def loads(text: str):
    """JSON text as Python (JSON's NaN / Infinity literals as floats, refused by the checks
    below); ValueError for anything that is not JSON, also brackets nested too deeply."""
    try:
        return json.loads(text)
    except RecursionError:  # a RuntimeError, which would otherwise end the connection
        raise ValueError("nested too deeply") from None


def _seq(msg: dict) -> int | None:
    """The message's sequence number (None if absent); BadMessage if it is not a count."""
    seq = msg.get("seq")
    if seq is None:
        return None
    if isinstance(seq, bool) or not isinstance(seq, int) or not (0 <= seq <= MAX_SEQ):
        kind = msg.get("type")
        raise BadMessage(f"seq must be an integer from 0 to {MAX_SEQ}, got {_show(seq)}",
                         about=kind if kind in TEXT_TYPES or kind == "upload" else None)  # fmt: skip
    return seq


def seq_of(msg: dict) -> int | None:
    try:
        return _seq(msg)
    except BadMessage:
        return None


def _finite(value: Any) -> bool:
    """True for a JSON number that is finite (an integer too large for a float is not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer of hundreds of digits
        return False


def number(msg: dict, key: str, default: float | None, lo: float, hi: float) -> float:
    value = msg.get(key, MISSING if default is None else default)
    if not _finite(value):
        raise BadMessage(f"{key} must be a finite number, got {_show(value)}")
    if not (lo <= value <= hi):
        raise BadMessage(f"{key} must lie in [{lo:g}, {hi:g}], got {_show(value)}")
    return float(value)


def integer(msg: dict, key: str, default: int | None, lo: int, hi: int) -> int:
    value = msg.get(key, MISSING if default is None else default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadMessage(f"{key} must be an integer, got {_show(value)}")
    if not (lo <= value <= hi):
        raise BadMessage(f"{key} must be from {lo} to {hi}, got {_show(value)}")
    return value


def scales(msg: dict, k: int) -> list[float]:
    """The ``scales`` list: exactly k finite numbers within +-MAX_SCALE."""
    values = msg.get("scales", [] if k == 0 else MISSING)
    if not isinstance(values, list):
        raise BadMessage(f"scales must be a list of {k} numbers (one per attribute slider), got {_show(values)}")
    if len(values) != k:
        raise BadMessage(f"scales has {len(values)} values but there are {k} attribute sliders")
    for i, v in enumerate(values):
        if not _finite(v):
            raise BadMessage(f"scales[{i}] must be a finite number, got {_show(v)}")
        if abs(v) > MAX_SCALE:
            raise BadMessage(f"scales[{i}] = {_show(v)} is out of range (at most {MAX_SCALE:g} in size)")
    return [float(v) for v in values]


def setting(msg: dict, default: DecodeSetting) -> DecodeSetting:
    steps = integer(msg, "steps", default.steps, MIN_STEPS, MAX_STEPS)
    sampler = msg.get("sampler", default.sampler)
    if sampler not in SAMPLERS:
        raise BadMessage(f"sampler must be one of {', '.join(SAMPLERS)}, got {_show(sampler)}")
    return DecodeSetting(steps, sampler)


def slot(msg: dict) -> str:
    value = msg.get("slot", "a")
    if value not in SLOTS:
        raise BadMessage(f"slot must be 'a' (the image to edit) or 'b' (the interpolation target), got {_show(value)}")
    return value


def show_field(msg: dict, key: str) -> str:
    """The value of ``msg[key]`` for an error message (saying so when the field is missing)."""
    return _show(msg.get(key, MISSING))


def _show(value: Any) -> str:
    """A client's value as JSON (shortened) for an error message."""
    if value is MISSING:
        return "nothing (the field is missing)"
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if value != value else "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**40:
        return f"an integer of {len(str(abs(value)))} digits"
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
