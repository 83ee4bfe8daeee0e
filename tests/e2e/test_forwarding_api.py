"""The relay's TCP port forwarding API (spec 003), played by hand.

A real relay under gunicorn; the test plays both proxies with `requests` and
raw sockets, never with ptth_server, ptth_client or ptth_lib:

- the fake server (its own key): tcp_listen (long-poll), tcp_accept (response
  body: the client's bytes), tcp_refuse, tcp_downstream (request body: bytes
  for the client);
- the fake client (a key from [[clients]]): /frontend/tcp/connect (response
  body: the server's bytes, once accepted) and /frontend/tcp/upstream
  (request body: bytes for the server).

Paths and header names are written out here, not imported, so the wire
protocol is pinned independently of the code. Every test uses port names of
its own, so they share one relay. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import queue
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import relay_modes
import requests
from conftest import Cluster, Relay, new_key, tripcode_of, wait_until
from procs import relay_samples

pytestmark = pytest.mark.process

LISTEN = "/7ZSFUKGV/tcp_listen/{server}/{port}"
ACCEPT = "/7ZSFUKGV/tcp_accept/{id}"
REFUSE = "/7ZSFUKGV/tcp_refuse/{id}"
DOWNSTREAM = "/7ZSFUKGV/tcp_downstream/{id}"
CHECK = "/frontend/tcp/check"
CONNECT = "/frontend/tcp/connect/{server}/{port}"
UPSTREAM = "/frontend/tcp/upstream/{id}"
ID_HEADER = "X-PTTH-Connection-Id"
CLIENT_HEADER = "X-PTTH-Client"
KEY_HEADER = "X-ApiKey"

# Far above anything the relay needs on a busy 2-core machine: hitting one means a hang.
WAIT_SECS = 20.0
# "At once": well below the 20 s a connect may otherwise wait for a server.
AT_ONCE_SECS = 8.0
# A connect waits 10 s for a listen to take it plus 10 s for the server to decide.
DECIDE_DEADLINE_SECS = 20.0

KEYS = {name: new_key(name) for name in ("alpha", "beta", "laptop", "phone", "desk")}
# Every key any test sends; none may show up in a log.
SENT_KEYS: set[str] = set(KEYS.values())


def clients_table(name: str, allow: list[str]) -> str:
    quoted = ", ".join(f'"{a}"' for a in allow)
    return f'[[clients]]\nname = "{name}"\ntripcode = "{tripcode_of(KEYS[name])}"\nallow = [{quoted}]\n'


@dataclass
class Api:
    relay: Relay
    audit: Path

    def url(self, template: str, **parts: str) -> str:
        return self.relay.url + template.format(**parts)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    tmp = tmp_path_factory.mktemp("forwarding-api")
    audit = tmp / "audit.jsonl"
    c = Cluster(tmp)
    # Listens end after 1 s, so a fake server re-polls as ptth_server does, and
    # a port counts as forwarded (for 5 s) as soon as one listen has ended.
    extra = (f'listen_timeout_secs = 1\naudit_log = "{audit}"\n'
             + clients_table("laptop", ["alpha:*"])
             + clients_table("phone", ["alpha:*"])
             + clients_table("desk", ["alpha:desk-only"]))
    relay = c.relay({"alpha": KEYS["alpha"], "beta": KEYS["beta"]}, extra=extra,
                    env={"PTTH_LOG_LEVEL": "debug", "PTTH_ACCESS_LOG": "-"})
    yield Api(relay, audit)
    c.close()


def unique_port(tag: str) -> str:
    return f"{tag}-{secrets.token_hex(4)}"


def headers(key: str | None) -> dict[str, str]:
    if key is None:
        return {}
    SENT_KEYS.add(key)
    return {KEY_HEADER: key}


def post(url: str, key: str | None, data: bytes | None = None) -> requests.Response:
    return requests.post(url, headers=headers(key), data=data, timeout=(5, WAIT_SECS))


# ---- the fake server's and the fake client's streams ------------------------------


class Listener:
    """A fake server's listen loop on one port: re-polls after each 204 until a listen answers 200."""

    def __init__(self, api: Api, port: str, server: str = "alpha", key: str | None = None) -> None:
        self.url = api.url(LISTEN, server=server, port=port)
        self.key = key or KEYS[server]
        self.primed = threading.Event()  # a listen has ended: the relay counts the port as forwarded
        self.done = threading.Event()
        self.response: requests.Response | None = None
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 60
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                r = post(self.url, self.key)
                if r.status_code != 204:
                    self.response = r
                    return
                self.primed.set()
        except BaseException as e:  # noqa: BLE001 - reported to the test
            self.error = e
        finally:
            self.done.set()

    def wait_primed(self) -> None:
        assert self.primed.wait(WAIT_SECS), f"no listen ended: {self.response!r} {self.error!r}"

    def taken(self) -> tuple[str, str]:
        """Wait for the listen that takes a connection; return its id and client name."""
        assert self.done.wait(WAIT_SECS), "no listen took the connection"
        r = self.response
        assert r is not None, f"listen failed: {self.error!r}"
        assert r.status_code == 200, (r.status_code, r.text)
        assert r.content == b"", "the answer is all in the headers"
        return r.headers[ID_HEADER], r.headers[CLIENT_HEADER]

    def stop(self) -> None:
        stop_all([self])


