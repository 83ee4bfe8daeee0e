"""The web app bench/web.py measures, directly and through the tunnel: lean, so that it is not the bottleneck.

    python bench/web_app.py [--port N]

Plain sockets and one thread per connection, on 127.0.0.1; prints
`bench web app listening on http://127.0.0.1:PORT` once it listens. Why not
Flask under werkzeug or gunicorn: the benchmark measures what the tunnel
adds, so the app should take bytes and answer messages as cheaply as Python
can, and be the same for both paths. Its own HTTP parsing is enough for
the three requests the benchmark makes:

- `POST /upload`: reads the body (Content-Length or chunked) a MiB at a time
  straight into one buffer, and answers `{"bytes": N, "sha256": HEX}`.
- `GET /sse?n=N&interval_ms=M`: N server-sent events, one every M ms on a
  fixed schedule, each `data: SEND_TIME_NS` (time.time_ns(), the machine's
  clock, which the client on the same machine reads too), sent at once; the
  body ends when the connection closes.
- `GET /ws` with `Upgrade: websocket`: an echo. wsproto (pinned in
  requirements-dev.txt for the tests) does the handshake and the framing:
  text and binary messages come back as they came, pings get pongs, a close
  is answered.

Every response has `Connection: close`: ptth_server opens a connection to
the app per request anyway, and so does the benchmark's client.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import socket
import sys
import threading
import time
from urllib.parse import parse_qs, urlsplit

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Request,
    TextMessage,
)

BUF_BYTES = 1024 * 1024
MAX_HEAD_BYTES = 64 * 1024


class Conn:
    """A socket with the bytes received but not yet used."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pending = bytearray()

    def fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the client closed the connection")
        self.pending += data

    def read_until(self, marker: bytes, limit: int = MAX_HEAD_BYTES) -> bytes:
        """Up to and including `marker`."""
        while (end := self.pending.find(marker)) < 0:
            if len(self.pending) > limit:
                raise ConnectionError("line or head too long")
            self.fill()
        end += len(marker)
        out = bytes(self.pending[:end])
        del self.pending[:end]
        return out

    def read_body(self, n: int, buf: memoryview, use: hashlib._Hash) -> None:
        """Feed exactly `n` bytes to `use.update`, through `buf`."""
        if self.pending:
            take = min(n, len(self.pending))
            use.update(self.pending[:take])
            del self.pending[:take]
            n -= take
        while n:
            got = self.sock.recv_into(buf, min(n, len(buf)))
            if not got:
                raise ConnectionError(f"the body ended {n} bytes early")
            use.update(buf[:got])
            n -= got


def respond(sock: socket.socket, status: str, body: bytes, content_type: str = "application/json") -> None:
    sock.sendall(f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                 f"Connection: close\r\n\r\n".encode() + body)


class Counter:
    """hashlib-like: counts what it is fed (chunked bodies are hashed and counted)."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.n = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self.sha.update(data)
        self.n += len(data)


def upload(conn: Conn, headers: dict[str, str]) -> None:
    buf = memoryview(bytearray(BUF_BYTES))
    body = Counter()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size = int(conn.read_until(b"\r\n", 1024).split(b";")[0], 16)
            if size == 0:
                while conn.read_until(b"\r\n", 8192) != b"\r\n":  # trailers
                    pass
                break
            conn.read_body(size, buf, body)
            if conn.read_until(b"\r\n", 2) != b"\r\n":
                raise ConnectionError("bad chunk end")
    else:
        conn.read_body(int(headers.get("content-length", "0")), buf, body)
    respond(conn.sock, "200 OK", json.dumps({"bytes": body.n, "sha256": body.sha.hexdigest()}).encode())


def sse(conn: Conn, query: dict[str, list[str]]) -> None:
    n = int(query.get("n", ["100"])[0])
    interval = float(query.get("interval_ms", ["10"])[0]) / 1000
    conn.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                      b"Connection: close\r\n\r\n")
    start = time.monotonic()
    for i in range(n):
        delay = start + i * interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        conn.sock.sendall(b"id: %d\ndata: %d\n\n" % (i, time.time_ns()))


def websocket(conn: Conn, head: bytes) -> None:
    ws = WSConnection(ConnectionType.SERVER)
    ws.receive_data(head + bytes(conn.pending))
    conn.pending.clear()
    sock = conn.sock
    while True:
        for event in ws.events():
            if isinstance(event, Request):
                sock.sendall(ws.send(AcceptConnection()))
            elif isinstance(event, (TextMessage, BytesMessage)):
                sock.sendall(ws.send(Message(data=event.data, message_finished=event.message_finished)))
            elif isinstance(event, Ping):
                sock.sendall(ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                sock.sendall(ws.send(event.response()))
                return
        data = sock.recv(65536)
        if not data:
            return
        ws.receive_data(data)


def handle(sock: socket.socket) -> None:
    with contextlib.suppress(OSError, ValueError), sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Conn(sock)
        head = conn.read_until(b"\r\n\r\n")
        request_line, *lines = head.decode("latin-1").split("\r\n")
        method, target, _ = request_line.split(" ", 2)
        headers = {}
        for line in lines:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        url = urlsplit(target)
        if url.path.endswith("/ws") and headers.get("upgrade", "").lower() == "websocket":
            websocket(conn, head)
        elif url.path.endswith("/upload") and method in ("POST", "PUT"):
            upload(conn, headers)
        elif url.path.endswith("/sse"):
            sse(conn, parse_qs(url.query))
        else:
            respond(sock, "200 OK" if url.path == "/" else "404 Not Found", b"bench web app\n", "text/plain")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    threading.stack_size(256 * 1024)  # 1,000 idle WebSockets are 1,000 threads
    listener = socket.create_server(("127.0.0.1", args.port), backlog=1024)
    print(f"bench web app listening on http://127.0.0.1:{listener.getsockname()[1]}", flush=True)
    while True:
        sock, _ = listener.accept()
        threading.Thread(target=handle, args=(sock,), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
