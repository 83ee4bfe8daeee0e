"""TCP port forwarding over QUIC (spec 004), end to end, with real processes.

TCP end client (this test) -> ptth_quic_client.py -> ptth_quic_relay.py (UDP)
-> ptth_quic_end_server.py, or ptth_server.py with a [quic] table -> TCP end
server (tcp_peers.py, fault_peers.py, quic_cluster.py).

1. The spec's end-to-end test, automated: bytes both ways byte for byte, 20
   connections at once, a single-byte ping-pong, a half-close; through both
   server proxies.
2. Every "sadder case" of the spec: start order swapped, each proxy and the
   relay restarted, the end server closing mid-connection. The broken
   connection must close on every side (waits are bounded by socket timeouts,
   so a hang fails the test), the others must stay up, and a new connection
   must work once the restarted part is back.
3. Refusals: unknown keys, ports a client may not reach or a server does not
   forward, a relay whose certificate is not the pinned one.
4. Backpressure: a reader that stops stops the sender, and nobody buffers it all;
   a client that stops reading does not slow another through the same server proxy.
5. Keepalive (slow): a connection idle for longer than the QUIC idle timeout.
6. Several server proxies under one name: both serve, in turn; a relay that
   keeps dropping a proxy sees it back off.
7. ptth_client.py itself over QUIC (`quic_relay`): the same program as over
   HTTP; ptth_quic_client.py, which the tests above run, is its alias.

Module-scoped clusters serve the tests that only cut TCP connections; a test
that stops a process gets a cluster of its own.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Proc, free_port, new_key, refusing_socket
from fault_peers import HoldingServer, Peer, RecordingServer, reset_close, wait_cut
from quic_cluster import (
    END_SERVER,
    PTTH_SERVER,
    RECOVER_SECS,
    SOCKET_TIMEOUT_SECS,
    WRONG_FINGERPRINT,
    EchoServerAt,
    GreetingServer,
    QuicForwarding,
    count_matches,
    wait_count,
    wait_exit,
)
from tcp_peers import DigestServer, recv_all, recv_exactly, unused_port_socket
from test_forwarding_faults import RssWatch, send_pattern

pytestmark = pytest.mark.process

# How long a party may take to notice a cut. A proxy that vanishes without a
# word is noticed by the QUIC idle timeout (10 s), so this has room above it.
CUT_SECS = 20.0
# What "at once" means for a cut that someone announced (a reset, a CONNECTION_CLOSE).
PROMPT_SECS = 5.0

# The client proxy's "closed" line for a connection, by the end client's port: group 1 is the reason.
CLIENT_CLOSED = r"(?m)quic connection 127\.0\.0\.1:{port} -> alpha:{name} closed(?: \((.*)\))?$"
SERVER_CLOSED = r"(?m)quic connection from client laptop \(port {port}\) to {name} closed(?: \((.*)\))?$"


# ---- clusters -------------------------------------------------------------------------

@dataclass
class Bundle:
    """A QuicForwarding and the TCP end servers behind its port names."""

    fw: QuicForwarding
    echo: RecordingServer  # "echo": echoes, records how each connection ended
    digest: DigestServer  # "digest": answers the count and SHA-256 after the client's half-close
    greet: GreetingServer  # "greet": speaks first, then echoes
    secret: RecordingServer  # "secret": forwarded by alpha, but laptop may not reach it
    hold: HoldingServer  # "hold": reads nothing until released
    dead: socket.socket  # "dead": bound, not listening: connections are refused

    def close(self) -> None:
        self.fw.close()
        self.hold.release.set()
        for server in (self.echo, self.digest, self.greet, self.secret, self.hold):
            server.close()
        self.dead.close()


def new_bundle(tmp: Path, kind: str = END_SERVER, server: bool = True, client: bool = True) -> Bundle:
    tmp.mkdir(parents=True, exist_ok=True)
    echo, digest, greet, secret, hold = (RecordingServer(), DigestServer(), GreetingServer(), RecordingServer(),
                                         HoldingServer())
    dead = refusing_socket()
    targets = {"echo": echo.port, "digest": digest.port, "greet": greet.port, "secret": secret.port,
               "hold": hold.port, "dead": dead.getsockname()[1]}
    # laptop may reach "nosuch", which alpha does not forward, but not "secret", which it does.
    allow = ["alpha:echo", "alpha:digest", "alpha:greet", "alpha:hold", "alpha:dead", "alpha:nosuch"]
    forwards = ["echo", "digest", "greet", "secret", "hold", "dead", "nosuch"]
    b = Bundle(QuicForwarding(tmp, targets, allow, forwards, server_kind=kind), echo, digest, greet, secret, hold,
               dead)
    try:
        b.fw.start_relay()
        if server:
            b.fw.start_server()
        if client:
            b.fw.start_client()
    except BaseException:
        b.close()
        raise
    return b


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bundle]:
    """One cluster (ptth_quic_end_server) for the tests that cut only TCP connections."""
    b = new_bundle(tmp_path_factory.mktemp("quic-shared"))
    yield b
    b.close()


@pytest.fixture(scope="module", params=[END_SERVER, PTTH_SERVER])
def e2e(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bundle]:
    """The end-to-end cluster, once with each server proxy."""
    if request.param == END_SERVER:
        yield request.getfixturevalue("shared")
        return
    b = new_bundle(tmp_path_factory.mktemp("quic-ptth-server"), kind=PTTH_SERVER)
    yield b
    b.close()


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., Bundle]]:
    """new_bundle for a cluster of the test's own, stopped afterwards."""
    made: list[Bundle] = []

    def make_bundle(**kwargs: object) -> Bundle:
        b = new_bundle(tmp_path / f"cluster-{len(made)}", **kwargs)  # type: ignore[arg-type]
        made.append(b)
        return b

    yield make_bundle
    for b in made:
        b.close()


