"""A web app's page in a real browser, through the tunnel: headless Chromium, the real relay and ptth_server.

Chromium (Debian's `chromium`, installed by `make debian-deps`) is driven
over its DevTools protocol on a pipe (devtools.py). It opens `/browser` of
the Flask test app (web_test_app.py), whose script submits a real multipart
form (and comes back by the app's 303), uploads 3 MiB made in JavaScript
with fetch, holds a WebSocket conversation and reads server-sent events with
EventSource, and shows the outcome of each step. The test reads the DOM,
checks what the app received (hashes), and checks a screenshot.

Host mode (`server_host_suffix = ".localhost"`: Chromium resolves every
`*.localhost` to loopback by itself, no DNS) is where the README puts web
apps, and everything works there. Path mode (`/frontend/servers/NAME/`)
sandboxes the page (CSP `sandbox` without `allow-same-origin`), so its
origin is opaque: a form submission and a WebSocket still work, but
fetch and EventSource are cross-origin requests (CORS) whose answers the
page may not read (`test_path_mode_*` pins exactly that). A server marked
`trusted = true` is not sandboxed, and its page works in path mode too.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import procs
import pytest
import requests
from conftest import Cluster, Relay, new_key, tripcode_of
from devtools import Browser, decode_png
from web_test_app import BROWSER_UPLOAD_BYTES

pytestmark = [pytest.mark.process,
              pytest.mark.skipif(shutil.which("chromium") is None,
                                 reason="chromium is not installed (make debian-deps installs it)")]

HOST_SUFFIX = ".localhost"
# The page's form and four steps (each with a 20 s timeout of its own), on a busy 2-core test machine.
PAGE_TIMEOUT_SECS = 90
# The viewport: the screenshot's size in pixels.
WIDTH, HEIGHT = 900, 700
# The summary box's background when every step passed, and when one failed (the page's CSS).
GREEN, RED = (0x1B, 0x7F, 0x3B), (0xB3, 0x26, 0x1E)
LOOPBACK_V4 = ipaddress.ip_network("127.0.0.0/8")


@dataclass
class Tunnel:
    relay: Relay
    app_url: str

    @property
    def path_mode_page(self) -> str:
        return f"{self.relay.url}/frontend/servers/webapp/browser"

    @property
    def trusted_path_mode_page(self) -> str:
        """The same app through server `mine`, marked `trusted = true` (not sandboxed)."""
        return f"{self.relay.url}/frontend/servers/mine/browser"

    @property
    def host_mode_origin(self) -> str:
        return f"http://webapp{HOST_SUFFIX}:{self.relay.port}"

    def uploads(self) -> list[dict[str, Any]]:
        """What the app made of every upload (straight from the app, not through the tunnel)."""
        answer: list[dict[str, Any]] = requests.get(self.app_url + "/uploads", timeout=10).json()
        return answer


@pytest.fixture(scope="module")
def tunnel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tunnel]:
    tmp = tmp_path_factory.mktemp("browser")
    c = Cluster(tmp)
    try:
        _, app_url = c.web_app()
        key, trusted_key = new_key("webapp"), new_key("mine")
        config = tmp / "relay.toml"
        config.write_text(procs.relay_config({"webapp": key}, f'server_host_suffix = "{HOST_SUFFIX}"')
                          + f'[[servers]]\nname = "mine"\ntripcode = "{tripcode_of(trusted_key)}"\ntrusted = true\n')
        relay = c.start_relay(config)
        c.server(relay, "webapp", key, None, extra_config=f'web_app_url = "{app_url}"')
        c.server(relay, "mine", trusted_key, None, extra_config=f'web_app_url = "{app_url}"')
        yield Tunnel(relay, app_url)
    finally:
        c.close()


@dataclass
class PageRun:
    title: str
    results: dict[str, Any]
    summary: str
    summary_box: dict[str, float]
    screenshot: bytes
    # Every HTTP response the page got (DevTools' Network.responseReceived): url, remoteIPAddress, headers...
    responses: list[dict[str, Any]]
    # Every WebSocket the page opened (Network.webSocketCreated).
    websockets: list[str]


def run_page(url: str, tmp_path: Path, name: str) -> PageRun:
    """Open `url` in a new headless Chromium and wait for the page's last step; what it showed.

    The screenshot is saved as `tmp_path / NAME.png` at once, to look at when a check fails.
    """
    chromium = shutil.which("chromium")
    assert chromium is not None
    browser = Browser(chromium, tmp_path / "profile", tmp_path / "chromium.log", WIDTH, HEIGHT)
    try:
        browser.call("Emulation.setDeviceMetricsOverride", {"width": WIDTH, "height": HEIGHT,
                                                            "deviceScaleFactor": 1, "mobile": False})
        browser.call("Network.enable")
        browser.call("Page.enable")
        browser.call("Page.navigate", {"url": url})
        title = browser.wait_for("document.title", lambda t: t == "ALL OK" or str(t).startswith("FAILED"),
                                 PAGE_TIMEOUT_SECS)
        state = browser.evaluate("JSON.stringify({results: window.results, "
                                 "summary: document.getElementById('summary').textContent, "
                                 "box: document.getElementById('summary').getBoundingClientRect()})")
        state = json.loads(state) if state else {"results": None, "summary": None, "box": None}
        screenshot = browser.screenshot()
        (tmp_path / f"{name}.png").write_bytes(screenshot)
        responses = [e["response"] for e in browser.events_named("Network.responseReceived")]
        websockets = [e["url"] for e in browser.events_named("Network.webSocketCreated")]
    finally:
        browser.close()
    return PageRun(str(title), state["results"] or {}, state["summary"] or "", state["box"] or {},
                   screenshot, responses, websockets)


def browser_upload_bytes() -> bytes:
    """The bytes the page uploads: byte i is (i * 131 + (i >> 12)) mod 256."""
    return bytes((i * 131 + (i >> 12)) & 255 for i in range(BROWSER_UPLOAD_BYTES))


def check_screenshot(run: PageRun, colour: tuple[int, int, int]) -> None:
    """The screenshot is a PNG of the viewport where the summary box is painted `colour`, with text on it."""
    assert len(run.screenshot) > 5000, "a real render of text is more than a few kilobytes of PNG"
    width, height, rows = decode_png(run.screenshot)
    assert (width, height) == (WIDTH, HEIGHT)
    box = run.summary_box
    assert box["width"] > 300 and box["height"] > 30, box
    pixels = [rows[y][3 * x:3 * x + 3]
              for y in range(int(box["top"]) + 2, int(box["bottom"]) - 2)
              for x in range(int(box["left"]) + 2, int(box["right"]) - 2)]
    painted = sum(all(abs(a - b) <= 3 for a, b in zip(p, colour, strict=True)) for p in pixels)
    light = sum(min(p) > 200 for p in pixels)  # the box's white text
    assert painted > 0.7 * len(pixels), f"{painted} of {len(pixels)} summary pixels are {colour}"
    assert light > 0.005 * len(pixels), "the summary box has no text on it"
    above = {rows[y][3 * x:3 * x + 3] for y in range(int(box["top"]) - 1) for x in range(0, width, 3)}
    assert len(above) > 2, "the heading above the summary was not painted"


def check_form_answer(answer: dict[str, Any]) -> None:
    """What the app made of the page's form: a multipart body with every field and the file, in UTF-8."""
    assert answer["content_type"] == "multipart/form-data"
    assert answer["fields"] == {"name": ["Zoë 🚇 tunnel"], "note": ["line one\r\nline two & three"],
                                "pick": ["a", "b"]}
    assert answer["files"] == {"attachment": {
        "filename": "note.txt", "content_type": "text/plain", "bytes": 14,
        "sha256": hashlib.sha256(b"attached file\n").hexdigest()}}


