"""The demo page in a real browser: headless Chromium (Debian's ``chromium``, started by Playwright)
loads the page, clicks Generate, waits for both videos and the summary, and saves a screenshot.

Marked ``browser``: CI runs it (``pytest -m browser``) after installing chromium; the quick local run
leaves it out. ``DITACCEL_DEMO_SCREENSHOT=path.png`` keeps a copy of the screenshot.
"""

from __future__ import annotations

import os
import shutil
import socket

import imageio.v3 as iio
import pytest

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("DITACCEL_CHROMIUM", "/usr/bin/chromium")
TIMEOUT_MS = 240_000  # one small generation on a busy 2-core CPU


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_page_generates_both_outputs(tmp_path):
    from playwright.sync_api import sync_playwright

    from ditaccel.demo import launch
    from ditaccel.demo.session import DemoSession

    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} is missing: apt-get install -y chromium"
    session = DemoSession()
    # A 2-step 64x128x5 tile run: the page's own defaults with smaller numbers, nothing typed.
    app = launch(port=free_port(), session=session, block=False, quiet=True,
                 initial=dict(steps=2, height=64, width=128, frames=5, method="tile"))
    shot, shot_pair = tmp_path / "demo.png", tmp_path / "side_by_side.png"
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1100})
                page.goto(app.local_url, wait_until="domcontentloaded")
                page.locator("#generate").click()
                for side in ("dense", "accelerated"):
                    page.locator(f"#{side}-video video[src]").wait_for(state="attached", timeout=TIMEOUT_MS)
                summary = page.locator("#summary")
                summary.get_by_text("speedup").first.wait_for(timeout=TIMEOUT_MS)
                text = summary.inner_text()
                page.locator("#block-map img").wait_for(timeout=TIMEOUT_MS)
                page.locator("#side-by-side img").wait_for(timeout=TIMEOUT_MS)
                page.screenshot(path=str(shot), full_page=True)
                page.locator("#side-by-side img").screenshot(path=str(shot_pair))  # the labelled comparison
                errors = page.locator(".toast-body").count()
            finally:
                browser.close()
    finally:
        app.close()
        session.close()

    assert "density" in text and "PSNR" in text and "tile" in text
    assert errors == 0
    with open(shot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
    pair = iio.imread(shot_pair)
    assert pair.shape[1] > pair.shape[0] and pair.std() > 0  # three labelled panels side by side
    if os.environ.get("DITACCEL_DEMO_SCREENSHOT"):
        shutil.copy(shot, os.environ["DITACCEL_DEMO_SCREENSHOT"])