# ---- the end client's view --------------------------------------------------------------

@dataclass
class Conversation:
    sock: socket.socket  # the end client's side
    peer: Peer  # the end server's side
    port: int  # the end client's port, which names the connection in both proxies' logs

    def closed_reason(self, proxy: Proc, pattern: str, deadline: float = CUT_SECS) -> str:
        """The reason in the proxy's "closed (REASON)" line for this connection; "" for a clean end."""
        m = proxy.wait_for_output(pattern.format(port=self.port, name="echo"), deadline)
        return m.group(1) or ""


def open_conversation(b: Bundle) -> Conversation:
    """An echo connection that has carried a few round trips."""
    before = len(b.echo.peers)
    sock = b.fw.connect("echo")
    try:
        for i in range(5):
            message = f"round trip {i}\n".encode() * 100
            sock.sendall(message)
            assert recv_exactly(sock, len(message)) == message
        return Conversation(sock, b.echo.wait_peer(before + 1), sock.getsockname()[1])
    except BaseException:
        sock.close()
        raise


def assert_refused(fw: QuicForwarding, name: str = "echo") -> int:
    """A new connection to `name` is reset without a byte, at once; returns the end client's port.

    The reset may come so soon that connect() itself reports it: the port is bound first, so
    the logs can still be matched.
    """
    with unused_port_socket() as sock:
        port = sock.getsockname()[1]
        sock.settimeout(PROMPT_SECS)
        try:
            sock.connect(("127.0.0.1", fw.ports[name]))
        except ConnectionResetError:
            return port
        assert wait_cut(sock, PROMPT_SECS) == ("reset", b"")
    return port


def echo_exchange(fw: QuicForwarding, data: bytes, name: str = "echo") -> tuple[bytes, int]:
    """Send `data` and half-close while reading the echo; (what came back, end client's port)."""
    failed: list[OSError] = []
    with fw.connect(name) as sock:
        def send() -> None:
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
            except OSError as e:
                failed.append(e)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        got = recv_all(sock)
        sender.join(SOCKET_TIMEOUT_SECS)
        assert not sender.is_alive() and not failed, f"sending failed: {failed}"
        return got, sock.getsockname()[1]


def assert_clean_close(fw: QuicForwarding, port: int, name: str = "echo") -> None:
    """Both proxies logged this connection's end without a reason: nothing was cut."""
    for proc, pattern in ((fw.client_proc, CLIENT_CLOSED), (fw.server_proc, SERVER_CLOSED)):
        m = proc.wait_for_output(pattern.format(port=port, name=name))
        assert m.group(1) is None, m.group(0)


# ---- 1. spec 004's end-to-end test --------------------------------------------------------

def test_bytes_cross_both_ways_byte_for_byte(e2e: Bundle) -> None:
    fw = e2e.fw
    data = os.urandom(3 * 1024 * 1024 + 7)  # more than a stream's 1 MiB window
    got, port = echo_exchange(fw, data)
    assert len(got) == len(data) and got == data
    assert_clean_close(fw, port)
    # The end server speaks first: its bytes cross before the client sent any.
    with fw.connect("greet") as sock:
        assert recv_exactly(sock, len(GreetingServer.GREETING)) == GreetingServer.GREETING
        sock.sendall(b"and back\n")
        assert recv_exactly(sock, 9) == b"and back\n"
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b""
    fw.assert_up(fw.relay_proc, fw.server_proc, fw.client_proc)


def test_twenty_connections_at_once(e2e: Bundle) -> None:
    fw = e2e.fw
    rng = random.Random(20040)
    # 1 B .. 512 KiB: the extremes, some spread evenly over the range, some mostly small.
    sizes = ([1, 512 * 1024] + [rng.randint(1, 512 * 1024) for _ in range(9)]
             + [int(2 ** rng.uniform(0, 19)) for _ in range(9)])
    blobs = [rng.randbytes(n) for n in sizes]
    results: list[tuple[bytes, int] | Exception | None] = [None] * len(blobs)

    def run(i: int) -> None:
        try:
            results[i] = echo_exchange(fw, blobs[i])
        except (OSError, AssertionError) as e:  # reported below, with the others
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(blobs))]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    elapsed = time.monotonic() - start
    problems = []
    for i, (blob, result) in enumerate(zip(blobs, results, strict=True)):
        if not isinstance(result, tuple):
            problems.append(f"#{i} ({len(blob)} B): {result!r}")
        elif result[0] != blob:
            problems.append(f"#{i}: sent {len(blob)} B, got back {len(result[0])} B, differing")
    assert not problems, "\n".join(problems)
    for result in results:
        assert isinstance(result, tuple)
        assert_clean_close(fw, result[1])
    fw.assert_up(fw.relay_proc, fw.server_proc, fw.client_proc)
    print(f"20 connections, {sum(sizes) / 2**20:.1f} MiB each way, in {elapsed:.1f} s")


