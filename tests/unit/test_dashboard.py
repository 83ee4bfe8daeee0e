"""The dashboard's pure parts (rates, rings, charts, numbers for people) and the relay's pages in process.

The in-process relay is the real one (test_relay.py's Tunnel: a Relay and its
Flask app, driven by werkzeug's test client, which goes through HotPaths as
gunicorn would); nothing of ours is mocked. tests/e2e/test_relay_pages.py
shows the same pages in a real browser against the relay under gunicorn.
"""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest
from test_relay import KEYS, LISTEN, Tunnel, relay_config
from werkzeug.security import generate_password_hash
from werkzeug.test import EnvironBuilder

from ptth_lib import pages
from ptth_lib.config import parse_relay_config
from ptth_lib.errors import ConfigError
from ptth_lib.relay import chart, rendezvous, views
from ptth_lib.relay.dashboard import (
    RING_SAMPLES,
    SAMPLE_SECS,
    WINDOW_SECS,
    Sample,
    format_bytes_rate,
    format_duration,
    format_requests_rate,
    rates,
)
from ptth_lib.relay.metrics import MAX_ERRORS_PER_SERVER
from ptth_lib.relay.responses import text
from ptth_lib.wire import tripcode

pytestmark = pytest.mark.usefixtures("bounded")

HOSTILE = "<img src=x onerror=alert(1)>\"'"
BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
PASSWORD = "dashboard-password"
# One cheap hash for every test (werkzeug's default scrypt costs ~50 ms each).
PASSWORD_HASH = generate_password_hash(PASSWORD, method="pbkdf2:sha256:1000")


def login(user: str = "admin", password: str = PASSWORD) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def dashboard_on(**extra: Any) -> dict[str, Any]:
    return {"dashboard": {"enabled": True, "basic_auth": [f"admin:{PASSWORD_HASH}"]}, **extra}


def hostile_servers() -> list[dict[str, Any]]:
    return [{"name": "alpha", "tripcode": _tripcode("alpha"), "display_name": HOSTILE},
            {"name": "beta", "tripcode": _tripcode("beta")}]


def _tripcode(name: str) -> str:
    return tripcode.derive(KEYS[name])


# ---- rates and rings -------------------------------------------------------------


def test_rates_are_differences_per_second_between_samples() -> None:
    got = rates([Sample(0.0, 0, 0), Sample(5.0, 10, 5000), Sample(10.0, 10, 5000), Sample(12.0, 14, 9000)])
    assert [(r.at, r.requests_per_sec, r.bytes_per_sec) for r in got] == [
        (5.0, 2.0, 1000.0), (10.0, 0.0, 0.0), (12.0, 2.0, 2000.0)]


def test_a_counter_that_restarts_gives_zero_not_a_negative_rate() -> None:
    got = rates([Sample(0.0, 50, 9000), Sample(5.0, 3, 100)])
    assert [(r.requests_per_sec, r.bytes_per_sec) for r in got] == [(0.0, 0.0)]


@pytest.mark.parametrize("samples", [[], [Sample(1.0, 1, 1)], [Sample(1.0, 1, 1), Sample(1.0, 5, 5)]])
def test_no_interval_no_rate(samples: list[Sample]) -> None:
    assert rates(samples) == []


def test_a_ring_holds_the_window_and_no_more(make_tunnel: Any) -> None:
    t: Tunnel = make_tunnel(**dashboard_on())
    board = t.relay.dashboard
    for i in range(RING_SAMPLES + 40):
        board.sample(i * SAMPLE_SECS, 1000.0 + i * SAMPLE_SECS)
    assert {name: len(h.samples) for name, h in board.histories.items()} == {"alpha": RING_SAMPLES,
                                                                            "beta": RING_SAMPLES}
    now = (RING_SAMPLES + 39) * SAMPLE_SECS
    [alpha, _] = board.view(now)
    assert len(alpha.rates) == RING_SAMPLES - 1
    assert all(now - r.at <= WINDOW_SECS for r in alpha.rates)
    assert RING_SAMPLES * SAMPLE_SECS >= WINDOW_SECS  # the ring covers the whole chart


