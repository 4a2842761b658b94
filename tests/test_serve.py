"""`dbae serve`: its HTTP routes and websocket protocol through FastAPI's test client (no
browser; tests/test_serve_browser.py drives the page in Chromium), the renderer's batching,
the slider arithmetic, face alignment, and the command's argument checks.

Every image the studio sends is compared with what the model itself makes of the same
input (a runner of the same kind and decode setting, made by the export registry), so a
frame that is not the model's output, or the output of another setting, fails."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import json
import math
import logging
import struct
import time
import zlib
from dataclasses import replace

import anyio
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from starlette.websockets import WebSocketDisconnect

from dbae.apps.interpolate import interpolate_latents
from dbae.apps.manipulate import shift_latents
from dbae.cli.main import main
from dbae.errors import ConfigError
from dbae.export.registry import factory
from dbae.export.runner import DecodeSetting
from dbae.imageio import decode_rgb, pil_to_tensor, resize_square, to_uint8
from dbae.inference import load_model
from dbae.serve import align
from dbae.serve import protocol as P
from dbae.serve.app import CSP, STATIC, create_app
from dbae.serve.latents import attribute_directions, edit_latents, mix_latents, path_latents
from dbae.serve.render import DECODE, ENCODE, Renderer
from dbae.serve.server import bind, host_warning, make_studio
from dbae.serve.session import Session
from dbae.serve.studio import Studio, png_bytes

SIZE = 16  # the tiny16 model's images
STEPS = 4  # the studio's default decode steps


# ----- the studio (built once per module) and a reference runner of the same setting -----
@pytest.fixture(scope="module")
def loaded(trained_tiny):
    return load_model(trained_tiny, device="cpu")


@pytest.fixture(scope="module")
def studio(loaded, trained_tiny):
    """The studio of the shared tiny run, with the classifier it fits itself (shapes). It
    sets torch's CPU threads (dbae serve --threads): restored for the tests after these."""
    threads = torch.get_num_threads()
    s = make_studio(loaded, ckpt=str(trained_tiny), runner="eager", steps=STEPS, log=lambda line: None)
    yield s
    s.renderer.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(studio):
    with TestClient(create_app(studio)) as c:  # runs the app's lifespan: the renderer's dispatcher
        yield c


@pytest.fixture(scope="module")
def ref(loaded):
    """A runner of its own (same kind, precision and setting as the studio's), for the
    images the studio's frames must equal."""
    return factory("eager", loaded.model, "fp32")(DecodeSetting(STEPS, "euler"))


