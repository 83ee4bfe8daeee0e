"""A local web app through the tunnel: the real relay (gunicorn), the real ptth_server, a real Flask app.

The app is tests/e2e/web_test_app.py under werkzeug's threaded server. One
relay, app and server (serving a folder under /files/ too) for the module;
tests that break the app or the server start their own.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pytest
import requests
from conftest import Cluster, Proc, Relay, Server, free_port, new_key, wait_until
from hand_websocket import HandWebSocket

pytestmark = pytest.mark.process

# The relay's request timeout in this module: the slow-app test waits this long.
REQUEST_TIMEOUT_SECS = 5
# A request through the tunnel on a busy 2-core test machine, at most.
TIMEOUT_SECS = 30
# Host routing: NAME plus this is server NAME's own host (sent as Host; nothing resolves it).
HOST_SUFFIX = ".tunnel.test"


@dataclass
class WebTunnel:
    relay: Relay
    server: Server
    app: Proc
    app_url: str
    root: Path
    cluster: Cluster

    @property
    def base(self) -> str:
        return f"{self.relay.url}/frontend/servers/{self.server.name}"

    @property
    def host(self) -> str:
        """The server's own host (host mode), port included, for the Host header."""
        return f"{self.server.name}{HOST_SUFFIX}:{self.relay.port}"


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebTunnel]:
    tmp = tmp_path_factory.mktemp("web")
    root = tmp / "root"
    root.mkdir()
    (root / "hello.txt").write_bytes(b"hello from the folder\n")
    c = Cluster(tmp)
    try:
        app, app_url = c.web_app()
        key = new_key("webapp")
        relay = c.relay({"webapp": key}, extra=f"request_timeout_secs = {REQUEST_TIMEOUT_SECS}\n"
                                              f'server_host_suffix = "{HOST_SUFFIX}"')
        server = c.server(relay, "webapp", key, root, extra_config=f'web_app_url = "{app_url}"')
        yield WebTunnel(relay, server, app, app_url, root, c)
    finally:
        c.close()


def get(url: str, **kwargs: object) -> requests.Response:
    return requests.get(url, timeout=TIMEOUT_SECS, allow_redirects=False, **kwargs)  # type: ignore[arg-type]


# ---- plain requests --------------------------------------------------------


def test_page_and_form_by_get(web: WebTunnel) -> None:
    r = get(web.base + "/")
    assert r.status_code == 200 and "web test app" in r.text
    r = get(web.base + "/form?q=tunnel&q=two&empty=")
    assert r.status_code == 200
    assert r.json() == {"method": "GET", "fields": {"q": ["tunnel", "two"], "empty": [""]}}


def test_files_stay_with_the_file_server(web: WebTunnel) -> None:
    """With both keys set, /files/ is the folder's and everything else the app's."""
    r = get(web.base + "/files/hello.txt")
    assert r.status_code == 200 and r.content == b"hello from the folder\n"
    assert get(web.base + "/files/nothing-here").status_code == 404
    assert get(web.base + "/target").text == "target from ?\n"


def test_app_gets_its_own_host(web: WebTunnel) -> None:
    r = get(web.base + "/headers?x=1", headers={"X-End-To-End": "kept"})
    assert r.status_code == 200
    seen = dict(r.json()["headers"])
    assert r.json()["path"] == "/headers?x=1"
    assert seen["host"] == urlsplit(web.app_url).netloc, "the app gets its own host, as nginx sends by default"
    assert seen["x-end-to-end"] == "kept"
    assert "keep-alive" not in seen and "te" not in seen


def test_hop_by_hop_response_headers_stay_with_the_app(web: WebTunnel) -> None:
    r = get(web.base + "/hop")
    assert r.status_code == 200 and r.text == "hop\n"
    assert r.headers["X-Public"] == "kept"
    assert "X-Private" not in r.headers, "a header the app's Connection header lists is hop-by-hop"
    assert "Keep-Alive" not in r.headers


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "DELETE"])
def test_other_methods_without_a_body(web: WebTunnel, method: str) -> None:
    r = requests.request(method, web.base + "/headers", timeout=TIMEOUT_SECS)
    assert r.status_code == 200
    if method == "HEAD":
        assert r.content == b""
        assert int(r.headers["Content-Length"]) > 0, "HEAD keeps the length a GET would have"
    else:
        assert r.json()["method"] == method


