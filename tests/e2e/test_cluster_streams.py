"""Request bodies, WebSockets and TCP forwarding across the workers of a cluster relay (CLUSTER.md section 4).

gunicorn runs 4 workers (nodes) sharing a real redis-server; a real
ptth_server carries a real web app (web_test_app.py) and forwarded ports,
a real ptth_client forwards ports. The node that holds a stream's client
owns it; a stream of that id landing on another worker is carried to the
owner over a peer link, and that worker logs (at debug level) one
"cluster forwarded KIND ID to relay node OWNER" line. The ids' owner prefix
and those lines prove that a stream crossed: each test repeats with new
connections until every kind of stream it is about has crossed at least
once (a bounded number of rounds), checking every byte each time.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit

import pytest
import requests
from conftest import Cluster, Proc, Relay, Server, new_key, tripcode_of, wait_until
from procs import children
from redis_harness import start_redis
from tcp_peers import DigestServer, EchoServer, recv_all, recv_exactly, unused_port_socket

from ptth_lib.relay.cluster.store import NODE_ID_CHARS

pytestmark = [pytest.mark.process,
              pytest.mark.skipif(shutil.which("redis-server") is None,
                                 reason="needs Debian's redis-server (make debian-deps installs it)")]

WORKERS = 4
# Rounds of new connections before a kind of stream that never crossed fails the test. With
# 4 workers a stream lands on its owner's worker about one time in four.
MAX_ROUNDS = 12
TIMEOUT_SECS = 60.0
FORWARDED = re.compile(r"cluster forwarded (\S+) (\S+) to relay node (\S+)")


@dataclass
class ClusterTunnel:
    relay: Relay
    server: Server
    client: Proc
    ports: dict[str, int]  # forward name -> ptth_client's local port
    echo: EchoServer
    digest: DigestServer
    cluster: Cluster

    @property
    def base(self) -> str:
        return f"{self.relay.url}/frontend/servers/{self.server.name}"

    def forwarded(self) -> list[tuple[str, str, str]]:
        """(kind, id, owner) of every stream a worker carried to another so far."""
        return FORWARDED.findall(self.relay.proc.output())


@pytest.fixture(scope="module")
def tunnel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterTunnel]:
    tmp = tmp_path_factory.mktemp("cluster-streams")
    redis = start_redis(tmp)
    c = Cluster(tmp)
    echo, digest = EchoServer(), DigestServer()
    try:
        _app, app_url = c.web_app()
        server_key, client_key = new_key("alpha"), new_key("laptop")
        extra = (f'redis_url = "{redis.url}"\npeer_bind = "127.0.0.1:42040-42079"\nrequest_timeout_secs = 20\n'
                 f'[[clients]]\nname = "laptop"\ntripcode = "{tripcode_of(client_key)}"\n'
                 'allow = ["alpha:echo", "alpha:digest", "alpha:closed", "alpha:nosuch"]\n')
        relay = c.relay({"alpha": server_key}, extra=extra, env={"PTTH_LOG_LEVEL": "debug"},
                        gunicorn_args=["-w", str(WORKERS)])
        relay.proc.wait_for_output(r"(?s)(relay node \S+ up.*){" + str(WORKERS) + "}")
        closed = socket.socket()  # bound, never listening: connections to it are refused
        closed.bind(("127.0.0.1", 0))
        ports_table = (f'[forwarded_ports]\necho = "127.0.0.1:{echo.port}"\n'
                       f'digest = "127.0.0.1:{digest.port}"\nclosed = "127.0.0.1:{closed.getsockname()[1]}"\n')
        server = c.server(relay, "alpha", server_key, None,
                          extra_config=f'web_app_url = "{app_url}"\n{ports_table}')
        names = ["echo", "digest", "closed", "nosuch"]
        client, ports = c.client(relay, client_key, [f"0:alpha:{n}" for n in names])
        yield ClusterTunnel(relay, server, client, dict(zip(names, ports, strict=True)), echo, digest, c)
        closed.close()
    finally:
        c.close()
        echo.close()
        digest.close()
        redis.kill()


def until_crossed(tunnel: ClusterTunnel, kinds: set[str], ids: Callable[[], set[str]] | None,
                  one_round: Callable[[int], None]) -> None:
    """Run `one_round(i)` until a stream of each of `kinds` (of one of `ids()`, if given) was carried
    to another worker during these rounds."""
    earlier = len(tunnel.forwarded())
    for i in range(MAX_ROUNDS):
        one_round(i)
        wanted = ids() if ids is not None else None
        forwarded = tunnel.forwarded()[earlier:]
        for kind, owned, owner in forwarded:
            assert owned.startswith(owner) and len(owner) == NODE_ID_CHARS, (kind, owned, owner)
        crossed = {kind for kind, owned, _ in forwarded if wanted is None or owned in wanted}
        if kinds <= crossed:
            break
    else:
        pytest.fail(f"after {MAX_ROUNDS} rounds, streams of {sorted(kinds - crossed)} never crossed workers")
    assert "Traceback" not in tunnel.relay.proc.output()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class PeakMemory:
    """The largest growth of any relay worker's resident memory while the block runs, in KiB."""

    def __init__(self, relay: Relay) -> None:
        self.workers = children(relay.proc.pid)
        assert len(self.workers) == WORKERS, self.workers
        self.before = {pid: rss_kib(pid) for pid in self.workers}
        self.growth = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._done.wait(0.05):
            for pid in self.workers:
                self.growth = max(self.growth, rss_kib(pid) - self.before[pid])

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join()