def test_host_mode_page_submits_uploads_talks_and_listens(tunnel: Tunnel, tmp_path: Path) -> None:
    """At http://webapp.localhost:PORT/browser every step of the page works, and stays on loopback."""
    before = len(tunnel.uploads())
    run = run_page(tunnel.host_mode_origin + "/browser", tmp_path, "host-mode")
    assert run.title == "ALL OK", (run.title, run.results)
    assert run.summary == "ALL OK: form, upload, WebSocket, SSE"
    assert run.results["origin"] == tunnel.host_mode_origin and run.results["secure_context"] is True
    check_form_answer(run.results["form_answer"])

    expected = hashlib.sha256(browser_upload_bytes()).hexdigest()
    assert run.results["upload_own_sha256"] == expected, "crypto.subtle in the page hashed other bytes"
    assert f"{BROWSER_UPLOAD_BYTES} bytes, sha256 {expected} = the page's" in run.results["upload"]["detail"]
    upload, = tunnel.uploads()[before:]
    assert upload["complete"] and upload["bytes"] == BROWSER_UPLOAD_BYTES and upload["sha256"] == expected
    assert upload["origin"] == tunnel.host_mode_origin, "a same-origin fetch"

    assert run.results["websocket_close"] == {"code": 4000, "reason": "all echoed"}
    assert run.results["websocket"]["detail"].startswith("4/4 echoes identical")
    assert run.results["sse"]["detail"] == "events 0:0, 1:1, 2:2, 3:3, 4:4"

    # Every request went to the relay on loopback, by the host name (no DNS: *.localhost is loopback).
    assert run.websockets == [f"ws://webapp{HOST_SUFFIX}:{tunnel.relay.port}/ws"]
    urls = [r["url"] for r in run.responses]
    for path in ("/browser", "/browser?form=", "/upload", "/sse?n=5"):
        assert any(u.startswith(tunnel.host_mode_origin + path) for u in urls), (path, urls)
    for r in run.responses:
        assert r["url"].startswith(tunnel.host_mode_origin + "/"), r["url"]
        assert ipaddress.ip_address(r["remoteIPAddress"]) in LOOPBACK_V4, (r["url"], r["remoteIPAddress"])
        assert "content-security-policy" not in {k.lower() for k in r["headers"]}, "host mode is not sandboxed"

    check_screenshot(run, GREEN)


