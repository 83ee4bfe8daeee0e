"""The relay's own pages in a real browser: the dashboard under traffic, error pages, the server list.

The real relay under gunicorn, a real ptth_server (server `alpha`, whose
display name is an XSS attempt), a server that never connects (`gone`: 502)
and a scripted one that takes requests and answers too late (`slow`: 504).
Headless Chromium (devtools.py) loads each page; every check reads the DOM
and the browser's own logs: the page has the shared look (its inlined
stylesheets applied under the relay's CSP), says in plain words what
happened, and nothing failed to load or broke the policy. The same URLs with
`Accept: */*` (requests, as curl) get the relay's one line of text.

Screenshots go to the test's tmp folder; with PTTH_SCREENSHOTS=1 also to
docs/screenshots/ (relay-dashboard.png, relay-servers.png, relay-error-502.png),
the README's pictures.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import procs
import pytest
import relay_modes
import requests
from conftest import Cluster, Relay, new_key, tripcode_of, wait_for_online
from devtools import Browser, decode_png
from scripted_server import ScriptedServer
from werkzeug.security import generate_password_hash

pytestmark = [pytest.mark.process,
              pytest.mark.skipif(shutil.which("chromium") is None,
                                 reason="chromium is not installed (make debian-deps installs it)")]

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "docs" / "screenshots"
README_SCREENSHOTS = ("relay-dashboard.png", "relay-servers.png", "relay-error-502.png")
HOSTILE = "<img src=x onerror=alert(1)>\"'"
USER, PASSWORD = "admin", "dashboard-password-for-tests"
# The relay's wait for a server's answer (so that `slow` gives a 504 soon) and `slow`'s delay.
REQUEST_TIMEOUT_SECS = 3
SLOW_SECS = 6
# How long the dashboard may take to show traffic: two samples (5 s apart) after the first request.
TRAFFIC_SHOWN_SECS = 30
# A head the relay refuses (431: over its 256 KiB) that gunicorn lets through (50 lines of 16 KiB).
BIG_HEADERS = {f"X-Big-{i}": "b" * 15_000 for i in range(20)}


@dataclass
class Site:
    relay: Relay
    slow: ScriptedServer
    tmp: Path

    def url(self, path: str) -> str:
        return self.relay.url + path


def relay_toml(keys: dict[str, str], dashboard: bool) -> str:
    users = f'basic_auth = ["{USER}:{generate_password_hash(PASSWORD, method="pbkdf2:sha256:1000")}"]' \
        if dashboard else ""
    servers = "".join(f'[[servers]]\nname = "{name}"\ntripcode = "{tripcode_of(key)}"\n'
                      + (f"display_name = '''{HOSTILE}'''\n" if name == "alpha" else "")
                      for name, key in keys.items())
    return (f"request_timeout_secs = {REQUEST_TIMEOUT_SECS}\nenable_scraper_api = true\n"
            f"[dashboard]\nenabled = {'true' if dashboard else 'false'}\n{users}\n{servers}")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("relay-pages")
    root = tmp / "root"
    root.mkdir()
    (root / "hello.txt").write_bytes(b"hello, dashboard\n" * 64)
    c = Cluster(tmp)
    keys = {"alpha": new_key("alpha"), "gone": new_key("gone"), "slow": new_key("slow")}
    config = tmp / "relay.toml"
    config.write_text(relay_toml(keys, dashboard=True))
    slow = None
    try:
        relay = c.start_relay(config)
        c.server(relay, "alpha", keys["alpha"], root)

        def late(uri: str, headers: dict[str, bytes]) -> tuple[int, dict[str, bytes], bytes]:
            time.sleep(SLOW_SECS)
            return 200, {}, b"too late"

        slow = ScriptedServer(relay.url, "slow", keys["slow"], late).start()
        procs.wait_until(lambda: requests.get(relay.url + "/frontend/servers/", timeout=5,
                                              headers={"Accept": "application/json"}).json()[2]["online"],
                         "slow online", relay.proc)
        yield Site(relay, slow, tmp)
    finally:
        if slow is not None:
            slow.stop()
        c.close()


# ---- the browser ---------------------------------------------------------------------


@dataclass
class Visit:
    status: int
    screenshot: bytes
    failed: list[dict[str, Any]]  # Network.loadingFailed
    complaints: list[dict[str, Any]]  # console errors and CSP issues
    browser: Browser


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    chromium = shutil.which("chromium")
    assert chromium is not None
    b = Browser(chromium, tmp_path / "profile", tmp_path / "chromium.log", 900, 700)
    try:
        for domain in ("Network.enable", "Page.enable", "Log.enable", "Runtime.enable", "Audits.enable"):
            b.call(domain)
        yield b
    finally:
        b.close()


def visit(browser: Browser, url: str, size: tuple[int, int] = (900, 700), mobile: bool = False,
          headers: dict[str, str] | None = None) -> Visit:
    """Load `url` in the tab at `size` and wait until it is painted; what the browser saw."""
    browser.call("Emulation.setDeviceMetricsOverride", {"width": size[0], "height": size[1],
                                                         "deviceScaleFactor": 1, "mobile": mobile})
    browser.call("Network.setExtraHTTPHeaders", {"headers": headers or {}})
    before = len(browser.events)
    browser.call("Page.navigate", {"url": url})
    browser.wait_for("document.readyState + ' ' + location.href",
                     lambda v: v == f"complete {url}", 30)
    time.sleep(0.3)  # late console messages and issues
    new = browser.events[before:]
    documents = [e["params"]["response"] for e in new if e.get("method") == "Network.responseReceived"
                 and e["params"].get("type") == "Document"]
    assert documents, f"no document loaded for {url}"
    complaints = [e["params"] for e in new
                  if (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error"
                      and "status of" not in e["params"]["entry"].get("text", ""))  # the page's own 4xx/5xx
                  or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] == "error")
                  or e.get("method") == "Audits.issueAdded"]
    failed = [e["params"] for e in new if e.get("method") == "Network.loadingFailed"]
    return Visit(documents[-1]["status"], browser.screenshot(), failed, complaints, browser)


def save(shot: bytes, tmp_path: Path, name: str) -> None:
    """Keep a screenshot in the test's folder; the README's ones also in docs/ with PTTH_SCREENSHOTS=1."""
    (tmp_path / name).write_bytes(shot)
    if os.environ.get("PTTH_SCREENSHOTS") == "1" and name in README_SCREENSHOTS:
        (SCREENSHOTS / name).write_bytes(shot)


def check_shared_look(v: Visit) -> None:
    """The page has the shared look: both stylesheets applied, nothing refused, nothing failed."""
    assert not v.failed, v.failed
    assert not v.complaints, v.complaints
    look = v.browser.evaluate("""(() => {
        const top = document.querySelector('header.top');
        return {sheets: document.styleSheets.length,
                rules: [...document.styleSheets].map(s => s.cssRules.length),
                top: top && getComputedStyle(top).borderBottomStyle,
                font: getComputedStyle(document.body).fontFamily,
                overflow: document.documentElement.scrollWidth - document.documentElement.clientWidth};
    })()""")
    assert look["sheets"] == 2 and all(n > 10 for n in look["rules"]), look
    assert look["top"] == "solid" and "system-ui" in look["font"], look
    assert look["overflow"] <= 0, f"the page scrolls sideways: {look}"
    width, height, rows = decode_png(v.screenshot)
    assert len({rows[y][x:x + 3] for y in range(0, height, 7) for x in range(0, 3 * width, 21)}) > 8, \
        "the screenshot is nearly blank"


def text_of(browser: Browser, selector: str) -> str:
    value = browser.evaluate(f"(document.querySelector({selector!r}) || {{}}).textContent || ''")
    return " ".join(str(value).split())


# ---- the dashboard ------------------------------------------------------------------------


def login_header() -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}


def alpha_chart(page: str) -> tuple[int, float]:
    """The number of points and the peak of alpha's requests chart on a dashboard page."""
    card = page.split('data-server="alpha"', 1)[1].split("</article>", 1)[0]
    m = re.search(r'class="chart requests"[^>]*data-points="(\d+)" data-peak="([\d.]+)"', card)
    assert m is not None, card
    return int(m.group(1)), float(m.group(2))


