"""`dbae serve` on a model of the authors' code: their tiny 128 px DBAE-d fixture imported
by `dbae import`, with a random 40-attribute classifier saved as their ``best.pt`` and
imported for it. The studio shows CelebA's 40 sliders, offers face alignment, and its
edited frames are the model's own edit with the authors' raw-z rule. (The same in
Chromium: tests/test_serve_browser.py.)"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dbae.apps.attributes import load_classifier
from dbae.data.attributes import CELEBA_ATTRIBUTES
from dbae.export.registry import factory
from dbae.export.runner import DecodeSetting
from dbae.imageio import to_uint8
from dbae.inference import load_model
from dbae.serve import align
from dbae.serve import protocol as P

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from dbae.serve.app import create_app  # noqa: E402
from dbae.serve.server import make_studio  # noqa: E402

STEPS = 1


@pytest.fixture(scope="module")
def studio(imported_tiny128):
    run, classifier = imported_tiny128
    threads = torch.get_num_threads()
    s = make_studio(load_model(run), ckpt=str(run), classifier=classifier, steps=STEPS, log=lambda line: None)
    yield s
    s.renderer.close()
    torch.set_num_threads(threads)


def _frame(ws, kind: str) -> tuple[dict, np.ndarray]:
    """The next frame of ``kind`` (other frames skipped; an error message fails)."""
    while True:
        message = ws.receive()
        if message.get("text") is not None:
            data = json.loads(message["text"])
            assert data["type"] != "error", data
            continue
        header, payload = P.unpack(message["bytes"])
        if header["kind"] == kind:
            with Image.open(io.BytesIO(payload)) as im:
                return header, np.asarray(im.convert("RGB")).copy()


def test_the_studio_of_an_imported_face_model(studio, imported_tiny128):
    hello = studio.hello()
    assert [a["name"] for a in hello["attributes"]] == list(CELEBA_ATTRIBUTES)
    assert hello["face"] is True and hello["align"] == align.alignment_available()
    assert hello["image_size"] == 128 and hello["preset"] == "official-custom"

    _, classifier = imported_tiny128
    clf = load_classifier(classifier)
    model = studio.loaded.model
    rng = np.random.default_rng(0)
    picture = (rng.random((128, 128, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, format="PNG")
    scales = [0.0] * len(CELEBA_ATTRIBUTES)
    smiling = CELEBA_ATTRIBUTES.index("Smiling")
    scales[smiling] = 0.8
    with TestClient(create_app(studio)) as client, client.websocket_connect("/ws") as ws:
        assert json.loads(ws.receive()["text"])["type"] == "hello"
        ws.send_bytes(P.pack({"type": "upload", "seq": 1, "slot": "a", "align": False}, buf.getvalue()))
        _, shown = _frame(ws, "input")
        ws.send_text(json.dumps({"type": "edit", "seq": 2, "scales": scales}))
        header, edited = _frame(ws, "edit")
    assert header["seq"] == 2
    # what the model makes of it: z + 0.8 sqrt(d) w / |w| (raw z), decoded with the same setting
    ref = factory("eager", model, "fp32")(DecodeSetting(STEPS, "euler"))
    x = torch.from_numpy(shown).permute(2, 0, 1)[None].float() / 127.5 - 1
    z = ref.encode(x)
    w = clf.weight[smiling]
    expected = to_uint8(ref.decode(z + 0.8 * math.sqrt(z.shape[1]) * w / w.norm()))[0]
    d = np.abs(edited.astype(np.int16) - expected.astype(np.int16))
    assert d.max() <= 1 and d.mean() < 0.05, (d.max(), d.mean())
    unedited = to_uint8(ref.decode(z))[0]
    assert np.abs(edited.astype(np.int16) - unedited.astype(np.int16)).mean() > 0.5  # the slider moved it