def test_single_byte_ping_pong(e2e: Bundle) -> None:
    """Each byte crosses alone: nothing waits for more bytes to fill a packet."""
    with e2e.fw.connect() as sock:
        times = []
        for i in range(200):
            byte = bytes([i])
            start = time.monotonic()
            sock.sendall(byte)
            assert sock.recv(16) == byte  # exactly the one byte: nothing else is in flight
            times.append(time.monotonic() - start)
    print(f"round trip: median {statistics.median(times) * 1000:.1f} ms, max {max(times) * 1000:.1f} ms")


@pytest.mark.parametrize("size", [0, 1, 300_001])
def test_half_close(e2e: Bundle, size: int) -> None:
    """The client ends its direction; the server reads to that end and still answers."""
    data = os.urandom(size)
    with e2e.fw.connect("digest") as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer = recv_all(sock)
        port = sock.getsockname()[1]
    assert answer == f"{size} {hashlib.sha256(data).hexdigest()}\n".encode()
    assert_clean_close(e2e.fw, port, "digest")


# ---- 2. the sadder cases: the end server or end client goes away ---------------------------

def test_end_server_closes_mid_connection(shared: Bundle) -> None:
    fw = shared.fw
    c = open_conversation(shared)
    with c.sock:
        c.peer.sock.sendall(b"last words\n")
        c.peer.cut("close")
        # A FIN ends the server's direction cleanly: all it sent arrives, then the end.
        assert wait_cut(c.sock, CUT_SECS) == ("eof", b"last words\n")
    # The end client closing too ends the other direction: a clean end at both proxies.
    assert c.closed_reason(fw.client_proc, CLIENT_CLOSED) == ""
    assert c.closed_reason(fw.server_proc, SERVER_CLOSED) == ""
    fw.assert_up(fw.relay_proc, fw.server_proc, fw.client_proc)
    assert fw.works()


def test_end_server_resets_mid_connection(shared: Bundle) -> None:
    fw = shared.fw
    c = open_conversation(shared)
    with c.sock:
        c.peer.cut("reset")
        assert wait_cut(c.sock, CUT_SECS) == ("reset", b"")
    assert "reset by peer" in c.closed_reason(fw.server_proc, SERVER_CLOSED)
    assert c.closed_reason(fw.client_proc, CLIENT_CLOSED).startswith("QUIC stream")
    fw.assert_up(fw.relay_proc, fw.server_proc, fw.client_proc)
    assert fw.works()


def test_end_server_stops_listening_mid_connection(make: Callable[..., Bundle]) -> None:
    """The whole TCP end server goes (its listener and connections); the proxies stay up."""
    b = make()
    c = open_conversation(b)
    with c.sock:
        # Stop listening (shutdown wakes the blocked accept; close alone would leave the
        # kernel accepting), and shut every connection down both ways: a FIN to the server proxy.
        b.echo.listener.shutdown(socket.SHUT_RDWR)
        b.echo.close()
        assert wait_cut(c.sock, CUT_SECS) == ("eof", b"")
    c.peer.wait_ended(CUT_SECS)
    # Nothing listens now: refused by the server proxy, with its reason.
    port = assert_refused(b.fw)
    b.fw.client_proc.wait_for_output(rf"127\.0\.0\.1:{port} -> alpha:echo refused: cannot connect to port echo")
    b.fw.assert_up(b.fw.relay_proc, b.fw.server_proc, b.fw.client_proc)
    back = EchoServerAt(b.echo.port)  # the end server restarted
    try:
        assert b.fw.works()
    finally:
        back.close()


def test_end_client_resets_mid_connection(shared: Bundle) -> None:
    fw = shared.fw
    c = open_conversation(shared)
    reset_close(c.sock)
    assert c.peer.wait_ended(CUT_SECS) == "reset"  # not "eof": the end client never finished
    assert "reset by peer" in c.closed_reason(fw.client_proc, CLIENT_CLOSED)
    assert c.closed_reason(fw.server_proc, SERVER_CLOSED).startswith("QUIC stream")
    fw.assert_up(fw.relay_proc, fw.server_proc, fw.client_proc)
    assert fw.works()


def test_end_client_closes_mid_connection(shared: Bundle) -> None:
    fw = shared.fw
    c = open_conversation(shared)
    c.sock.close()  # a FIN: the end server sees the end, echoes nothing more and closes too
    assert c.peer.wait_ended(CUT_SECS) == "eof"
    fw.assert_up(fw.relay_proc, fw.server_proc, fw.client_proc)
    assert fw.works()