def traffic_shown(site: Site) -> bool:
    """Whether the dashboard's chart of alpha's requests has two points or more, not all zero."""
    points, peak = alpha_chart(requests.get(site.url("/frontend/dashboard"), headers=login_header(), timeout=10).text)
    return points >= 2 and peak > 0


def test_the_dashboard_shows_live_traffic(site: Site, browser: Browser, tmp_path: Path) -> None:
    """Requests made while the page loads show as rates and a chart; alpha is online, gone is not."""
    stop = threading.Event()
    served: list[int] = []

    def traffic() -> None:
        with requests.Session() as s:
            while not stop.is_set():
                served.append(s.get(site.url("/frontend/servers/alpha/files/hello.txt"), timeout=10).status_code)
                time.sleep(0.02)

    for _ in range(2):  # errors to show: gone's 502s, while it stays away
        assert requests.get(site.url("/frontend/servers/gone/x"), timeout=10).status_code == 502
    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    try:
        procs.wait_until(lambda: traffic_shown(site), "traffic on the dashboard", site.relay.proc,
                         TRAFFIC_SHOWN_SECS)
        v = visit(browser, site.url("/frontend/dashboard"), headers=login_header())
    finally:
        stop.set()
        worker.join(10)
    assert served and set(served) == {200}
    assert v.status == 200
    check_shared_look(v)
    cards = browser.evaluate("""[...document.querySelectorAll('article.card')].map(c => ({
        server: c.dataset.server, online: c.classList.contains('is-online'),
        title: c.querySelector('h3').textContent,
        points: +c.querySelector('svg.chart.requests').dataset.points,
        peak: +c.querySelector('svg.chart.requests').dataset.peak,
        bytesPeak: +c.querySelector('svg.chart.bytes').dataset.peak,
        line: (c.querySelector('svg.chart.requests path.line') || {getAttribute: () => ''}).getAttribute('d'),
        errors: [...c.querySelectorAll('details.errors li')].map(li => li.textContent)}))""")
    by_name = {c["server"]: c for c in cards}
    assert list(by_name) == ["alpha", "gone", "slow"]
    alpha = by_name["alpha"]
    assert alpha["online"] and alpha["title"] == HOSTILE, alpha  # shown as text
    assert not by_name["gone"]["online"] and by_name["slow"]["online"]  # (a cluster's: from Redis)
    if not site.relay.cluster:  # a cluster's worker shows its own traffic and errors (README, "Dashboard")
        assert alpha["points"] >= 2 and alpha["peak"] > 0 and alpha["bytesPeak"] > 0, alpha
        assert len(re.findall(r"[ML]", alpha["line"])) == alpha["points"]
        assert any("502" in e and "server 'gone' is offline" in e for e in by_name["gone"]["errors"])
    assert browser.evaluate("document.querySelectorAll('img').length") == 0  # the display name made none
    assert browser.evaluate("document.querySelector('meta[http-equiv=refresh]').content") == "5"
    assert text_of(browser, "#total-online") == "2 / 3"
    save(v.screenshot, tmp_path, "relay-dashboard.png")
    phone = visit(browser, site.url("/frontend/dashboard"), size=(390, 844), mobile=True, headers=login_header())
    check_shared_look(phone)
    (tmp_path / "relay-dashboard-phone.png").write_bytes(phone.screenshot)


