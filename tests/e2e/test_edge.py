"""The relay's edge, end to end: which server a path reaches, what crosses, who sees what.

Real relay (gunicorn), real ptth_server, servers played by a script where a
test needs a server to send what ptth_server never would, headless Chromium
where a page's script is the attacker, and nginx configured as the README
says where the finding was about nginx. Each test here failed on the relay
before the hardening of 2026-12 (RELIABILITY.md, "Access control" and
"Origin isolation").
"""

from __future__ import annotations

import http.client
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from conftest import Cluster, Relay, new_key, tripcode_of, wait_until
from nginx import start_nginx
from scripted_server import ScriptedServer

pytestmark = pytest.mark.process

SECRET = b"the private server's secret\n"
CHROMIUM = shutil.which("chromium")

EDGE_HEADERS = {
    "set-cookie": b"relay_session=stolen; Path=/", "strict-transport-security": b"max-age=0",
    "x-accel-redirect": b"/frontend/servers/private/files/secret.txt", "x-sendfile": b"/etc/passwd",
    "alt-svc": b'h3=":4433"', "clear-site-data": b'"*"', "service-worker-allowed": b"/",
    "www-authenticate": b'Basic realm="relay"',
}


@dataclass
class Edge:
    relay: Relay
    cluster: Cluster
    evil: ScriptedServer
    trusted: ScriptedServer
    tmp: Path

    def url(self, path: str) -> str:
        return self.relay.url + path


def evil_answer(uri: str, headers: dict[str, bytes]) -> tuple[int, dict[str, bytes], bytes]:
    body = b"<p>evil</p>"
    return 200, {"content-type": b"text/html", "content-length": str(len(body)).encode(), **EDGE_HEADERS}, body


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    tmp = tmp_path_factory.mktemp("edge")
    c = Cluster(tmp)
    keys = {name: new_key(name) for name in ("alpha", "private", "evil", "trustme")}
    relay = c.relay(keys, extra="listen_timeout_secs = 5\nrequest_timeout_secs = 5\n")
    text = relay.config.read_text().replace(
        f'name = "trustme"\ntripcode = "{tripcode_of(keys["trustme"])}"\n',
        f'name = "trustme"\ntripcode = "{tripcode_of(keys["trustme"])}"\ntrusted = true\n')
    relay.config.write_text(text)  # picked up within 2 s; the scripted server waits for it below
    for name, files in (("alpha", {"hello.txt": b"hello\n", "page.html": ATTACK_PAGE}),
                        ("private", {"secret.txt": SECRET})):
        root = tmp / name
        root.mkdir()
        for rel, data in files.items():
            (root / rel).write_bytes(data)
        c.server(relay, name, keys[name], root)
    evil = ScriptedServer(relay.url, "evil", keys["evil"], evil_answer).start()
    trusted = ScriptedServer(relay.url, "trustme", keys["trustme"], evil_answer).start()
    wait_until(lambda: requests.get(relay.url + "/frontend/servers/trustme/x", timeout=10).status_code == 200
               and "Content-Security-Policy" not in requests.get(relay.url + "/frontend/servers/trustme/x",
                                                                  timeout=10).headers,
               "the trusted server's config applied", relay.proc)
    yield Edge(relay, c, evil, trusted, tmp)
    evil.stop()
    trusted.stop()
    c.close()