# ---- 2. the sadder cases: a proxy or the relay restarted ------------------------------------

def test_client_proxy_started_before_the_server_proxy(make: Callable[..., Bundle]) -> None:
    b = make(server=False)
    fw = b.fw
    port = assert_refused(fw)  # at once, not left hanging
    fw.client_proc.wait_for_output(rf"127\.0\.0\.1:{port} -> alpha:echo refused: server 'alpha' is not connected")
    fw.start_server()
    took = fw.wait_works()  # the same client proxy, never restarted
    fw.assert_up(fw.relay_proc, fw.client_proc)
    print(f"worked {took:.1f} s after the server proxy connected")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["stop", "kill"])
def test_server_proxy_restarted_with_a_connection_open(make: Callable[..., Bundle], sig: int) -> None:
    b = make()
    fw = b.fw
    c = open_conversation(b)
    with c.sock:
        fw.stop(fw.server_proc, sig)
        start = time.monotonic()
        # After SIGKILL the relay learns that alpha's old connection is gone when it does not
        # answer the PING the relay sends all of alpha's connections once the new one is in.
        fw.start_server()
        assert wait_cut(c.sock, CUT_SECS) == ("reset", b"")
        c.peer.wait_ended(CUT_SECS)  # the kernel closed it at exit, with an end or a reset
        cut_after = time.monotonic() - start
    assert c.closed_reason(fw.client_proc, CLIENT_CLOSED).startswith("QUIC stream")
    fw.assert_up(fw.relay_proc, fw.client_proc)
    fw.wait_works()
    # No connect goes to the old connection any more (it was not answering even before it was closed).
    for _ in range(4):
        assert fw.works()
    fw.assert_up(fw.relay_proc, fw.client_proc)
    print(f"the end client was cut {cut_after:.1f} s after the server proxy restarted")


# A killed proxy or relay is noticed at the QUIC idle timeout (10 s): slow, so only with -m slow.
STOP_AND_SLOW_KILL = [pytest.param(signal.SIGTERM, id="stop"),
                      pytest.param(signal.SIGKILL, id="kill", marks=pytest.mark.slow)]


@pytest.mark.parametrize("sig", STOP_AND_SLOW_KILL)
def test_client_proxy_restarted_with_a_connection_open(make: Callable[..., Bundle], sig: int) -> None:
    b = make()
    fw = b.fw
    c = open_conversation(b)
    with c.sock:
        fw.stop(fw.client_proc, sig)
        start = time.monotonic()
        wait_cut(c.sock, CUT_SECS)  # the kernel closed it at exit, with an end or a reset
        fw.start_client()
        # The relay learns the old client proxy is gone from the QUIC idle timeout.
        assert c.peer.wait_ended(CUT_SECS) == "reset"
        cut_after = time.monotonic() - start
    assert c.closed_reason(fw.server_proc, SERVER_CLOSED).startswith("QUIC stream")
    fw.assert_up(fw.relay_proc, fw.server_proc)
    fw.wait_works()
    print(f"the end server was cut {cut_after:.1f} s after the client proxy stopped")


def proxy_role(fw: QuicForwarding, role: str) -> Proc:
    return fw.server_proc if role == "server" else fw.client_proc


@pytest.mark.parametrize("role", ["server", "client"])
def test_a_stopped_proxy_resets_its_tcp_connections(make: Callable[..., Bundle], role: str) -> None:
    b = make()
    c = open_conversation(b)
    with c.sock:
        b.fw.stop(proxy_role(b.fw, role))
        # A cut, not an end: the near end must not take a truncated stream for a whole one.
        if role == "server":
            assert c.peer.wait_ended(PROMPT_SECS) == "reset"
        else:
            assert wait_cut(c.sock, PROMPT_SECS) == ("reset", b"")


@pytest.mark.parametrize("role", ["server", "client"])
def test_a_stopped_proxy_tells_the_relay(make: Callable[..., Bundle], role: str) -> None:
    b = make()
    c = open_conversation(b)
    with c.sock:
        b.fw.stop(proxy_role(b.fw, role))
        name = "alpha" if role == "server" else "laptop"
        m = b.fw.relay_proc.wait_for_output(rf"quic {role} '{name}' disconnected: (.*)", PROMPT_SECS)
        assert m.group(1) != "Idle timeout"
        # The far end is cut at once, through the relay.
        if role == "server":
            assert wait_cut(c.sock, PROMPT_SECS) == ("reset", b"")
        else:
            assert c.peer.wait_ended(PROMPT_SECS) == "reset"


def test_relay_restarted_after_the_server_proxy_connected(make: Callable[..., Bundle]) -> None:
    b = make(client=False)
    fw = b.fw
    fw.stop(fw.relay_proc)
    fw.start_relay()  # the same UDP port and certificate
    fw.wait_server_connected(2, RECOVER_SECS)
    fw.server_proc.wait_for_output(r"lost the QUIC relay \(the relay is stopping\)")
    fw.start_client()
    fw.wait_works()
    fw.assert_up(fw.server_proc)