def test_the_dashboard_asks_for_its_login(site: Site) -> None:
    anonymous = requests.get(site.url("/frontend/dashboard"), timeout=10)
    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"] == 'Basic realm="relay dashboard", charset="UTF-8"'
    assert anonymous.text == ("the dashboard needs a user name and password ([dashboard] basic_auth in the "
                              "relay config)\n")
    wrong = requests.get(site.url("/frontend/dashboard"), auth=(USER, "wrong"), timeout=10)
    assert wrong.status_code == 401
    right = requests.get(site.url("/frontend/dashboard"), auth=(USER, PASSWORD), timeout=10)
    assert right.status_code == 200 and right.headers["Content-Type"].startswith("text/html")


def test_a_dashboard_that_is_off_is_404(cluster: Cluster) -> None:
    config = cluster.tmp / "relay.toml"
    config.write_text(relay_toml({"alpha": new_key("alpha")}, dashboard=False))
    relay = cluster.start_relay(config)
    r = requests.get(relay.url + "/frontend/dashboard", auth=(USER, PASSWORD), timeout=10)
    line = "the dashboard is off: set enabled = true under [dashboard] in the relay config\n"
    assert (r.status_code, r.text) == (404, line)
    assert "/frontend/dashboard" not in requests.get(relay.url + "/", timeout=10).text


