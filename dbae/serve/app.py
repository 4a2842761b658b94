"""The FastAPI application of ``dbae serve``: one page, its two static files, a few JSON
routes, and the websocket (protocol: :mod:`dbae.serve.protocol`).

Routes: ``GET /`` the page; ``GET /static/app.js``, ``style.css`` and ``favicon.svg`` (a fixed
table of the files shipped in the package: no request string is used as a path);
``GET /api/info`` what the page is told on connecting; ``GET /api/heldout/{i}.png`` a
held-out image; ``GET /api/stats`` the server's counters; ``WS /ws``.

The websocket refuses connections from pages of other origins (another site open in the
same browser must not drive, or read, a studio on localhost); a server bound to a loopback
address also refuses requests that do not name it by a loopback name (DNS rebinding, see
:class:`LoopbackHostGuard`). Every response, errors included (404, 405, 421, 422, ...),
carries a content security policy that lets the page load nothing from anywhere else, and
``nosniff`` (:class:`SecurityHeaders`; the responses uvicorn writes itself get them from
:mod:`dbae.serve.transport`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from importlib import resources
from urllib.parse import urlsplit

from fastapi import FastAPI, HTTPException, WebSocket
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.websockets import WebSocketDisconnect, WebSocketState

from .server import is_loopback
from .session import Session
from .studio import Studio

log = logging.getLogger("dbae.serve")

#: the static files the page uses: name -> media type (nothing else is served)
STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8",
          "favicon.svg": "image/svg+xml"}

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")  # fmt: skip
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-store"}  # fmt: skip


def static_text(name: str) -> str:
    """A file of dbae/serve/static, read through importlib.resources (works from a wheel,
    an editable install or a source tree)."""
    return resources.files("dbae.serve").joinpath("static", name).read_text(encoding="utf-8")


def same_origin(websocket: WebSocket) -> bool:
    """True unless the request comes from a browser page of another origin (clients that
    are not browsers send no Origin header)."""
    origin = websocket.headers.get("origin")
    if origin is None:
        return True
    host = websocket.headers.get("host", "")
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower()


def host_is_loopback(host_header: str) -> bool:
    """True when a Host header ("127.0.0.1:8000", "localhost:8000", "[::1]:8000") names
    this machine by a loopback name or address."""
    try:
        name = urlsplit("//" + host_header).hostname
    except ValueError:
        return False
    return name is not None and is_loopback(name)


class SecurityHeaders:
    """ASGI wrapper that adds :data:`HEADERS` to every HTTP response (those of the routes, and
    the errors of routing and validation; a header a route set itself is kept)."""

    _raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in HEADERS.items()]

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message) -> None:
            if message["type"] in ("http.response.start", "websocket.http.response.start"):
                headers = list(message.get("headers", []))
                have = {name.lower() for name, _ in headers}
                headers += [(k, v) for k, v in self._raw if k not in have]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class LoopbackHostGuard:
    """ASGI wrapper of a server bound to a loopback address: requests whose Host header is
    not a loopback name are refused (HTTP 421; websockets closed unaccepted). A page of
    another site whose name was re-pointed at 127.0.0.1 (DNS rebinding) is of the same
    origin as its own host name, so the origin check alone would let it drive the studio."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] in ("http", "websocket"):
            host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            if not host_is_loopback(host):
                log.warning("dbae serve: refused a request for host %r (this server answers loopback names only)",
                            host[:100])  # fmt: skip
                if scope["type"] == "http":
                    await PlainTextResponse("this server answers requests for localhost / 127.0.0.1 only",
                                            status_code=421)(scope, receive, send)  # fmt: skip
                else:
                    await send({"type": "websocket.close", "code": 1008})
                return
        await self.app(scope, receive, send)


def create_app(studio: Studio, *, loopback_only: bool = False):
    """The app serving ``studio`` (its renderer's dispatcher runs while the app runs).
    ``loopback_only`` (a server bound to a loopback address): requests must name the host
    by a loopback name, see :class:`LoopbackHostGuard`."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await studio.renderer.start()
        try:
            yield
        finally:
            await studio.renderer.stop()

    app = FastAPI(title="dbae serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    pages = {name: static_text(name) for name in ("index.html", *STATIC)}

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse(pages["index.html"])

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        if name not in STATIC:  # a lookup in a fixed table, never a path
            raise HTTPException(404, "no such file")
        return Response(pages[name], media_type=STATIC[name])

    @app.get("/api/info")
    def info() -> JSONResponse:
        return JSONResponse(studio.hello())

    @app.get("/api/stats")
    def stats() -> JSONResponse:
        return JSONResponse(studio.stats_dict())

    @app.get("/api/heldout/{index}.png")
    def heldout(index: int) -> Response:
        if not (0 <= index < studio.heldout.shape[0]):
            raise HTTPException(404, f"no held-out image {index} (there are {studio.heldout.shape[0]})")
        return Response(studio.heldout_png(index), media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        if not same_origin(websocket):
            await websocket.close(code=1008, reason="cross-origin connections are refused")
            return
        await websocket.accept()
        session = Session(studio, websocket.send_bytes, websocket.send_text)
        renderer = asyncio.create_task(session.run(), name="dbae-session")
        try:
            await session.send_json(studio.hello())
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                if renderer.done():  # the render loop ended: the socket failed while sending
                    break
                if message.get("text") is not None:
                    await session.on_text(message["text"])
                elif message.get("bytes") is not None:
                    await session.on_bytes(message["bytes"])
        except (WebSocketDisconnect, ConnectionError, RuntimeError):
            pass  # the client went away (also while we were sending to it)
        finally:
            session.close()
            renderer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await renderer
            if websocket.client_state == WebSocketState.CONNECTED:
                with contextlib.suppress(Exception):
                    await websocket.close()

    return SecurityHeaders(LoopbackHostGuard(app) if loopback_only else app)