def request_ids(tunnel: ClusterTunnel, what: str) -> set[str]:
    """The ids of the requests the server logged as `what` ("POST /upload", "WebSocket /ws")."""
    return set(re.findall(rf"request (\S+) from \S+: {re.escape(what)}\b", tunnel.server.proc.output()))


# ---- request bodies -----------------------------------------------------------------------


def test_a_5_mib_upload_reaches_the_app_whole_when_its_body_get_lands_on_another_worker(
        tunnel: ClusterTunnel) -> None:
    def one_round(i: int) -> None:
        body = os.urandom(5 * 1024 * 1024 + i)
        # A new connection each time: the client lands on any worker.
        r = requests.post(f"{tunnel.base}/upload", data=body, timeout=TIMEOUT_SECS,
                          headers={"Content-Type": "application/octet-stream", "Connection": "close"})
        assert r.status_code == 200, r.text
        assert r.json() == {"sha256": hashlib.sha256(body).hexdigest(), "bytes": len(body)}

    until_crossed(tunnel, {"body"}, lambda: request_ids(tunnel, "POST /upload"), one_round)


def test_a_64_mib_upload_crossing_workers_keeps_every_worker_s_memory_bounded(tunnel: ClusterTunnel) -> None:
    """Backpressure end to end: the client's upload waits for the app; no worker holds the body."""
    total = 64 * 1024 * 1024
    block = os.urandom(1024 * 1024)

    def pieces() -> Iterator[bytes]:
        for k in range(64):
            yield block[k:] + block[:k]

    digest = hashlib.sha256(b"".join(pieces())).hexdigest()

    def one_round(i: int) -> None:
        with PeakMemory(tunnel.relay) as peak:
            r = requests.post(f"{tunnel.base}/upload", data=pieces(), timeout=TIMEOUT_SECS * 2,
                              headers={"Content-Type": "application/octet-stream", "Connection": "close"})
        assert r.status_code == 200, r.text
        assert r.json() == {"sha256": digest, "bytes": total}
        assert peak.growth < 16 * 1024, f"a relay worker grew by {peak.growth // 1024} MiB for a 64 MiB upload"

    until_crossed(tunnel, {"body"}, None, one_round)


