"""The screenshot of ``dbae serve`` in the docs: the real server and page in headless Chromium.

    python benchmarks/screenshot_serve.py --ckpt runs/shapes16 --out docs/serve_studio.png

Picks held-out images A and B, moves two attribute sliders, waits for the frame of the last
move and saves the page. Needs Playwright's Python API and a Chromium (``--chromium``;
default: ``chromium`` on PATH, Debian's package).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from dbae.serve.launch import serve_process


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="run directory or checkpoint to serve")
    p.add_argument("--out", type=Path, default=Path("docs/serve_studio.png"))
    p.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    p.add_argument("--a", type=int, default=4, help="held-out image A")
    p.add_argument("--b", type=int, default=9, help="held-out image B")
    p.add_argument("--move", nargs=2, action="append", metavar=("ATTRIBUTE", "VALUE"),
                   help="slider (aria label, e.g. 'colour: red') and value; default: colour: red 1.2, size 0.5")
    args = p.parse_args(argv)
    if not args.chromium:
        p.error("no Chromium found: pass --chromium PATH (Debian: apt-get install chromium)")
    moves = args.move or [("colour: red", "1.2"), ("size", "0.5")]
    from playwright.sync_api import sync_playwright

    with serve_process(args.ckpt) as server, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(server.url)
        page.wait_for_selector("#status.ok")
        page.click(f".thumbs button[data-index='{args.a}']")
        page.wait_for_selector("#img-edit[data-seq]")
        page.click(".seg[data-target='b']")
        page.click(f".thumbs button[data-index='{args.b}']")
        page.wait_for_selector("#img-strip[src^='blob:']")
        for label, value in moves:
            page.locator(f".attr-slider[aria-label='{label}']").fill(value)
        sent = page.get_attribute("#img-edit", "data-sent")
        page.wait_for_selector(f"#img-edit[data-seq='{sent}']")
        page.wait_for_timeout(300)  # the image element paints the blob
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.out), full_page=True)
        browser.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