def get_from(source: str, url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """GET `url` from the local address `source` (127.0.0.x), raw: no redirects, no normalising."""
    rest = url.removeprefix("http://")
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30, source_address=(source, 0))
    try:
        conn.request("GET", "/" + path, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def curl(url: str, *args: str) -> tuple[int, bytes, str]:
    """curl --path-as-is: the path exactly as written. Returns status, body, Location."""
    out = subprocess.run(["curl", "-s", "--path-as-is", "-o", "-", "-w", "\n%{http_code} %{redirect_url}",
                          *args, url], check=False, capture_output=True, timeout=30).stdout
    body, _, tail = out.rpartition(b"\n")
    status, _, location = tail.decode().partition(" ")
    return int(status), body, location


# ---- access control: one canonical path, one prefix to protect -----------------


def test_the_old_alias_redirects_to_the_one_prefix(edge: Edge) -> None:
    status, body, location = curl(edge.url("/servers/private/files/secret.txt?x=1"))
    assert (status, location) == (308, edge.url("/frontend/servers/private/files/secret.txt?x=1"))
    assert SECRET not in body
    r = requests.get(edge.url("/servers/alpha/files/hello.txt"), timeout=10)  # clients follow it
    assert (r.status_code, r.content) == (200, b"hello\n")


def test_the_alias_can_be_turned_off(cluster: Cluster) -> None:
    relay = cluster.relay({"alpha": new_key("alpha")}, extra="servers_alias = false")
    r = requests.get(relay.url + "/servers/alpha/files/x", timeout=10, allow_redirects=False)
    assert r.status_code == 404 and "servers_alias" in r.text


# The whole table is tests/unit/test_relay.py's, in-process; these two go raw through gunicorn.
@pytest.mark.parametrize("path", [
    "/frontend/servers/private%2F..%2Falpha/files/secret.txt",
    "/frontend/servers/alpha/../private/files/secret.txt",
])
def test_a_path_that_could_be_read_two_ways_is_refused(edge: Edge, path: str) -> None:
    status, body, _ = curl(edge.url(path))
    assert status in (400, 404) and SECRET not in body, (path, status)
    if not path.startswith("/scraper/"):  # the scraper API is off here: its 404 comes first
        assert status == 400, (path, status)


def test_nginx_location_protecting_one_server_cannot_be_bypassed(edge: Edge) -> None:
    """The finding: nginx normalises a path to one server's location, the relay served another."""
    nginx = start_nginx(edge.cluster, edge.relay)
    people = ("-u", ":".join(nginx.auth))
    insiders = ("-u", ":".join(nginx.private_auth))
    attempts = [
        "/frontend/servers/private/files/secret.txt",
        "/frontend/servers/private%2F..%2Falpha/files/secret.txt",
        "/frontend/servers/private%2f..%2falpha/files/secret.txt",
        "/frontend/servers/alpha/%2e%2e/private/files/secret.txt",
        "/frontend//servers/private/files/secret.txt",
        "/servers/private/files/secret.txt",
        "/servers/private%2F..%2Falpha/files/secret.txt",
    ]
    for path in attempts:
        status, body, _ = curl(nginx.url + path, *people)
        assert SECRET not in body and status in (308, 400, 401, 404), (path, status)
        status, body, _ = curl(nginx.url + path, *people, "-L")
        assert SECRET not in body and status in (400, 401, 404), (path, status)
    status, body, _ = curl(nginx.url + "/frontend/servers/private/files/secret.txt", *insiders)
    assert (status, body) == (200, SECRET)  # the location protects; it does not just deny
    status, body, _ = curl(nginx.url + "/frontend/servers/alpha/files/hello.txt", *people)
    assert (status, body) == (200, b"hello\n")
    # A server's X-Accel-Redirect would make nginx fetch another location itself.
    status, body, _ = curl(nginx.url + "/frontend/servers/evil/x", *people)
    assert status == 200 and SECRET not in body and body == b"<p>evil</p>"


# ---- origin isolation ---------------------------------------------------------


def test_relayed_content_gets_no_hold_on_the_relay(edge: Edge) -> None:
    r = requests.get(edge.url("/frontend/servers/evil/page"), timeout=10)
    assert r.status_code == 200 and r.content == b"<p>evil</p>"
    for name in EDGE_HEADERS:
        assert name not in {k.lower() for k in r.headers}, name
    csp = r.headers["Content-Security-Policy"].split()
    assert csp[0] == "sandbox" and "allow-same-origin" not in csp
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    wait_until(lambda: "dropped header 'x-accel-redirect' from server evil" in edge.relay.proc.output(),
               "a log line for the dropped header", edge.relay.proc, 10)
    for _ in range(3):
        requests.get(edge.url("/frontend/servers/evil/again"), timeout=10)
    # Once an hour by each relay worker that saw it, not once a request.
    assert edge.relay.proc.output().count("dropped header 'x-accel-redirect' from server evil") <= len(
        edge.relay.worker_pids())


def test_a_trusted_server_is_not_sandboxed_but_still_kept_off_the_edge(edge: Edge) -> None:
    r = requests.get(edge.url("/frontend/servers/trustme/page"), timeout=10)
    assert "Content-Security-Policy" not in r.headers and r.headers["X-Content-Type-Options"] == "nosniff"
    for name in EDGE_HEADERS:
        assert name not in {k.lower() for k in r.headers}, name


def test_visitors_credentials_never_reach_a_server(edge: Edge) -> None:
    before = len(edge.evil.seen)
    requests.get(edge.url("/frontend/servers/evil/creds"), timeout=10, cookies={"relay_session": "s3cret"},
                 headers={"Authorization": "Basic b3BlcmF0b3I6cGFzc3dvcmQ=", "X-ApiKey": "scraper-key",
                          "X-Forwarded-For": "6.6.6.6", "X-Real-IP": "6.6.6.6", "Forwarded": "for=6.6.6.6",
                          "Range": "bytes=0-3"})
    (_, headers), = [s for s in edge.evil.seen[before:] if s[0] == "/creds"]
    assert set(headers) & {"cookie", "authorization", "x-apikey", "x-real-ip"} == set()
    # The client's claims about itself are replaced by the relay's own (PROTOCOL.md "Who is asking").
    assert headers["x-forwarded-for"] == b"127.0.0.1" and headers["forwarded"].startswith(b"for=127.0.0.1;")
    assert headers["range"] == b"bytes=0-3"  # the rest still crosses


ATTACK_PAGE = b"""<!DOCTYPE html><html><head><title>attack</title></head><body><p id="out">RUNNING</p>
<script>
(async () => {
  const out = [];
  for (const url of ['/frontend/servers/private/files/secret.txt', '/metrics', '/frontend/servers/']) {
    try { const r = await fetch(url); out.push(url + '=' + r.status + ':' + (await r.text()).slice(0, 40)); }
    catch (e) { out.push(url + '=BLOCKED'); }
  }
  try { out.push('cookie=' + document.cookie); } catch (e) { out.push('cookie=BLOCKED'); }
  document.getElementById('out').textContent = 'DONE ' + out.join(' | ');
})();
</script></body></html>"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make debian-deps installs it)")
def test_a_servers_page_cannot_read_other_servers_or_the_relay_in_a_browser(edge: Edge, tmp_path: Path) -> None:
    """Headless Chromium opens a server's HTML page whose script reaches for the rest of the relay."""
    assert CHROMIUM is not None
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                          "--no-first-run", "--disable-background-networking", "--disable-component-update",
                          "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
                          "--virtual-time-budget=5000", "--dump-dom",
                          edge.url("/frontend/servers/alpha/files/page.html")],
                         capture_output=True, timeout=60, check=False).stdout.decode()
    assert "DONE" in out, out[-2000:]  # the script ran (in its own origin)
    assert SECRET.decode().strip() not in out and "ptth_servers" not in out, out  # not the file, not the metrics
    assert "/frontend/servers/private/files/secret.txt=BLOCKED" in out and "/metrics=BLOCKED" in out, out