def test_the_sampler_counts_each_servers_requests_and_bytes(make_tunnel: Any) -> None:
    t: Tunnel = make_tunnel(**dashboard_on())
    board = t.relay.dashboard
    board.sample(0.0, 1000.0)
    for body in (b"hello", b"twelve bytes"):
        call, item = t.take("/x")
        assert t.respond(item["id"], 200, {"content-length": str(len(body)).encode()}, body).status_code == 200
        assert call.get(timeout=5).data == body
    board.sample(5.0, 1005.0)
    [alpha, beta] = board.view(5.0)
    assert alpha.now is not None and (alpha.now.requests_per_sec, alpha.now.bytes_per_sec) == (2 / 5, 17 / 5)
    assert beta.now is not None and (beta.now.requests_per_sec, beta.now.bytes_per_sec) == (0.0, 0.0)
    metrics = t.client.get("/metrics").text
    assert 'ptth_server_client_requests_total{server="alpha"} 2.0' in metrics
    assert 'ptth_server_relayed_bytes_total{server="alpha"} 17.0' in metrics
    assert 'ptth_server_client_requests_total{server="beta"} 0.0' in metrics


def test_a_response_still_streaming_counts_what_it_sent(make_tunnel: Any) -> None:
    t: Tunnel = make_tunnel(**dashboard_on())
    call, item = t.take("/big")
    counters = t.relay.metrics.for_server("alpha")
    assert counters is not None
    assert t.respond(item["id"], 200, {"content-length": b"3"}, b"abc").status_code == 200
    assert call.get(timeout=5).data == b"abc"
    assert counters.bytes_so_far() == 3 and not counters.streaming


def test_online_since_changes_when_the_state_does(make_tunnel: Any) -> None:
    t: Tunnel = make_tunnel(**dashboard_on())
    board = t.relay.dashboard
    board.sample(0.0, 1000.0)
    assert board.histories["alpha"].online is False and board.histories["alpha"].since_wall == 1000.0
    t.be_online("alpha")
    board.sample(5.0, 1005.0)
    board.sample(10.0, 1010.0)
    assert board.histories["alpha"].online is True and board.histories["alpha"].since_wall == 1005.0
    assert board.histories["beta"].since_wall == 1000.0


def test_removed_servers_are_forgotten(make_tunnel: Any) -> None:
    t: Tunnel = make_tunnel(**dashboard_on())
    t.get("/frontend/servers/beta/x").get(timeout=5)  # counted: 502, beta is offline
    t.relay.dashboard.sample(0.0, 1000.0)
    assert set(t.relay.metrics.servers) == set(t.relay.dashboard.histories) == {"alpha", "beta"}
    config = relay_config(servers=[{"name": "alpha", "tripcode": _tripcode("alpha")}], **dashboard_on())
    t.relay.reconfigure(config)
    t.relay.dashboard.sample(5.0, 1005.0)
    assert set(t.relay.metrics.servers) == set(t.relay.dashboard.histories) == {"alpha"}
    assert 'server="beta"' not in t.client.get("/metrics").text


def test_nothing_is_kept_while_the_dashboard_is_off(make_tunnel: Any) -> None:
    t: Tunnel = make_tunnel(**dashboard_on())
    t.relay.dashboard.sample(0.0, 1000.0)
    t.relay.reconfigure(relay_config())
    slept: list[float] = []

    def sleep(secs: float) -> None:
        slept.append(secs)
        raise StopIteration  # one round of the loop

    with pytest.raises(StopIteration):
        t.relay.dashboard.run(sleep)
    assert t.relay.dashboard.histories == {} and slept == [SAMPLE_SECS]


def test_the_last_errors_are_kept_per_server_and_bounded(make_tunnel: Any) -> None:
    t: Tunnel = make_tunnel(**dashboard_on())
    for _ in range(MAX_ERRORS_PER_SERVER + 2):
        assert t.get("/frontend/servers/beta/x").get(timeout=5).status_code == 502
    t.get("/frontend/servers/nobody/x").get(timeout=5)  # not a configured server: not counted
    counters = t.relay.metrics.for_server("beta")
    assert counters is not None and len(counters.errors) == MAX_ERRORS_PER_SERVER
    assert {(e.status, e.message) for e in counters.errors} == {
        (502, "server 'beta' is offline (not connected to the relay)")}
    assert "nobody" not in t.relay.metrics.servers


# ---- charts ----------------------------------------------------------------------


def _coords(d: str) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in re.findall(r"(-?[\d.]+),(-?[\d.]+)", d)]