@pytest.mark.parametrize("sig", STOP_AND_SLOW_KILL)
def test_relay_restarted_with_a_connection_open(make: Callable[..., Bundle], sig: int) -> None:
    b = make()
    fw = b.fw
    c = open_conversation(b)
    with c.sock:
        fw.stop(fw.relay_proc, sig)
        if sig == signal.SIGTERM:  # the relay says goodbye: both proxies cut at once
            assert wait_cut(c.sock, CUT_SECS) == ("reset", b"")
            assert c.peer.wait_ended(CUT_SECS) == "reset"
            assert_refused(fw)  # no relay: a reset at once, not a hang
            fw.start_relay()
        else:  # killed and back at once: the proxies find out from the QUIC idle timeout
            fw.start_relay()
            assert wait_cut(c.sock, CUT_SECS) == ("reset", b"")
            assert c.peer.wait_ended(CUT_SECS) == "reset"
    assert c.closed_reason(fw.client_proc, CLIENT_CLOSED).startswith("QUIC stream")
    assert c.closed_reason(fw.server_proc, SERVER_CLOSED).startswith("QUIC stream")
    took = fw.wait_works()
    fw.assert_up(fw.server_proc, fw.client_proc)
    fw.wait_server_connected(2)
    assert count_matches(fw.client_proc, r"quic client: connected to the QUIC relay") == 2
    print(f"worked again {took:.1f} s after the relay restarted")


@pytest.mark.slow
def test_relay_back_after_a_long_outage(make: Callable[..., Bundle]) -> None:
    """Down for longer than the proxies' longest backoff (30 s): both come back by themselves."""
    b = make()
    fw = b.fw
    fw.stop(fw.relay_proc)
    time.sleep(35)
    assert_refused(fw)  # still refused at once, not left hanging
    fw.start_relay()
    took = fw.wait_works()
    fw.assert_up(fw.server_proc, fw.client_proc)
    print(f"worked again {took:.1f} s after the relay came back")


# ---- 3. refusals ---------------------------------------------------------------------------------

def test_a_port_the_client_may_not_reach(shared: Bundle) -> None:
    fw = shared.fw
    before = len(shared.secret.peers)
    port = assert_refused(fw, "secret")
    fw.client_proc.wait_for_output(
        rf"127\.0\.0\.1:{port} -> alpha:secret refused: client 'laptop' may not reach alpha:secret")
    fw.relay_proc.wait_for_output(r"laptop -> alpha:secret refused: client 'laptop' may not reach")
    assert len(shared.secret.peers) == before, "the server proxy connected to a port laptop may not reach"
    assert not re.search(r"to secret", fw.server_proc.output()), "the server proxy was even asked"
    fw.assert_up(fw.relay_proc, fw.server_proc, fw.client_proc)
    assert fw.works()


def test_a_port_the_server_does_not_forward(shared: Bundle) -> None:
    fw = shared.fw
    port = assert_refused(fw, "nosuch")
    fw.client_proc.wait_for_output(rf"127\.0\.0\.1:{port} -> alpha:nosuch refused: port 'nosuch' is not forwarded")
    fw.server_proc.wait_for_output(rf"\(port {port}\) to nosuch refused: port 'nosuch' is not forwarded")
    fw.assert_up(fw.relay_proc, fw.server_proc, fw.client_proc)
    assert fw.works()


def test_a_forwarded_port_nobody_listens_on(shared: Bundle) -> None:
    fw = shared.fw
    port = assert_refused(fw, "dead")
    fw.client_proc.wait_for_output(
        rf"127\.0\.0\.1:{port} -> alpha:dead refused: cannot connect to port dead: Connection refused")
    fw.assert_up(fw.relay_proc, fw.server_proc, fw.client_proc)
    assert fw.works()


def assert_no_traceback(proc: Proc) -> None:
    assert "Traceback" not in proc.output(), proc.output()


@pytest.mark.parametrize("name", ["laptop", "stranger"], ids=["wrong-key", "unknown-name"])
def test_client_with_an_unknown_key_is_refused(shared: Bundle, name: str) -> None:
    fw = shared.fw
    key = new_key(name)
    proc = fw.start_client(name=name, key=key, wait=False)
    assert wait_exit(proc) == 1
    assert_no_traceback(proc)
    assert key not in proc.output(), "the API key must never be printed"
    assert re.search(rf"(?m)^ptth_quic_client: the relay refused client '{name}': unknown client or wrong key",
                     proc.output()), proc.output()
    assert "forwarding" not in proc.output(), "it listened on its local port before the relay accepted it"
    fw.relay_proc.wait_for_output(rf"quic client '{name}' refused: unknown client or wrong key")
    assert key not in fw.relay_proc.output()
    fw.assert_up(fw.relay_proc, fw.server_proc, fw.client_proc)


