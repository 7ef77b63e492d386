"""`dreambooth serve` in a real browser (Debian's Chromium, driven by Playwright; no browser is downloaded): train
the built-in demo from the page, watch it, stop it, resume it, see it finish; upload photos and caption them — and
nothing fetched from elsewhere.

UI_SCREENSHOTS=docs writes the screenshots the README shows (docs/ui-*.png); otherwise they go to a temporary folder.
"""

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary here (the test image has Debian's chromium)"),
]
MINUTES = 60_000  # Playwright counts milliseconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    for name in ("models", "data", "output", "cache"):
        (tmp_path / name).mkdir()
    port = free_port()
    command = [sys.executable, "-m", "dreambooth", "serve", "--port", str(port),
               *(f"--{n}={tmp_path / n}" for n in ("models", "data", "output", "cache"))]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = process.stdout.readline()
    assert f"http://127.0.0.1:{port}/" in line, line
    yield f"http://127.0.0.1:{port}", tmp_path
    process.terminate()
    process.wait(timeout=30)
    for folder in (tmp_path / "output").iterdir():  # a run still going when a check failed: end it
        subprocess.run(["pkill", "-TERM", "-f", str(folder)], check=False)


def test_train_the_demo_from_the_page_stop_it_resume_it_see_it_finish(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    base, volumes = server
    shots = Path(os.environ.get("UI_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    elsewhere = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("request", lambda r: None if r.url.startswith((base, "blob:", "data:")) else elsewhere.append(r.url))

        page.goto(base)
        expect(page.locator("#runs")).to_contain_text("No runs")
        page.fill("#demo-form input[name=run_name]", "demo")
        page.fill("#demo-form input[name=max_train_steps]", "24")
        page.fill("#demo-form input[name=save_interval]", "8")
        page.click("#demo-form button[type=submit]")
        page.wait_for_url(re.compile(r".*/run\?run=demo$"))

        # it trains: the step count and the loss plot grow, live
        expect(page.locator("#status")).to_have_text("running", timeout=2 * MINUTES)
        page.wait_for_function("document.querySelector('#progress').value >= 2", timeout=6 * MINUTES)
        points = page.eval_on_selector("#plot polyline.loss", "e => e.getAttribute('points').split(' ').length")
        page.wait_for_function(
            f"document.querySelector('#plot polyline.loss').getAttribute('points').split(' ').length > {points}",
            timeout=2 * MINUTES,
        )
        # the first checkpoint's samples appear
        expect(page.locator("#samples img").first).to_be_visible(timeout=4 * MINUTES)
        page.screenshot(path=shots / "ui-run.png", full_page=True)

        # Stop: the run saves a checkpoint and ends; the page says which
        page.click("#stop")
        expect(page.locator("#status")).to_have_text(re.compile(r"^stopped, checkpoint step-\d+$"), timeout=3 * MINUTES)
        stopped_at = int(page.locator("#status").inner_text().rsplit("-", 1)[1])
        assert 8 <= stopped_at < 24

        # Resume: it goes on from there and finishes, its export listed with its sha256
        page.click("#resume")
        expect(page.locator("#status")).to_have_text("done", timeout=8 * MINUTES)
        expect(page.locator("#exports tbody tr")).to_have_count(1, timeout=MINUTES)
        expect(page.locator("#exports tbody")).to_contain_text(re.compile(r"[0-9a-f]{64}"))
        expect(page.locator("#step")).to_have_text("step 24 of 24")
        page.screenshot(path=shots / "ui-run-done.png", full_page=True)

        page.goto(base)
        expect(page.locator("#runs tbody")).to_contain_text("done")
        page.screenshot(path=shots / "ui-runs.png", full_page=True)
        page.goto(f"{base}/new")
        expect(page.locator("details.panel").first).to_be_visible()
        # photos from this computer into a new folder of /data: thumbnails with their buckets, captions saved
        photos = [tmp_path / f"upload{i}.png" for i in range(2)]
        for i, path in enumerate(photos):
            Image.new("RGB", (768, 512), (60 * i, 90, 120)).save(path)
        page.fill("#upload-folder", "alice")
        page.set_input_files("#upload-files", [str(p) for p in photos])
        page.click("#upload")
        expect(page.locator("#upload-status")).to_have_text("2 of 2 uploaded to alice", timeout=MINUTES)
        expect(page.locator("#photos")).to_have_value("alice")
        expect(page.locator("#thumbs figure")).to_have_count(2)
        expect(page.locator("#thumbs figure").first).to_contain_text("upload0.png · bucket 640x384")
        caption = page.locator("#thumbs input").first
        caption.fill("sks woman on a bench")
        caption.press("Tab")
        expect(caption).to_have_attribute("title", "saved")
        page.screenshot(path=shots / "ui-new.png", full_page=True)
        browser.close()

    assert elsewhere == []  # every script, style and image came from the server itself
    alice = volumes / "data" / "alice"
    assert (alice / "upload0.png").read_bytes() == photos[0].read_bytes()
    assert (alice / "upload0.txt").read_text() == "sks woman on a bench\n"
    events = (volumes / "output" / "demo" / "events.jsonl").read_text()
    assert events.count('"event": "train_start"') == 2  # started, then resumed from its checkpoint