def test_a_client_cut_mid_upload_is_an_incomplete_body_at_the_app_across_workers(tunnel: ClusterTunnel) -> None:
    """The owner sees the client's upload break off and cuts the body GET on the other worker: the app's
    read fails, never a short success."""
    parts = urlsplit(tunnel.base)
    total = 8 * 1024 * 1024

    def one_round(i: int) -> None:
        before = len(requests.get(f"{tunnel.base}/uploads", timeout=TIMEOUT_SECS).json())
        with socket.create_connection((parts.hostname or "", parts.port or 80), timeout=TIMEOUT_SECS) as sock:
            sock.sendall(f"POST {parts.path}/upload HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                         f"Content-Length: {total}\r\nContent-Type: application/octet-stream\r\n\r\n".encode())
            sock.sendall(os.urandom(total // 2))
            time.sleep(1.0)  # the half sent reaches the app before the cut (as in one process's test)
        outcomes: list[list[dict[str, object]]] = []
        wait_until(lambda: outcomes.append(requests.get(f"{tunnel.base}/uploads", timeout=TIMEOUT_SECS).json())
                   or len(outcomes[-1]) > before, "the app to see the upload end")
        outcome = outcomes[-1][-1]
        assert outcome["complete"] is False and int(outcome["bytes"]) < total, outcome  # type: ignore[call-overload]

    until_crossed(tunnel, {"body"}, None, one_round)


# ---- WebSocket --------------------------------------------------------------------------


def test_websockets_carry_messages_both_ways_and_close_codes_across_workers(tunnel: ClusterTunnel) -> None:
    import simple_websocket

    url = tunnel.base.replace("http://", "ws://", 1) + "/ws"

    def one_socket(i: int, errors: list[str]) -> None:
        ws = simple_websocket.Client.connect(url)
        try:
            for text in (f"hello {i}", "grüße 👋"):
                ws.send(text)
                if ws.receive(timeout=TIMEOUT_SECS) != text:
                    errors.append(f"socket {i}: text echo differs")
            blob = os.urandom(200_000 + i)
            ws.send(blob)
            if ws.receive(timeout=TIMEOUT_SECS) != blob:
                errors.append(f"socket {i}: binary echo differs")
            ws.send(f"close {4000 + i} bye {i}")
            try:
                ws.receive(timeout=TIMEOUT_SECS)
                errors.append(f"socket {i}: still open after the app closed it")
            except simple_websocket.ConnectionClosed as closed:
                if (closed.reason, closed.message) != (4000 + i, f"bye {i}"):
                    errors.append(f"socket {i}: closed with {closed.reason} {closed.message!r}")
        finally:
            if ws.connected:
                ws.close()

    def one_round(i: int) -> None:
        errors: list[str] = []
        threads = [threading.Thread(target=one_socket, args=(4 * i + k, errors)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT_SECS)
        assert not errors

    until_crossed(tunnel, {"respond", "body"}, lambda: request_ids(tunnel, "WebSocket /ws"), one_round)


# ---- TCP forwarding ----------------------------------------------------------------------


def connect(tunnel: ClusterTunnel, name: str) -> socket.socket:
    """A connection to ptth_client's port for `name`; closed if connecting fails (a refusal's reset
    can come so soon that connect() itself reports it)."""
    sock = unused_port_socket()
    try:
        sock.settimeout(TIMEOUT_SECS)
        sock.connect(("127.0.0.1", tunnel.ports[name]))
    except BaseException:
        sock.close()
        raise
    return sock


def test_forwarded_connections_echo_and_carry_20_mib_with_half_close_across_workers(
        tunnel: ClusterTunnel) -> None:
    def echo(i: int, errors: list[str]) -> None:
        data = os.urandom(64 * 1024 + i)
        with connect(tunnel, "echo") as sock:
            sock.sendall(b"k")  # a keystroke crosses alone
            if recv_exactly(sock, 1) != b"k":
                errors.append(f"echo {i}: keystroke differs")
            sender = threading.Thread(target=lambda: (sock.sendall(data), sock.shutdown(socket.SHUT_WR)))
            sender.start()
            got = recv_all(sock)
            sender.join()
        if got != data:
            errors.append(f"echo {i}: sent {len(data)} bytes, got {len(got)} back, different")

    def digest(errors: list[str]) -> None:
        hasher = hashlib.sha256()
        block = os.urandom(1024 * 1024)
        with connect(tunnel, "digest") as sock:
            for k in range(20):
                piece = block[k:] + block[:k]
                sock.sendall(piece)
                hasher.update(piece)
            sock.shutdown(socket.SHUT_WR)  # the half-close: the digest answers only after it
            answer = recv_all(sock)
        if answer != f"{20 * 1024 * 1024} {hasher.hexdigest()}\n".encode():
            errors.append(f"digest: {answer!r}")

    def one_round(i: int) -> None:
        errors: list[str] = []
        threads = [threading.Thread(target=echo, args=(6 * i + k, errors)) for k in range(6)]
        threads.append(threading.Thread(target=digest, args=(errors,)))
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT_SECS * 2)
        assert not errors

    # Only forwarded connections make these kinds of call (ptth_client logs only an id's first 8 characters).
    until_crossed(tunnel, {"tcp_taken", "tcp_accept", "tcp_downstream", "tcp_upstream"}, None, one_round)


def refused(tunnel: ClusterTunnel, name: str) -> None:
    """The TCP connection is reset or closed without a byte."""
    try:
        with connect(tunnel, name) as sock:
            assert sock.recv(1) == b""
    except ConnectionResetError:
        pass


def test_refusals_reach_the_client_across_workers(tunnel: ClusterTunnel) -> None:
    """A port the server does not forward: 502 from Redis's view of its listens. A port it forwards
    with nothing listening: the server's refusal, carried to the connection's owner."""
    refused(tunnel, "nosuch")
    tunnel.client.wait_for_output(r"-> alpha:nosuch refused: 502 .*does not forward port 'nosuch'")

    def one_round(i: int) -> None:
        for _ in range(4):
            refused(tunnel, "closed")

    until_crossed(tunnel, {"tcp_refuse"}, None, one_round)
    tunnel.client.wait_for_output(r"-> alpha:closed refused: 502 .*cannot connect to port closed")
    # The echo port still works afterwards.
    with connect(tunnel, "echo") as sock:
        sock.sendall(b"after")
        assert recv_exactly(sock, 5) == b"after"