# ----- helpers -----
def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with almost no data (a bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def receive(ws, timeout: float = 60.0) -> dict:
    """The next message: a text message's JSON, or a frame's header with its decoded
    ``image`` (H, W, 3) uint8. Fails (instead of hanging) after ``timeout`` seconds."""
    rx = getattr(ws, "_send_rx", None)
    if rx is None:  # another Starlette: no timeout
        message = ws.receive()
    else:
        async def get():
            with anyio.fail_after(timeout):
                return await rx.receive()

        message = ws.portal.call(get)
    if message["type"] == "websocket.close":
        raise AssertionError(f"the server closed the connection: {message}")
    if message.get("text") is not None:
        return json.loads(message["text"])
    header, payload = P.unpack(message["bytes"])
    assert header["type"] == "frame" and payload[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(payload)) as im:
        assert im.mode == "RGB"
        header["image"] = np.asarray(im).copy()
    return header


def until_frame(ws, seq: int, kind: str | None = None) -> tuple[dict, list[dict]]:
    """(the frame of ``seq`` (and ``kind``), every message received before it)."""
    before = []
    while True:
        m = receive(ws)
        if m["type"] == "frame" and m["seq"] == seq and (kind is None or m["kind"] == kind):
            return m, before
        before.append(m)


@contextlib.contextmanager
def connect(client, **kwargs):
    with client.websocket_connect("/ws", **kwargs) as ws:
        hello = receive(ws)
        assert hello["type"] == "hello"
        yield ws


def send(ws, message) -> None:
    if isinstance(message, bytes):
        ws.send_bytes(message)
    elif isinstance(message, str):
        ws.send_text(message)
    else:
        ws.send_text(json.dumps(message))


def upload(ws, data: bytes, seq: int, slot: str = "a", **header) -> None:
    ws.send_bytes(P.pack({"type": "upload", "seq": seq, "slot": slot, **header}, data))


def pick(ws, index: int, seq: int, slot: str = "a") -> dict:
    """Use held-out image ``index`` as A or B; (the input frame, and for A the recon frame)."""
    send(ws, {"type": "pick", "seq": seq, "slot": slot, "index": index})
    frames = {"input": until_frame(ws, seq, "input")[0]}
    if slot == "a":
        frames["recon"] = until_frame(ws, seq, "recon")[0]
    return frames


def edit(ws, seq: int, scales, **fields) -> dict:
    send(ws, {"type": "edit", "seq": seq, "scales": list(scales), **fields})
    frame, before = until_frame(ws, seq, "edit")
    assert [m for m in before if m["type"] == "error"] == []
    return frame


def image_of(x: torch.Tensor) -> np.ndarray:
    """(H, W, 3) uint8 of one image (1, C, H, W) or (C, H, W) as the studio's PNG holds it."""
    return to_uint8(x.reshape(-1, *x.shape[-3:])[0])


def render(ref, z: torch.Tensor) -> np.ndarray:
    """uint8 images (B, H, W, 3) the model decodes from z (B, d)."""
    return to_uint8(ref.decode(z))


def diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    assert a.shape == b.shape, (a.shape, b.shape)
    return np.abs(a.astype(np.int16) - b.astype(np.int16))


def assert_close(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to one level in a few pixels (latents computed in another float order)."""
    d = diff(a, b)
    assert d.max() <= 1 and d.mean() < 0.05, (d.max(), d.mean())


def stats(client) -> dict:
    return client.get("/api/stats").json()


def scales_with(studio, **named) -> list[float]:
    s = [0.0] * len(studio.attributes)
    for name, value in named.items():
        s[studio.attributes.index(name)] = value
    return s


def z_heldout(studio, ref, index: int) -> torch.Tensor:
    return ref.encode(studio.heldout[index:index + 1])


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# ----- 1. pages, static files, info, held-out images -----
def test_page_and_static_files_are_served_with_the_csp(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CSP and "default-src 'none'" in CSP
    assert page.headers["x-content-type-options"] == "nosniff"
    for name in ("app.js", "style.css"):
        assert f"/static/{name}" in page.text  # the page loads its files from this server
    for name, media in STATIC.items():
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"] == media and len(r.content) > 0
        assert r.headers["content-security-policy"] == CSP
    for route in ("/api/info", "/api/stats", "/api/heldout/0.png"):
        assert client.get(route).headers["content-security-policy"] == CSP


@pytest.mark.parametrize("path", [
    "/static/index.html", "/static/session.py", "/static/..%2fapp.py", "/static/..%2f..%2fpyproject.toml",
    "/static/%2e%2e%2fapp.py", "/static/..%5capp.py", "/static/app.js%00", "/static/APP.JS", "/static/app.js.bak",
    "/static/", "/static/static%2fapp.js", "/static/%2fetc%2fpasswd",
])  # fmt: skip
def test_static_serves_only_its_table(client, path):
    r = client.get(path)
    assert r.status_code == 404
    assert "import" not in r.text and "root:" not in r.text


def test_api_info_is_the_hello_message(client, studio):
    info = client.get("/api/info").json()
    with client.websocket_connect("/ws") as ws:
        hello = receive(ws)
    assert info == hello
    assert hello["image_size"] == SIZE and hello["steps"] == STEPS and hello["sampler"] == "euler"
    assert [a["name"] for a in hello["attributes"]] == list(studio.attributes) and len(studio.attributes) > 5
    assert hello["heldout"] == studio.heldout.shape[0] == 24 and hello["face"] is False
    assert hello["max_upload_bytes"] == studio.max_upload_bytes and hello["runner"] == "eager"


def test_heldout_images_are_pngs_of_the_models_size(client, studio):
    for i in (0, 23):
        r = client.get(f"/api/heldout/{i}.png")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        with Image.open(io.BytesIO(r.content)) as im:
            assert im.size == (SIZE, SIZE)
            np.testing.assert_array_equal(np.asarray(im.convert("RGB")), image_of(studio.heldout[i]))
    assert client.get("/api/heldout/24.png").status_code == 404
    assert client.get("/api/heldout/-1.png").status_code == 404


# ----- 2. uploads -----
@pytest.mark.parametrize("encode", [png, jpeg], ids=["png", "jpeg"])
def test_upload_gives_the_input_then_the_models_reconstruction(client, ref, encode):
    array = noise(SIZE, SIZE, seed=1)
    data = encode(array)
    x = pil_to_tensor(Image.open(io.BytesIO(data)).convert("RGB"))[None]
    with connect(client) as ws:
        upload(ws, data, seq=7)
        first, second = receive(ws), receive(ws)
    assert (first["kind"], first["seq"], first["slot"]) == ("input", 7, "a")
    assert (second["kind"], second["seq"], second["slot"]) == ("recon", 7, "a")
    assert first["note"] == "" and first["width"] == first["height"] == SIZE
    np.testing.assert_array_equal(first["image"], image_of(x))  # the decoded upload, as it is
    expected = render(ref, ref.encode(x))[0]
    np.testing.assert_array_equal(second["image"], expected)  # the model's reconstruction
    assert diff(second["image"], first["image"]).mean() > 10  # (and not the input sent back)
    t = second["timings"]
    assert t["batch"] == 1 and t["steps"] == STEPS and t["decode_ms"] > 0 and t["encode_ms"] > 0


def test_the_studio_serves_the_onnxruntime_runner_unchanged(loaded, trained_tiny):
    """Another runtime behind the same studio: the frames are that runner's output, and
    within float rounding of eager PyTorch's."""
    pytest.importorskip("onnxruntime")
    threads = torch.get_num_threads()
    s = make_studio(loaded, ckpt=str(trained_tiny), runner="onnxruntime", steps=2, auto=False,
                    log=lambda line: None)  # fmt: skip
    try:
        assert s.renderer.name == "onnxruntime-cpu" and s.hello()["runner"] == "onnxruntime-cpu"
        ort = s.renderer.runner(DecodeSetting(2, "euler"))
        eager = factory("eager", loaded.model, "fp32")(DecodeSetting(2, "euler"))
        array = noise(SIZE, SIZE, seed=4)
        x = pil_to_tensor(Image.fromarray(array))[None]
        with TestClient(create_app(s)) as c, connect(c) as ws:
            upload(ws, png(array), seq=1)
            receive(ws)
            recon = receive(ws)
            out = edit(ws, seq=2, scales=[])
        assert recon["kind"] == "recon" and out["kind"] == "edit"
        np.testing.assert_array_equal(recon["image"], render(ort, ort.encode(x))[0])
        np.testing.assert_array_equal(out["image"], recon["image"])  # no sliders, alpha 0: z itself
        assert diff(recon["image"], render(eager, eager.encode(x))[0]).max() <= 1
    finally:
        s.renderer.close()
        torch.set_num_threads(threads)


def test_an_image_of_another_size_is_resized_and_centre_cropped(client, ref):
    array = noise(30, 40, seed=2)  # 40 wide, 30 high
    expected_input = np.asarray(resize_square(Image.fromarray(array), SIZE, center_crop=True))
    squashed = np.asarray(resize_square(Image.fromarray(array), SIZE, center_crop=False))
    assert diff(expected_input, squashed).mean() > 10  # the two would be told apart
    with connect(client) as ws:
        upload(ws, png(array), seq=3)
        inp = until_frame(ws, 3, "input")[0]
        rec = until_frame(ws, 3, "recon")[0]
    np.testing.assert_array_equal(inp["image"], expected_input)
    assert "resized from 40x30 to 16x16" in inp["note"] and "centre-cropped" in inp["note"]
    x = pil_to_tensor(Image.fromarray(expected_input))[None]
    np.testing.assert_array_equal(rec["image"], render(ref, ref.encode(x))[0])


def test_pick_a_heldout_image(client, studio, ref):
    with connect(client) as ws:
        frames = pick(ws, 5, seq=11)
        b = pick(ws, 6, seq=12, slot="b")
        send(ws, {"type": "edit", "seq": 13, "scales": [0.0] * len(studio.attributes)})
        plain, between = until_frame(ws, 13, "edit")
    assert between == []  # B's upload gives its input frame only (no reconstruction of B)
    np.testing.assert_array_equal(plain["image"], frames["recon"]["image"])  # no slider moved: A's recon
    np.testing.assert_array_equal(frames["input"]["image"], image_of(studio.heldout[5]))
    np.testing.assert_array_equal(frames["recon"]["image"], render(ref, z_heldout(studio, ref, 5))[0])
    assert b["input"]["slot"] == "b" and "recon" not in b
    np.testing.assert_array_equal(b["input"]["image"], image_of(studio.heldout[6]))


# ----- 3. attribute edits -----
def test_one_slider_is_dbae_manipulates_shift(client, studio, ref):
    """Two sliders that the shared 300-step model renders clearly: on held-out image 2, +1.5
    changes the image by 10.3 (size) and 21.9 (background) levels on average (measured
    2026-12-06). Not x: that model moves the small shape by less than a pixel (2.3 levels);
    before issue 22's encoder fix this check passed with x only because its direction there
    changed the background."""
    clf = studio.classifier
    z = z_heldout(studio, ref, 2)
    with connect(client) as ws:
        recon = pick(ws, 2, seq=1)["recon"]
        frames = {name: edit(ws, 100 + i, scales_with(studio, **{name: 1.5}))
                  for i, name in enumerate(("size", "background"))}  # fmt: skip
    for i, (name, frame) in enumerate(frames.items()):
        assert frame["seq"] == 100 + i and frame["kind"] == "edit" and frame["coalesced"] == 0
        expected = render(ref, shift_latents(z, clf, name, [1.5])[0])[0]
        assert_close(frame["image"], expected)
        assert diff(frame["image"], recon["image"]).mean() > 3  # the slider did move the image
    assert diff(frames["size"]["image"], frames["background"]["image"]).mean() > 3


def test_several_sliders_add_up_in_normalized_z(client, studio, ref):
    clf = studio.classifier
    moves = {"x": -1.0, "y": 0.8, "colour=blue": 1.2, "size": 0.5}
    z = z_heldout(studio, ref, 4)
    d = z.shape[1]
    # z' = denorm(norm(z) + sqrt(d) sum_i s_i w_i / |w_i|), written out here on its own
    shift = sum(s * clf.direction(name).float() / clf.direction(name).float().norm() for name, s in moves.items())
    expected = render(ref, clf.denormalize(clf.normalize(z) + math.sqrt(d) * shift))[0]
    one = render(ref, shift_latents(z, clf, "x", [-1.0])[0])[0]
    with connect(client) as ws:
        pick(ws, 4, seq=1)
        frame = edit(ws, 77, scales_with(studio, **moves))
    assert frame["seq"] == 77 and frame["alpha"] == 0.0
    assert_close(frame["image"], expected)
    assert diff(frame["image"], one).mean() > 3  # the other sliders count too


def test_edit_before_any_image_is_an_error_then_works(client, studio):
    with connect(client) as ws:
        send(ws, {"type": "edit", "seq": 5, "scales": [0.0] * len(studio.attributes)})
        error = receive(ws)
        assert error == {"type": "error", "message": error["message"], "seq": 5, "about": "edit"}
        assert "no image to edit yet" in error["message"]
        send(ws, {"type": "recon", "seq": 6})
        assert "no image to reconstruct yet" in receive(ws)["message"]
        pick(ws, 0, seq=7)
        assert edit(ws, 8, [0.0] * len(studio.attributes))["seq"] == 8


def test_decode_steps_and_sampler_of_a_request_are_used(client, studio, loaded):
    heun2 = factory("eager", loaded.model, "fp32")(DecodeSetting(2, "heun"))
    z = heun2.encode(studio.heldout[1:2])
    with connect(client) as ws:
        default = pick(ws, 1, seq=1)["recon"]
        send(ws, {"type": "recon", "seq": 2, "steps": 2, "sampler": "heun"})
        frame = until_frame(ws, 2, "recon")[0]
    assert frame["timings"]["steps"] == 2 and frame["timings"]["sampler"] == "heun"
    np.testing.assert_array_equal(frame["image"], render(heun2, z)[0])
    assert diff(frame["image"], default["image"]).max() > 0  # another setting, another image


# ----- 4. interpolation -----
def test_alpha_and_strip_follow_the_linear_path_from_a_to_b(client, studio, ref):
    za, zb = z_heldout(studio, ref, 0), z_heldout(studio, ref, 9)
    k = len(studio.attributes)
    with connect(client) as ws:
        pick(ws, 0, seq=1)
        pick(ws, 9, seq=2, slot="b")
        mid = edit(ws, 3, [0.0] * k, alpha=0.3)
        end = edit(ws, 4, [0.0] * k, alpha=1.0)
        send(ws, {"type": "strip", "seq": 5, "count": 5})
        strip = until_frame(ws, 5, "strip")[0]
    assert mid["alpha"] == 0.3
    assert_close(mid["image"], render(ref, 0.7 * za + 0.3 * zb)[0])
    assert_close(end["image"], render(ref, zb)[0])
    assert diff(mid["image"], render(ref, za)[0]).mean() > 3
    assert (strip["width"], strip["height"], strip["count"]) == (5 * SIZE, SIZE, 5)
    assert strip["image"].shape == (SIZE, 5 * SIZE, 3)
    path = render(ref, interpolate_latents(za, zb, 5)[1][0])
    assert_close(strip["image"], np.concatenate(list(path), axis=1))
    np.testing.assert_array_equal(strip["image"][:, :SIZE], render(ref, za)[0])  # the ends are A and B
    np.testing.assert_array_equal(strip["image"][:, -SIZE:], render(ref, zb)[0])


def test_interpolation_without_b_is_a_clear_error(client, studio):
    k = len(studio.attributes)
    with connect(client) as ws:
        pick(ws, 0, seq=1)
        send(ws, {"type": "edit", "seq": 2, "scales": [0.0] * k, "alpha": 0.5})
        error = receive(ws)
        assert (error["type"], error["seq"], error["about"]) == ("error", 2, "edit")
        assert "second image (B)" in error["message"]
        send(ws, {"type": "strip", "seq": 3, "count": 4})
        error = receive(ws)
        assert (error["type"], error["seq"], error["about"]) == ("error", 3, "strip")
        assert "needs two images" in error["message"]
        assert edit(ws, 4, [0.0] * k)["seq"] == 4  # alpha 0 needs no B


# ----- 5. newest wins -----
def test_a_burst_of_slider_moves_is_coalesced_and_ends_on_the_last_setting(client, studio, ref):
    clf = studio.classifier
    z = z_heldout(studio, ref, 3)
    settings = [scales_with(studio, x=-2.0 + 0.02 * i) for i in range(99)] + [scales_with(studio, y=2.5)]
    last = render(ref, edit_latents(z, clf, studio.directions, settings[-1]))[0]
    before_last = render(ref, edit_latents(z, clf, studio.directions, settings[-2]))[0]
    assert diff(last, before_last).mean() > 3  # the last setting's image is told apart from the others
    with connect(client) as ws:
        pick(ws, 3, seq=1)
        calls = stats(client)["runner_calls"]
        for i, s in enumerate(settings):
            send(ws, {"type": "edit", "seq": 1000 + i, "scales": s})
        final, before = until_frame(ws, 1099, "edit")
        after = stats(client)
    frames = [m for m in before if m["type"] == "frame"] + [final]
    assert all(m["type"] == "frame" and m["kind"] == "edit" for m in before)  # no errors
    assert len(frames) <= 20  # far fewer decodes than moves
    assert after["runner_calls"] - calls == len(frames)
    seqs = [f["seq"] for f in frames]
    assert seqs == sorted(set(seqs)) and seqs[-1] == 1099
    assert sum(f["coalesced"] for f in frames) + len(frames) == 100  # every move is accounted for
    assert_close(final["image"], last)
    for f in frames[:-1]:  # the earlier frames are renders of their own (earlier) settings
        assert_close(f["image"], render(ref, edit_latents(z, clf, studio.directions, settings[f["seq"] - 1000]))[0])


# ----- 6. bad input: one clear error on that connection, which keeps working -----
def _edit_text(k: int, scales: str | None = None, **fields) -> str:
    """An edit message written as text (to send JSON's NaN / Infinity literals too)."""
    body = {"type": "edit", "seq": 3, **fields}
    text = json.dumps(body)[:-1]
    return text + f', "scales": {scales if scales is not None else json.dumps([0.0] * k)}}}'


def _header(fields: dict, payload: bytes = b"") -> bytes:
    h = json.dumps(fields).encode()
    return struct.pack(">I", len(h)) + h + payload


GOOD = png(noise(SIZE, SIZE, seed=3))
TRUNCATED = png(noise(64, 64, seed=4))[:600]

#: (id, message (a function of the number of sliders k), text in the error, the error's seq and about)
BAD = [
    ("not-json", lambda k: "not json", "malformed message: not JSON", None, None),
    ("json-list", lambda k: "[1, 2]", "expected a JSON object, got list", None, None),
    ("json-string", lambda k: '"edit"', "expected a JSON object, got str", None, None),
    ("deeply-nested", lambda k: "[" * 5000, "not JSON (nested too deeply)", None, None),
    ("too-long", lambda k: "x" * (P.MAX_TEXT_BYTES + 1), "too long", None, None),
    ("unknown-type", lambda k: {"type": "paint", "seq": 3}, 'unknown message type "paint"', 3, None),
    ("no-type", lambda k: {"seq": 3}, "message has no type", 3, None),
    ("scales-short", lambda k: {"type": "edit", "seq": 3, "scales": [0.0] * (k - 1)},
     "scales has {k1} values but there are {k} attribute sliders", 3, "edit"),
    ("scales-long", lambda k: {"type": "edit", "seq": 3, "scales": [0.0] * (k + 1)}, "attribute sliders", 3, "edit"),
    ("scales-missing", lambda k: {"type": "edit", "seq": 3}, "got nothing (the field is missing)", 3, "edit"),
    ("scales-not-list", lambda k: {"type": "edit", "seq": 3, "scales": 0.5}, "scales must be a list", 3, "edit"),
    ("scales-nan", lambda k: _edit_text(k, "[NaN" + ", 0" * (k - 1) + "]"),
     "scales[0] must be a finite number, got NaN", 3, "edit"),
    ("scales-inf", lambda k: _edit_text(k, "[0, Infinity" + ", 0" * (k - 2) + "]"),
     "scales[1] must be a finite number, got Infinity", 3, "edit"),
    ("scales--inf", lambda k: _edit_text(k, "[-Infinity" + ", 0" * (k - 1) + "]"), "got -Infinity", 3, "edit"),
    ("scales-string", lambda k: _edit_text(k, '["0.5"' + ", 0" * (k - 1) + "]"), 'got "0.5"', 3, "edit"),
    ("scales-null", lambda k: _edit_text(k, "[null" + ", 0" * (k - 1) + "]"), "got null", 3, "edit"),
    ("scales-bool", lambda k: _edit_text(k, "[true" + ", 0" * (k - 1) + "]"), "got true", 3, "edit"),
    ("scales-huge-int", lambda k: _edit_text(k, "[1" + "0" * 400 + ", 0" * (k - 1) + "]"), "integer of 401 digits",
     3, "edit"),
    ("scales-out-of-range", lambda k: {"type": "edit", "seq": 3, "scales": [11.0] + [0.0] * (k - 1)}, "out of range",
     3, "edit"),
    ("steps-0", lambda k: _edit_text(k, steps=0), "steps must be from 1 to 10, got 0", 3, "edit"),
    ("steps-11", lambda k: _edit_text(k, steps=11), "steps must be from 1 to 10, got 11", 3, "edit"),
    ("steps-fraction", lambda k: _edit_text(k, steps=2.5), "steps must be an integer, got 2.5", 3, "edit"),
    ("steps-string", lambda k: _edit_text(k, steps="4"), 'steps must be an integer, got "4"', 3, "edit"),
    ("sampler", lambda k: _edit_text(k, sampler="rk4"), 'sampler must be one of euler, heun, got "rk4"', 3, "edit"),
    ("alpha-high", lambda k: _edit_text(k, alpha=1.5), "alpha must lie in [0, 1], got 1.5", 3, "edit"),
    ("alpha-negative", lambda k: _edit_text(k, alpha=-0.1), "alpha must lie in [0, 1]", 3, "edit"),
    ("alpha-nan", lambda k: _edit_text(k)[:-1] + ', "alpha": NaN}', "alpha must be a finite number, got NaN", 3,
     "edit"),
    ("alpha-huge-int", lambda k: _edit_text(k)[:-1] + ', "alpha": 1' + "0" * 400 + "}", "alpha must be", 3, "edit"),
    ("alpha-without-b", lambda k: _edit_text(k, alpha=0.5), "second image (B)", 3, "edit"),
    ("strip-without-b", lambda k: {"type": "strip", "seq": 3, "count": 4}, "needs two images", 3, "strip"),
    ("strip-count", lambda k: {"type": "strip", "seq": 3, "count": 17}, "count must be from 2 to 16", 3, "strip"),
    ("seq-negative", lambda k: _edit_text(k, seq=-1), "seq must be an integer", None, "edit"),
    ("seq-string", lambda k: _edit_text(k, seq="x"), 'seq must be an integer from 0 to 9007199254740991, got "x"',
     None, "edit"),
    ("seq-too-large", lambda k: _edit_text(k, seq=2**53), "seq must be an integer", None, "edit"),
    ("seq-bool", lambda k: _edit_text(k, seq=True), "got true", None, "edit"),
    ("seq-fraction", lambda k: _edit_text(k, seq=1.5), "got 1.5", None, "edit"),
    ("pick-index", lambda k: {"type": "pick", "seq": 3, "index": 24}, "index must be from 0 to 23, got 24", 3, "pick"),
    ("pick-no-index", lambda k: {"type": "pick", "seq": 3}, "index must be an integer, got nothing", 3, "pick"),
    ("pick-slot", lambda k: {"type": "pick", "seq": 3, "index": 0, "slot": "c"}, "slot must be 'a'", 3, "pick"),
    ("binary-too-short", lambda k: b"ab", "too short for an upload", None, "upload"),
    ("binary-not-envelope", lambda k: struct.pack(">I", 5000) + b"{}" + GOOD, "upload header length 5000 is invalid",
     None, "upload"),
    ("binary-raw-png", lambda k: GOOD, "upload header length", None, "upload"),
    ("header-not-json", lambda k: struct.pack(">I", 9) + b"{not json" + GOOD, "upload header is not JSON", None,
     "upload"),
    ("header-deeply-nested", lambda k: struct.pack(">I", 3000) + b"[" * 3000 + GOOD, "nested too deeply", None,
     "upload"),
    ("header-not-object", lambda k: _header([1], GOOD), "upload header must be a JSON object", None, "upload"),
    ("header-no-type", lambda k: _header({"seq": 3}, GOOD), "header type 'upload'), got nothing (the field is missing)",
     3, "upload"),
    ("header-wrong-type", lambda k: _header({"type": "edit", "seq": 3}, GOOD), 'must be an upload', 3, "upload"),
    ("header-slot", lambda k: _header({"type": "upload", "seq": 3, "slot": "c"}, GOOD), "slot must be", 3, "upload"),
    ("header-steps", lambda k: _header({"type": "upload", "seq": 3, "steps": 0}, GOOD), "steps must be", 3, "upload"),
    ("header-align", lambda k: _header({"type": "upload", "seq": 3, "align": "yes"}, GOOD),
     'align must be true or false, got "yes"', 3, "upload"),
    ("header-seq", lambda k: _header({"type": "upload", "seq": -2}, GOOD), "seq must be an integer", None, "upload"),
    ("non-image", lambda k: P.pack({"type": "upload", "seq": 3}, b"this is not an image at all"),
     "not a PNG, JPEG or WebP image (only those are read)", 3, "upload"),
    ("empty-file", lambda k: P.pack({"type": "upload", "seq": 3}), "the uploaded file is empty", 3, "upload"),
    ("truncated-png", lambda k: P.pack({"type": "upload", "seq": 3}, TRUNCATED), "not a readable image", 3,
     "upload"),
    ("decompression-bomb", lambda k: P.pack({"type": "upload", "seq": 3}, png_claiming(12000, 12000)),
     "image is 12000x12000 pixels, 144.0 megapixels, over the limit of 64 megapixels", 3, "upload"),
]  # fmt: skip


@pytest.mark.parametrize("make, expected, seq, about", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_input_gets_one_clear_error_and_the_connection_keeps_working(client, studio, make, expected, seq, about):
    k = len(studio.attributes)
    expected = expected.format(k=k, k1=k - 1)
    with connect(client) as ws:
        recon = pick(ws, 8, seq=1)["recon"]
        send(ws, make(k))
        error = receive(ws)
        assert error["type"] == "error", error
        assert expected in error["message"], error["message"]
        assert (error["seq"], error["about"]) == (seq, about)
        message = error["message"]
        assert "\n" not in message and "Traceback" not in message and "BytesIO" not in message and len(message) < 300
        send(ws, {"type": "ping", "seq": 900})
        assert receive(ws) == {"type": "pong", "seq": 900}  # one error, nothing else
        frame = edit(ws, 901, [0.0] * k)  # and the connection still serves (the image A it had)
    np.testing.assert_array_equal(frame["image"], recon["image"])


def test_a_file_over_the_upload_limit_is_refused(client, studio, ref, monkeypatch):
    big = png(noise(32, 32, seed=5))
    small = png(noise(SIZE, SIZE, seed=6))
    assert len(small) < 1500 < len(big) < 1500 + P.MAX_HEADER_BYTES
    monkeypatch.setattr(studio, "max_upload_bytes", 1500)
    with connect(client) as ws:
        upload(ws, big, seq=3)
        error = receive(ws)
        assert (error["type"], error["seq"], error["about"]) == ("error", 3, "upload")
        assert f"the uploaded file is {len(big):,} bytes" in error["message"]
        assert "over the limit of 1,500 bytes" in error["message"] and "--max-upload-mb" in error["message"]
        upload(ws, big + b"\0" * 20_000, seq=4)  # the whole message is over the limit: refused before unpacking
        error = receive(ws)
        assert error["about"] == "upload" and "over the limit of 1,500 bytes" in error["message"]
        upload(ws, small, seq=5)  # under the limit: served
        assert until_frame(ws, 5, "input")[0]["note"] == ""
        rec = until_frame(ws, 5, "recon")[0]
    x = pil_to_tensor(Image.open(io.BytesIO(small)).convert("RGB"))[None]
    np.testing.assert_array_equal(rec["image"], render(ref, ref.encode(x))[0])


def test_an_upload_over_the_studios_pixel_limit_is_refused(client, studio, monkeypatch):
    monkeypatch.setattr(studio, "max_pixels", SIZE * SIZE - 1)
    with connect(client) as ws:
        upload(ws, GOOD, seq=3)
        error = receive(ws)
    assert error["about"] == "upload" and "over the limit" in error["message"] and "16x16 pixels" in error["message"]


def test_other_connections_are_served_while_one_sends_garbage(client, studio, ref):
    k = len(studio.attributes)
    garbage = [b"\x00", "{", "[]", {"type": "nope"}, P.pack({"type": "upload", "seq": 1}, b"junk"),
               _edit_text(k, "[NaN" + ", 0" * (k - 1) + "]"), struct.pack(">I", 3000) + b"[" * 3000]  # fmt: skip
    with connect(client) as bad, connect(client) as good:
        pick(good, 1, seq=1)
        pick(bad, 2, seq=1)
        for g in garbage:
            send(bad, g)
        frame = edit(good, 2, scales_with(studio, x=1.0))
        errors = [receive(bad) for _ in garbage]
        assert [e["type"] for e in errors] == ["error"] * len(garbage)
        assert edit(bad, 3, [0.0] * k)["seq"] == 3  # the sender of garbage is still served too
    z = z_heldout(studio, ref, 1)
    assert_close(frame["image"], render(ref, shift_latents(z, studio.classifier, "x", [1.0])[0])[0])


# ----- 7. a disconnect in the middle of a render -----
@pytest.mark.parametrize("last", ["upload", "edit", "strip"])
def test_a_disconnect_in_the_middle_of_a_render_frees_the_session(client, studio, ref, caplog, last):
    caplog.set_level(logging.WARNING, logger="dbae.serve")
    k = len(studio.attributes)
    with connect(client) as ws:
        if last != "upload":
            pick(ws, 0, seq=1)
            pick(ws, 1, seq=2, slot="b")
        if last == "upload":
            upload(ws, png(noise(300, 400, seed=8)), seq=3)
        elif last == "edit":
            send(ws, {"type": "edit", "seq": 3, "scales": scales_with(studio, x=1.0), "alpha": 0.5})
        else:
            send(ws, {"type": "strip", "seq": 3, "count": 16})
        # ... and gone before the answer
    assert wait_until(lambda: len(studio.sessions) == 0)
    with connect(client) as ws:  # the next connection is served as usual
        frames = pick(ws, 2, seq=1)
        assert edit(ws, 2, [0.0] * k)["seq"] == 2
    np.testing.assert_array_equal(frames["recon"]["image"], render(ref, z_heldout(studio, ref, 2))[0])
    assert wait_until(lambda: len(studio.sessions) == 0)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


# ----- 8. per-connection state is freed -----
def test_memory_stays_flat_over_many_connect_upload_disconnect_cycles(client, studio):
    """An upload of 1024x1024 noise (a 3 MB PNG, 3 MB of pixels once decoded): a server that
    kept each connection's upload, its decoded image or its Session would grow by 120+ MB
    over 40 connections."""
    data = png(noise(1024, 1024, seed=9))
    assert len(data) > 3_000_000

    def cycle(i: int) -> None:
        with connect(client) as ws:
            upload(ws, data, seq=i)
            upload(ws, data, seq=i, slot="b")
            until_frame(ws, i, "recon")
            send(ws, {"type": "edit", "seq": i + 1, "scales": scales_with(studio, y=0.5), "alpha": 0.5})
            if i % 2:  # every other connection leaves before its edit is rendered
                until_frame(ws, i + 1, "edit")

    def settled() -> float:
        assert wait_until(lambda: len(studio.sessions) == 0)
        gc.collect()
        return studio.stats_dict()["rss_mb"]

    for i in range(5):  # warm-up: allocator pools, the runner's buffers
        cycle(i)
    before = settled()
    total = studio.stats.connections_total
    for i in range(40):
        cycle(10 * i)
    after = settled()
    assert studio.stats.connections_total - total == 40
    assert [o for o in gc.get_objects() if type(o) is Session] == []  # (no Session survives its connection)
    assert studio.stats_dict()["connections_open"] == 0
    assert after - before < 40, (before, after)


# ----- 9. one runner for every connection, batching the decodes that wait together -----
def _run_jobs(renderer: Renderer, jobs, cancel: tuple[int, ...] = ()):
    """Run jobs (op, setting, x) or (op, setting, x, owner) submitted in that order, cancelling
    those at indices ``cancel``; their Rendered results (a cancelled job's: its CancelledError)."""
    async def go():
        await renderer.start()
        try:
            tasks = [asyncio.create_task(renderer.submit(*job)) for job in jobs]
            await asyncio.sleep(0)  # every job is queued, the dispatcher has not taken them yet
            for i in cancel:  # (their connections went away)
                tasks[i].cancel()
            return await asyncio.gather(*tasks, return_exceptions=bool(cancel))
        finally:
            await renderer.stop()

    try:
        return asyncio.run(go())
    finally:
        renderer.close()


def test_the_renderers_worker_thread_keeps_the_cpu_threads_it_was_made_with(loaded):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        renderer = Renderer(loaded.model, "eager", "fp32", DecodeSetting(1))
        torch.set_num_threads(2)  # (a new thread would start with torch's process-wide count)
        assert renderer._executor.submit(torch.get_num_threads).result() == 1
        renderer.close()
    finally:
        torch.set_num_threads(threads)


def test_the_renderer_batches_jobs_waiting_together_into_one_runner_call(loaded, studio, ref):
    s4 = DecodeSetting(STEPS, "euler")
    z = ref.encode(studio.heldout[:6])
    edits = [(DECODE, s4, z[0:1]), (DECODE, s4, z[1:2]), (DECODE, s4, z[3:4])]
    batched = Renderer(loaded.model, "eager", "fp32", s4, max_batch=16)
    out = _run_jobs(batched, edits)
    assert (batched.stats.calls, batched.stats.rows, batched.stats.jobs) == (1, 3, 3)
    for r, (_, _, x) in zip(out, edits):
        assert (r.rows, r.jobs) == (3, 3) and r.out.shape == (1, 3, 16, 16)
        torch.testing.assert_close(r.out, ref.decode(x), atol=1e-4, rtol=0)  # each job gets its own rows
    assert diff(to_uint8(out[0].out), to_uint8(out[2].out)).mean() > 3

    # a strip (a job of 2 rows) never shares a call with one-row jobs: the edits run together
    # first (the least recently served connection's job leads), then the strip
    jobs = [(DECODE, s4, z[0:1]), (DECODE, s4, z[1:3]), (DECODE, s4, z[3:4])]
    alone = [ref.decode(x) for _, _, x in jobs]
    apart = Renderer(loaded.model, "eager", "fp32", s4, max_batch=16)
    out = _run_jobs(apart, jobs)
    # (one row per call: the edits' connections, served last, have not come back)
    assert [(r.rows, r.jobs, r.first_call, r.calls) for r in out] == [(2, 2, 0, 1), (1, 1, 1, 2), (2, 2, 0, 1)]
    for r, expected in zip(out, alone):
        torch.testing.assert_close(r.out, expected, atol=1e-4, rtol=0)

    single = Renderer(loaded.model, "eager", "fp32", s4, max_batch=1)  # one row per call: the 2-row job takes two
    out = _run_jobs(single, jobs)
    assert (single.stats.calls, single.stats.rows) == (4, 4) and [r.rows for r in out] == [1, 1, 1]
    assert [r.calls for r in out] == [1, 2, 1]
    for r, expected in zip(out, alone):
        torch.testing.assert_close(r.out, expected, atol=1e-5, rtol=0)

    pairs = Renderer(loaded.model, "eager", "fp32", s4, max_batch=2)
    out = _run_jobs(pairs, [(DECODE, s4, z[i:i + 1]) for i in range(3)])
    assert pairs.stats.calls == 2 and [r.rows for r in out] == [2, 2, 1]

    # only jobs of one kind and one decode setting share a call
    s2 = DecodeSetting(2, "heun")
    mixed = Renderer(loaded.model, "eager", "fp32", s4, max_batch=16)
    out = _run_jobs(mixed, [(ENCODE, s4, studio.heldout[:2]), (DECODE, s4, z[:1]), (DECODE, s2, z[1:2]),
                            (DECODE, s4, z[2:3])])  # fmt: skip
    # (while the others wait, a call takes one row per job: the 2-image encode takes two turns)
    assert mixed.stats.calls == 4 and mixed.stats.by_op == {ENCODE: 2, DECODE: 2}
    assert [r.rows for r in out] == [1, 2, 1, 2] and [r.calls for r in out] == [2, 1, 1, 1]
    torch.testing.assert_close(out[0].out, z[:2], atol=1e-5, rtol=0)
    heun2 = factory("eager", loaded.model, "fp32")(s2)
    torch.testing.assert_close(out[2].out, heun2.decode(z[1:2]), atol=1e-5, rtol=0)

    # a job whose connection went away is left out of the call
    gone = Renderer(loaded.model, "eager", "fp32", s4, max_batch=16)
    out = _run_jobs(gone, [(DECODE, s4, z[:1]), (DECODE, s4, z[1:2])], cancel=(0,))
    assert isinstance(out[0], asyncio.CancelledError) and (gone.stats.calls, gone.stats.rows) == (1, 1)
    torch.testing.assert_close(out[1].out, alone[1][:1], atol=1e-5, rtol=0)


def _run_owned(renderer: Renderer, jobs):
    """Run (owner, op, setting, x) jobs submitted in that order; their Rendered results."""
    return _run_jobs(renderer, [(op, setting, x, owner) for owner, op, setting, x in jobs])


def test_connections_are_served_round_robin_and_a_strip_costs_its_rows(loaded, studio, ref):
    """Eight connections ask for 8-image strips at 10 steps, then a ninth for one edit at the
    default 4 steps: the first call takes one row of four strips (the cap while somebody
    edits), and the edit runs inside it, at its first pause point (not after 8 whole strips,
    as in arrival order). Every strip, split over calls, is still the model's
    decode of its rows; with nobody else waiting the strips' rows are batched again."""
    s4, s10 = DecodeSetting(STEPS, "euler"), DecodeSetting(10, "euler")
    z = ref.encode(studio.heldout[:9])
    strips = [path_latents(z[i:i + 1], z[i + 1:i + 2], 8) for i in range(8)]
    owners = [object() for _ in range(9)]
    renderer = Renderer(loaded.model, "eager", "fp32", s4, max_batch=16, editing_s=600.0)
    jobs = [(owners[i], DECODE, s10, strips[i]) for i in range(8)] + [(owners[8], DECODE, s4, z[8:9])]
    out = _run_owned(renderer, jobs)
    edit = out[8]
    assert (edit.first_call, edit.calls, edit.rows, edit.preempted) == (1, 1, 1, True), edit  # inside the first call
    # while somebody edits, a strip call holds STRIP_ROWS_WHILE_EDITING = 4 rows
    assert [r.first_call for r in out[:8]] == [0] * 4 + [2] * 4 and all(r.calls > 1 for r in out[:8])
    ten = factory("eager", loaded.model, "fp32")(s10)
    for r, zs in zip(out[:8], strips):
        torch.testing.assert_close(r.out, ten.decode(zs), atol=1e-4, rtol=0)
    torch.testing.assert_close(edit.out, ref.decode(z[8:9]), atol=1e-5, rtol=0)
    # the edit, then the strips' 64 rows in calls of 4
    assert (renderer.stats.calls, renderer.stats.rows, renderer.stats.preemptions) == (1 + 64 // 4, 65, 1)

    # nobody edits: the strips (nothing else waiting) share calls of max_batch rows
    renderer = Renderer(loaded.model, "eager", "fp32", s4, max_batch=16)
    out = _run_owned(renderer, jobs[:8])
    assert [r.first_call for r in out] == [0] * 8
    assert (renderer.stats.calls, renderer.stats.rows) == (64 // 16, 64)


def _run_after_first_call(renderer: Renderer, first, then):
    """Submit job ``first`` (owner, op, setting, x); once its runner call has started, the jobs
    ``then``. Their Rendered results, and the order the jobs finished in (indices)."""
    finished = []

    async def go():
        await renderer.start()
        try:
            async def run(i, owner, op, setting, x):
                r = await renderer.submit(op, setting, x, owner=owner)
                finished.append(i)
                return r

            tasks = [asyncio.create_task(run(0, *first))]
            while renderer._busy_since is None:  # (the first call is in the worker thread)
                await asyncio.sleep(0.001)
            tasks += [asyncio.create_task(run(i + 1, *job)) for i, job in enumerate(then)]
            return await asyncio.gather(*tasks)
        finally:
            await renderer.stop()

    try:
        return asyncio.run(go()), finished
    finally:
        renderer.close()


def test_an_edit_runs_at_the_next_pause_point_of_a_strips_call(loaded, studio, ref):
    """A 16-image strip at 10 steps occupies the runner; an edit of another connection, sent
    while it runs, is rendered inside that call (before its next U-Net evaluation) and comes
    back first. Both images are what each would be alone."""
    s4, s10 = DecodeSetting(STEPS, "euler"), DecodeSetting(10, "euler")
    z = ref.encode(studio.heldout[:3])
    strip = path_latents(z[0:1], z[1:2], 16)
    renderer = Renderer(loaded.model, "eager", "fp32", s4, max_batch=16)
    (r_strip, r_edit), finished = _run_after_first_call(renderer, (object(), DECODE, s10, strip),
                                                        [(object(), DECODE, s4, z[2:3])])  # fmt: skip
    assert finished == [1, 0] and r_edit.preempted and not r_strip.preempted
    assert (r_strip.calls, r_strip.rows, r_edit.calls, r_edit.rows) == (1, 16, 1, 1)
    assert (renderer.stats.calls, renderer.stats.preemptions) == (2, 1)
    torch.testing.assert_close(r_edit.out, ref.decode(z[2:3]), atol=1e-5, rtol=0)
    torch.testing.assert_close(r_strip.out, factory("eager", loaded.model, "fp32")(s10).decode(strip), atol=1e-4, rtol=0)
    # the edit's wait was part of the strip's call: the strip's own runner time leaves it out
    assert r_edit.blocked_ms < r_strip.runner_ms and r_strip.blocked_ms >= r_edit.runner_ms

    # a call without pause points (an encode) is not pre-empted: the edit handed to it comes
    # back to the queue and runs next
    renderer = Renderer(loaded.model, "eager", "fp32", s4, max_batch=16)
    (r_enc, r_edit), finished = _run_after_first_call(renderer, (object(), ENCODE, s4, studio.heldout[:16]),
                                                      [(object(), DECODE, s4, z[2:3])])  # fmt: skip
    assert finished == [0, 1] and not r_edit.preempted and renderer.stats.preemptions == 0
    assert (r_edit.first_call, renderer.stats.calls) == (1, 2)
    torch.testing.assert_close(r_edit.out, ref.decode(z[2:3]), atol=1e-5, rtol=0)

    # edits do not pre-empt edits: one-row jobs take turns (batched) as before
    renderer = Renderer(loaded.model, "eager", "fp32", s4, max_batch=16)
    (_, r_edit), finished = _run_after_first_call(renderer, (object(), DECODE, s10, z[0:1]),
                                                  [(object(), DECODE, s4, z[2:3])])  # fmt: skip
    assert finished == [0, 1] and not r_edit.preempted and renderer.stats.preemptions == 0


def test_a_client_gone_while_its_frame_is_sent_ends_its_session_quietly(client, studio, caplog):
    """The socket fails while the input frame of an upload is sent (the client left in the
    middle of its upload): the render loop ends (a ConnectionError) and nothing is logged as
    an internal error."""
    caplog.set_level(logging.WARNING, logger="dbae.serve")

    async def go() -> str:
        async def gone(data) -> None:
            raise WebSocketDisconnect(1006)  # what Starlette raises on a connection the client closed

        session = Session(studio, gone, gone)
        try:
            await session._serve("upload:a", {"msg": {"type": "upload", "seq": 1}, "data": GOOD,
                                              "received": time.perf_counter()})  # fmt: skip
        except ConnectionError:
            return "ended"
        finally:
            session.close()
        return "went on"

    assert client.portal.call(go) == "ended"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def _decode_together(client, studio, k: int, attempts: int = 5) -> list[tuple[dict, dict]]:
    """Edits of two connections sent while a third one's 16-image strip occupies the runner."""
    seen = []
    with connect(client) as w1, connect(client) as w2, connect(client) as w3:
        pick(w1, 0, seq=1)
        pick(w1, 1, seq=2, slot="b")
        pick(w2, 2, seq=1)
        pick(w3, 3, seq=1)
        for attempt in range(attempts):
            seq = 10 * (attempt + 1)
            send(w1, {"type": "strip", "seq": seq, "count": 16})
            send(w2, {"type": "edit", "seq": seq, "scales": scales_with(studio, x=1.0)})
            send(w3, {"type": "edit", "seq": seq, "scales": scales_with(studio, y=1.0)})
            f2, f3 = until_frame(w2, seq, "edit")[0], until_frame(w3, seq, "edit")[0]
            until_frame(w1, seq, "strip")
            seen.append((f2, f3))
            if f2["timings"]["batch"] == 2:
                break
    return seen


def test_connections_that_wait_together_share_one_runner_call(client, studio, ref, monkeypatch):
    k = len(studio.attributes)
    seen = _decode_together(client, studio, k)
    f2, f3 = seen[-1]
    assert f2["timings"]["batch"] == f3["timings"]["batch"] == 2, [(a["timings"], b["timings"]) for a, b in seen]
    clf = studio.classifier
    assert_close(f2["image"], render(ref, shift_latents(z_heldout(studio, ref, 2), clf, "x", [1.0])[0])[0])
    assert_close(f3["image"], render(ref, shift_latents(z_heldout(studio, ref, 3), clf, "y", [1.0])[0])[0])

    monkeypatch.setattr(studio.renderer, "max_batch", 1)  # batching off: one call per request
    seen = _decode_together(client, studio, k, attempts=3)
    assert len(seen) == 3 and all(a["timings"]["batch"] == b["timings"]["batch"] == 1 for a, b in seen)


# ----- 10. security and the command line -----
@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://testserver.evil.example",
                                    "https://evil.example:443", "file://", "chrome-extension://abc"])  # fmt: skip
def test_a_websocket_from_another_origin_is_refused(client, studio, origin):
    total = studio.stats.connections_total
    with pytest.raises(WebSocketDisconnect) as info:
        with client.websocket_connect("/ws", headers={"origin": origin}):
            pass
    assert info.value.code == 1008
    assert studio.stats.connections_total == total  # no session was made


def test_a_websocket_from_the_page_itself_is_accepted(client):
    for headers in ({"origin": "http://testserver"}, {"origin": "http://TESTSERVER"}, {}):
        with connect(client, headers=headers) as ws:
            send(ws, {"type": "ping", "seq": 1})
            assert receive(ws) == {"type": "pong", "seq": 1}


def test_a_loopback_server_answers_loopback_host_names_only(studio):
    """DNS rebinding: a site whose name was re-pointed at 127.0.0.1 is of its own origin, so
    the origin check passes; the Host header still names that site, and is refused. (No
    `with`: the app's lifespan is not run, so the module's client keeps the renderer.)"""
    app = create_app(studio, loopback_only=True)
    for base in ("http://127.0.0.1:8000", "http://localhost:8000", "http://[::1]:8000", "http://127.0.0.1"):
        assert TestClient(app, base_url=base).get("/").status_code == 200, base
    total = studio.stats.connections_total
    for base in ("http://evil.example:8000", "http://127.0.0.1.evil.example", "http://10.0.0.1:8000"):
        guarded = TestClient(app, base_url=base)
        r = guarded.get("/api/info")
        assert r.status_code == 421 and "localhost" in r.text, base
        with pytest.raises(WebSocketDisconnect) as info:
            with guarded.websocket_connect("/ws", headers={"origin": base}):
                pass
        assert info.value.code == 1008
    assert studio.stats.connections_total == total
    # without the guard (a server bound to another interface) any host name is served
    assert TestClient(create_app(studio), base_url="http://evil.example:8000").get("/").status_code == 200


def test_listening_beyond_this_machine_prints_a_warning():
    for host in ("0.0.0.0", "::", ""):
        assert "WARNING" in host_warning(host) and "every network interface" in host_warning(host)
    assert "192.168.1.5" in host_warning("192.168.1.5")
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert host_warning(host) is None


def test_bind_says_when_the_port_is_taken():
    first = bind("127.0.0.1", 0)
    try:
        port = first.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"cannot listen on 127\.0\.0\.1:{port} .*choose another --port"):
            bind("127.0.0.1", port)
    finally:
        first.close()


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def no_server(monkeypatch):
    """The command must fail before it loads anything or listens."""
    import dbae.serve.server as server

    def refuse(*args, **kwargs):
        raise AssertionError("dbae serve went on to start the studio")

    for name in ("make_studio", "bind", "run_server"):
        monkeypatch.setattr(server, name, refuse)


@pytest.mark.parametrize("args, expected", [
    (["--steps", "0"], "--steps must be from 1 to 10, got 0"),
    (["--steps", "11"], "--steps must be from 1 to 10, got 11"),
    (["--port", "70000"], "--port must be from 0 to 65535, got 70000"),
    (["--port", "-1"], "--port must be from 0 to 65535"),
    (["--max-upload-mb", "0"], "--max-upload-mb must be a positive number"),
    (["--max-upload-mb", "nan"], "--max-upload-mb must be a positive number"),
    (["--max-upload-mb", "inf"], "--max-upload-mb must be a positive number"),
    (["--max-batch", "0"], "--max-batch must be at least 1"),
    (["--threads", "0"], "--threads must be at least 1, got 0"),
    (["--max-megapixels", "0"], "--max-megapixels must be a positive number"),
    (["--classifier", "{tmp}/missing.safetensors"], "no classifier file at"),
    (["--classifier", "{tmp}/garbage.safetensors"], "garbage.safetensors"),
    (["--ckpt", "{tmp}/no-such-run"], "no-such-run"),
])  # fmt: skip
def test_serve_arguments_are_checked_before_anything_starts(capsys, trained_tiny, tmp_path, no_server, args,
                                                            expected):  # fmt: skip
    (tmp_path / "garbage.safetensors").write_bytes(b"not a classifier at all")
    argv = ["serve", "--ckpt", str(trained_tiny), *(a.format(tmp=tmp_path) for a in args)]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in err, err
    assert "open http" not in out


def test_serve_command_builds_the_studio_and_listens(capsys, trained_tiny, monkeypatch):
    import dbae.serve.server as server

    real_bind, started = server.bind, {}

    def fake_bind(host, port):  # (never listen on every interface in a test)
        started["asked"] = (host, port)
        return real_bind("127.0.0.1", 0)

    def fake_run(studio, sock, **kwargs):
        started.update(studio=studio, port=sock.getsockname()[1])

    monkeypatch.setattr(server, "bind", fake_bind)
    monkeypatch.setattr(server, "run_server", fake_run)
    threads = torch.get_num_threads()
    try:
        code, out, err = run_cli(capsys, "serve", "--ckpt", str(trained_tiny), "--host", "0.0.0.0", "--port", "0",
                                 "--no-auto-classifier", "--steps", "3", "--sampler", "heun", "--max-upload-mb",
                                 "2.5", "--max-batch", "4", "--threads", "1")  # fmt: skip
        assert torch.get_num_threads() == 1 and "1 CPU thread per call" in out
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    assert err.strip().startswith("WARNING: listening on every network interface")
    assert started["asked"] == ("0.0.0.0", 0) and f"open http://127.0.0.1:{started['port']}/" in out
    studio = started["studio"]
    try:
        assert studio.renderer.default == DecodeSetting(3, "heun") and studio.renderer.max_batch == 4
        assert studio.max_upload_bytes == 2_500_000 and studio.classifier is None and studio.attributes == ()
        assert "dbae train-classifier" in out and "dbae train-classifier" in studio.hello()["classifier_note"]
    finally:
        studio.renderer.close()


# ----- 11. the slider arithmetic -----
@pytest.mark.parametrize("shape", [(3, 16, 16), (5, 3, 16, 16), (1, 9, 12), (3, 64, 48)])
def test_frames_are_pngs_of_the_uint8_pixels(shape):
    """The server's own PNG writer: any PNG decoder reads back to_uint8's pixels exactly
    (clamped, rounded half to even), a strip side by side, grey for one channel."""
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g) * 0.9
    x.view(-1)[:4] = torch.tensor([-3.0, 3.0, -1 / 127.5 * 0.5 - 1, 0.5 / 127.5 - 1])  # clamped; rounding ties
    want = to_uint8(x)
    if want.ndim == 4:
        want = np.concatenate(list(want), axis=1)
    img = Image.open(io.BytesIO(png_bytes(x)))
    assert img.format == "PNG" and img.mode == ("RGB" if shape[-3] == 3 else "L")
    assert np.array_equal(np.asarray(img), want[..., 0] if want.shape[-1] == 1 else want)


def test_edit_latents_with_one_slider_is_shift_latents(studio, ref):
    clf, names, directions = studio.classifier, studio.attributes, studio.directions
    assert attribute_directions(clf)[0] == names and directions.shape == (len(names), clf.z_dim)
    z = ref.encode(studio.heldout[:3])
    for name in ("x", "colour=green", "size"):
        for s in (-2.0, 0.7):
            scales = [0.0] * len(names)
            scales[names.index(name)] = s
            torch.testing.assert_close(edit_latents(z, clf, directions, scales), shift_latents(z, clf, name, [s])[0],
                                       atol=1e-5, rtol=1e-5)  # fmt: skip
    assert edit_latents(z, clf, directions, [0.0] * len(names)) is z  # nothing moved: z itself
    per_row = torch.zeros(3, len(names))
    per_row[1, names.index("x")] = 1.0
    moved = edit_latents(z, clf, directions, per_row)
    torch.testing.assert_close(moved[0], z[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moved[1], shift_latents(z[1:2], clf, "x", [1.0])[0, 0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="scales must have"):
        edit_latents(z, clf, directions, [1.0] * (len(names) - 1))


def test_mix_and_path_latents_end_at_a_and_b(studio, ref):
    za, zb = ref.encode(studio.heldout[0:1]), ref.encode(studio.heldout[1:2])
    assert mix_latents(za, zb, 0.0) is za
    torch.testing.assert_close(mix_latents(za, zb, 1.0), zb)
    torch.testing.assert_close(mix_latents(za, zb, 0.25), 0.75 * za + 0.25 * zb)
    path = path_latents(za, zb, 5)
    assert path.shape == (5, za.shape[1])
    torch.testing.assert_close(path[0], za[0])
    torch.testing.assert_close(path[-1], zb[0])
    torch.testing.assert_close(path[2], mix_latents(za, zb, 0.5)[0])
    # the edit is a shift of normalized z: editing the mix is mixing the edits
    clf, d = studio.classifier, studio.directions
    s = scales_with(studio, x=1.0, y=-0.5)
    torch.testing.assert_close(edit_latents(mix_latents(za, zb, 0.3), clf, d, s),
                               mix_latents(edit_latents(za, clf, d, s), edit_latents(zb, clf, d, s), 0.3),
                               atol=1e-5, rtol=1e-5)  # fmt: skip


# ----- 12. face alignment -----
def _similarity_coords(quad: np.ndarray, point, size: int) -> np.ndarray:
    """Where ``point`` of the photo lands in the size x size crop of the square ``quad``."""
    q0, q1, q3 = quad[0], quad[1], quad[3]
    p = np.asarray(point, np.float64) - q0
    u = p @ (q3 - q0) / np.sum((q3 - q0) ** 2)
    v = p @ (q1 - q0) / np.sum((q1 - q0) ** 2)
    return np.array([u, v]) * size


def test_ffhq_quad_of_a_level_face_is_an_axis_aligned_square():
    el, er, ml, mr = (100.0, 100.0), (140.0, 100.0), (105.0, 150.0), (135.0, 150.0)
    quad = align.ffhq_quad(el, er, ml, mr)
    # eye_to_eye (40, 0), eye_to_mouth (0, 50): x = (90, 0) scaled to max(2 * 40, 1.8 * 50) = 90,
    # c = eye_avg + 0.1 eye_to_mouth = (120, 105); corners TL, BL, BR, TR
    np.testing.assert_allclose(quad, [[30, 15], [30, 195], [210, 195], [210, 15]], atol=1e-9)
    quad = align.ffhq_quad(el, er, (110.0, 120.0), (130.0, 120.0))  # mouth close: the eyes set the scale
    np.testing.assert_allclose(quad, [[40, 22], [40, 182], [200, 182], [200, 22]], atol=1e-9)
    quad = align.ffhq_quad(el, er)  # the mouth estimated EYE_TO_MOUTH eye distances below the eyes
    m = 40 * align.EYE_TO_MOUTH
    half = max(80, 1.8 * m)
    c = np.array([120, 100 + 0.1 * m])
    np.testing.assert_allclose(quad, c + half * np.array([[-1, -1], [-1, 1], [1, 1], [1, -1]]), atol=1e-9)
    with pytest.raises(ValueError, match="do not span a face"):
        align.ffhq_quad((5, 5), (5, 5))


@pytest.mark.parametrize("degrees", [-25.0, 12.0, 90.0])
def test_ffhq_quad_of_a_rotated_face_is_the_rotated_quad(degrees):
    t = math.radians(degrees)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    centre = np.array([300.0, 200.0])
    points = np.array([(100.0, 100.0), (140.0, 100.0), (105.0, 150.0), (135.0, 150.0)])
    turned = (points - centre) @ rot.T + centre
    for k in (4, 2):  # with the mouth corners, and without (estimated)
        level = align.ffhq_quad(*points[:k])
        quad = align.ffhq_quad(*turned[:k])
        np.testing.assert_allclose(quad, (level - centre) @ rot.T + centre, atol=1e-9)
        edge = quad[3] - quad[0]  # the top edge turns with the face
        assert math.isclose(math.atan2(edge[1], edge[0]), t, abs_tol=1e-9)


def test_crop_quad_maps_the_quad_onto_the_square():
    photo = np.zeros((200, 200, 3), np.uint8)
    photo[58:63, 148:153] = 255  # a white dot centred at (150, 60)
    t = math.radians(30)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    corners = np.array([[-1, -1], [-1, 1], [1, 1], [1, -1]]) * 60.0
    quad = corners @ rot.T + (110.0, 100.0)
    out = np.asarray(align.crop_quad(Image.fromarray(photo), quad, 64)).astype(float).sum(axis=2)
    ys, xs = np.nonzero(out > 0.5 * out.max())
    expected = _similarity_coords(quad, (150.5, 60.5), 64)
    assert abs(xs.mean() + 0.5 - expected[0]) < 1.5 and abs(ys.mean() + 0.5 - expected[1]) < 1.5


def _astronaut() -> Image.Image:
    data = pytest.importorskip("skimage.data")
    return Image.fromarray(data.astronaut())


def test_align_face_puts_the_eyes_where_ffhq_has_them():
    pytest.importorskip("cv2")
    assert align.alignment_available()
    photo = _astronaut()
    face = align.detect_face(photo)
    assert face is not None and face.eyes is not None
    (lx, ly), (rx, ry) = face.eyes
    x, y, w, h = face.box
    assert x < lx < rx < x + w and y < ly < y + h / 2 and y < ry < y + h / 2  # eyes: upper half, left first
    size = 256
    out, note = align.align_face(photo, size)
    assert out.size == (size, size) and note == "aligned to FFHQ framing from the eye centres"
    quad = align.ffhq_quad(*face.eyes)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(align.crop_quad(photo, quad, size)))
    # FFHQ's framing of a face (the mouth estimated): eyes level at 0.486 of the height,
    # 0.24 of the width apart around the centre
    m = align.EYE_TO_MOUTH
    half = max(2.0, 1.8 * m) * 2  # the crop's side in eye distances
    canon_y = 0.5 - 0.1 * m / half
    canon = [(0.5 - 0.5 / half, canon_y), (0.5 + 0.5 / half, canon_y)]
    for eye, where in zip(face.eyes, canon):
        np.testing.assert_allclose(_similarity_coords(quad, eye, size) / size, where, atol=1e-9)
    again = align.detect_face(out.resize((512, 512), Image.Resampling.BICUBIC))  # found there again
    assert again is not None and again.eyes is not None
    for eye, where in zip(again.eyes, canon):
        assert np.abs(np.asarray(eye) / 512 - where).max() < 0.05, (again.eyes, canon)


def test_prepare_upload_aligns_only_for_face_models(studio, loaded, monkeypatch):
    pytest.importorskip("cv2")
    photo = _astronaut()
    data = png(np.asarray(photo))
    # (decoded reduced by a whole factor to at least 4x the model's side first: 512 / 8 = 64)
    centred = pil_to_tensor(resize_square(photo.reduce(8), SIZE, center_crop=True))[None]
    x, note = studio.prepare_upload(data, True)  # a shapes model: no alignment, asked or not
    assert studio.face is False and note == "resized from 512x512 to 16x16 (shorter side, then centre-cropped)"
    torch.testing.assert_close(x, centred, atol=0, rtol=0)

    face_loaded = replace(loaded, preset=replace(loaded.preset, name="celeba64"))
    face = Studio(face_loaded, studio.renderer, None, heldout=0)
    assert face.face and face.align_available and face.hello()["align"] is True
    x, note = face.prepare_upload(data, True)
    aligned, _ = align.align_face(decode_rgb(data, "photo"), SIZE)
    assert note == "512x512: aligned to FFHQ framing from the eye centres"
    torch.testing.assert_close(x, pil_to_tensor(aligned)[None], atol=0, rtol=0)
    assert (x - centred).abs().mean() > 0.05
    x, note = face.prepare_upload(data, False)  # not asked: centre-cropped
    torch.testing.assert_close(x, centred, atol=0, rtol=0)
    x, note = face.prepare_upload(png(noise(48, 64, seed=10)), True)  # no face in it: centre-cropped, and said
    assert note == "no face found: resized from 64x48 to 16x16 (shorter side, then centre-cropped)"

    monkeypatch.setattr(align, "alignment_available", lambda: False)  # an install without OpenCV
    bare = Studio(face_loaded, studio.renderer, None, heldout=0)
    assert bare.face and not bare.align_available and "unavailable" in bare.hello()["align_note"]
    x, note = bare.prepare_upload(data, True)
    assert note.startswith("face alignment is unavailable") and "centre-cropped" in note
    torch.testing.assert_close(x, centred, atol=0, rtol=0)
