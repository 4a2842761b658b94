"""`dbae serve` against hostile clients on loopback (issue 23), through the real uvicorn
server (``server_config``, in a thread of this process, so its memory is this process's):
a ping flood that never reads its pongs, idle and slowloris connections, error responses'
headers, uploads in refused formats, a sub-limit decompression bomb, and an upload
abandoned by its client. Each has a well-behaved client beside it, and bounded counts and
time."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import socket
import struct
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from dbae.imageio import DecodeAbandoned, decode_reduced
from dbae.inference import load_model
from dbae.serve import protocol as P
from dbae.serve.app import CSP
from dbae.serve.server import bind, make_studio, server_config
from dbae.serve.studio import rss_mb

uvicorn = pytest.importorskip("uvicorn")
ws_client = pytest.importorskip("websockets.sync.client")

SIZE = 16


@pytest.fixture(scope="module")
def server(trained_tiny):
    """A studio (no classifier) served by uvicorn on 127.0.0.1 with short timeouts: request
    head 1 s, keep-alive 1 s, keepalive ping every 1 s with 1 s to answer."""
    threads = torch.get_num_threads()
    studio = make_studio(load_model(trained_tiny, device="cpu"), ckpt=str(trained_tiny), auto=False, log=lambda m: None)
    sock = bind("127.0.0.1", 0)
    config = server_config(studio, sock, header_timeout=1.0, keep_alive=1, ping_interval=1.0, ping_timeout=1.0)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield studio, sock.getsockname()[1]
    srv.should_exit = True
    thread.join(30)
    studio.renderer.close()
    torch.set_num_threads(threads)


def ws_url(port: int) -> str:
    return f"ws://127.0.0.1:{port}/ws"


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the server closes ``sock`` (EOF or reset) within ``seconds``."""
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except (TimeoutError, socket.timeout):
        return False


def well_behaved_ping(port: int, seq: int) -> None:
    with ws_client.connect(ws_url(port), open_timeout=10, close_timeout=2) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "hello"
        ws.send(json.dumps({"type": "ping", "seq": seq}))
        assert json.loads(ws.recv(timeout=10)) == {"type": "pong", "seq": seq}


def handshake(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())  # fmt: skip
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head[:200]
    return sock