# ---- redirects -------------------------------------------------------------


@pytest.mark.parametrize(("path", "source"), [("/redirect/absolute", "absolute"), ("/redirect/path", "path"),
                                              ("/redirect/relative", "relative")])
def test_location_points_at_the_public_url(web: WebTunnel, path: str, source: str) -> None:
    """An absolute Location on the app's own origin, or a path, leads back through the relay (path mode)."""
    r = get(web.base + path)
    assert r.status_code == 302
    location = r.headers["Location"]
    assert urlsplit(web.app_url).netloc not in location, "the app's own address must not reach the client"
    followed = urljoin(r.url, location)
    assert followed == f"{web.base}/target?from={source}"
    assert get(followed).text == f"target from {source}\n"


# ---- failures --------------------------------------------------------------


def test_app_down_is_a_502_that_does_not_name_it(web: WebTunnel) -> None:
    port = free_port()  # nothing listens there
    key = new_key("down")
    relay = web.cluster.relay({"down": key})
    server = web.cluster.server(relay, "down", key, None, wait=False,
                                extra_config=f'web_app_url = "http://127.0.0.1:{port}"')
    url = f"{relay.url}/frontend/servers/down/anything"
    answers: list[requests.Response] = []
    wait_until(lambda: answers.append(get(url)) or b"web app" in answers[-1].content, "the server's 502",
               server.proc)
    r = answers[-1]
    assert r.status_code == 502
    assert r.text.count("\n") == 1 and r.text.endswith("\n")
    assert str(port) not in r.text and "127.0.0.1" not in r.text
    assert f"127.0.0.1:{port}" in server.proc.output(), "the server's log names the app it could not reach"


@pytest.mark.parametrize("framing", ["chunked", "length"])
def test_app_reset_mid_response_cuts_the_client(web: WebTunnel, framing: str) -> None:
    """Never a short body passed off as complete: the client's connection is cut."""
    parts = urlsplit(web.base)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=TIMEOUT_SECS)
    conn.request("GET", f"{parts.path}/reset?framing={framing}")
    r = conn.getresponse()
    assert r.status == 200
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        data = r.read()
        # A body of unknown length that ends early is indistinguishable from a complete one, unless cut.
        pytest.fail(f"the body ended cleanly after {len(data)} bytes")
    conn.close()


@pytest.mark.alone
def test_sse_events_arrive_as_they_are_sent(web: WebTunnel) -> None:
    """Each event reaches the client at once, not when a buffer fills or the response ends."""
    delays = []
    with requests.get(web.base + "/sse?n=10&interval=0.3", stream=True, timeout=TIMEOUT_SECS) as r:
        assert r.status_code == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        for line in r.iter_lines(chunk_size=None):
            if line.startswith(b"data: "):
                delays.append(time.time() - json.loads(line[6:])["sent"])
    assert len(delays) == 10
    assert statistics.median(delays) < 0.05, delays
    assert max(delays) < 0.25, delays  # the gap between events is 0.3 s: none waited for the next


def test_slow_app_gets_the_relays_504(web: WebTunnel) -> None:
    started = time.monotonic()
    r = get(web.base + f"/slow?secs={REQUEST_TIMEOUT_SECS + 3}")
    took = time.monotonic() - started
    assert r.status_code == 504
    assert took >= REQUEST_TIMEOUT_SECS - 0.5, "the server must not answer for a slow app before the relay"


# ---- what needs the relay's half (request bodies, WebSocket, header lists) ----------------


@pytest.mark.direct_relay  # nginx replaces the visitor's Connection header (and keeps what it named)
def test_connection_listed_request_headers_do_not_reach_the_app(web: WebTunnel) -> None:
    """The relay sees the client's Connection header (it never reaches the server): it drops what it lists."""
    r = get(web.base + "/headers", headers={"Connection": "keep-alive, X-Hop", "X-Hop": "secret"})
    assert r.status_code == 200
    assert "x-hop" not in dict(r.json()["headers"])


