"""Web apps through the real relay (gunicorn, gevent worker), the server played by hand.

PROTOCOL.md "Web apps": a server that announces `bodies` and `websocket`
fetches request bodies with `GET /7ZSFUKGV/http_request_body/{id}` and
carries WebSockets on its response POST and that GET. These tests build the
messages by hand (MsgPack, no ptth_lib), so they pin the wire format, and
drive the client side with curl or a raw socket: a 64 MiB chunked upload
with the relay's memory bounded, a client abort mid-upload, Expect:
100-continue, a WebSocket both ways, a spoofed X-Forwarded-For.
"""

from __future__ import annotations

import base64
import hashlib
import os
import queue
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import requests
from conftest import Cluster, Relay, new_key, wait_until
from procs import relay_samples, unlabelled

pytestmark = pytest.mark.process

LISTEN = "/7ZSFUKGV/http_listen/"
RESPOND = "/7ZSFUKGV/http_response/"
BODY = "/7ZSFUKGV/http_request_body/"
FEATURES = "bodies, websocket"
WAIT_SECS = 30


def head_header(status: int, headers: dict[str, bytes]) -> str:
    return base64.b64encode(msgpack.packb({"status_code": status, "headers": headers})).decode()


@pytest.fixture
def relay_and_key(cluster: Cluster) -> tuple[Relay, str]:
    key = new_key("web")
    relay = cluster.relay({"web": key}, extra="listen_timeout_secs = 5\nrequest_timeout_secs = 20")
    return relay, key


def take_one(relay: Relay, key: str, start_client: Any) -> tuple[Any, dict[str, Any]]:
    """Park a listen announcing bodies and websocket, start the client, return it and the item taken."""
    box: dict[str, requests.Response] = {}

    def listen() -> None:
        box["r"] = requests.get(relay.url + LISTEN + "web", timeout=WAIT_SECS,
                                headers={"X-ApiKey": key, "X-PTTH-Features": FEATURES})

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    deadline = time.monotonic() + 10
    while unlabelled(relay_samples(relay.url)).get("ptth_listeners_waiting") != 1:
        assert time.monotonic() < deadline, "the listen was not parked"
        time.sleep(0.02)
    client = start_client()
    listener.join(WAIT_SECS)
    answer = box["r"]
    assert answer.status_code == 200, answer.text
    assert "header-lists" in answer.headers["X-PTTH-Features"]
    (item,) = msgpack.unpackb(answer.content, raw=False)
    return client, item


def respond(relay: Relay, key: str, rid: str, status: int, body: bytes | Iterator[bytes] = b"",
            headers: dict[str, bytes] | None = None) -> requests.Response:
    return requests.post(relay.url + RESPOND + rid, data=body, timeout=WAIT_SECS,
                         headers={"X-ApiKey": key, "X-PTTH-2LJYXWC4": head_header(status, headers or {})})