def test_a_ping_flood_that_never_reads_its_pongs_keeps_memory_flat(server):
    """A client sends up to 64 MB of pings (125-byte payloads, masked) and reads nothing: the
    server stops reading it once its pongs back up, so its memory does not grow by the
    pongs (it grew by about the size of the pings sent before), and the keepalive drops it.
    A well-behaved client is served meanwhile."""
    studio, port = server
    frame = b"\x89" + bytes([0x80 | 125]) + b"\x01\x02\x03\x04" + bytes(125)  # ping, masked by 01020304
    chunk = frame * (1_048_576 // len(frame))
    flooder = handshake(port)
    well_behaved_ping(port, 1)
    before = rss_mb()
    sent = 0
    flooder.settimeout(1.0)
    t0 = time.monotonic()
    try:
        while sent < 64 * 1_048_576 and time.monotonic() - t0 < 20:
            sent += flooder.send(chunk)
    except (TimeoutError, socket.timeout, ConnectionError):
        pass  # blocked (the server reads no more of it) or dropped
    well_behaved_ping(port, 2)
    growth = rss_mb() - before
    assert growth < 24, f"the server grew by {growth:.0f} MB while a client sent {sent / 1e6:.0f} MB of pings"
    assert closed_within(flooder, 10), "the flooding connection outlived its keepalive timeout"
    flooder.close()
    well_behaved_ping(port, 3)


def test_idle_and_slowloris_connections_are_closed(server):
    """A connection that sends nothing, one that sends half a request line, one that trickles
    a request a byte at a time, and a keep-alive connection left idle after its response are
    all closed (request head within 1 s, keep-alive 1 s here); the server serves meanwhile."""
    studio, port = server
    idle = socket.create_connection(("127.0.0.1", port), timeout=5)
    half = socket.create_connection(("127.0.0.1", port), timeout=5)
    half.sendall(b"GET / HTT")
    kept = socket.create_connection(("127.0.0.1", port), timeout=5)
    kept.sendall(f"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    assert kept.recv(65536).startswith(b"HTTP/1.1 200")
    trickle = socket.create_connection(("127.0.0.1", port), timeout=5)
    t0 = time.monotonic()
    request = f"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    trickled_out = False
    for i in range(len(request)):  # one byte every 0.2 s: 8 s for the request, never finished
        try:
            trickle.sendall(request[i:i + 1])
        except ConnectionError:
            trickled_out = True
            break
        if closed_within(trickle, 0.2):
            trickled_out = True
            break
    assert trickled_out and time.monotonic() - t0 < 4, "the trickling request was not cut off"
    for name, sock in (("idle", idle), ("half a request line", half), ("idle keep-alive", kept)):
        assert closed_within(sock, 4), f"the {name} connection was not closed"
        sock.close()
    trickle.close()
    well_behaved_ping(port, 4)


def _raw_response(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            more = sock.recv(65536)
            if not more:
                break
            data += more
    return data


def test_every_response_carries_the_security_headers_errors_too(server):
    studio, port = server
    cases = {}
    for method, path, host in (("GET", "/", None), ("GET", "/nope", None), ("POST", "/", None),
                               ("GET", "/api/heldout/x.png", None), ("GET", "/static/nope.js", None),
                               ("GET", "/api/info", "evil.example")):  # fmt: skip
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.putrequest(method, path, skip_host=host is not None)
        if host is not None:
            conn.putheader("Host", host)
        conn.endheaders()
        r = conn.getresponse()
        r.read()
        cases[f"{method} {path}"] = (r.status, r.getheader("content-security-policy"),
                                     r.getheader("x-content-type-options"))  # fmt: skip
        conn.close()
    assert [s for s, _, _ in cases.values()] == [200, 404, 405, 422, 404, 421]
    # uvicorn's own answers: a request it cannot parse, a websocket handshake it refuses
    for name, raw in (("garbage", b"NOT HTTP AT ALL\r\n\r\n"),
                      ("bad handshake", f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                                        "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())):  # fmt: skip
        head = _raw_response(port, raw).split(b"\r\n\r\n")[0].decode("latin-1").lower()
        status = int(head.split()[1])
        csp = next((line.split(":", 1)[1].strip() for line in head.split("\r\n") if line.startswith("content-security-policy:")), None)
        nosniff = "x-content-type-options: nosniff" in head
        cases[name] = (status, csp, "nosniff" if nosniff else None)
    for name, (status, csp, nosniff) in cases.items():
        assert csp is not None and csp.lower() == CSP.lower() and nosniff == "nosniff", (name, status, csp, nosniff)
    assert cases["garbage"][0] == 400 and cases["bad handshake"][0] == 400


# ----- uploads -----
def _encoded(fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buf, format=fmt, **kw)
    return buf.getvalue()


def grey16_bomb(side: int) -> bytes:
    """A PNG of side x side 16-bit grey zeros: a few hundred kB that decode to 2 * side^2 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = bytes(1 + 2 * side)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("fmt, named", [("GIF", "GIF"), ("BMP", "BMP"), ("TIFF", "TIFF"), ("ICO", "ICO"),
                                        ("EPS", "PostScript / EPS"), ("TGA", None)])  # fmt: skip
def test_only_png_jpeg_and_webp_uploads_are_opened(server, fmt, named):
    studio, port = server
    data = _encoded(fmt)
    with ws_client.connect(ws_url(port), open_timeout=10, max_size=2**24) as ws:
        json.loads(ws.recv(timeout=10))
        ws.send(P.pack({"type": "upload", "seq": 5}, data))
        error = json.loads(ws.recv(timeout=30))
        assert error["type"] == "error" and error["seq"] == 5
        expected = (f"its format ({named}) is not read here; only PNG, JPEG and WebP images are" if named
                    else "not a PNG, JPEG or WebP image")  # fmt: skip
        assert expected in error["message"], error["message"]
        ws.send(P.pack({"type": "upload", "seq": 6}, _encoded("WEBP", lossless=True)))  # and WebP is
        header, _ = P.unpack(ws.recv(timeout=30))
        assert (header["kind"], header["seq"]) == ("input", 6)


def _peak_rss_during(fn) -> tuple[object, float]:
    """(fn(), the largest RSS growth in MB seen while it ran, sampled every 2 ms)."""
    base, peak, done = rss_mb(), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb() - base)
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        return fn(), peak[0]
    finally:
        done.set()
        t.join()


def test_a_sub_limit_decompression_bomb_decodes_in_bounded_memory():
    """A 6000 x 6000 16-bit grey PNG (36 MP, under the 64 MP limit, about 70 kB) is 72 MB as
    decoded by Pillow. Converted to float64 before resizing it took over 600 MB; decoded to
    8 bits in integers and reduced first it stays within 5 bytes per pixel."""
    data = grey16_bomb(6000)
    assert len(data) < 200_000
    decode_reduced(grey16_bomb(64), "warm-up", SIZE)
    (im, size), peak = _peak_rss_during(lambda: decode_reduced(data, "bomb", SIZE))
    assert size == (6000, 6000) and min(im.size) >= 4 * SIZE and max(im.size) < 6000
    assert peak < 5 * 36, f"peak RSS growth {peak:.0f} MB for a 36 MP decode"


def test_a_decode_is_called_off_between_blocks_of_input():
    class CallsOff(threading.Event):  # set once the decoder has read 3 blocks
        reads = 0

        def is_set(self) -> bool:
            self.reads += 1
            return self.reads > 3

    cancel = CallsOff()
    data = grey16_bomb(8000)
    with pytest.raises(DecodeAbandoned):
        decode_reduced(data, "bomb", SIZE, cancel=cancel)
    assert cancel.reads == 4 and len(data) > 8 * 8192  # (it stopped with most of its input unread)


def test_an_upload_abandoned_by_its_client_is_called_off_and_others_decode_meanwhile(server):
    """Client A uploads a sub-limit bomb and leaves at once; B uploads one too and stays; C
    then uploads a small image: C's frame comes before B's bomb is done (decodes run in
    parallel, no lock between them), and A's decode is called off."""
    studio, port = server
    bomb, small = grey16_bomb(8000), _encoded("PNG")
    abandoned = studio.stats.uploads_abandoned
    with ws_client.connect(ws_url(port), open_timeout=10) as a:
        json.loads(a.recv(timeout=10))
        a.send(P.pack({"type": "upload", "seq": 1}, bomb))
        time.sleep(0.05)
    with ws_client.connect(ws_url(port), open_timeout=10) as b, ws_client.connect(ws_url(port), open_timeout=10) as c:
        json.loads(b.recv(timeout=10))
        json.loads(c.recv(timeout=10))
        b.send(P.pack({"type": "upload", "seq": 2}, bomb))
        time.sleep(0.05)
        c.send(P.pack({"type": "upload", "seq": 3}, small))
        header, _ = P.unpack(c.recv(timeout=30))
        assert (header["kind"], header["seq"]) == ("input", 3)
        b_done = False
        try:
            b.recv(timeout=0)
            b_done = True
        except TimeoutError:
            pass
        assert not b_done, "the small upload waited for the bomb's decode"
        header, _ = P.unpack(b.recv(timeout=60))
        assert (header["kind"], header["seq"]) == ("input", 2)
    deadline = time.monotonic() + 10
    while studio.stats.uploads_abandoned == abandoned and time.monotonic() < deadline:
        time.sleep(0.05)
    assert studio.stats.uploads_abandoned == abandoned + 1