def test_the_app_learns_who_is_asking(web: WebTunnel) -> None:
    seen = dict(get(web.base + "/headers", headers={"X-Forwarded-For": "6.6.6.6"}).json()["headers"])
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == urlsplit(web.relay.url).netloc
    assert seen["x-forwarded-prefix"] == f"/frontend/servers/{web.server.name}"
    assert "for=127.0.0.1" in seen["forwarded"]
    log = web.server.proc.output()
    assert "from 127.0.0.1: GET /headers" in log, "the server's log shows the client's address"


def test_post_form_and_json(web: WebTunnel) -> None:
    r = requests.post(web.base + "/form", data={"name": "Zoë", "n": "2"}, timeout=TIMEOUT_SECS)
    assert r.status_code == 200
    assert r.json() == {"method": "POST", "fields": {"name": ["Zoë"], "n": ["2"]}}
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        r = requests.request(method, web.base + "/json", json={"a": [1, 2], "b": "c"}, timeout=TIMEOUT_SECS)
        assert r.status_code == 200, r.text
        assert r.json() == {"method": method, "json": {"a": [1, 2], "b": "c"}}


def test_location_points_at_the_public_url_in_host_mode(web: WebTunnel) -> None:
    for path, source in (("/redirect/absolute", "absolute"), ("/redirect/path", "path")):
        r = get(web.relay.url + path, headers={"Host": web.host})
        assert r.status_code == 302, r.text
        assert urljoin(f"http://{web.host}{path}", r.headers["Location"]) == f"http://{web.host}/target?from={source}"
    r = get(web.relay.url + "/redirect/absolute", headers={"Host": web.host})
    assert r.headers["Location"] == f"http://{web.host}/target?from=absolute", "absolute, on the public host"


def test_two_cookies_survive_in_host_mode(web: WebTunnel) -> None:
    """Both Set-Cookie lines reach the client, in order and unjoined (the relay keeps them in host mode)."""
    r = get(web.relay.url + "/cookies/set", headers={"Host": web.host})
    assert r.status_code == 200
    cookies = r.raw.headers.getlist("Set-Cookie")
    assert len(cookies) == 2, r.raw.headers
    assert cookies[0].startswith("first=1; Expires=") and cookies[1].startswith("second=2; HttpOnly")
    r = get(web.relay.url + "/cookies/show", headers={"Host": web.host, "Cookie": "first=1; second=2"})
    assert r.json() == {"first": "1", "second": "2"}