def test_a_chart_spans_the_window_with_its_peak_at_the_top() -> None:
    c = chart.chart([(100.0, 0.0), (550.0, 4.0), (1000.0, 2.0)], now=1000.0, window_secs=900.0)
    assert (c.points, c.peak) == (3, 4.0)
    assert _coords(c.line) == [(0.0, chart.HEIGHT - chart.PAD), (150.0, chart.PAD), (300.0, 30.0)]
    assert c.line.startswith("M") and c.area.startswith(c.line) and c.area.endswith("Z")
    assert _coords(c.area)[-2:] == [(300.0, chart.HEIGHT - chart.PAD), (0.0, chart.HEIGHT - chart.PAD)]


def test_a_chart_leaves_out_what_is_older_than_its_window() -> None:
    c = chart.chart([(0.0, 9.0), (500.0, 1.0), (1000.0, 1.0)], now=1000.0, window_secs=600.0)
    assert c.points == 2 and c.peak == 1.0
    assert all(0 <= x <= chart.WIDTH and chart.PAD <= y <= chart.HEIGHT - chart.PAD for x, y in _coords(c.line))


def test_an_idle_chart_is_a_flat_line_at_the_bottom_and_an_empty_one_draws_nothing() -> None:
    idle = chart.chart([(990.0, 0.0), (1000.0, -3.0)], now=1000.0, window_secs=900.0)
    assert idle.peak == 0.0 and {y for _, y in _coords(idle.line)} == {chart.HEIGHT - chart.PAD}
    assert chart.chart([], now=1000.0, window_secs=900.0) == chart.Chart("", "", 0.0, 0)


def test_path_data_is_only_numbers_and_commands() -> None:
    c = chart.chart([(float(t), float(t % 7)) for t in range(0, 900, 5)], now=900.0, window_secs=900.0)
    assert re.fullmatch(r"[MLZ0-9., -]+", c.area)


# ---- numbers for people ----------------------------------------------------------


@pytest.mark.parametrize(("value", "shown"), [
    (0, "0 B/s"), (999, "999 B/s"), (1000, "1.0 kB/s"), (1234567, "1.2 MB/s"), (250_000, "250 kB/s"),
    (5e12, "5.0 TB/s"), (5e15, "5000 TB/s"),
])
def test_format_bytes_rate(value: float, shown: str) -> None:
    assert format_bytes_rate(value) == shown


@pytest.mark.parametrize(("value", "shown"), [
    (0, "0 req/s"), (0.25, "0.25 req/s"), (12.345, "12.3 req/s"), (250, "250 req/s"),
])
def test_format_requests_rate(value: float, shown: str) -> None:
    assert format_requests_rate(value) == shown


@pytest.mark.parametrize(("secs", "shown"), [
    (-1, "0 s"), (40, "40 s"), (60, "1 min"), (725, "12 min"), (3600, "1 h"), (3 * 3600 + 300, "3 h 5 min"),
    (86400, "1 day"), (3 * 86400, "3 days"),
])
def test_format_duration(secs: float, shown: str) -> None:
    assert format_duration(secs) == shown


# ---- error lines as pages --------------------------------------------------------


def _environ(accept: str | None) -> dict[str, Any]:
    return EnvironBuilder(headers={"Accept": accept} if accept else {}).get_environ()


@pytest.mark.parametrize(("accept", "page"), [
    (BROWSER, True), ("text/html", True), (None, False), ("*/*", False), ("application/json", False),
    ("text/plain, text/html;q=0.5", False),
])
def test_an_error_line_is_a_page_only_for_a_client_that_prefers_html(accept: str | None, page: bool) -> None:
    resp = text(503, "server 'x' has too many requests waiting; try again later")
    resp.headers["Retry-After"] = "5"
    closed: list[bool] = []
    resp.call_on_close(lambda: closed.append(True))
    out = views.as_page(resp, _environ(accept))
    assert out is resp and out.status_code == 503 and out.headers["Retry-After"] == "5"
    if page:
        body = out.get_data(as_text=True)
        assert out.mimetype == "text/html" and "The relay is busy" in body and "Try again in a few seconds" in body
        assert "server &#39;x&#39; has too many requests waiting" in body
        assert out.headers["Content-Security-Policy"] == views.PAGE_CSP
        assert out.headers["X-Frame-Options"] == "DENY" and out.headers["Cache-Control"] == "no-store"
    else:
        line = b"server 'x' has too many requests waiting; try again later\n"
        assert (out.mimetype, out.get_data()) == ("text/plain", line)
    out.close()
    assert closed == [True]  # what the relay set to run at the end still runs