def in_thread(call: Any) -> threading.Thread:
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def curl(*args: str) -> subprocess.Popen[bytes]:
    assert shutil.which("curl"), "curl is needed (the test setup installs it)"
    return subprocess.Popen(["curl", "-sS", "--noproxy", "*", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


# ---- request bodies --------------------------------------------------------------------------


def test_a_64_mib_chunked_upload_streams_through_the_body_get_with_bounded_relay_memory(
        relay_and_key: tuple[Relay, str], tmp_path: Path) -> None:
    relay, key = relay_and_key
    upload = tmp_path / "upload.bin"
    data = os.urandom(1024 * 1024)
    digest = hashlib.sha256()
    with upload.open("wb") as f:
        for i in range(64):
            piece = data[i:] + data[:i]
            f.write(piece)
            digest.update(piece)
    worker = relay.worker_pid()
    before = rss_kib(worker)
    client, item = take_one(relay, key, lambda: curl(
        "-X", "PUT", "-H", "Transfer-Encoding: chunked", "--data-binary", f"@{upload}",
        f"{relay.url}/frontend/servers/web/upload?x=1"))
    assert (item["req"]["method"], item["req"]["uri"], item["body"]) == ("PUT", "/upload?x=1", -1)
    assert "transfer-encoding" not in item["req"]["headers"]
    got = hashlib.sha256()
    size = 0
    peak = before
    with requests.get(relay.url + BODY + item["id"], headers={"X-ApiKey": key}, stream=True,
                      timeout=WAIT_SECS) as r:
        assert r.status_code == 200 and r.headers["Content-Type"] == "application/octet-stream"
        for chunk in r.iter_content(256 * 1024):
            got.update(chunk)
            size += len(chunk)
            if size % (4 * 1024 * 1024) < len(chunk):
                peak = max(peak, rss_kib(worker))
                time.sleep(0.01)  # a slowish server: the client's upload must wait, not pile up
    assert size == 64 * 1024 * 1024 and got.hexdigest() == digest.hexdigest()
    # The body is fetched once.
    assert requests.get(relay.url + BODY + item["id"], headers={"X-ApiKey": key}, timeout=10).status_code == 404
    assert respond(relay, key, item["id"], 201, b"stored\n", {"content-length": b"7"}).status_code == 200
    out, err = client.communicate(timeout=WAIT_SECS)
    assert (client.returncode, out) == (0, b"stored\n"), err
    assert peak - before < 16 * 1024, f"relay worker grew by {(peak - before) // 1024} MiB for a 64 MiB upload"


def test_a_client_abort_mid_upload_cuts_the_body_get(relay_and_key: tuple[Relay, str]) -> None:
    relay, key = relay_and_key
    sock = socket.create_connection(("127.0.0.1", relay.port), timeout=WAIT_SECS)

    def start() -> socket.socket:
        sock.sendall(b"POST /frontend/servers/web/form HTTP/1.1\r\nHost: relay\r\n"
                     b"Content-Length: 10000000\r\n\r\n" + b"x" * 1_000_000)
        return sock

    _, item = take_one(relay, key, start)
    assert item["body"] == 10_000_000
    received = 0
    with requests.get(relay.url + BODY + item["id"], headers={"X-ApiKey": key}, stream=True,
                      timeout=WAIT_SECS) as r:
        assert r.status_code == 200
        chunks = r.iter_content(65536)
        while received < 1_000_000:
            received += len(next(chunks))
        sock.close()  # the client gives up mid-upload
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            for chunk in chunks:
                received += len(chunk)
    assert received == 1_000_000
    # The request is gone: the server's answer finds nobody.
    assert respond(relay, key, item["id"], 200, b"late").status_code in (404, 410)


@pytest.mark.direct_relay  # nginx in front answers or changes this itself
def test_expect_100_continue_is_answered_when_the_server_fetches_and_not_before(
        relay_and_key: tuple[Relay, str], tmp_path: Path) -> None:
    relay, key = relay_and_key
    upload = tmp_path / "two-mib.bin"
    upload.write_bytes(os.urandom(2 * 1024 * 1024))
    url = f"{relay.url}/frontend/servers/web/up"
    expect = ["--expect100-timeout", "30", "-H", "Expect: 100-continue", "-w", "\n%{size_upload}"]

    # The server answers without the body: the client never uploads it, and is answered.
    client, item = take_one(relay, key, lambda: curl(*expect, "--data-binary", f"@{upload}", url))
    assert item["body"] == 2 * 1024 * 1024 and "expect" not in item["req"]["headers"]
    assert respond(relay, key, item["id"], 405, b"no\n", {"content-length": b"3"}).status_code == 200
    out, err = client.communicate(timeout=WAIT_SECS)
    assert out.decode().split() == ["no", "0"], (out, err)  # 0 bytes uploaded

    # The server fetches it a second later: only then does curl send it.
    client, item = take_one(relay, key, lambda: curl(*expect, "--data-binary", f"@{upload}", url))
    time.sleep(1)
    r = requests.get(relay.url + BODY + item["id"], headers={"X-ApiKey": key}, timeout=WAIT_SECS)
    assert r.content == upload.read_bytes()
    assert respond(relay, key, item["id"], 200, b"ok\n", {"content-length": b"3"}).status_code == 200
    out, err = client.communicate(timeout=WAIT_SECS)
    assert out.decode().split() == ["ok", str(2 * 1024 * 1024)], (out, err)


# ---- WebSocket ------------------------------------------------------------------------------


def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(4096)
        assert piece, f"connection closed after {data!r}"
        data += piece
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def sockets_between(local_port: int, peer_port: int) -> str:
    """What `ss` shows of the established TCP sockets from `local_port` to `peer_port`, timers included."""
    which = f"( sport = :{local_port} and dport = :{peer_port} )"
    return subprocess.run(["ss", "-tno", "state", "established", which], capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.direct_relay  # nginx in front answers or changes this itself
def test_a_websocket_carries_bytes_both_ways_and_closes_through_the_real_relay(
        relay_and_key: tuple[Relay, str]) -> None:
    relay, key = relay_and_key
    client = socket.create_connection(("127.0.0.1", relay.port), timeout=WAIT_SECS)
    ws_key = base64.b64encode(os.urandom(16)).decode()

    def start() -> socket.socket:
        client.sendall(f"GET /frontend/servers/web/ws HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\n"
                       f"Connection: Upgrade\r\nSec-WebSocket-Key: {ws_key}\r\n"
                       f"Sec-WebSocket-Version: 13\r\nX-Private: no\r\nConnection: x-private\r\n\r\n".encode())
        return client

    _, item = take_one(relay, key, start)
    headers = item["req"]["headers"]
    assert item["upgrade"] == "websocket" and "body" not in item
    assert (headers["upgrade"], headers["connection"]) == (b"websocket", b"upgrade")
    assert headers["sec-websocket-key"] == ws_key.encode() and "x-private" not in headers

    to_client: queue.Queue[bytes | None] = queue.Queue()

    def app_bytes() -> Iterator[bytes]:
        while (piece := to_client.get(timeout=WAIT_SECS)) is not None:
            yield piece

    accept = base64.b64encode(hashlib.sha1((ws_key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
    post: dict[str, requests.Response] = {}
    poster = threading.Thread(target=lambda: post.update(r=respond(
        relay, key, item["id"], 101, app_bytes(),
        {"upgrade": b"websocket", "connection": b"upgrade", "sec-websocket-accept": accept})), daemon=True)
    poster.start()
    head, rest = read_head(client)
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 101 Switching Protocols"
    assert f"Sec-Websocket-Accept: {accept.decode()}" in lines and "Upgrade: websocket" in lines
    assert rest == b""

    with requests.get(relay.url + BODY + item["id"], headers={"X-ApiKey": key}, stream=True,
                      timeout=WAIT_SECS) as from_client:
        assert from_client.status_code == 200
        pieces = from_client.iter_content(None)
        client.sendall(b"\x81\x05hello")  # bytes as they are: the relay does not read frames
        assert next(pieces) == b"\x81\x05hello"
        to_client.put(b"\x81\x05world")
        assert client.recv(100) == b"\x81\x05world"
        # The relay keeps its end alive while idle (keepalive.py): the kernel shows its timer.
        # (Once the bytes just sent are acknowledged: until then the timer shown is the retransmission's.)
        wait_until(lambda: "timer:(keepalive" in sockets_between(relay.port, client.getsockname()[1]),
                   "a keepalive timer on the relay's end", deadline=3)
        client.shutdown(socket.SHUT_WR)  # the client's half-close ends the server's GET cleanly
        assert list(pieces) == []
    to_client.put(b"\x88\x00")  # the app's close frame, then its half-close
    to_client.put(None)
    poster.join(WAIT_SECS)
    assert post["r"].status_code == 200
    assert client.recv(100) == b"\x88\x00"
    assert client.recv(100) == b""  # and the end
    client.close()


def test_a_websocket_or_a_body_to_a_server_without_the_feature_is_501(
        relay_and_key: tuple[Relay, str]) -> None:
    relay, key = relay_and_key
    assert requests.get(relay.url + LISTEN + "web", headers={"X-ApiKey": key, "X-PTTH-Wait-Secs": "0"},
                        timeout=10).status_code == 204  # online, announcing nothing
    url = f"{relay.url}/frontend/servers/web/ws"
    ws = requests.get(url, headers={"Upgrade": "websocket", "Connection": "Upgrade"}, timeout=10)
    body = requests.post(url, data=b"x", timeout=10)
    assert (ws.status_code, body.status_code) == (501, 501)
    assert "websocket" in ws.text.lower() and "bodies" in body.text


# ---- who is asking --------------------------------------------------------------------------


def test_a_spoofed_x_forwarded_for_from_an_untrusted_peer_is_replaced(relay_and_key: tuple[Relay, str]) -> None:
    relay, key = relay_and_key
    _, item = take_one(relay, key, lambda: in_thread(lambda: requests.get(
        f"{relay.url}/frontend/servers/web/who", timeout=WAIT_SECS,
        headers={"X-Forwarded-For": "6.6.6.6", "Forwarded": "for=6.6.6.6", "X-Forwarded-Host": "evil.example",
                 "X-Forwarded-Proto": "https", "X-Real-IP": "6.6.6.6"})))
    headers = item["req"]["headers"]
    host = f"127.0.0.1:{relay.port}".encode()
    assert headers["x-forwarded-for"] == b"127.0.0.1"
    assert headers["x-forwarded-proto"] == b"http"
    assert headers["x-forwarded-host"] == host
    assert headers["x-forwarded-prefix"] == b"/frontend/servers/web"
    assert headers["forwarded"] == b'for=127.0.0.1;proto=http;host="' + host + b'"'
    assert "x-real-ip" not in headers
    respond(relay, key, item["id"], 204)