def test_client_with_a_wrong_fingerprint_never_sends_its_key(shared: Bundle) -> None:
    fw = shared.fw
    # mallory's own, registered key: had it reached the relay, the relay would have let mallory in.
    proc = fw.start_client(name="mallory", key=fw.other_client_key, fingerprint=WRONG_FINGERPRINT, wait=False)
    assert wait_exit(proc) == 1
    assert_no_traceback(proc)
    assert re.search(rf"(?m)^ptth_quic_client: .*{fw.fingerprint}.*{WRONG_FINGERPRINT}", proc.output()), \
        proc.output()
    time.sleep(1)  # a hello would be logged by now
    assert "mallory" not in fw.relay_proc.output(), "the relay got a hello from a client that pinned another cert"
    fw.assert_up(fw.relay_proc, fw.server_proc, fw.client_proc)


@pytest.mark.parametrize("case", ["wrong-key", "wrong-fingerprint"])
def test_client_refusal_is_one_line(shared: Bundle, case: str) -> None:
    fw = shared.fw
    if case == "wrong-key":
        proc = fw.start_client(key=new_key("laptop"), wait=False)
    else:
        proc = fw.start_client(fingerprint=WRONG_FINGERPRINT, wait=False)
    assert wait_exit(proc) == 1
    lines = proc.output().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ptth_quic_client: "), proc.output()


def test_server_proxy_with_a_wrong_fingerprint_exits(shared: Bundle) -> None:
    """ptth_quic_end_server gives up at once (exit 1), without sending its hello."""
    fw = shared.fw
    hellos = count_matches(fw.relay_proc, r"quic server 'alpha'")
    proc = fw.start_server(kind=END_SERVER, fingerprint=WRONG_FINGERPRINT, wait=False)
    assert wait_exit(proc) == 1
    assert_no_traceback(proc)
    assert re.search(rf"has certificate {fw.fingerprint}, not the pinned {WRONG_FINGERPRINT}", proc.output()), \
        proc.output()
    time.sleep(1)
    assert count_matches(fw.relay_proc, r"quic server 'alpha'") == hellos, fw.relay_proc.output()
    fw.assert_up(fw.relay_proc, fw.server_proc, fw.client_proc)
    assert fw.works()  # the real alpha was not replaced


def test_ptth_server_with_a_wrong_fingerprint_exits(shared: Bundle) -> None:
    """ptth_server stops with exit 1, as when the HTTP relay refuses it, without sending its hello."""
    fw = shared.fw
    hellos = count_matches(fw.relay_proc, r"quic server 'alpha'")
    proc = fw.start_server(kind=PTTH_SERVER, fingerprint=WRONG_FINGERPRINT, wait=False)
    try:
        assert wait_exit(proc) == 1
        mismatch = rf"has certificate {fw.fingerprint}, not the pinned {WRONG_FINGERPRINT}"
        assert count_matches(proc, mismatch) == 1, proc.output()
        assert count_matches(proc, r"connected to the QUIC relay") == 0
        assert_no_traceback(proc)
        assert count_matches(fw.relay_proc, r"quic server 'alpha'") == hellos, fw.relay_proc.output()
    finally:
        proc.kill()
    assert fw.works()


def test_server_proxy_with_an_unknown_key_exits(shared: Bundle) -> None:
    fw = shared.fw
    real_key = fw.server_key
    fw.server_key = new_key("alpha")
    try:
        proc = fw.start_server(kind=END_SERVER, wait=False)
    finally:
        fw.server_key = real_key
    assert wait_exit(proc) == 1
    assert_no_traceback(proc)
    assert "the relay refused server 'alpha': unknown server or wrong key" in proc.output(), proc.output()
    fw.assert_up(fw.relay_proc, fw.server_proc, fw.client_proc)
    assert fw.works()  # the real alpha was not replaced


# ---- 4. backpressure --------------------------------------------------------------------------------

STREAM_BYTES = 64 * 1024 * 1024
RSS_GROWTH_LIMIT = 48 * 1024 * 1024


def test_a_reader_that_stops_stops_the_sender(shared: Bundle) -> None:
    """64 MiB into a port whose server reads nothing: the sender blocks, and nobody holds it all."""
    fw = shared.fw
    assert fw.works()  # warm: the processes have served a connection before we measure
    watch = RssWatch({"relay": fw.relay_proc.pid, "client proxy": fw.client_proc.pid,
                      "server proxy": fw.server_proc.pid})
    try:
        with fw.connect("hold") as sock:
            sock.settimeout(5.0)
            accepted = send_pattern(sock, 0, STREAM_BYTES)
            # Kernel socket buffers at both TCP ends hold some; each QUIC hop about 2 MiB.
            assert accepted < STREAM_BYTES // 2, f"the tunnel took {accepted} bytes that nobody reads"
            blocked = {name: watch.peak[name] - watch.start[name] for name in watch.pids}
            # Now the end server reads: the rest goes through, and all of it arrives, in order.
            start = time.monotonic()
            shared.hold.release.set()
            sock.settimeout(SOCKET_TIMEOUT_SECS)
            assert send_pattern(sock, accepted, STREAM_BYTES) == STREAM_BYTES
            sock.shutdown(socket.SHUT_WR)
            answer = recv_all(sock)
            elapsed = time.monotonic() - start
    finally:
        growth = watch.stop()
    assert answer == f"{STREAM_BYTES} ok\n".encode()
    for name, grew in growth.items():
        assert grew < RSS_GROWTH_LIMIT, f"{name} grew by {grew / 2**20:.0f} MiB"
    print(f"accepted before blocking: {accepted / 2**20:.1f} MiB; the rest at "
          f"{(STREAM_BYTES - accepted) / 2**20 / elapsed:.1f} MiB/s; RSS growth in MiB while blocked: "
          f"{ {n: round(g / 2**20, 1) for n, g in blocked.items()} }, in all: "
          f"{ {n: round(g / 2**20, 1) for n, g in growth.items()} }")


