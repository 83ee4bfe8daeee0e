"""What requests_adapter.py relies on in requests and urllib3, checked against the installed versions.

Each check drives the adapter against a small HTTP peer in a thread of this
process (no PTTH program): if an upgrade of requests or urllib3 changes what
the adapter uses, the test fails naming the library, its version, and what
changed.
"""

from __future__ import annotations

import inspect
import socket
import struct
import threading
from collections.abc import Callable, Iterator

import pytest
import requests
import urllib3
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool
from urllib3.poolmanager import PoolManager

from ptth_lib.keepalive import KEEPALIVE_OPTIONS
from ptth_lib.requests_adapter import (
    SizedBody,
    closed_when_reused,
    closed_without_answer,
    ended_early_when_reused,
    exchange,
    is_answered_early,
    new_session,
    response_socket,
)

VERSIONS = f"requests {requests.__version__} / urllib3 {urllib3.__version__}"


class Peer:
    """A one-connection HTTP peer: reads a request head, then does what `act(conn, head)` says."""

    def __init__(self, act: Callable[[socket.socket, bytes], None]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.head = b""
        self._act = act
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            while b"\r\n\r\n" not in self.head:
                data = conn.recv(65536)
                if not data:
                    return
                self.head += data
            self._act(conn, self.head)

    def close(self) -> None:
        self.listener.close()
        self._thread.join(5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/x"


def read_sized_body(conn: socket.socket, head: bytes) -> None:
    """Read the rest of a request with a Content-Length (what came with the head counts)."""
    header, _, got = head.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in header.lower().split(b"\r\n")
                  if line.startswith(b"content-length:"))
    while len(got) < length:
        got += conn.recv(65536)


def test_the_names_the_adapter_uses_are_there() -> None:
    assert isinstance(getattr(PoolManager(), "pool_classes_by_scheme", None), dict), (
        f"{VERSIONS}: PoolManager has no pool_classes_by_scheme dict: the adapter cannot put in its "
        "connection classes")
    assert getattr(HTTPConnectionPool, "ConnectionCls", None) is HTTPConnection, (
        f"{VERSIONS}: HTTPConnectionPool.ConnectionCls is gone or changed")
    params = inspect.signature(HTTPConnection.request).parameters
    assert {"method", "url", "body", "headers", "chunked"} <= set(params), (
        f"{VERSIONS}: HTTPConnection.request takes {list(params)}: the watched connection's request() "
        "must take what urllib3 passes")


def test_an_early_answer_is_seen_between_chunks() -> None:
    """The relay answers 410 while the body is still going out: the thread feeding it sees it."""
    seen: list[bool] = []
    answered = threading.Event()

    def act(conn: socket.socket, head: bytes) -> None:
        conn.sendall(b"HTTP/1.1 410 Gone\r\nContent-Length: 5\r\n\r\ngone\n")
        answered.set()
        while conn.recv(65536):  # read and discard the rest, as nginx does
            pass

    peer = Peer(act)

    def body() -> Iterator[bytes]:
        yield b"x" * 1024
        answered.wait(5)
        for _ in range(50):
            seen.append(is_answered_early())
            if seen[-1]:
                return
            threading.Event().wait(0.02)

    try:
        with new_session({}, "test").post(peer.url, data=body(), timeout=10) as r:
            assert r.status_code == 410
    finally:
        peer.close()
    assert seen and seen[-1], f"{VERSIONS}: the socket an upload goes out on is not visible to its thread"


def test_an_upload_on_a_quiet_connection_sees_no_answer() -> None:
    seen: list[bool] = []

    def act(conn: socket.socket, head: bytes) -> None:
        got = head  # the body may have come with the head; the last chunk is "end", then "0\r\n\r\n"
        while not got.endswith(b"end\r\n0\r\n\r\n"):
            data = conn.recv(65536)
            if not data:
                return
            got += data
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")

    peer = Peer(act)

    def body() -> Iterator[bytes]:
        for _ in range(3):
            seen.append(is_answered_early())
            yield b"x" * 1024
        yield b"end"

    try:
        with new_session({}, "test").post(peer.url, data=body(), timeout=10) as r:
            assert r.status_code == 200
    finally:
        peer.close()
    assert seen == [False, False, False], f"{VERSIONS}: an early answer seen where there was none"


def test_a_sized_body_goes_with_its_content_length() -> None:
    def act(conn: socket.socket, head: bytes) -> None:
        read_sized_body(conn, head)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    peer = Peer(act)
    try:
        new_session({}, "test").post(peer.url, data=SizedBody(iter([b"abc", b"de"]), 5), timeout=10).close()
    finally:
        peer.close()
    head = peer.head.lower()
    assert b"content-length: 5\r\n" in head and b"transfer-encoding" not in head, (
        f"{VERSIONS}: an iterable with __len__ is no longer sent with Content-Length: {peer.head!r}")


def test_redirects_are_never_followed() -> None:
    def act(conn: socket.socket, head: bytes) -> None:
        conn.sendall(b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.2:1/stolen\r\n"
                     b"Content-Length: 0\r\n\r\n")

    peer = Peer(act)
    try:
        r = new_session({}, "test").get(peer.url, headers={"X-ApiKey": "k"}, timeout=10)
    finally:
        peer.close()
    assert r.status_code == 307, f"{VERSIONS}: the session followed a redirect"


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
def test_a_connection_closed_with_nothing_answered_is_told_apart(reset: bool) -> None:
    def act(conn: socket.socket, head: bytes) -> None:
        read_sized_body(conn, head)  # the whole request, then close (or reset) without a word
        if reset:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    peer = Peer(act)
    try:
        with pytest.raises(requests.RequestException) as closed:
            new_session({}, "test").post(peer.url, data=b"x" * 12, timeout=10)
    finally:
        peer.close()
    assert closed_without_answer(closed.value), (
        f"{VERSIONS}: a connection closed without an answer no longer raises http.client's "
        f"RemoteDisconnected (or a reset) inside what requests raises: {closed.value!r}")
    assert not closed_when_reused(closed.value), "a new connection taken for a kept-alive one"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(requests.RequestException) as refused:
        new_session({}, "test").post(f"http://127.0.0.1:{port}/", data=b"x", timeout=10)
    assert not closed_without_answer(refused.value)


def test_connections_to_the_relay_keep_alive_while_idle() -> None:
    """Streams of forwarded connections and WebSockets idle for hours: NAT boxes must not forget them."""
    def act(conn: socket.socket, head: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    peer = Peer(act)
    try:
        with new_session({}, "test").get(peer.url, stream=True, timeout=10) as r:
            sock = response_socket(r)
            assert sock is not None, f"{VERSIONS}: no socket under a streaming response"
            options = {(level, option): sock.getsockopt(level, option) for level, option, _ in KEEPALIVE_OPTIONS}
            assert r.content == b"ok"
    finally:
        peer.close()
    assert options == {(level, option): value for level, option, value in KEEPALIVE_OPTIONS}, (
        f"{VERSIONS}: the socket_options given to the pool manager no longer reach the connections")


def read_head(conn: socket.socket, got: bytes = b"") -> bytes:
    """Read up to the end of a request head; what came after it is returned with it."""
    while b"\r\n\r\n" not in got:
        data = conn.recv(65536)
        if not data:
            break
        got += data
    return got


def test_a_kept_alive_connection_closed_as_it_is_reused_is_told_apart() -> None:
    """A proxy cutting an idle connection in the instant it is reused: the POST meets a closed connection.

    The peer answers one POST and keeps the connection; it resets it as soon as
    the second POST's head arrives, before its body goes out (a proxy closing
    the idle connection is the same to the sender). The write of the body
    fails, urllib3 ignores that so as to read an answer, and finds none: the
    body's last chunk was handed over, yet its generator never ran to its end.
    """
    reset_done = threading.Event()
    second_head = threading.Event()

    def act(conn: socket.socket, head: bytes) -> None:
        read_sized_body(conn, head)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        read_head(conn)
        second_head.set()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
        reset_done.set()

    ran_to_end: list[bool] = []

    def body() -> Iterator[bytes]:
        assert second_head.wait(5) and reset_done.wait(5)
        threading.Event().wait(0.05)  # the reset reaches this side
        yield b"x" * 12
        ran_to_end.append(True)

    peer = Peer(act)
    session = new_session({}, "test")
    try:
        first = session.post(peer.url, data=b"y" * 12, timeout=10)
        assert first.content == b"ok"
        with pytest.raises(requests.RequestException) as closed:
            session.post(peer.url, data=SizedBody(body(), 12), timeout=10)
    finally:
        peer.close()
    assert closed_when_reused(closed.value), (
        f"{VERSIONS}: a kept-alive connection reset as it was reused is not told apart: {closed.value!r}")
    assert ran_to_end == [], f"{VERSIONS}: urllib3 no longer ignores a failed write of the body"


@pytest.mark.parametrize("answer", [False, True], ids=["ended", "answered"])
def test_a_kept_alive_connection_ending_between_chunks_is_not_an_answer(answer: bool) -> None:
    """Over a network the close of a connection cut as it is reused may come between chunks of the body.

    The peer answers one POST and keeps the connection; when the second POST's
    head arrives it ends the connection with nothing said (FIN), or answers 410
    early, and reads on. The thread feeding the body sees either between two
    chunks; only the end is one to send again.
    """
    seen = threading.Event()

    def act(conn: socket.socket, head: bytes) -> None:
        read_sized_body(conn, head)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        read_head(conn)
        if answer:
            conn.sendall(b"HTTP/1.1 410 Gone\r\nContent-Length: 5\r\n\r\ngone\n")
        else:
            conn.shutdown(socket.SHUT_WR)
        seen.wait(5)

    found: list[tuple[bool, bool]] = []

    def body() -> Iterator[bytes]:
        yield b"x" * 1024
        for _ in range(100):
            if is_answered_early():
                found.append((True, ended_early_when_reused()))
                return
            threading.Event().wait(0.02)
        found.append((False, ended_early_when_reused()))

    peer = Peer(act)
    session = new_session({}, "test")
    try:
        assert session.post(peer.url, data=b"y" * 12, timeout=10).content == b"ok"
        try:
            session.post(peer.url, data=body(), timeout=10).close()
        except requests.RequestException:
            pass  # ended: no answer to read
    finally:
        seen.set()
        peer.close()
    assert found == [(True, not answer)], (
        f"{VERSIONS}: {'an early answer' if answer else 'the end of a reused connection'} seen between "
        f"chunks as (seen, ended) = {found}")


def read_chunked_body(conn: socket.socket, got: bytes) -> bytes:
    """Read a chunked body to its last chunk; what came after it is returned."""
    while b"0\r\n\r\n" not in got:
        got += conn.recv(65536)
    return got.partition(b"0\r\n\r\n")[2]


def test_exchange_frames_bodies_and_keeps_its_connection() -> None:
    """exchange (urllib3 through the session's pool): Content-Length for bytes and SizedBody,
    chunked for an iterable without a length, all three on one kept-alive connection."""
    heads: list[bytes] = []

    def act(conn: socket.socket, head: bytes) -> None:
        for kind in ("sized", "sized", "chunked"):
            header, _, rest = head.partition(b"\r\n\r\n")
            heads.append(header.lower())
            if kind == "sized":
                read_sized_body(conn, head)
                rest = b""
            else:
                rest = read_chunked_body(conn, rest)
            conn.sendall(b"HTTP/1.1 200 OK\r\nX-PTTH-Node: n1\r\nContent-Length: 3\r\n\r\nok\n")
            if kind != "chunked":
                head = read_head(conn, rest)

    peer = Peer(act)
    session = new_session({}, "test")
    try:
        answers = [exchange(session, "POST", peer.url, {"X-ApiKey": "k"}, (10, 10), 4096, body)
                   for body in (b"abc", SizedBody(iter([b"ab", b"cd"]), 4), iter([b"x", b"yz"]))]
    finally:
        peer.close()
    assert [(a.status, a.body, a.headers.get("x-ptth-node")) for a in answers] == [(200, b"ok\n", "n1")] * 3
    assert len(heads) == 3, f"{VERSIONS}: the three POSTs did not share one kept-alive connection"
    assert b"content-length: 3" in heads[0] and b"content-length: 4" in heads[1]
    assert b"transfer-encoding: chunked" in heads[2] and b"content-length" not in heads[2]
    assert all(b"x-apikey: k" in h and b"user-agent: test" in h for h in heads)


def test_exchange_tells_a_kept_alive_connection_closed_as_it_is_reused() -> None:
    """The race of test_a_kept_alive_connection_closed_as_it_is_reused_is_told_apart, through exchange."""
    def act(conn: socket.socket, head: bytes) -> None:
        read_sized_body(conn, head)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        read_head(conn)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    peer = Peer(act)
    session = new_session({}, "test")
    try:
        assert exchange(session, "POST", peer.url, {}, (10, 10), 4096, b"y" * 12).body == b"ok"
        with pytest.raises(urllib3.exceptions.HTTPError) as closed:
            exchange(session, "POST", peer.url, {}, (10, 10), 4096, SizedBody(iter([b"x" * 12]), 12))
    finally:
        peer.close()
    assert closed_when_reused(closed.value), f"{VERSIONS}: not told apart: {closed.value!r}"


def test_exchange_never_follows_a_redirect() -> None:
    def act(conn: socket.socket, head: bytes) -> None:
        read_sized_body(conn, head)
        conn.sendall(b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.2:1/stolen\r\n"
                     b"Content-Length: 0\r\n\r\n")

    peer = Peer(act)
    try:
        answer = exchange(new_session({}, "test"), "POST", peer.url, {"X-ApiKey": "k"}, (10, 10), 4096, b"x")
    finally:
        peer.close()
    assert answer.status == 307