def test_only_the_relays_own_error_lines_become_pages() -> None:
    ok = text(200, "Relay is up")
    assert views.as_page(ok, _environ(BROWSER)).get_data() == b"Relay is up\n"
    redirect = text(302, "see x/")
    assert views.as_page(redirect, _environ(BROWSER)).mimetype == "text/plain"


def test_every_page_allows_exactly_its_two_stylesheets() -> None:
    page = views.render("servers.html", servers=[]).get_data(as_text=True)
    styles = re.findall(r"<style>(.*?)</style>", page, re.DOTALL)
    assert [s.encode() for s in styles] == [pages.STYLESHEET.encode(), views.RELAY_STYLESHEET.encode()]
    assert f"style-src {pages.STYLE_SOURCE} {views.RELAY_STYLE_SOURCE};" in views.PAGE_CSP
    assert "unsafe-inline" not in views.PAGE_CSP and "script-src" not in views.PAGE_CSP


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 429, 431, 500, 501, 502, 503, 504])
def test_every_error_the_relay_makes_has_plain_words(status: int) -> None:
    title, advice = views.plain_words(status)
    assert title and advice.endswith(".") and (title, advice) != views.plain_words(999)


# ---- the pages, in process -------------------------------------------------------


def test_an_offline_server_is_a_page_for_a_browser_and_a_line_for_curl(make_tunnel: Any) -> None:
    t: Tunnel = make_tunnel()
    for_curl = t.get("/frontend/servers/beta/x", headers={"Accept": "*/*"}).get(timeout=5)
    assert (for_curl.status_code, for_curl.text) == (502, "server 'beta' is offline (not connected to the relay)\n")
    for_browser = t.get("/frontend/servers/beta/x", headers={"Accept": BROWSER}).get(timeout=5)
    assert for_browser.status_code == 502 and for_browser.mimetype == "text/html"
    assert "The server cannot be reached" in for_browser.text and "try again in a minute" in for_browser.text
    assert "server &#39;beta&#39; is offline" in for_browser.text