# A client that stops reading must not slow the others: the relay's one connection to the
# server proxy carries every client's streams, and each stream has credit of its own.
FAIR_BYTES = 8 * 1024 * 1024
FAIR_SECS = 6.0


def test_a_stalled_client_does_not_stall_another_through_the_same_server(make: Callable[..., Bundle]) -> None:
    """Client A's echo is never read; client B's 8 MiB echo through the same server proxy still flows."""
    b = make()
    fw = b.fw
    client_a = fw.client_proc
    port_a = fw.ports["echo"]
    client_b = fw.start_client(name="mallory", key=fw.other_client_key, forwards=["echo"])
    assert fw.ports["echo"] != port_a
    assert fw.works()  # warm, through B
    watch = RssWatch({"relay": fw.relay_proc.pid, "server proxy": fw.server_proc.pid,
                      "client proxy A": client_a.pid, "client proxy B": client_b.pid})
    stalled = os.urandom(STREAM_BYTES)
    failed: list[OSError] = []
    with socket.create_connection(("127.0.0.1", port_a), timeout=60.0) as sock_a:
        def send_a() -> None:
            try:
                sock_a.sendall(stalled)
            except OSError as e:
                failed.append(e)

        sender = threading.Thread(target=send_a, daemon=True)
        sender.start()
        try:
            time.sleep(3.0)  # A's echo fills every buffer on its way back, and A reads none of it
            assert sender.is_alive(), "A's 64 MiB went through although A read nothing"
            data = os.urandom(FAIR_BYTES)
            start = time.monotonic()
            got, _ = echo_exchange(fw, data)
            elapsed = time.monotonic() - start
            assert got == data
            assert elapsed < FAIR_SECS, f"B's {FAIR_BYTES >> 20} MiB echo took {elapsed:.1f} s while A was stalled"
            assert sender.is_alive(), "A was not stalled while B ran"
            stalled_growth = {name: watch.peak[name] - watch.start[name] for name in watch.pids}
            # Now A reads: all of its echo comes back, in order.
            sock_a.settimeout(SOCKET_TIMEOUT_SECS)
            assert recv_exactly(sock_a, STREAM_BYTES) == stalled
            sender.join(SOCKET_TIMEOUT_SECS)
            assert not sender.is_alive() and not failed, f"A's sending failed: {failed}"
        finally:
            growth = watch.stop()
    for name, grew in growth.items():
        assert grew < RSS_GROWTH_LIMIT, f"{name} grew by {grew / 2**20:.0f} MiB"
    print(f"B's {FAIR_BYTES >> 20} MiB echo while A stalled: {elapsed:.2f} s; RSS growth in MiB while A "
          f"stalled: { {n: round(g / 2**20, 1) for n, g in stalled_growth.items()} }")


# ---- 5. keepalive -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_an_idle_connection_outlives_the_quic_idle_timeout(shared: Bundle) -> None:
    fw = shared.fw
    disconnects = count_matches(fw.relay_proc, r"disconnected")
    c = open_conversation(shared)
    with c.sock:
        time.sleep(40)  # 4 times the QUIC idle timeout (10 s): only the PINGs keep it up
        c.sock.sendall(b"still there?")
        assert recv_exactly(c.sock, 12) == b"still there?"
        assert not c.peer.ended.is_set()
    assert count_matches(fw.relay_proc, r"disconnected") == disconnects, fw.relay_proc.output()
    assert count_matches(fw.client_proc, r"lost the QUIC relay") == 0
    assert count_matches(fw.server_proc, r"lost the QUIC relay") == 0
    wait_count(fw.client_proc, CLIENT_CLOSED.format(port=c.port, name="echo"), 1)


# ---- 6. several server proxies under one name ---------------------------------------------------------

CONNECTED = r"quic end server: connected to the QUIC relay"
# A server proxy's line for a connection it opened to its end server.
SERVED = r"quic connection from client laptop \(port \d+\) to echo \(127\.0\.0\.1:\d+\) open"
# How long two server proxies under one name must get along: before, they knocked each
# other off four times a second.
TOGETHER_SECS = 3.0