def _random_chunks(total: int, seed: bytes) -> Iterator[bytes]:
    """`total` bytes, made as they are sent (never held whole), in 1 MiB pieces."""
    block = hashlib.sha256(seed).digest() * (1024 * 1024 // 32)
    sent = 0
    while sent < total:
        piece = block[: min(len(block), total - sent)]
        sent += len(piece)
        yield piece


def _sha_of_chunks(total: int, seed: bytes) -> str:
    digest = hashlib.sha256()
    for piece in _random_chunks(total, seed):
        digest.update(piece)
    return digest.hexdigest()


class _Sized:
    """Pieces with a length: requests sends Content-Length instead of chunked."""

    def __init__(self, pieces: Iterator[bytes], length: int) -> None:
        self._pieces, self._length = pieces, length

    def __iter__(self) -> Iterator[bytes]:
        return self._pieces

    def __len__(self) -> int:
        return self._length


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_upload_64_mib_arrives_whole(web: WebTunnel, framing: str) -> None:
    total = 64 * 1024 * 1024
    pieces = _random_chunks(total, framing.encode())
    body: object = _Sized(pieces, total) if framing == "length" else pieces
    headers = {"Content-Type": "application/octet-stream"}
    r = requests.post(web.base + "/upload", data=body, headers=headers, timeout=120)  # type: ignore[arg-type]
    assert r.status_code == 200, r.text
    assert r.json() == {"sha256": _sha_of_chunks(total, framing.encode()), "bytes": total}


@pytest.mark.parametrize("size", [1000, 8 * 1024 * 1024])
def test_an_app_answering_before_reading_the_upload_is_heard(web: WebTunnel, size: int) -> None:
    """The app's 413 reaches the client; the server stops copying the body (it does not wait for all of it)."""
    parts = urlsplit(web.base)
    with socket.create_connection((parts.hostname or "", parts.port or 80), timeout=TIMEOUT_SECS) as sock:
        sock.sendall(f"POST {parts.path}/refuse HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Length: {size}\r\n"
                     "Content-Type: application/octet-stream\r\n\r\n".encode())
        try:
            sock.sendall(b"x" * size)
        except OSError:
            pass  # the relay may close its side once the answer is out: the answer is still there to read
        answer = b""
        while b"\r\n\r\n" not in answer:
            more = sock.recv(65536)
            assert more, f"no answer: {answer!r}"
            answer += more
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_download_64_mib_arrives_whole(web: WebTunnel, framing: str) -> None:
    total = 64 * 1024 * 1024
    digest = hashlib.sha256()
    size = 0
    with requests.get(web.base + f"/download?bytes={total}&seed={framing}&framing={framing}", stream=True,
                      timeout=TIMEOUT_SECS) as r:
        assert r.status_code == 200
        assert r.headers.get("Content-Length") == (str(total) if framing == "length" else None)
        for piece in r.iter_content(1 << 20):
            digest.update(piece)
            size += len(piece)
    assert size == total
    assert digest.hexdigest() == _sha_of_chunks(total, framing.encode())


def test_client_abort_mid_upload_is_an_incomplete_body_at_the_app(web: WebTunnel) -> None:
    """The client sends half of a declared length and goes: the app's read fails, never a short success."""
    before = len(get(web.base + "/uploads").json())
    parts = urlsplit(web.base)
    sock = socket.create_connection((parts.hostname or "", parts.port or 80), timeout=TIMEOUT_SECS)
    total = 8 * 1024 * 1024
    sock.sendall(f"POST {parts.path}/upload HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                 f"Content-Length: {total}\r\nContent-Type: application/octet-stream\r\n\r\n".encode())
    sock.sendall(os.urandom(total // 2))
    time.sleep(1.0)
    sock.close()
    outcomes: list[list[dict[str, object]]] = []
    wait_until(lambda: outcomes.append(get(web.base + "/uploads").json()) or len(outcomes[-1]) > before,
               "the app to see the upload end")
    outcome = outcomes[-1][-1]
    assert outcome["complete"] is False, outcome
    assert outcome["bytes"] < total, outcome


# ---- WebSocket ------------------------------------------------------------------------


def _ws_url(web: WebTunnel) -> str:
    return web.base.replace("http://", "ws://", 1) + "/ws"


def test_websocket_echo_text_binary_and_close_code(web: WebTunnel) -> None:
    import simple_websocket

    ws = simple_websocket.Client.connect(_ws_url(web))
    try:
        ws.send("hello, tunnel")
        assert ws.receive(timeout=TIMEOUT_SECS) == "hello, tunnel"
        blob = os.urandom(200_000)
        ws.send(blob)
        assert ws.receive(timeout=TIMEOUT_SECS) == blob
        ws.send("close 4001 bye now")
        with pytest.raises(simple_websocket.ConnectionClosed) as closed:
            ws.receive(timeout=TIMEOUT_SECS)
        assert (closed.value.reason, closed.value.message) == (4001, "bye now")
    finally:
        if ws.connected:
            ws.close()


def test_websocket_ping_gets_a_pong(web: WebTunnel) -> None:
    """A ping from the client crosses both hops and the app's pong comes back (wsproto by hand)."""
    from wsproto.events import CloseConnection, Ping, Pong

    parts = urlsplit(web.base)
    with HandWebSocket(parts.port or 80, parts.netloc, f"{parts.path}/ws", TIMEOUT_SECS) as ws:
        ws.send(Ping(payload=b"are you there"))
        assert ws.until(Pong).payload == b"are you there"
        ws.send(CloseConnection(code=1000, reason="done"))
        # The app ends the connection: its end reaches the client. (Its close frame is not
        # checked: simple-websocket sends it from another thread than the one whose return
        # makes werkzeug close the socket, and now and then that comes first, with no tunnel.)
        while ws.sock.recv(65536):
            pass


def test_many_websockets_at_once(web: WebTunnel) -> None:
    import simple_websocket

    sockets = [simple_websocket.Client.connect(_ws_url(web)) for _ in range(20)]
    try:
        for i, ws in enumerate(sockets):
            ws.send(f"socket {i}")
        for i, ws in enumerate(sockets):
            assert ws.receive(timeout=TIMEOUT_SECS) == f"socket {i}"
    finally:
        for ws in sockets:
            if ws.connected:
                ws.close()


# ---- memory and resources ------------------------------------------------------------


def _peak_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0])


def _rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0])


