"""One websocket connection: its images' latents, its pending requests, its render loop.

Two tasks per connection. The reader takes every message as it arrives, checks it, and
files it in a slot of :attr:`Session.pending` (uploads of A and B, the edit, the strip):
a newer request of a kind replaces the older one that has not started yet (newest wins,
counted as ``coalesced``). The render loop takes one request at a time, in that order of
kinds, runs it through the shared :class:`~dbae.serve.render.Renderer` and sends the
frame, so at most one render per connection is in flight, and the frame sent after a
burst of slider moves is the render of the last one.

The latents (z of A and B) live here only: they go when the connection goes. Nothing is
written to disk; no string from the client is used as a path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import torch

from ..errors import DBAEError
from ..export.runner import DecodeSetting
from . import protocol as P
from .latents import edit_latents, mix_latents, path_latents
from .render import DECODE, ENCODE
from .studio import Studio, png_bytes

Tensor = torch.Tensor
log = logging.getLogger("dbae.serve")

class ClientGone(ConnectionError):
    """The connection's socket failed while a frame or a message was sent to it."""


#: the order in which the render loop serves the kinds of pending requests
ORDER = ("upload:a", "upload:b", "edit", "recon", "strip")


class Session:
    """The state of one connection. ``send_bytes`` / ``send_text`` write to its socket."""

    def __init__(self, studio: Studio, send_bytes: Callable[[bytes], Awaitable[None]],
                 send_text: Callable[[str], Awaitable[None]]) -> None:  # fmt: skip
        self.studio = studio
        self._send_bytes = send_bytes
        self._send_text = send_text
        self.z: dict[str, Tensor | None] = {"a": None, "b": None}
        self.encode_ms: dict[str, float | None] = {"a": None, "b": None}
        self.pending: dict[str, dict] = {}
        self.coalesced = {"edit": 0, "recon": 0, "strip": 0}
        self._wake = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self.closed = False
        studio.sessions.add(self)
        studio.stats.connections_total += 1

    # ----- the reader's side -----
    async def on_text(self, text: str) -> None:
        try:
            msg = P.parse_text(text)
            kind = msg["type"]
            seq = P.seq_of(msg)
            if kind == "ping":
                await self.send_json({"type": "pong", "seq": seq})
                return
            if kind == "pick":
                self._check_pick(msg)
                self._file(f"upload:{P.slot(msg)}", {"msg": msg, "data": None, "received": time.perf_counter()})
                return
            self._check_render(msg)
            self._file(kind, {"msg": msg, "received": time.perf_counter()})
        except P.BadMessage as exc:
            seq, kind = _peek(text)
            await self.error(exc, exc.seq if exc.seq is not None else seq, exc.about or kind)

    async def on_bytes(self, data: bytes) -> None:
        header: dict = {}
        try:
            limit = self.studio.max_upload_bytes + P.MAX_HEADER_BYTES + 4
            if len(data) > limit:
                raise P.BadMessage(self.studio.too_large(len(data)), about="upload")
            header, payload = P.unpack(data)
            if header.get("type") != "upload":
                raise P.BadMessage(f"a binary message must be an upload (header type 'upload'), got "
                                   f"{P.show_field(header, 'type')}", about="upload")  # fmt: skip
            P._seq(header)
            self._check_upload(header)
            if len(payload) > self.studio.max_upload_bytes:
                raise P.BadMessage(self.studio.too_large(len(payload)), about="upload")
            self._file(f"upload:{P.slot(header)}", {"msg": header, "data": payload, "received": time.perf_counter()})
        except P.BadMessage as exc:
            await self.error(exc, P.seq_of(header), "upload")

    def _check_render(self, msg: dict) -> None:
        """Everything about an edit / strip request that can be checked on arrival."""
        seq, kind = P.seq_of(msg), msg["type"]
        try:
            P.setting(msg, self.studio.renderer.default)
            if kind == "edit":
                P.scales(msg, len(self.studio.attributes))
                P.number(msg, "alpha", 0.0, 0.0, 1.0)
            elif kind == "strip":
                P.integer(msg, "count", 8, P.MIN_STRIP, P.MAX_STRIP)
        except P.BadMessage as exc:
            raise P.BadMessage(str(exc), seq=seq, about=kind) from None

    def _check_pick(self, msg: dict) -> None:
        seq = P.seq_of(msg)
        try:
            P.slot(msg)
            P.setting(msg, self.studio.renderer.default)
            n = self.studio.heldout.shape[0]
            if n == 0:
                raise P.BadMessage("this model has no built-in held-out images; upload an image instead")
            P.integer(msg, "index", None, 0, n - 1)
        except P.BadMessage as exc:
            raise P.BadMessage(str(exc), seq=seq, about="pick") from None

    def _check_upload(self, header: dict) -> None:
        P.slot(header)
        P.setting(header, self.studio.renderer.default)
        if not isinstance(header.get("align", False), bool):
            raise P.BadMessage(f"align must be true or false, got {P.show_field(header, 'align')}")

    def _file(self, key: str, request: dict) -> None:
        if key in self.pending and key in self.coalesced:
            self.coalesced[key] += 1
        self.pending[key] = request
        self._wake.set()

    # ----- the render loop -----
    async def run(self) -> None:
        """Serve pending requests until cancelled (the connection closed)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.pending:
                key = next(k for k in ORDER if k in self.pending)
                request = self.pending.pop(key)
                await self._serve(key, request)

    async def _serve(self, key: str, request: dict) -> None:
        msg = request["msg"]
        seq = P.seq_of(msg)
        about = "upload" if request.get("data") is not None else msg.get("type", "upload")
        try:
            if key.startswith("upload:"):
                await self._upload(key[-1], request)
            elif key == "edit":
                await self._edit(request)
            elif key == "recon":
                await self._recon(request)
            else:
                await self._strip(request)
        except asyncio.CancelledError:
            raise
        except DBAEError as exc:  # the client's mistake, or an image that cannot be used
            await self.error(exc, seq, about)
        except ConnectionError:
            raise
        except Exception as exc:  # noqa: BLE001  (a bug: logged, and the connection lives on)
            if self.closed:
                raise
            log.exception("dbae serve: internal error while serving a %s request", about)
            await self.error(f"internal error while serving this {about} request ({type(exc).__name__}: {exc}); "
                             "the server keeps running", seq, about)  # fmt: skip

    async def _upload(self, slot: str, request: dict) -> None:
        msg, data = request["msg"], request["data"]
        studio = self.studio
        setting = P.setting(msg, studio.renderer.default)
        t0 = time.perf_counter()
        if data is None:  # a held-out image
            index = P.integer(msg, "index", None, 0, studio.heldout.shape[0] - 1)
            x, note = studio.heldout[index:index + 1], ""
        else:
            x, note = await studio.decode_upload(data, bool(msg.get("align", False)))
            studio.stats.uploads += 1
        prep_ms = (time.perf_counter() - t0) * 1e3
        enc = await studio.renderer.submit(ENCODE, setting, x, owner=self)
        z = enc.out
        self.z[slot] = z
        self.encode_ms[slot] = enc.runner_ms
        seq = P.seq_of(msg)
        image_ms, png = await _png(x[0])
        await self.send_frame({"kind": "input", "slot": slot, "seq": seq, "note": note,
                               "timings": {"encode_ms": enc.runner_ms, "prepare_ms": prep_ms, "image_ms": image_ms,
                                           "queue_ms": enc.queue_ms, "batch": enc.rows}}, png)  # fmt: skip
        if slot == "a":
            await self._decode_and_send("recon", setting, z, seq, request["received"], extra={"slot": "a"})

    def _edit_latent(self, msg: dict) -> Tensor:
        z_a = self.z["a"]
        if z_a is None:
            raise P.BadMessage("no image to edit yet: upload one or pick a held-out image first")
        alpha = P.number(msg, "alpha", 0.0, 0.0, 1.0)
        z = z_a
        if alpha > 0.0:
            if self.z["b"] is None:
                raise P.BadMessage("alpha moves towards a second image (B): upload or pick one first")
            z = mix_latents(z_a, self.z["b"], alpha)
        s = P.scales(msg, len(self.studio.attributes))
        if self.studio.classifier is not None and any(s):
            z = edit_latents(z, self.studio.classifier, self.studio.directions, s)
        return z

    async def _edit(self, request: dict) -> None:
        msg = request["msg"]
        setting = P.setting(msg, self.studio.renderer.default)
        z = self._edit_latent(msg)
        coalesced, self.coalesced["edit"] = self.coalesced["edit"], 0
        self.studio.stats.coalesced += coalesced
        await self._decode_and_send("edit", setting, z, P.seq_of(msg), request["received"],
                                    extra={"coalesced": coalesced, "alpha": msg.get("alpha", 0.0)})  # fmt: skip

    async def _recon(self, request: dict) -> None:
        msg = request["msg"]
        setting = P.setting(msg, self.studio.renderer.default)
        if self.z["a"] is None:
            raise P.BadMessage("no image to reconstruct yet: upload one or pick a held-out image first")
        self.coalesced["recon"] = 0
        await self._decode_and_send("recon", setting, self.z["a"], P.seq_of(msg), request["received"],
                                    extra={"slot": "a"})  # fmt: skip

    async def _strip(self, request: dict) -> None:
        msg = request["msg"]
        setting = P.setting(msg, self.studio.renderer.default)
        if self.z["a"] is None or self.z["b"] is None:
            raise P.BadMessage("the interpolation strip needs two images, A and B: upload or pick both first")
        count = P.integer(msg, "count", 8, P.MIN_STRIP, P.MAX_STRIP)
        z = path_latents(self.z["a"], self.z["b"], count)
        coalesced, self.coalesced["strip"] = self.coalesced["strip"], 0
        await self._decode_and_send("strip", setting, z, P.seq_of(msg), request["received"],
                                    extra={"count": count, "coalesced": coalesced})  # fmt: skip

    async def _decode_and_send(self, kind: str, setting: DecodeSetting, z: Tensor, seq: int | None,
                               received: float, *, extra: dict) -> None:  # fmt: skip
        t0 = time.perf_counter()
        dec = await self.studio.renderer.submit(DECODE, setting, z, owner=self)
        image_ms, png = await _png(dec.out if kind == "strip" else dec.out[0])
        timings = {"encode_ms": self.encode_ms["a"], "decode_ms": dec.runner_ms, "image_ms": image_ms,
                   "queue_ms": dec.queue_ms, "batch": dec.rows, "steps": setting.steps, "sampler": setting.sampler}
        timings["server_ms"] = (time.perf_counter() - t0) * 1e3
        timings["waited_ms"] = (t0 - received) * 1e3  # in the pending slot, behind this connection's own work
        await self.send_frame({"kind": kind, "seq": seq, "timings": timings, **extra}, png)
        if kind == "edit":
            s = self.studio.stats
            total = (time.perf_counter() - t0) * 1e3
            s.edit_frames += 1
            s.frame_runner_ms += dec.runner_ms
            s.frame_overhead_ms += max(0.0, total - dec.runner_ms - dec.blocked_ms)
            s.frame_image_ms += image_ms

    # ----- sending -----
    async def send_frame(self, header: dict, png: bytes) -> None:
        s = self.studio.image_size
        width = s * header.get("count", 1) if header["kind"] == "strip" else s
        await self._send(self._send_bytes, P.pack({"type": "frame", "width": width, "height": s, **header}, png))
        self.studio.stats.frames += 1

    async def send_json(self, msg: dict) -> None:
        await self._send(self._send_text, json.dumps(msg, allow_nan=False))

    async def _send(self, send: Callable[[Any], Awaitable[None]], data) -> None:
        """Send on the socket; any failure of the socket (the client went away: Starlette's
        WebSocketDisconnect, a closed transport) is ClientGone, which ends the render loop
        quietly: it is no error of ours."""
        async with self._send_lock:
            try:
                await send(data)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise ClientGone(f"the client went away ({type(exc).__name__})") from exc

    async def error(self, exc: Exception | str, seq: int | None, about: str | None) -> None:
        self.studio.stats.errors += 1
        await self.send_json({"type": "error", "message": str(exc), "seq": seq, "about": about})

    def close(self) -> None:
        """Forget the connection's images (called when it closes)."""
        self.closed = True
        self.pending.clear()
        self.z = {"a": None, "b": None}
        self.studio.sessions.discard(self)


#: images of up to this many pixels are PNG-encoded on the event loop (tens of microseconds);
#: larger ones in a thread, so that the loop keeps reading messages meanwhile
INLINE_PNG_PIXELS = 64 * 64


async def _png(x: Tensor) -> tuple[float, bytes]:
    """(ms, PNG bytes) of an image (C, H, W) or a row of them (L, C, H, W)."""
    t0 = time.perf_counter()
    if x.shape[-1] * x.shape[-2] * (x.shape[0] if x.dim() == 4 else 1) <= INLINE_PNG_PIXELS:
        png = png_bytes(x)
    else:
        png = await asyncio.to_thread(png_bytes, x)
    return (time.perf_counter() - t0) * 1e3, png


def _peek(text: str) -> tuple[int | None, str | None]:
    """(seq, type) of a text message that failed its checks, where they can be read."""
    if len(text) > P.MAX_TEXT_BYTES:
        return None, None
    try:
        msg = P.loads(text)
    except ValueError:
        return None, None
    if not isinstance(msg, dict):
        return None, None
    kind = msg.get("type")
    return P.seq_of(msg), kind if kind in P.TEXT_TYPES else None