def test_relay_pages_are_never_framed_or_sniffed(edge: Edge) -> None:
    for path in ("/", "/frontend/servers/", "/frontend/relay_up_check"):
        r = requests.get(edge.url(path), timeout=10)
        assert r.headers["X-Frame-Options"] == "DENY", path
        assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"], path
        assert r.headers["X-Content-Type-Options"] == "nosniff", path


def test_redirects_are_paths_never_the_clients_host(edge: Edge) -> None:
    for path, expected in (("/frontend/servers", "/frontend/servers/"), ("/frontend/servers/alpha", "alpha/")):
        r = requests.get(edge.url(path), headers={"Host": "attacker.example"}, allow_redirects=False,
                         timeout=10)
        assert r.status_code in (301, 302, 308) and r.headers["Location"] == expected, path
    for path in ("//frontend/servers/", "//attacker.example/frontend/servers", "//frontend//servers"):
        status, _, location = curl(edge.url(path), "-H", "Host: attacker.example")
        assert "attacker" not in location and status in (400, 404), (path, status, location)


# ---- operators' pages -----------------------------------------------------------


OPERATOR_PAGES = ("/metrics", "/frontend/unregistered_servers", "/frontend/audit_log")


@pytest.mark.direct_relay  # behind nginx, 127.0.0.1 is a visitor of nginx's, not a proxy
def test_operator_pages_are_for_this_machine_only(cluster: Cluster, tmp_path: Path) -> None:
    relay = cluster.relay({"alpha": new_key("alpha")}, extra=f'audit_log = "{tmp_path / "audit.jsonl"}"')
    for path in OPERATOR_PAGES:
        assert get_from("127.0.0.1", relay.url + path)[0] == 200, path
        assert get_from("127.0.0.2", relay.url + path)[0] == 403, path  # anyone else
        # a client cannot claim to be local...
        assert get_from("127.0.0.2", relay.url + path, {"X-Forwarded-For": "127.0.0.1"})[0] == 403, path
        # ...and a proxy the relay does not trust proves nothing either
        assert get_from("127.0.0.1", relay.url + path, {"X-Forwarded-For": "203.0.113.9"})[0] == 403, path