def _reset_peak_rss(pid: int) -> None:
    """Writing 5 to clear_refs resets VmHWM to the current RSS (Linux 4.0+)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@pytest.mark.alone
def test_one_gib_upload_arrives_whole_with_bounded_memory(web: WebTunnel) -> None:
    """1 GiB, chunked, client -> relay -> server -> app: hash-checked, and neither the relay's
    worker nor the server grows by more than a few MiB (each holds a piece or two in hand)."""
    total = 1 << 30
    worker, server = web.relay.worker_pid(), web.server.proc.pid
    requests.post(web.base + "/upload", data=b"warm up", timeout=TIMEOUT_SECS).raise_for_status()
    for pid in (worker, server):
        _reset_peak_rss(pid)
    before = {pid: _peak_rss_kib(pid) for pid in (worker, server)}
    started = time.monotonic()
    r = requests.post(web.base + "/upload", data=_random_chunks(total, b"gib"), timeout=600)
    took = time.monotonic() - started
    assert r.status_code == 200, r.text
    assert r.json() == {"sha256": _sha_of_chunks(total, b"gib"), "bytes": total}
    for pid, name in ((worker, "relay worker"), (server, "server")):
        growth_mib = (_peak_rss_kib(pid) - before[pid]) / 1024
        assert growth_mib < 16, f"{name} peak RSS grew {growth_mib:.1f} MiB during a 1 GiB upload ({took:.1f} s)"


def test_client_leaving_an_event_stream_frees_the_app(web: WebTunnel) -> None:
    """A client that goes away mid-stream frees the server's thread and the app's connection:
    the relay finds the client gone when it passes on the next event and answers the POST,
    and the server, which looks for that answer between events and every WATCH_SECS while
    the app is quiet, stops. (The relay does not notice the client's end while nothing
    flows, hence an event every 2 s here.)"""
    with requests.get(web.base + "/sse?n=1000&interval=2", stream=True, timeout=TIMEOUT_SECS) as r:
        assert r.status_code == 200
        next(r.iter_lines(chunk_size=None))
    request_id_lines = lambda: [line for line in web.server.proc.output().splitlines()
                                if "GET /sse?n=1000&interval=2" in line]
    wait_until(lambda: request_id_lines(), "the server's line for the stream", web.server.proc)
    request_id = request_id_lines()[-1].split("request ")[1].split()[0]
    wait_until(lambda: f"response {request_id} cut off" in web.server.proc.output()
               or f"response {request_id}: the client left" in web.server.proc.output(),
               "the server to notice that the client left", web.server.proc, deadline=15)


@pytest.mark.slow
def test_a_thousand_idle_websockets_are_held(web: WebTunnel) -> None:
    """1,000 WebSockets open at once, idle: all still echo afterwards, and the server holds them
    outside its request pool (a plain request is answered meanwhile) in bounded memory."""
    import base64

    parts = urlsplit(web.base)
    server = web.server.proc.pid
    before = _rss_kib(server)
    sockets: list[socket.socket] = []
    try:
        for i in range(1000):
            s = socket.create_connection((parts.hostname or "", parts.port or 80), timeout=TIMEOUT_SECS)
            sockets.append(s)
            key = base64.b64encode(os.urandom(16)).decode()
            s.sendall(f"GET {parts.path}/ws HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                      .encode())
            head = b""
            while b"\r\n\r\n" not in head:
                more = s.recv(4096)
                assert more, f"WebSocket {i} closed during its handshake: {head!r}"
                head += more
            assert head.startswith(b"HTTP/1.1 101"), (i, head)
        assert get(web.base + "/target").status_code == 200, "the request pool is not taken by WebSockets"
        held_mib = (_rss_kib(server) - before) / 1024
        for s in sockets[::50]:
            s.sendall(b"\x81\x82" + b"\x00\x00\x00\x00" + b"hi")  # a masked text frame, mask 0
            assert s.recv(16) == b"\x81\x02hi"
        assert held_mib < 150, f"the server grew {held_mib:.0f} MiB holding 1,000 idle WebSockets"
    finally:
        for s in sockets:
            s.close()
