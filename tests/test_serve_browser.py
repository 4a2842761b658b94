"""End to end: the real ``dbae serve`` on a free loopback port, driven in headless Chromium.

Playwright's Python API drives Debian's ``chromium`` (``executable_path``: Playwright's own
browser download is impossible here). Without a Chromium the test is skipped, unless
``DBAE_REQUIRE_BROWSER=1`` (set by ``.ci/run``, which installs it), where it fails.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil

import pytest
import torch
from PIL import Image

from dbae.data import ShapesDataset
from dbae.imageio import to_uint8
from dbae.serve.launch import serve_process
from dbae.serve.render import resolve_runner_kind

playwright = pytest.importorskip("playwright.sync_api")

MS = re.compile(r"^\d+(\.\d+)? ms$")


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    message = "no Chromium on PATH (Debian: apt-get install chromium)"
    if os.environ.get("DBAE_REQUIRE_BROWSER") == "1":
        pytest.fail(message + "; DBAE_REQUIRE_BROWSER=1 forbids skipping the browser test")
    pytest.skip(message)


@pytest.fixture(scope="module")
def server(trained_tiny):
    with serve_process(trained_tiny, "--steps", "3") as proc:
        yield proc


@contextlib.contextmanager
def open_page(url: str):
    """The studio's page in headless Chromium, connected; fails if the page logged errors."""
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(url)
            page.wait_for_selector("#status.ok", timeout=30_000)
            yield page
            assert errors == [], f"the page logged errors: {errors}"
        finally:
            browser.close()


@pytest.fixture
def page(server):
    with open_page(server.url) as page:
        yield page


def shapes_png(path, index: int, size: int) -> str:
    Image.fromarray(to_uint8(ShapesDataset(size, seed=1, split="test")[index][0])).save(path)
    return str(path)


def drag(page, selector: str, to_fraction: float) -> None:
    """Drag a range slider's thumb from its centre to ``to_fraction`` of its width, in
    small mouse moves (each one an input event, as a user's drag)."""
    box = page.locator(selector).bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] / 2, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * to_fraction, y, steps=25)
    page.mouse.up()


def test_upload_edit_and_readout_in_chromium(page, server, tmp_path):
    info = page.inner_text("#model-info")
    assert "tiny16" in info and f"runner {resolve_runner_kind('auto', torch.device('cpu'))} " in info
    sliders = page.locator(".attr-slider")
    assert sliders.count() > 5  # the shapes classifier the server fitted: one slider per attribute

    # upload A (64x64: the server resizes it to the model's 16x16 and says so)
    page.set_input_files("#file-a", shapes_png(tmp_path / "a.png", 0, 64))
    page.wait_for_selector("#img-edit[data-seq]", timeout=30_000)
    page.wait_for_selector("#img-recon[src^='blob:']")
    assert "resized from 64x64 to 16x16" in page.inner_text("#toast")
    for img in ("#img-input", "#img-recon", "#img-edit"):
        size = page.locator(img).evaluate("(im) => im.decode().then(() => [im.naturalWidth, im.naturalHeight])")
        assert size == [16, 16], img
    before = page.locator("#img-edit").screenshot()
    first_seq = int(page.get_attribute("#img-edit", "data-seq"))

    # drag the 'red' colour slider all the way: many input events, coalesced by the server
    drag(page, ".attr-slider[aria-label='colour: red']", 0.98)
    value = float(page.locator(".attr-slider[aria-label='colour: red']").input_value())
    assert value > 1.0
    # the page shows the frame of the last slider event once the burst is served
    sent = page.get_attribute("#img-edit", "data-sent")
    page.wait_for_selector(f"#img-edit[data-seq='{sent}']", timeout=30_000)
    assert int(sent) > first_seq + 5  # a drag of many events
    after = page.locator("#img-edit").screenshot()
    assert after != before, "moving the slider did not change the edited image"

    # the readout shows the server's and the page's timings
    for metric in ("#m-encode", "#m-decode", "#m-image", "#m-server", "#m-e2e"):
        assert MS.match(page.inner_text(metric)), (metric, page.inner_text(metric))
    assert int(page.inner_text("#m-fps")) >= 0
    batch, skipped = (int(v) for v in page.inner_text("#m-batch").split("·"))
    assert batch == 1 and skipped >= 0

    # the server decoded far fewer images than the drag sent events
    stats = page.evaluate("() => fetch('/api/stats').then((r) => r.json())")
    assert stats["errors"] == 0 and stats["edit_frames"] >= 2
    page.screenshot(path=str(tmp_path / "studio.png"), full_page=True)
    if os.environ.get("DBAE_SERVE_SCREENSHOT"):
        page.screenshot(path=os.environ["DBAE_SERVE_SCREENSHOT"], full_page=True)


def test_bad_upload_is_one_message_and_the_page_keeps_working(page, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    page.set_input_files("#file-a", str(bad))
    page.wait_for_selector("#toast:not(.hidden)")
    assert "not a PNG, JPEG or WebP image" in page.inner_text("#toast")
    assert "connected" in page.inner_text("#status")
    page.set_input_files("#file-a", shapes_png(tmp_path / "a.png", 2, 16))
    page.wait_for_selector("#img-edit[data-seq]", timeout=30_000)


@pytest.fixture(scope="module")
def official_server(imported_tiny128):
    """The authors' tiny 128 px model imported by `dbae import`, with a random 40-attribute
    classifier in the authors' format imported for it."""
    run, classifier = imported_tiny128
    with serve_process(run, "--classifier", str(classifier), "--steps", "1") as proc:
        yield proc


def test_an_imported_face_model_in_chromium(official_server, tmp_path):
    """CelebA's 40 sliders from the imported classifier, the face alignment option, and an
    upload edited by dragging one of them."""
    with open_page(official_server.url) as page:
        assert "official-custom" in page.inner_text("#model-info")
        assert page.locator(".attr-slider").count() == 40
        assert page.locator(".attr-slider[aria-label='Smiling']").count() == 1
        assert page.locator("#align-row").is_visible()  # a face model: alignment is offered
        picture = tmp_path / "face.png"
        Image.fromarray(to_uint8(ShapesDataset(128, seed=1, split="test")[0][0])).save(picture)
        if page.locator("#align").is_enabled():
            page.uncheck("#align")  # a random test picture has no face to find
        page.set_input_files("#file-a", str(picture))
        page.wait_for_selector("#img-edit[data-seq]", timeout=60_000)
        before = page.locator("#img-edit").screenshot()
        smiling = page.locator(".attr-slider[aria-label='Smiling']")
        smiling.scroll_into_view_if_needed()  # the 32nd of 40 sliders
        drag(page, ".attr-slider[aria-label='Smiling']", 0.98)
        assert float(smiling.input_value()) > 1.0
        sent = page.get_attribute("#img-edit", "data-sent")
        page.wait_for_selector(f"#img-edit[data-seq='{sent}']", timeout=60_000)
        assert page.locator("#img-edit").screenshot() != before