def stop_all(listeners: list[Listener]) -> None:
    """Stop re-polling (all at once, not one after the other) and wait for the last listens to end."""
    for listener in listeners:
        listener._stop.set()
    for listener in listeners:
        listener._thread.join(WAIT_SECS)
        assert not listener._thread.is_alive(), "a listen did not end"


class Stream:
    """A POST whose response body streams (connect or accept), read in a thread."""

    def __init__(self, url: str, key: str | None) -> None:
        self.url = url
        self.key = key
        self.answered = threading.Event()
        self.done = threading.Event()
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.text = ""
        self.outcome: str | BaseException | None = None  # "end" for a clean end of the body
        self.started = time.monotonic()
        self.answered_at = 0.0
        self._chunks: queue.Queue[bytes] = queue.Queue()
        self._buffer = b""
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with requests.post(self.url, headers=headers(self.key), stream=True, timeout=(5, 60)) as r:
                self.status, self.headers = r.status_code, dict(r.headers)
                self.answered_at = time.monotonic()
                if r.status_code != 200:
                    self.text = r.text
                    self.answered.set()
                    return
                self.answered.set()
                for chunk in r.iter_content(None):
                    self._chunks.put(chunk)
            self.outcome = "end"
        except BaseException as e:  # noqa: BLE001 - reported to the test
            self.outcome = e
        finally:
            self.answered.set()
            self.done.set()

    def wait_status(self, timeout: float = WAIT_SECS) -> int:
        assert self.answered.wait(timeout), f"no answer to {self.url}"
        assert self.status is not None, f"{self.url} failed: {self.outcome!r}"
        return self.status

    def read(self, n: int, timeout: float = WAIT_SECS) -> bytes:
        """Exactly n bytes of the body (fails if they do not come in time)."""
        end = time.monotonic() + timeout
        while len(self._buffer) < n:
            try:
                self._buffer += self._chunks.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"{len(self._buffer)} of {n} bytes came in {timeout} s "
                                     f"(outcome {self.outcome!r})") from None
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def wait_end(self, timeout: float = WAIT_SECS) -> str | BaseException:
        """How the body ended: "end" if cleanly (its last chunk came), else the error; no bytes left over."""
        assert self.done.wait(timeout), f"the body of {self.url} did not end"
        left = self._buffer + b"".join(self._chunks.get_nowait() for _ in range(self._chunks.qsize()))
        assert left == b"", f"{len(left)} unread bytes at the end"
        assert self.outcome is not None
        return self.outcome


class Sender:
    """A chunked POST (upstream or downstream) whose body the test feeds piece by piece."""

    def __init__(self, url: str, key: str | None) -> None:
        self._pieces: queue.Queue[bytes | None] = queue.Queue()
        self.response: requests.Response | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url, key), daemon=True)
        self._thread.start()

    def _body(self) -> Iterator[bytes]:
        while (piece := self._pieces.get()) is not None:
            yield piece

    def _run(self, url: str, key: str | None) -> None:
        try:
            self.response = requests.post(url, headers=headers(key), data=self._body(), timeout=(5, 60))
        except BaseException as e:  # noqa: BLE001 - reported to the test
            self.error = e
        finally:
            self.done.set()

    def send(self, piece: bytes) -> None:
        assert piece, "an empty chunk would end the body"
        self._pieces.put(piece)

    def end(self) -> None:
        self._pieces.put(None)

    def result(self, timeout: float = WAIT_SECS) -> requests.Response:
        assert self.done.wait(timeout), "the POST did not finish"
        assert self.response is not None, f"the POST failed: {self.error!r}"
        return self.response