def test_a_full_queue_is_a_busy_page_with_retry_after(make_tunnel: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """503 is hard to reach with real processes (256 requests queued); here the bound is 2."""
    monkeypatch.setattr(rendezvous, "MAX_QUEUED_PER_SERVER", 2)
    t: Tunnel = make_tunnel()
    t.be_online()
    waiting = [t.get("/frontend/servers/alpha/x") for _ in range(2)]
    page = t.client.get("/frontend/servers/alpha/x", headers={"Accept": BROWSER})
    assert page.status_code == 503 and page.headers["Retry-After"] == "5" and page.mimetype == "text/html"
    assert "The relay is busy" in page.text and "server &#39;alpha&#39; has too many requests waiting" in page.text
    line = t.client.get("/frontend/servers/alpha/x")
    assert (line.status_code, line.text) == (503, "server 'alpha' has too many requests waiting; try again later\n")
    assert [w.get(timeout=5).status_code for w in waiting] == [502, 502]


def test_a_page_the_relay_does_not_have_is_its_own_html_for_everyone(make_tunnel: Any) -> None:
    t: Tunnel = make_tunnel()
    for accept in (BROWSER, "*/*"):
        resp = t.client.get("/frontend/no-such-page", headers={"Accept": accept})
        assert resp.status_code == 404 and resp.mimetype == "text/html" and "Nothing here" in resp.text
        assert resp.headers["Content-Security-Policy"] == views.PAGE_CSP
    resp = t.client.post("/frontend/servers/", headers={"Accept": BROWSER})
    assert resp.status_code == 405 and "GET" in resp.headers["Allow"]


def test_names_and_display_names_are_text_everywhere(make_tunnel: Any, tmp_path: Any) -> None:
    t: Tunnel = make_tunnel(servers=hostile_servers(), audit_log=str(tmp_path / "audit.jsonl"), **dashboard_on())
    t.client.get(LISTEN + "a<b>c", headers={"X-ApiKey": "k" * 40})  # audited and listed as unregistered
    t.relay.dashboard.sample(0.0, 1000.0)
    got = {
        "list": t.client.get("/frontend/servers/", headers={"Accept": BROWSER}).text,
        "dashboard": t.client.get("/frontend/dashboard", headers=login()).text,
        "unregistered": t.client.get("/frontend/unregistered_servers").text,
        "audit": t.client.get("/frontend/audit_log").text,
        "error": t.get("/frontend/servers/%3Cimg%20src%3Dx%3E/", headers={"Accept": BROWSER}).get(timeout=5).text,
    }
    assert "&lt;img src=x onerror=alert(1)&gt;&#34;&#39;" in got["list"]
    assert "&lt;img src=x onerror=alert(1)&gt;&#34;&#39;" in got["dashboard"]
    assert "a&lt;b&gt;c" in got["unregistered"] and "a&lt;b&gt;c" in got["audit"]
    assert "&lt;img src=x&gt;" in got["error"]
    t.relay.audit.set_path(None)  # closes the file
    for where, page in got.items():
        assert "<img" not in page and "<b>" not in page, where


# ---- dashboard access --------------------------------------------------------------


def test_the_dashboard_is_404_while_it_is_off(make_tunnel: Any) -> None:
    resp = make_tunnel().client.get("/frontend/dashboard", headers=login())
    line = "the dashboard is off: set enabled = true under [dashboard] in the relay config\n"
    assert (resp.status_code, resp.text) == (404, line)


@pytest.mark.parametrize("headers", [{}, login(password="wrong"), login(user="eve"),
                                     {"Authorization": "Bearer x"}])
def test_the_dashboard_without_its_login_is_401_with_a_challenge(make_tunnel: Any, headers: dict[str, str]) -> None:
    resp = make_tunnel(**dashboard_on()).client.get("/frontend/dashboard", headers=headers)
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"] == 'Basic realm="relay dashboard", charset="UTF-8"'
    assert "PASSWORD" not in resp.text and PASSWORD_HASH not in resp.text


def test_a_wrong_dashboard_login_is_audited_without_the_password(make_tunnel: Any) -> None:
    t: Tunnel = make_tunnel(**dashboard_on())
    t.client.get("/frontend/dashboard")  # no credentials: nothing to audit
    t.client.get("/frontend/dashboard", headers=login(password="guessed-password"),
                 environ_base={"REMOTE_ADDR": "203.0.113.9"})
    entries = [e for e in t.relay.audit.recent if e["event"] == "dashboard_login_rejected"]
    assert [e["address"] for e in entries] == ["203.0.113.9"]
    assert "guessed-password" not in repr(list(t.relay.audit.recent))


def test_the_dashboard_with_its_login_shows_every_server(make_tunnel: Any) -> None:
    t: Tunnel = make_tunnel(**dashboard_on())
    t.be_online("alpha")
    t.relay.dashboard.sample(0.0, 1000.0)
    resp = t.client.get("/frontend/dashboard", headers=login())
    assert resp.status_code == 200 and resp.headers["Cache-Control"] == "no-store"
    assert resp.headers["Content-Security-Policy"] == views.PAGE_CSP
    assert re.search(r'<meta http-equiv="refresh" content="\d+">', resp.text)
    assert 'data-server="alpha"' in resp.text and 'data-server="beta"' in resp.text
    assert re.search(r'class="card server is-online" data-server="alpha"', resp.text)


def test_a_server_login_does_not_open_the_dashboard(make_tunnel: Any) -> None:
    """The same user and password under a server's basic_auth are no key to the dashboard."""
    servers = [{"name": "alpha", "tripcode": _tripcode("alpha"), "basic_auth": [f"admin:{PASSWORD_HASH}"]}]
    other = generate_password_hash("another-password", method="pbkdf2:sha256:1000")
    t: Tunnel = make_tunnel(servers=servers, dashboard={"enabled": True, "basic_auth": [f"admin:{other}"]})
    assert t.client.get("/frontend/dashboard", headers=login()).status_code == 401


@pytest.mark.parametrize(("table", "problem"), [
    ({"enabled": True}, "lists nobody"),
    ({"enabled": True, "basic_auth": ["admin:plain"]}, "--hash-password"),
    ({"enabled": "yes"}, "must be a boolean"),
    ({"enable": True}, "unknown key 'enable'"),
])
def test_a_bad_dashboard_table_is_one_line(table: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(problem)) as e:
        parse_relay_config({"dashboard": table}, "relay.toml")
    assert "\n" not in str(e.value) and str(e.value).startswith("relay.toml: ")
