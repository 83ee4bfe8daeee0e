"""Host routing behind nginx, configured with the README's own wildcard block ("Put a web app on the internet").

The site is the README's `*.tunnel.example.com` server block, with the
upstream and the WebSocket `map` from its "Behind nginx (TLS)" block, read
from README.md when the test runs; only the listen port and the TLS lines
change (tests/e2e/nginx.py). Requests name their host in a Host header: no
name is resolved, and everything stays on 127.0.0.1. One relay (with
`server_host_suffix` and nginx as its trusted proxy), one app and two servers
in front of it: `open`, and `guarded` with `basic_auth`.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from conftest import Cluster, new_key, wait_until
from hand_websocket import HandWebSocket
from nginx import TRUSTED_PROXIES, Nginx, readme_site_config, start_nginx
from procs import http_status
from werkzeug.security import generate_password_hash

# direct_relay: these put nginx in front themselves (not a second one in front of the hosts' nginx)
pytestmark = [pytest.mark.process, pytest.mark.direct_relay]

SUFFIX = ".tunnel.example.com"
TIMEOUT_SECS = 30
USER, PASSWORD = "alice", "a password for the app"
# The visitors' address: on loopback, but not nginx's (127.0.0.1 is in trusted_proxies).
VISITOR = "127.0.0.2"
REPO_README = Path(__file__).resolve().parents[2] / "README.md"


def readme_web_app_site() -> str:
    """The README's upstream and map (first block) with its wildcard server block (web-app section)."""
    readme = REPO_README.read_text()
    section = readme[readme.index("## Put a web app on the internet"):]
    web_block = re.search(r"```nginx\n(.*?)```", section, re.DOTALL)
    assert web_block, "README.md has no nginx block under 'Put a web app on the internet'"
    main = readme_site_config()
    shared = main[:main.index("server {")]  # the upstream and the map
    return shared + web_block.group(1)


@dataclass
class Front:
    nginx: Nginx

    def get(self, host: str, path: str, **kwargs: object) -> requests.Response:
        headers = {"Host": host, **kwargs.pop("headers", {})}  # type: ignore[dict-item]
        return requests.get(self.nginx.url + path, headers=headers, timeout=TIMEOUT_SECS,
                            **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    c = Cluster(tmp_path_factory.mktemp("web-nginx"))
    try:
        _, app_url = c.web_app()
        keys = {"open": new_key("open"), "guarded": new_key("guarded")}
        extra = f'server_host_suffix = "{SUFFIX}"\n{TRUSTED_PROXIES}\n'
        relay = c.relay(keys, extra=extra)
        for name, key in keys.items():  # online first: the check that they are asks without a password
            c.server(relay, name, key, None, extra_config=f'web_app_url = "{app_url}"')
        config = relay.config.read_text() + f'basic_auth = ["{USER}:{generate_password_hash(PASSWORD)}"]\n'
        reloads = relay.proc.output().count("config reloaded from")
        relay.config.write_text(config)  # the last [[servers]] table is guarded's; the relay reloads it
        wait_until(lambda: relay.logged_by_all("config reloaded from", reloads), "every worker reloaded",
                   relay.proc, TIMEOUT_SECS)
        wait_until(lambda: http_status(f"{relay.url}/frontend/servers/guarded/") == 401, "basic_auth in force",
                   relay.proc, TIMEOUT_SECS)
        yield Front(start_nginx(c, relay, site=readme_web_app_site()))
    finally:
        c.close()


def headers_seen_by_app(front: Front, headers: dict[str, str]) -> tuple[int, dict[str, str], dict[str, str]]:
    """GET /headers from 127.0.0.2 (a visitor, not nginx's own 127.0.0.1, which is a trusted proxy).

    Returns the status, the response's headers and the request headers the app saw.
    """
    conn = http.client.HTTPConnection("127.0.0.1", front.nginx.port, timeout=TIMEOUT_SECS,
                                      source_address=(VISITOR, 0))
    try:
        conn.request("GET", "/headers", headers={"Host": f"open{SUFFIX}", **headers})
        r = conn.getresponse()
        body = r.read()
        assert r.status == 200, body
        return r.status, {k.lower(): v for k, v in r.getheaders()}, dict(json.loads(body)["headers"])
    finally:
        conn.close()


def test_a_host_under_the_suffix_is_its_server_at_slash(front: Front) -> None:
    _, response, seen = headers_seen_by_app(front, {})
    assert seen["x-forwarded-host"] == f"open{SUFFIX}"
    assert seen["x-forwarded-for"] == VISITOR  # as nginx reported it
    assert seen["forwarded"] == f"for={VISITOR};proto=http;host=open{SUFFIX}"
    assert seen["x-forwarded-prefix"] == ""  # host mode
    assert "content-security-policy" not in response  # an origin of its own


def test_a_spoofed_address_does_not_reach_the_app(front: Front) -> None:
    _, _, seen = headers_seen_by_app(front, {"X-Forwarded-For": "203.0.113.7"})
    assert seen["x-forwarded-for"] == VISITOR  # nginx appends; the relay reads from the right


def test_a_host_under_the_suffix_that_names_no_server_is_404(front: Front) -> None:
    r = front.get(f"nobody{SUFFIX}", "/")
    assert r.status_code == 404 and "no server named" in r.text


@pytest.mark.parametrize(("auth", "status"), [(None, 401), ((USER, "wrong"), 401), ((USER, PASSWORD), 200)],
                         ids=["missing", "wrong", "right"])
def test_basic_auth_at_the_relay(front: Front, auth: tuple[str, str] | None, status: int) -> None:
    r = front.get(f"guarded{SUFFIX}", "/headers", auth=auth)
    assert r.status_code == status, r.text
    if status == 401:
        assert r.headers["WWW-Authenticate"].startswith('Basic realm="guarded"')
    else:
        seen = {k.lower() for k, _ in r.json()["headers"]}
        assert "authorization" not in seen  # the relay used it up


def test_an_upload_streams_through_nginx(front: Front) -> None:
    pieces = [bytes([i]) * 1024 * 1024 for i in range(8)]
    r = requests.post(front.nginx.url + "/upload", data=iter(pieces), timeout=TIMEOUT_SECS,
                      headers={"Host": f"open{SUFFIX}", "Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    assert r.json() == {"sha256": hashlib.sha256(b"".join(pieces)).hexdigest(), "bytes": 8 * 1024 * 1024}


def test_server_sent_events_are_not_buffered_by_nginx(front: Front) -> None:
    delays = []
    with requests.get(front.nginx.url + "/sse?n=5&interval=0.3", stream=True, timeout=TIMEOUT_SECS,
                      headers={"Host": f"open{SUFFIX}"}) as r:
        assert r.status_code == 200
        for line in r.iter_lines(chunk_size=None):
            if line.startswith(b"data: "):
                delays.append(time.time() - json.loads(line[6:])["sent"])
    assert len(delays) == 5
    assert max(delays) < 0.25, delays  # events are 0.3 s apart: none waited for the next


def test_a_websocket_through_nginx(front: Front) -> None:
    from wsproto.events import BytesMessage, TextMessage

    with HandWebSocket(front.nginx.port, f"open{SUFFIX}", "/ws", TIMEOUT_SECS) as ws:
        ws.send(TextMessage(data="through nginx"))
        assert ws.until(TextMessage).data == "through nginx"
        blob = base64.b64encode(b"\x00\xff" * 50_000)
        ws.send(BytesMessage(data=blob))
        got = b""
        while len(got) < len(blob):
            got += ws.until(BytesMessage).data
        assert got == blob