class RawPost:
    """A chunked POST on a raw socket: chunk sizes, pauses and breaks exactly as written."""

    def __init__(self, api: Api, path: str, key: str) -> None:
        SENT_KEYS.add(key)
        self.sock = socket.create_connection(("127.0.0.1", api.relay.port), timeout=WAIT_SECS)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{api.relay.port}\r\n{KEY_HEADER}: {key}\r\n"
                          "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                          .encode())

    def chunk(self, data: bytes) -> None:
        self.sock.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    def end(self) -> str:
        """Send the last chunk; return the status line and body of the answer."""
        self.sock.sendall(b"0\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"\n"):
            data = self.sock.recv(65536)
            if not data:
                break
            answer += data
        return answer.decode("latin-1")

    def break_off(self, data: bytes) -> None:
        """Announce a chunk, send only part of it, and close the connection."""
        self.sock.sendall(f"{len(data) + 1000:x}\r\n".encode() + data)
        self.close()

    def close(self) -> None:
        self.sock.close()


@dataclass
class Opened:
    """A connection accepted by hand: both response bodies streaming."""

    id: str
    port: str
    connect: Stream
    accept: Stream


def offer(api: Api, port: str, client: str = "laptop", server: str = "alpha") -> tuple[Stream, str, str]:
    """A client's connect, taken by a fake server's listen; returns the connect and the listen's answer."""
    listener = Listener(api, port, server)
    try:
        listener.wait_primed()
        connect = Stream(api.url(CONNECT, server=server, port=port), KEYS[client])
        conn_id, client_name = listener.taken()
    finally:
        listener.stop()
    return connect, conn_id, client_name


def open_connection(api: Api, tag: str, client: str = "laptop") -> Opened:
    port = unique_port(tag)
    connect, conn_id, _ = offer(api, port, client)
    accept = Stream(api.url(ACCEPT, id=conn_id), KEYS["alpha"])
    assert accept.wait_status() == 200, accept.text
    assert connect.wait_status() == 200, connect.text
    return Opened(conn_id, port, connect, accept)


def close_cleanly(api: Api, opened: Opened, client: str = "laptop") -> None:
    """End both directions with empty bodies; both responses end cleanly."""
    up = Sender(api.url(UPSTREAM, id=opened.id), KEYS[client])
    up.end()
    down = Sender(api.url(DOWNSTREAM, id=opened.id), KEYS["alpha"])
    down.end()
    assert up.result().status_code == 200
    assert down.result().status_code == 200
    assert opened.accept.wait_end() == "end"
    assert opened.connect.wait_end() == "end"


def scrape(api: Api) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return relay_samples(api.relay.url)


def metric(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def open_count(api: Api) -> float:
    return metric(scrape(api), "ptth_tcp_connections_open")


def is_cut(outcome: str | BaseException) -> bool:
    """A body that broke off: requests says the chunked body ended early or the connection broke."""
    return isinstance(outcome, requests.exceptions.ChunkedEncodingError | requests.exceptions.ConnectionError)


# ---- the happy path ----------------------------------------------------------


def test_check_names_the_client_and_what_it_may_reach(api: Api) -> None:
    r = post(api.url(CHECK), KEYS["desk"])
    assert r.status_code == 200, r.text
    assert r.json() == {"client": "desk", "allow": ["alpha:desk-only"]}
    assert post(api.url(CHECK), None).status_code == 403
    assert post(api.url(CHECK), new_key("nobody")).status_code == 403
    assert post(api.url(CHECK), KEYS["alpha"]).status_code == 403, "a server's key is not a client's"


def test_happy_path_by_hand(api: Api) -> None:
    port = unique_port("happy")
    listener = Listener(api, port)
    listener.wait_primed()
    connect = Stream(api.url(CONNECT, server="alpha", port=port), KEYS["laptop"])
    conn_id, client_name = listener.taken()
    listener.stop()
    assert re.fullmatch(r"[A-Za-z0-9_-]{16,64}", conn_id), conn_id
    assert client_name == "laptop"
    assert not connect.answered.wait(0.5), "the connect waits for the server to accept"

    accept = Stream(api.url(ACCEPT, id=conn_id), KEYS["alpha"])
    assert accept.wait_status() == 200, accept.text
    assert connect.wait_status() == 200, connect.text
    assert connect.headers[ID_HEADER] == conn_id
    for stream in (accept, connect):
        assert stream.headers["Content-Type"] == "application/octet-stream"
        assert stream.headers["Cache-Control"] == "no-store"
        if relay_modes.MODE != "hosts":  # nginx acts on it and keeps it to itself
            assert stream.headers["X-Accel-Buffering"] == "no"
        assert stream.headers["Transfer-Encoding"] == "chunked"
    assert open_count(api) == 1

    up = Sender(api.url(UPSTREAM, id=conn_id), KEYS["laptop"])
    down = Sender(api.url(DOWNSTREAM, id=conn_id), KEYS["alpha"])
    up.send(b"hello, server")
    assert accept.read(13) == b"hello, server"
    down.send(b"hello, client")
    assert connect.read(13) == b"hello, client"
    big_up, big_down = os.urandom(700_000), os.urandom(900_000)
    for i in range(0, len(big_up), 50_000):
        up.send(big_up[i:i + 50_000])
    assert accept.read(len(big_up)) == big_up
    down.send(big_down)
    assert connect.read(len(big_down)) == big_down

    # The client's clean end is a half-close: the server's body ends, the other way stays open.
    up.end()
    r = up.result()
    assert r.status_code == 200, r.text
    assert accept.wait_end() == "end"
    down.send(b"after the half-close")
    assert connect.read(20) == b"after the half-close"
    assert not connect.done.is_set()
    down.end()
    assert down.result().status_code == 200
    assert connect.wait_end() == "end"
    wait_until(lambda: open_count(api) == 0, "the connection forgotten", api.relay.proc, WAIT_SECS)
    # All four streams ended: the id is gone.
    assert post(api.url(DOWNSTREAM, id=conn_id), KEYS["alpha"], b"late").status_code == 404


def test_server_ends_first(api: Api) -> None:
    opened = open_connection(api, "server-first")
    down = Sender(api.url(DOWNSTREAM, id=opened.id), KEYS["alpha"])
    down.send(b"bye")
    down.end()
    assert down.result().status_code == 200
    assert opened.connect.read(3) == b"bye"
    assert opened.connect.wait_end() == "end"
    up = Sender(api.url(UPSTREAM, id=opened.id), KEYS["laptop"])
    up.send(b"still talking")
    assert opened.accept.read(13) == b"still talking"
    up.end()
    assert up.result().status_code == 200
    assert opened.accept.wait_end() == "end"


def test_single_bytes_cross_at_once_both_ways(api: Api) -> None:
    """Each one-byte chunk reaches the other side before the next is sent: nothing waits to fill a buffer."""
    opened = open_connection(api, "bytes")
    up = RawPost(api, UPSTREAM.format(id=opened.id), KEYS["laptop"])
    down = RawPost(api, DOWNSTREAM.format(id=opened.id), KEYS["alpha"])
    try:
        for i in range(30):
            byte = bytes([i + 65])
            up.chunk(byte)
            assert opened.accept.read(1, timeout=10) == byte, f"byte {i} upstream"
            down.chunk(byte)
            assert opened.connect.read(1, timeout=10) == byte, f"byte {i} downstream"
            time.sleep(0.02)
        assert up.end().startswith("HTTP/1.1 200")
        assert down.end().startswith("HTTP/1.1 200")
    finally:
        up.close()
        down.close()
    assert opened.accept.wait_end() == "end"
    assert opened.connect.wait_end() == "end"


def test_sized_bodies_work_too_and_cross_at_once(api: Api) -> None:
    """An upstream with Content-Length, sent a byte at a time: each byte crosses alone, the end is a clean end."""
    opened = open_connection(api, "sized")
    data = b"0123456789"
    SENT_KEYS.add(KEYS["laptop"])
    with socket.create_connection(("127.0.0.1", api.relay.port), timeout=WAIT_SECS) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(f"POST {UPSTREAM.format(id=opened.id)} HTTP/1.1\r\nHost: x\r\n{KEY_HEADER}: {KEYS['laptop']}\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode())
        for i in range(len(data)):
            sock.sendall(data[i:i + 1])
            assert opened.accept.read(1, timeout=10) == data[i:i + 1], f"byte {i}"
            time.sleep(0.02)
        assert sock.recv(12) == b"HTTP/1.1 200"
    assert opened.accept.wait_end() == "end"
    down = Sender(api.url(DOWNSTREAM, id=opened.id), KEYS["alpha"])
    down.end()
    assert down.result().status_code == 200
    assert opened.connect.wait_end() == "end"
    # requests sends bytes with a Content-Length in one go: the same, all at once.
    opened = open_connection(api, "sized-whole")
    assert post(api.url(UPSTREAM, id=opened.id), KEYS["laptop"], b"x" * 300_000).status_code == 200
    assert post(api.url(DOWNSTREAM, id=opened.id), KEYS["alpha"], b"y" * 200_000).status_code == 200
    assert opened.accept.read(300_000) == b"x" * 300_000 and opened.accept.wait_end() == "end"
    assert opened.connect.read(200_000) == b"y" * 200_000 and opened.connect.wait_end() == "end"


def test_allow_star_reaches_any_port_of_that_server_only(api: Api) -> None:
    for tag in ("star-one", "star-two"):
        opened = open_connection(api, tag, client="phone")
        close_cleanly(api, opened, client="phone")
    r = post(api.url(CONNECT, server="beta", port=unique_port("star")), KEYS["phone"])
    assert r.status_code == 403 and "may not reach" in r.text


def test_allow_one_port(api: Api) -> None:
    connect, conn_id, client_name = offer(api, "desk-only", client="desk")
    assert client_name == "desk"
    accept = Stream(api.url(ACCEPT, id=conn_id), KEYS["alpha"])
    assert accept.wait_status() == 200 and connect.wait_status() == 200
    close_cleanly(api, Opened(conn_id, "desk-only", connect, accept), client="desk")
    for server, port in (("alpha", "desk-other"), ("beta", "desk-only")):
        r = post(api.url(CONNECT, server=server, port=port), KEYS["desk"])
        assert r.status_code == 403, r.text
        assert f"may not reach {server}:{port}" in r.text


# ---- refusals and failures -----------------------------------------------------


def test_refusal_gives_the_client_502_with_the_reason(api: Api) -> None:
    connect, conn_id, _ = offer(api, unique_port("refused"))
    r = post(api.url(REFUSE, id=conn_id), KEYS["alpha"], b"cannot connect to port ssh: \x1b[2Jrefused\n")
    assert r.status_code == 200, r.text
    assert connect.wait_status() == 502
    assert "'alpha' refused" in connect.text and "cannot connect to port ssh" in connect.text
    assert "\x1b" not in connect.text, "control characters are dropped"
    assert ID_HEADER not in connect.headers
    # Decided and answered: the id is gone.
    assert post(api.url(ACCEPT, id=conn_id), KEYS["alpha"]).status_code == 404


def test_refusal_without_a_reason(api: Api) -> None:
    connect, conn_id, _ = offer(api, unique_port("refused-empty"))
    assert post(api.url(REFUSE, id=conn_id), KEYS["alpha"]).status_code == 200
    assert connect.wait_status() == 502
    assert "no reason given" in connect.text


def test_refusal_reason_is_bounded(api: Api) -> None:
    connect, conn_id, _ = offer(api, unique_port("refused-long"))
    r = post(api.url(REFUSE, id=conn_id), KEYS["alpha"], b"x" * 2000)
    assert r.status_code == 413, r.text
    assert not connect.answered.is_set(), "a refused refusal decides nothing"
    assert post(api.url(REFUSE, id=conn_id), KEYS["alpha"], b"short " + b"y" * 500).status_code == 200
    assert connect.wait_status() == 502
    assert "short" in connect.text and len(connect.text) < 400, "the reason is cut to 200 characters"


def test_chunked_refusal_reason_is_bounded_too(api: Api) -> None:
    connect, conn_id, _ = offer(api, unique_port("refused-chunked"))
    refuse = Sender(api.url(REFUSE, id=conn_id), KEYS["alpha"])
    for _ in range(20):
        refuse.send(b"z" * 1000)
    refuse.end()
    status = refuse.result().status_code
    if status != 413:  # finish the connection either way
        connect.wait_status()
    else:
        post(api.url(REFUSE, id=conn_id), KEYS["alpha"], b"done")
        connect.wait_status()
    assert status == 413


def test_connect_to_a_port_nobody_listens_on_fails_at_once(api: Api) -> None:
    started = time.monotonic()
    r = post(api.url(CONNECT, server="alpha", port=unique_port("nobody")), KEYS["laptop"])
    assert r.status_code == 502, r.text
    assert "offline or does not forward port" in r.text
    assert time.monotonic() - started < AT_ONCE_SECS
    r = post(api.url(CONNECT, server="beta", port=unique_port("nobody")), KEYS["phone"])
    assert r.status_code == 403, "not allowed comes before not listened"


@pytest.mark.slow
def test_taken_but_never_accepted_times_out_with_504(api: Api) -> None:
    connect, conn_id, _ = offer(api, unique_port("undecided"))
    assert connect.wait_status(DECIDE_DEADLINE_SECS + WAIT_SECS) == 504
    assert "did not accept" in connect.text
    assert connect.answered_at - connect.started > DECIDE_DEADLINE_SECS / 2, "it waited for the server"
    assert post(api.url(ACCEPT, id=conn_id), KEYS["alpha"]).status_code == 404, "too late"


@pytest.mark.slow
def test_connect_no_listen_takes_times_out_after_10_s(api: Api) -> None:
    port = unique_port("gone")
    listener = Listener(api, port)
    listener.wait_primed()
    listener.stop()  # the server is gone, but the port counts as forwarded for 5 s more
    connect = Stream(api.url(CONNECT, server="alpha", port=port), KEYS["laptop"])
    assert connect.wait_status(DECIDE_DEADLINE_SECS + WAIT_SECS) == 504
    assert "took no listen" in connect.text
    assert connect.answered_at - connect.started < 15, "10 s, with 5 s to spare for a busy machine"


@pytest.mark.slow
def test_at_most_64_connects_wait_per_port(api: Api) -> None:
    port = unique_port("queue")
    listener = Listener(api, port)
    listener.wait_primed()
    listener.stop()  # no listen parked, but the port counts as forwarded for 5 s
    before = scrape(api)
    # 65 connects at once (well within those 5 s): whichever comes last finds the queue full.
    streams = [Stream(api.url(CONNECT, server="alpha", port=port), KEYS["laptop"]) for _ in range(65)]
    statuses = [stream.wait_status(DECIDE_DEADLINE_SECS + WAIT_SECS) for stream in streams]
    assert sorted(statuses) == [503] + [504] * 64, statuses
    (full,) = [stream for stream in streams if stream.status == 503]
    assert "64 connections already wait" in full.text
    assert full.headers.get("Retry-After")
    assert full.answered_at - full.started < AT_ONCE_SECS, "a full queue answers at once"
    after = scrape(api)
    assert metric(after, "ptth_tcp_connections_total", outcome="rejected") \
        - metric(before, "ptth_tcp_connections_total", outcome="rejected") == 1
    assert metric(after, "ptth_tcp_connections_total", outcome="timed_out") \
        - metric(before, "ptth_tcp_connections_total", outcome="timed_out") == 64


def test_accepted_but_streams_never_come_is_aborted(api: Api) -> None:
    """Neither upstream nor downstream within 10 s of the accept: both responses are cut."""
    opened = open_connection(api, "no-streams")
    assert is_cut(_outcome(opened.accept, DECIDE_DEADLINE_SECS + WAIT_SECS))
    assert is_cut(_outcome(opened.connect))
    assert post(api.url(UPSTREAM, id=opened.id), KEYS["laptop"], b"late").status_code == 404


@pytest.mark.slow
def test_idle_connection_is_aborted(tmp_path: Path) -> None:
    """tcp_idle_timeout_secs: no byte either way for that long cuts every stream (a relay of its own)."""
    c = Cluster(tmp_path)
    try:
        extra = ("listen_timeout_secs = 1\ntcp_idle_timeout_secs = 10\n" + clients_table("laptop", ["alpha:*"]))
        own = Api(c.relay({"alpha": KEYS["alpha"]}, extra=extra), tmp_path / "no-audit")
        opened = open_connection(own, "idle")
        up = RawPost(own, UPSTREAM.format(id=opened.id), KEYS["laptop"])
        down = RawPost(own, DOWNSTREAM.format(id=opened.id), KEYS["alpha"])
        try:
            up.chunk(b"!")
            assert opened.accept.read(1) == b"!"
            started = time.monotonic()
            assert is_cut(_outcome(opened.accept, 10 + WAIT_SECS))
            assert is_cut(_outcome(opened.connect))
            assert time.monotonic() - started > 5, "cut for being idle, not at once"
        finally:
            up.close()
            down.close()
        assert "idle for 10 s" in c.procs[0].output()
    finally:
        c.close()


# ---- keys ----------------------------------------------------------------------


def test_connect_needs_a_registered_client_key(api: Api) -> None:
    url = api.url(CONNECT, server="alpha", port=unique_port("keys"))
    r = post(url, None)
    assert r.status_code == 403 and "missing X-ApiKey" in r.text
    r = post(url, new_key("stranger"))
    assert r.status_code == 403 and "unknown client key" in r.text
    assert post(url, KEYS["alpha"]).status_code == 403, "a server's key is not a client's"


def test_upstream_only_with_the_connecting_clients_key(api: Api) -> None:
    opened = open_connection(api, "upstream-key")
    url = api.url(UPSTREAM, id=opened.id)
    assert post(url, KEYS["phone"], b"intruder").status_code == 403
    assert post(url, None, b"intruder").status_code == 403
    assert post(url, new_key("stranger"), b"intruder").status_code == 403
    assert post(url, KEYS["alpha"], b"intruder").status_code == 403
    up = Sender(url, KEYS["laptop"])
    up.send(b"the owner")
    assert opened.accept.read(9) == b"the owner", "nothing of the refused posts came through"
    up.end()
    assert up.result().status_code == 200
    down = Sender(api.url(DOWNSTREAM, id=opened.id), KEYS["alpha"])
    down.end()
    assert down.result().status_code == 200
    assert opened.accept.wait_end() == "end" and opened.connect.wait_end() == "end"


def test_server_streams_only_with_that_servers_key(api: Api) -> None:
    connect, conn_id, _ = offer(api, unique_port("server-key"))
    for key in (KEYS["beta"], None, new_key("stranger"), KEYS["laptop"]):
        assert post(api.url(ACCEPT, id=conn_id), key).status_code == 403
        assert post(api.url(REFUSE, id=conn_id), key, b"not yours").status_code == 403
    assert not connect.answered.is_set(), "nothing was decided by another key"
    accept = Stream(api.url(ACCEPT, id=conn_id), KEYS["alpha"])
    assert accept.wait_status() == 200 and connect.wait_status() == 200
    for key in (KEYS["beta"], None, KEYS["laptop"]):
        assert post(api.url(DOWNSTREAM, id=conn_id), key, b"not yours").status_code == 403
    close_cleanly(api, Opened(conn_id, "", connect, accept))


def test_listen_without_a_client_ends_with_204(api: Api) -> None:
    r = post(api.url(LISTEN, server="alpha", port=unique_port("quiet")), KEYS["alpha"])
    assert r.status_code == 204 and r.content == b""
    assert ID_HEADER not in r.headers


def test_at_most_8_listens_parked_per_port(api: Api) -> None:
    """Twelve fake servers re-polling one port: whoever finds eight parked there gets 429."""
    port = unique_port("crowd")
    crowd = [Listener(api, port) for _ in range(12)]
    try:
        wait_until(lambda: sum(1 for listener in crowd if listener.done.is_set()) >= 4, "four listens refused",
                   api.relay.proc, WAIT_SECS)
    finally:
        stop_all(crowd)
    refused = [listener.response for listener in crowd if listener.response is not None]
    assert all(listener.error is None for listener in crowd)
    assert len(refused) >= 4, "never more than eight parked"
    assert {r.status_code for r in refused} == {429}, [(r.status_code, r.text) for r in refused]
    assert "8 listens parked" in refused[0].text
    # Another port of the same server is not affected.
    assert post(api.url(LISTEN, server="alpha", port=unique_port("calm")), KEYS["alpha"]).status_code == 204


def test_listen_needs_the_servers_key(api: Api) -> None:
    url = api.url(LISTEN, server="alpha", port=unique_port("listen-key"))
    assert post(url, KEYS["beta"]).status_code == 403
    assert post(url, None).status_code == 403
    assert post(url, KEYS["laptop"]).status_code == 403


# ---- ids, order and names ------------------------------------------------------


def test_unknown_id_is_404(api: Api) -> None:
    unknown = secrets.token_urlsafe(16)
    for template in (ACCEPT, REFUSE, DOWNSTREAM):
        r = post(api.url(template, id=unknown), KEYS["alpha"], b"x")
        assert r.status_code == 404, (template, r.status_code, r.text)
    r = post(api.url(UPSTREAM, id=unknown), KEYS["laptop"], b"x")
    assert r.status_code == 404, r.text


def test_decisions_and_streams_happen_once_and_in_order(api: Api) -> None:
    connect, conn_id, _ = offer(api, unique_port("order"))
    r = post(api.url(DOWNSTREAM, id=conn_id), KEYS["alpha"], b"too early")
    assert r.status_code == 409 and "accept comes first" in r.text
    r = post(api.url(UPSTREAM, id=conn_id), KEYS["laptop"], b"too early")
    assert r.status_code == 409, r.text
    accept = Stream(api.url(ACCEPT, id=conn_id), KEYS["alpha"])
    assert accept.wait_status() == 200 and connect.wait_status() == 200
    assert post(api.url(ACCEPT, id=conn_id), KEYS["alpha"]).status_code == 409, "accept twice"
    assert post(api.url(REFUSE, id=conn_id), KEYS["alpha"], b"changed my mind").status_code == 409
    up = Sender(api.url(UPSTREAM, id=conn_id), KEYS["laptop"])
    down = Sender(api.url(DOWNSTREAM, id=conn_id), KEYS["alpha"])
    up.send(b"u")
    down.send(b"d")
    assert accept.read(1) == b"u" and connect.read(1) == b"d"  # both attached now
    assert post(api.url(UPSTREAM, id=conn_id), KEYS["laptop"], b"again").status_code == 409
    assert post(api.url(DOWNSTREAM, id=conn_id), KEYS["alpha"], b"again").status_code == 409
    up.end()
    down.end()
    assert up.result().status_code == 200 and down.result().status_code == 200
    assert accept.wait_end() == "end" and connect.wait_end() == "end"


@pytest.mark.parametrize("port", ["a.b", "a" * 65, "a%20b", "%C3%A9"], ids=["dot", "65-chars", "space", "e-acute"])
def test_bad_port_name_is_400(api: Api, port: str) -> None:
    r = post(api.relay.url + f"/frontend/tcp/connect/alpha/{port}", KEYS["laptop"])
    assert r.status_code == 400, r.text
    assert "port name" in r.text
    r = post(api.relay.url + f"/7ZSFUKGV/tcp_listen/alpha/{port}", KEYS["alpha"])
    assert r.status_code == 400, r.text


def test_longest_port_name_is_fine(api: Api) -> None:
    port = "p" * 56 + secrets.token_hex(4)
    assert len(port) == 64
    connect, conn_id, _ = offer(api, port)
    assert post(api.url(REFUSE, id=conn_id), KEYS["alpha"], b"only checking the name").status_code == 200
    assert connect.wait_status() == 502


# ---- cuts -------------------------------------------------------------------------


def test_upstream_breaking_off_cuts_every_stream(api: Api) -> None:
    opened = open_connection(api, "break-up")
    up = RawPost(api, UPSTREAM.format(id=opened.id), KEYS["laptop"])
    down = RawPost(api, DOWNSTREAM.format(id=opened.id), KEYS["alpha"])
    try:
        down.chunk(b"down")
        assert opened.connect.read(4) == b"down"
        up.chunk(b"first")
        assert opened.accept.read(5) == b"first"
        up.break_off(b"part of a chunk")
        outcome = _outcome(opened.accept)
        assert is_cut(outcome), f"the server must see a cut, not {outcome!r}"
        outcome = _outcome(opened.connect)
        assert is_cut(outcome), f"the client must see a cut, not {outcome!r}"
        # The downstream POST in flight is cut too (or answered with an error): never a 200.
        try:
            answer = down.sock.recv(65536)
        except ConnectionResetError:
            answer = b""
        assert not answer.startswith(b"HTTP/1.1 200"), answer
    finally:
        up.close()
        down.close()
    assert post(api.url(DOWNSTREAM, id=opened.id), KEYS["alpha"], b"late").status_code == 404
    wait_until(lambda: open_count(api) == 0, "the connection forgotten", api.relay.proc, WAIT_SECS)


def test_downstream_breaking_off_cuts_both_responses(api: Api) -> None:
    opened = open_connection(api, "break-down")
    down = RawPost(api, DOWNSTREAM.format(id=opened.id), KEYS["alpha"])
    try:
        down.chunk(b"first")
        assert opened.connect.read(5) == b"first"
        down.break_off(b"part")
    finally:
        down.close()
    assert is_cut(_outcome(opened.connect))
    assert is_cut(_outcome(opened.accept))


def test_client_leaving_the_connect_stream_cuts_the_server(api: Api) -> None:
    port = unique_port("client-leaves")
    listener = Listener(api, port)
    listener.wait_primed()
    sock = socket.create_connection(("127.0.0.1", api.relay.port), timeout=WAIT_SECS)
    SENT_KEYS.add(KEYS["laptop"])
    try:
        sock.sendall(f"POST {CONNECT.format(server='alpha', port=port)} HTTP/1.1\r\n"
                     f"Host: x\r\n{KEY_HEADER}: {KEYS['laptop']}\r\nContent-Length: 0\r\n\r\n".encode())
        conn_id, _ = listener.taken()
        accept = Stream(api.url(ACCEPT, id=conn_id), KEYS["alpha"])
        assert accept.wait_status() == 200
        assert sock.recv(12) == b"HTTP/1.1 200"
    finally:
        listener.stop()
        sock.close()
    assert is_cut(_outcome(accept)), "the server must see a cut when the client goes"


def test_client_leaving_before_the_accept(api: Api) -> None:
    """Either the accept is refused (404) or the server's body is cut: never a clean end."""
    port = unique_port("client-left")
    listener = Listener(api, port)
    listener.wait_primed()
    sock = socket.create_connection(("127.0.0.1", api.relay.port), timeout=WAIT_SECS)
    try:
        sock.sendall(f"POST {CONNECT.format(server='alpha', port=port)} HTTP/1.1\r\n"
                     f"Host: x\r\n{KEY_HEADER}: {KEYS['laptop']}\r\nContent-Length: 0\r\n\r\n".encode())
        conn_id, _ = listener.taken()
    finally:
        listener.stop()
        sock.close()
    time.sleep(0.5)
    accept = Stream(api.url(ACCEPT, id=conn_id), KEYS["alpha"])
    status = accept.wait_status()
    if status == 200:
        assert is_cut(_outcome(accept))
    else:
        assert status == 404, (status, accept.text)
    wait_until(lambda: open_count(api) == 0, "the connection forgotten", api.relay.proc, WAIT_SECS)


def _outcome(stream: Stream, timeout: float = WAIT_SECS) -> str | BaseException:
    assert stream.done.wait(timeout), f"the body of {stream.url} did not end"
    assert stream.outcome is not None
    return stream.outcome


# ---- metrics, logs and the audit log ----------------------------------------------


def test_metrics_count_outcomes_and_open_connections(api: Api) -> None:
    before = scrape(api)

    def delta(after: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    opened = open_connection(api, "metrics")
    assert open_count(api) == 1
    up = Sender(api.url(UPSTREAM, id=opened.id), KEYS["laptop"])
    up.send(b"12345")
    up.end()
    down = Sender(api.url(DOWNSTREAM, id=opened.id), KEYS["alpha"])
    down.send(b"1234567")
    down.end()
    assert opened.accept.read(5) == b"12345" and opened.connect.read(7) == b"1234567"
    assert opened.accept.wait_end() == "end" and opened.connect.wait_end() == "end"
    assert up.result().status_code == 200 and down.result().status_code == 200

    assert post(api.url(CONNECT, server="alpha", port=unique_port("none")), KEYS["laptop"]).status_code == 502
    assert post(api.url(CONNECT, server="alpha", port="not-desks"), KEYS["desk"]).status_code == 403
    assert post(api.url(CONNECT, server="alpha", port="any"), None).status_code == 403

    wait_until(lambda: open_count(api) == 0, "the connection forgotten", api.relay.proc, WAIT_SECS)
    after = scrape(api)
    assert delta(after, "ptth_tcp_connections_total", outcome="accepted") == 1
    assert delta(after, "ptth_tcp_connections_total", outcome="failed") == 1
    assert delta(after, "ptth_tcp_connections_total", outcome="forbidden") == 1
    assert delta(after, "ptth_tcp_connections_total", outcome="refused") == 0
    assert delta(after, "ptth_tcp_connections_total", outcome="timed_out") == 0
    assert delta(after, "ptth_tcp_auth_rejected_total") == 1
    assert delta(after, "ptth_tcp_bytes_total", direction="to_server") == 5
    assert delta(after, "ptth_tcp_bytes_total", direction="to_client") == 7
    assert metric(after, "ptth_tcp_connections_open") == 0


def test_metrics_count_a_refusal_once(api: Api) -> None:
    """One outcome per connect: a refusal is "refused", not also "failed"."""
    before = scrape(api)
    connect, conn_id, _ = offer(api, unique_port("metrics-refused"))
    assert post(api.url(REFUSE, id=conn_id), KEYS["alpha"], b"no").status_code == 200
    assert connect.wait_status() == 502
    after = scrape(api)
    outcomes = {o: metric(after, "ptth_tcp_connections_total", outcome=o)
                - metric(before, "ptth_tcp_connections_total", outcome=o)
                for o in ("accepted", "refused", "failed", "timed_out", "forbidden", "rejected")}
    assert outcomes == {"accepted": 0, "refused": 1, "failed": 0, "timed_out": 0, "forbidden": 0, "rejected": 0}


def audit_entries(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_keys_never_in_logs_or_audit_log(api: Api) -> None:
    """Last in the file on purpose: it also checks every key the tests above sent."""
    stranger = new_key("stranger")
    assert post(api.url(CHECK), stranger).status_code == 403
    assert post(api.url(LISTEN, server="alpha", port="audited"), stranger).status_code == 403
    assert post(api.url(CONNECT, server="alpha", port="not-desks"), KEYS["desk"]).status_code == 403

    def events() -> set[str]:
        return {str(e["event"]) for e in audit_entries(api.audit)}

    wanted = {"client_key_rejected", "backend_key_rejected", "tcp_connect_forbidden"}
    wait_until(lambda: wanted <= events(), "the audit events", api.relay.proc, WAIT_SECS)
    entries = audit_entries(api.audit)
    assert any(e["event"] == "backend_key_rejected" and e.get("tripcode") == tripcode_of(stranger)
               for e in entries), "a rejected server key is audited by its tripcode"
    assert any(e["event"] == "tcp_connect_forbidden" and e.get("client") == "desk" for e in entries)

    relay_log = api.relay.proc.output()
    assert "DEBUG" in relay_log and "/frontend/tcp/connect/" in relay_log, "debug and access logs were on"
    audit_text = api.audit.read_text()
    page = requests.get(api.relay.url + "/frontend/audit_log", timeout=10).text
    for key in SENT_KEYS:
        assert key not in relay_log, "an API key in the relay's log"
        assert key not in audit_text, "an API key in the audit log"
        assert key not in page, "an API key on the audit log page"
