"""The web chat at `/` in headless Chromium: it loads, streams a reply, renders the code block, shows
tool calls and usage. Saves screenshots (tests/artifacts/ or $QWEN3CODER_SCREENSHOT_DIR).

Needs Debian's `chromium` and the `playwright` Python package (its bundled browsers are not used);
skipped with the reason when either is missing.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.test_server_helpers import SCRIPTED_NAME, WEATHER_TOOL, get_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _shot_dir(tmp_path: Path) -> Path:
    d = os.environ.get("QWEN3CODER_SCREENSHOT_DIR")
    out = Path(d) if d else tmp_path
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium is not installed (Debian package `chromium`)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def scr():
    server = get_server("scripted")
    yield server
    assert server.alive(), server.log()


def test_static_assets_are_local(scr):
    html = httpx.get(scr.url + "/").text
    assert "<title>qwen3coder chat</title>" in html and "http" not in html.replace('href="/', "").split("<body>")[0]
    for asset in ("/static/app.js", "/static/markdown.js", "/static/style.css"):
        r = httpx.get(scr.url + asset)
        assert r.status_code == 200 and len(r.text) > 500
        assert "https://" not in r.text.replace("https?:", "")  # nothing fetched from a CDN


def test_page_streams_a_reply(browser, scr, tmp_path):
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    external = []
    page.on("request", lambda req: external.append(req.url) if not req.url.startswith(scr.url) else None)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(scr.url + "/")
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    assert page.input_value("#model") == SCRIPTED_NAME
    page.fill("#input", "Show me some code")
    page.keyboard.press("Enter")
    page.wait_for_selector(".msg.assistant .usage", timeout=60_000)
    reply = page.inner_text(".msg.assistant .body")
    assert "Hello from the scripted model!" in reply and "Done." in reply
    assert page.inner_text(".msg.assistant .code code") == "def add(a, b):\n    return a + b"
    assert page.inner_text(".msg.assistant .code-head span") == "python"
    usage = page.inner_text(".msg.assistant .usage")
    assert "prompt" in usage and "completion tokens" in usage and "finish: stop" in usage
    shot = _shot_dir(tmp_path) / "webchat_reply.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert not errors and not external, (errors, external)

    # a tool call, with the tools given in the settings panel
    page.click("#settings-toggle")
    page.fill("#tools", json.dumps([WEATHER_TOOL]))
    page.click("#settings-toggle")
    page.fill("#input", "What is the weather?")
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelectorAll('.msg.assistant .usage').length == 2", timeout=60_000)
    call = page.inner_text(".msg.assistant >> nth=1 >> .tool-call")
    assert "get_weather" in call and '"city": "Paris"' in call and '"days": 3' in call
    assert "finish: tool_calls" in page.inner_text(".msg.assistant >> nth=1 >> .usage")
    page.screenshot(path=str(_shot_dir(tmp_path) / "webchat_tool_call.png"), full_page=True)
    assert not errors, errors
    page.close()
