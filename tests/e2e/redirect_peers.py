"""Hostile HTTP peers for the redirect tests: a "relay" that answers as the test says, and a trap.

`Trap` listens on 127.0.0.2 (another loopback address, so another host to
requests) and records every request that reaches it. `HostileRelay` listens
on 127.0.0.1 and answers each request with what the test's `answer(request)`
returns, typically a redirect to the trap. A PTTH program that followed a
redirect while carrying its key would show up in `trap.keys_seen()`.

Both are plain `http.server` servers speaking HTTP/1.1 with keep-alive, and
read request bodies whole (Content-Length or chunked), so a streaming POST
gets its answer only once it has ended, as from the real relay.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TRAP_HOST = "127.0.0.2"


@dataclass
class Seen:
    """One request as a peer received it."""

    method: str
    path: str
    headers: dict[str, str]
    at: float = field(default_factory=time.monotonic)


@dataclass
class Reply:
    """What the hostile relay answers: status, headers, body; `delay` before it, `chunked` to
    send the body with chunked framing (an empty one is a clean end of a stream)."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay: float = 0.0
    chunked: bool = False


def redirect(status: int, location: str) -> Reply:
    return Reply(status, {"Location": location, "Content-Type": "text/html"},
                 b"<html><body>Moved <a href='" + location.encode() + b"'>here</a></body></html>")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def _any(self) -> None:
        self._read_body()
        seen = Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
        with self.server.lock:
            self.server.seen.append(seen)
        reply = self.server.answer(seen)
        if reply.delay:
            time.sleep(reply.delay)
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if reply.chunked:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if reply.body:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(reply.body), reply.body))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            self.wfile.write(reply.body)

    do_GET = do_POST = do_PUT = do_HEAD = _any

    def _read_body(self) -> None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                self.rfile.read(size + 2)  # the data and its CRLF
                if size == 0:
                    return  # (no trailers from our programs)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def log_message(self, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, answer: Callable[[Seen], Reply]) -> None:
        self.answer = answer
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        super().__init__((host, 0), _Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def handle_error(self, request: object, client_address: object) -> None:
        """A program that hangs up before reading the answer is what some tests expect: no traceback."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]

    def requests_to(self, prefix: str) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if s.path.startswith(prefix)]

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class Trap(_Server):
    """Where the redirects point: records everything, answers 200 to everything."""

    def __init__(self) -> None:
        super().__init__(TRAP_HOST, lambda seen: Reply(200, {"Content-Type": "text/plain"}, b"thanks\n"))

    def keys_seen(self) -> list[str]:
        with self.lock:
            return [s.headers["x-apikey"] for s in self.seen if "x-apikey" in s.headers]


class HostileRelay(_Server):
    """Answers each request with `answer(request)`."""

    def __init__(self, answer: Callable[[Seen], Reply]) -> None:
        super().__init__("127.0.0.1", answer)