def test_two_ptth_servers_with_one_name_both_serve(make: Callable[..., Bundle]) -> None:
    """Both stay connected, connects go to each in turn, and when one stops the other takes them all."""
    b = make(kind=PTTH_SERVER)
    fw = b.fw
    first = fw.server_proc
    second = fw.start_server(wait=False)
    wait_count(second, CONNECTED, 1)
    time.sleep(TOGETHER_SECS)
    for proc in (first, second):
        assert count_matches(proc, CONNECTED) == 1, proc.output()
        assert count_matches(proc, r"lost the QUIC relay") == 0, proc.output()
    assert count_matches(fw.relay_proc, r"quic server 'alpha' connected \(2 connections\)") == 1
    for _ in range(8):
        assert fw.works()
    served = [count_matches(proc, SERVED) for proc in (first, second)]
    assert served == [4, 4], served  # in turn
    fw.stop(first)
    fw.relay_proc.wait_for_output(r"quic server 'alpha' disconnected")
    for _ in range(4):
        assert fw.works()
    assert count_matches(second, SERVED) == 8, second.output()
    assert count_matches(second, r"lost the QUIC relay") == 0
    fw.assert_up(fw.relay_proc, second, fw.client_proc)


# How long the server proxy's reconnections are counted, against a relay that drops it each time.
DROPPED_SECS = 6.0


def test_a_relay_that_keeps_dropping_the_server_proxy_sees_it_back_off(tmp_path: Path) -> None:
    """A QUIC relay in the test process accepts every hello and closes the connection 0.1 s later.

    ptth_server must back off as when it cannot connect (0.25-0.5 s, then doubling), not
    reconnect at once.
    """
    import gevent
    import gevent.event
    import gevent.socket

    from ptth_lib.forward.quic import cert, driver
    from ptth_lib.forward.quic.endpoint import QuicServerEndpoint
    from ptth_lib.forward.quic.streams import read_tip
    from ptth_lib.wire import tip

    hellos: list[float] = []

    def on_peer(peer: driver.QuicPeer) -> None:
        first = gevent.event.AsyncResult()
        peer.on_stream = first.set
        try:
            stream = first.get(timeout=10)
            hello, _ = read_tip(stream)
            assert isinstance(hello, tip.PeerHello) and hello.name == "alpha", hello
            hellos.append(time.monotonic())
            stream.write(tip.encode(tip.HelloAnswer(True, "")))
            stream.end()
            gevent.sleep(0.1)
        finally:
            peer.close("dropped by a relay that drops everyone")

    identity = cert.load_or_create(str(tmp_path / "relay.crt"), str(tmp_path / "relay.key"))
    sock = gevent.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    endpoint = QuicServerEndpoint(sock, driver.configure(cert.server_configuration(driver.ALPN, identity)),
                                  on_peer)
    serving = gevent.spawn(endpoint.serve_forever)
    fw = QuicForwarding(tmp_path, targets={"echo": free_port()}, allow=[], forwards=[])
    fw.relay_port, fw.fingerprint = sock.getsockname()[1], identity.fingerprint
    try:
        proc = fw.start_server(kind=PTTH_SERVER, wait=False)
        deadline = time.monotonic() + 20
        while not hellos and time.monotonic() < deadline:
            gevent.sleep(0.05)
        assert hellos, proc.output()
        gevent.sleep(DROPPED_SECS)
        fw.assert_up(proc)
        times = [t - hellos[0] for t in hellos if t - hellos[0] <= DROPPED_SECS]
    finally:
        fw.close()
        serving.kill()
        sock.close()
    print(f"\nhellos in the {DROPPED_SECS:.0f} s after the first, at: {[round(t, 2) for t in times]}")
    # Backing off: at most 0.1 + 0.5 + 1 + 2 + 4 s of waits fit, so 5 hellos; at once: dozens.
    assert 2 <= len(times) <= 6, times


# ---- 7. the one client program ------------------------------------------------------------------

def test_ptth_client_forwards_over_quic(shared: Bundle, tmp_path: Path) -> None:
    """ptth_client.py with quic_relay in its config: QUIC forwarding, a half-close, then SIGTERM exits 0."""
    fw = shared.fw
    key_file = tmp_path / "client.key"
    key_file.write_text(fw.client_key + "\n")
    config = tmp_path / "ptth_client.toml"
    config.write_text(f'quic_relay = "127.0.0.1:{fw.relay_port}"\nrelay_fingerprint = "{fw.fingerprint}"\n'
                      f'name = "laptop"\napi_key_file = "{key_file}"\nforward = ["0:alpha:digest"]\n')
    proc = Proc([sys.executable, "ptth_client.py", "--config", str(config)], tmp_path / "client.log")
    try:
        port = int(proc.wait_for_output(r"forwarding 127\.0\.0\.1:(\d+) to alpha:digest over QUIC").group(1))
        assert "quic client: connected to the QUIC relay" in proc.output()
        data = os.urandom(300_001)
        with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_SECS) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == f"{len(data)} {hashlib.sha256(data).hexdigest()}\n".encode()
            local = sock.getsockname()[1]
        proc.wait_for_output(rf"(?m)quic connection 127\.0\.0\.1:{local} -> alpha:digest closed$")
        assert proc.stop(signal.SIGTERM) == 0
    finally:
        proc.kill()
    assert "Traceback" not in proc.output() and fw.client_key not in proc.output()
    fw.assert_up(fw.relay_proc, fw.server_proc, fw.client_proc)