def test_path_mode_page_is_sandboxed_so_fetch_and_eventsource_are_cross_origin(tunnel: Tunnel,
                                                                               tmp_path: Path) -> None:
    """Under /frontend/servers/NAME/ the page has an opaque origin (the relay's CSP sandbox).

    What needs no CORS still works: the form submission (and the 303 back,
    whose Location the server rewrote under the prefix) and the WebSocket
    (the app is sent `Origin: null` and does not check it). fetch's POST
    is a "simple" request: it reaches the app whole, but the page may not
    read the answer (no Access-Control-Allow-Origin); EventSource is refused
    the same way. An app that uses fetch or EventSource belongs in host mode.
    """
    before = len(tunnel.uploads())
    run = run_page(tunnel.path_mode_page, tmp_path, "path-mode")
    assert run.title == "FAILED: upload, sse", (run.title, run.results)
    assert run.results["origin"] == "null", "the sandbox gave the page an opaque origin"
    assert run.results["form"]["ok"], run.results
    check_form_answer(run.results["form_answer"])
    assert run.results["websocket"]["ok"] and run.results["websocket_close"] == {"code": 4000,
                                                                                 "reason": "all echoed"}
    assert run.websockets == [f"ws://127.0.0.1:{tunnel.relay.port}/frontend/servers/webapp/ws"]
    page = next(r for r in run.responses if r["url"] == tunnel.path_mode_page)
    assert {k.lower(): v for k, v in page["headers"].items()}["content-security-policy"].startswith("sandbox ")
    assert any(r["url"].startswith(tunnel.path_mode_page + "?form=") for r in run.responses), \
        "the app's 303 to /browser came back under the server's prefix"
    assert run.results["upload"]["detail"] == "failed: TypeError: Failed to fetch", run.results
    assert run.results["sse"]["detail"].startswith("failed: Error: EventSource error"), run.results

    upload, = tunnel.uploads()[before:]
    expected = hashlib.sha256(browser_upload_bytes()).hexdigest()
    assert upload["complete"] and upload["sha256"] == expected, "the body crossed; only its answer is hidden"
    assert upload["origin"] == "null"

    check_screenshot(run, RED)


def test_path_mode_page_of_a_trusted_server_does_everything(tunnel: Tunnel, tmp_path: Path) -> None:
    """`trusted = true`: no sandbox, the page shares the relay's origin, and every step works in path mode."""
    before = len(tunnel.uploads())
    run = run_page(tunnel.trusted_path_mode_page, tmp_path, "trusted-path-mode")
    assert run.title == "ALL OK", (run.title, run.results)
    assert run.results["origin"] == tunnel.relay.url
    check_form_answer(run.results["form_answer"])
    upload, = tunnel.uploads()[before:]
    assert upload["sha256"] == run.results["upload_own_sha256"] == hashlib.sha256(browser_upload_bytes()).hexdigest()
    assert run.results["websocket_close"] == {"code": 4000, "reason": "all echoed"}
    check_screenshot(run, GREEN)