# ---- error pages ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    path: str
    status: int
    title: str  # the page's heading
    line: str  # the one line for curl
    headers: tuple[tuple[str, str], ...] = ()


REFUSALS = {
    "404-unknown-server": Refusal("/frontend/servers/nobody/", 404, "Nothing here",
                                  "no server named 'nobody' is registered at this relay"),
    "502-offline": Refusal("/frontend/servers/gone/", 502, "The server cannot be reached",
                           "server 'gone' is offline (not connected to the relay)"),
    "504-no-answer": Refusal("/frontend/servers/slow/", 504, "The server did not answer in time",
                             f"server 'slow' did not answer in {REQUEST_TIMEOUT_SECS} s"),
    "400-bad-path": Refusal("/frontend/servers/al%2Fpha/x", 400, "The relay cannot follow this address",
                            "bad path: the server name holds '/', a backslash or a control character"),
    "431-head-too-large": Refusal("/frontend/servers/alpha/", 431, "The request is too large",
                                  "", tuple(BIG_HEADERS.items())),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_an_error_of_the_relays_is_a_page_in_a_browser_and_a_line_for_curl(site: Site, browser: Browser,
                                                                          tmp_path: Path, name: str) -> None:
    if name == "431-head-too-large" and relay_modes.MODE == "hosts":
        pytest.skip("nginx in front refuses a head this large itself (400)")
    r = REFUSALS[name]
    v = visit(browser, site.url(r.path), headers=dict(r.headers))
    assert v.status == r.status
    check_shared_look(v)
    assert text_of(browser, ".relay-error h1") == r.title
    assert text_of(browser, ".relay-error .status") == f"Error {r.status}"
    assert text_of(browser, ".relay-error .advice")
    assert r.line in text_of(browser, ".relay-error .detail")
    save(v.screenshot, tmp_path, f"relay-error-{r.status}.png")

    curl = requests.get(site.url(r.path), headers={"Accept": "*/*", **dict(r.headers)}, timeout=30)
    assert curl.status_code == r.status and curl.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert curl.text.count("\n") == 1 and (curl.text == r.line + "\n" or not r.line)


def test_too_many_failed_scraper_keys_is_429_in_a_browser(site: Site, browser: Browser, tmp_path: Path) -> None:
    url = site.url("/scraper/v1/test")
    codes = [requests.get(url, headers={"X-ApiKey": "wrong"}, timeout=10).status_code for _ in range(12)]
    assert codes[0] == 403 and codes[-1] == 429
    curl = requests.get(url, timeout=10)
    assert curl.text == "too many failed scraper key attempts from your address; try again later\n"
    v = visit(browser, url)
    assert v.status == 429
    check_shared_look(v)
    assert text_of(browser, ".relay-error h1") == "Too many requests at once"


def test_a_servers_own_error_page_is_passed_on_untouched(site: Site) -> None:
    r = requests.get(site.url("/frontend/servers/alpha/files/no-such-file"),
                     headers={"Accept": "text/html"}, timeout=10)
    assert r.status_code == 404
    assert "relay-error" not in r.text and "The relay says" not in r.text
    assert "sandbox" in r.headers["Content-Security-Policy"], "relayed: the relay's sandbox, not its pages' policy"


# ---- the server list --------------------------------------------------------------------------


def test_the_server_list_in_a_browser(site: Site, browser: Browser, tmp_path: Path) -> None:
    v = visit(browser, site.url("/frontend/servers/"))
    assert v.status == 200
    check_shared_look(v)
    rows = browser.evaluate("""[...document.querySelectorAll('table.list tbody tr')].map(
        tr => [...tr.children].map(td => td.textContent.trim()))""")
    assert [(row[0], row[1], row[2]) for row in rows] == [
        (HOSTILE, "alpha", "online"), ("gone", "gone", "offline"), ("slow", "slow", "online")]
    assert browser.evaluate("document.querySelectorAll('img').length") == 0
    save(v.screenshot, tmp_path, "relay-servers.png")
    phone = visit(browser, site.url("/frontend/servers/"), size=(390, 844), mobile=True)
    check_shared_look(phone)
    (tmp_path / "relay-servers-phone.png").write_bytes(phone.screenshot)
    wait_for_online(site.relay, "alpha")
