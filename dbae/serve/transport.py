"""The HTTP and websocket protocols ``dbae serve`` gives uvicorn: uvicorn's own (h11, and
the websockets sans-I/O implementation) with the limits a local server still needs when a
client on the same machine is hostile.

- :class:`FlowControlledWebSocket`: reads nothing more from a client while the data already
  queued for it (frames, pongs) is above the transport's high-water mark (64 KiB). uvicorn
  answers each ping with a pong written at once, so a client that floods pings and never
  reads would otherwise grow the server's memory by the size of the pings it sends. A
  keepalive timeout (``ws_ping_interval`` + ``ws_ping_timeout``) drops the connection at
  once (``abort``), also when its write buffer cannot drain.
- :class:`HeaderTimeoutH11`: a connection must send a complete request head within
  ``header_timeout`` seconds of opening (and of each response), else it is closed: idle
  and slowloris (partial-header) connections are not held. (uvicorn's ``timeout_keep_alive``
  only runs after a response.) Its own 400 response carries the security headers too.

Both add :data:`dbae.serve.app.HEADERS` to the responses uvicorn writes itself (a refused
websocket handshake, an unparseable request): the app adds them to every other response.
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from .app import HEADERS

log = logging.getLogger("dbae.serve")

#: seconds a connection has to send a complete request head
HEADER_TIMEOUT_S = 10.0


def _with_headers(make):
    """A websockets ``accept`` / ``reject`` whose non-101 responses carry the security headers."""

    def made(*args, **kwargs):
        response = make(*args, **kwargs)
        if response.status_code != 101:
            for name, value in HEADERS.items():
                if name not in response.headers:
                    response.headers[name] = value
        return response

    return made


class FlowControlledWebSocket(WebSocketsSansIOProtocol):
    """uvicorn's websockets sans-I/O protocol that stops reading while its writes are paused."""

    _write_paused = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.conn.accept = _with_headers(self.conn.accept)
        self.conn.reject = _with_headers(self.conn.reject)

    def pause_writing(self) -> None:
        super().pause_writing()
        self._write_paused = True
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._write_paused = False
        if not self.read_paused:  # (paused also while the app has not taken a message)
            self.transport.resume_reading()

    async def receive(self):
        message = await super().receive()  # may resume reading: not while writes are paused
        if self._write_paused and not self.transport.is_closing():
            self.transport.pause_reading()
        return message

    def keepalive_timeout(self) -> None:
        super().keepalive_timeout()
        if self.transport.get_write_buffer_size():  # a close would wait for a client that does not read
            self.transport.abort()


class HeaderTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol that closes a connection whose request head does not arrive
    complete within :attr:`header_timeout` seconds."""

    header_timeout = HEADER_TIMEOUT_S
    _head_timer: asyncio.TimerHandle | None = None

    @classmethod
    def with_timeout(cls, seconds: float) -> type[HeaderTimeoutH11]:
        return type(cls.__name__, (cls,), {"header_timeout": float(seconds)})

    def _expect_head(self) -> None:
        self._no_head_expected()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _no_head_expected(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            log.debug("dbae serve: closed a connection that sent no complete request head in %g s", self.header_timeout)
            self.transport.close()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._expect_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._no_head_expected()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:  # a request head arrived: its cycle started
            self._no_head_expected()

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        self._no_head_expected()
        super().handle_websocket_upgrade(event)

    def on_response_complete(self) -> None:
        cycle = self.cycle
        super().on_response_complete()
        if self.cycle is cycle and not self.transport.is_closing():  # (not a pipelined request begun)
            self._expect_head()

    def send_400_response(self, msg: str) -> None:
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close"),
                   *((k.lower().encode(), v.encode()) for k, v in HEADERS.items())]  # fmt: skip
        for event in (h11.Response(status_code=400, headers=headers, reason=STATUS_PHRASES[400]),
                      h11.Data(data=msg.encode("ascii")), h11.EndOfMessage()):  # fmt: skip
            self.transport.write(self.conn.send(event))
        self.transport.close()