@pytest.mark.direct_relay  # nginx in front answers or changes this itself
def test_operator_pages_through_nginx_answer_only_operators(cluster: Cluster, tmp_path: Path) -> None:
    relay = cluster.relay({"alpha": new_key("alpha")},
                          extra='trusted_proxies = ["127.0.0.1/32", "::1/128"]\n'
                                'operator_addresses = ["127.0.0.1/32", "127.0.0.5/32"]')
    nginx = start_nginx(cluster, relay)
    auth = "Basic " + __import__("base64").b64encode(":".join(nginx.auth).encode()).decode()
    assert get_from("127.0.0.2", nginx.url + "/metrics", {"Authorization": auth})[0] == 403
    assert get_from("127.0.0.2", nginx.url + "/metrics", {"Authorization": auth,
                                                           "X-Forwarded-For": "127.0.0.5"})[0] == 403
    status, body = get_from("127.0.0.5", nginx.url + "/metrics", {"Authorization": auth})
    assert status == 200 and b"ptth_servers_registered" in body


def test_unregistered_page_shows_every_offer_and_warns(cluster: Cluster) -> None:
    relay = cluster.relay({"alpha": new_key("alpha")})
    offers = {"127.0.0.2": new_key("ghost-one"), "127.0.0.3": new_key("ghost-two")}
    for source, key in offers.items():
        assert get_from(source, relay.url + "/7ZSFUKGV/http_listen/ghost", {"X-ApiKey": key})[0] == 403
    page = requests.get(relay.url + "/frontend/unregistered_servers", timeout=10).text
    for source, key in offers.items():
        assert tripcode_of(key) in page and source in page
        assert key not in page
    assert "proves nothing" in page


# ---- a malformed head from a server -----------------------------------------------


def test_a_non_numeric_content_length_is_a_502_at_once(cluster: Cluster) -> None:
    key = new_key("liar")
    relay = cluster.relay({"liar": key}, extra="request_timeout_secs = 30")
    liar = ScriptedServer(relay.url, "liar", key,
                          lambda uri, h: (200, {"content-length": b"abc", "content-type": b"text/plain"},
                                          b"hello")).start()
    try:
        wait_until(lambda: requests.get(relay.url + "/frontend/servers/", timeout=5,
                                        headers={"Accept": "application/json"}).json()[0]["online"],
                   "the scripted server online", relay.proc)
        started = time.monotonic()
        r = requests.get(relay.url + "/frontend/servers/liar/x", timeout=60)
        assert r.status_code == 502 and "content-length" in r.text
        assert time.monotonic() - started < 5, "the client waited instead of getting a 502 at once"
        wait_until(lambda: liar.posts == [400], "the relay's 400 to the server's POST", relay.proc, 10)
        log = relay.proc.output()
        assert "Traceback" not in log and log.count("content-length b'abc' is not a number") == 1
    finally:
        liar.stop()
