"""Tests for ptth_lib.relay.cluster.peering: peer links between relay nodes, on real loopback sockets.

A real `PeerServer` and `PeerPool` talk over 127.0.0.1 in threads (the
relay runs them as greenlets; the last test runs them under gevent's
monkey-patching in a subprocess). Hostile peers are plain sockets writing
bytes by hand; a peer that knows the secret but sends bad frames is a real
pool's link whose socket then carries garbage. Every wait is bounded, so a
hang fails the test instead of stalling the run.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from ptth_lib.errors import ConfigError
from ptth_lib.relay.cluster import peering
from ptth_lib.relay.cluster.peering import (
    PeerAuthError,
    PeerCutError,
    PeerLink,
    PeerPool,
    PeerServer,
    PeerUnreachableError,
)

SECRET = b"the cluster's secret, 32 bytes.."
# Far above what anything here takes; only a hang reaches it.
WAIT_SECS = 10.0
PIECE = 256 * 1024
LOGGER = "ptth_lib.relay.cluster.peering"

Handler = Callable[[dict[str, Any], PeerLink], None]


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_SECS
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT_SECS} s: {what}")
        time.sleep(0.01)


def in_thread(target: Callable[[], Any]) -> queue.Queue[Any]:
    """Run `target` in a thread; the queue gets its result or its exception."""
    done: queue.Queue[Any] = queue.Queue()

    def run() -> None:
        try:
            done.put(target())
        except BaseException as e:  # noqa: BLE001 - handed to the test, which raises or inspects it
            done.put(e)

    threading.Thread(target=run, daemon=True).start()
    return done


# ---- handlers the servers run -----------------------------------------------------------------


def answer_after_body(head: dict[str, Any], link: PeerLink) -> None:
    """Read the whole body, then answer its size and echo it back in one piece."""
    body = b"".join(link.pieces())
    link.send_head({"status": 200, "got": len(body), "asked": head.get("n")})
    link.send(body)
    link.end()


def echo_as_it_comes(head: dict[str, Any], link: PeerLink) -> None:
    """Full duplex: each piece goes back as it arrives; after the opener's end, one more, then ours."""
    link.send_head({"status": 200})
    for piece in link.pieces():
        link.send(piece.upper())
    link.send(b"trailer")
    link.end()


def answer_first(head: dict[str, Any], link: PeerLink) -> None:
    """End our direction at once, then read the opener's body (which it may send later)."""
    link.send_head({"status": 200})
    link.end()
    assert b"".join(link.pieces()) == b"late body"


def gone(head: dict[str, Any], link: PeerLink) -> None:
    """An early answer: 410 and end, without reading the body."""
    link.send_head({"status": 410})
    link.end()


HANDLERS: dict[str, Handler] = {"body": answer_after_body, "echo": echo_as_it_comes,
                                "answer-first": answer_first, "gone": gone}


@pytest.fixture
def make_server() -> Iterator[Callable[..., PeerServer]]:
    made: list[PeerServer] = []

    def make(handlers: dict[str, Handler] | None = None, secret: bytes = SECRET, **options: Any) -> PeerServer:
        server = PeerServer("127.0.0.1:0", secret, HANDLERS if handlers is None else handlers, **options)
        server.start()
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


@pytest.fixture
def make_pool() -> Iterator[Callable[..., PeerPool]]:
    made: list[PeerPool] = []

    def make(secret: bytes = SECRET, **options: Any) -> PeerPool:
        pool = PeerPool(secret, **options)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.close()


@pytest.fixture
def server(make_server: Callable[..., PeerServer]) -> PeerServer:
    return make_server()


@pytest.fixture
def pool(make_pool: Callable[..., PeerPool]) -> PeerPool:
    return make_pool()


def call_body(pool: PeerPool, address: str, pieces: list[bytes]) -> tuple[dict[str, Any], bytes]:
    with pool.open(address, {"kind": "body", "n": len(pieces)}) as link:
        for piece in pieces:
            link.send(piece)
        link.end()
        return link.read_head(), b"".join(link.pieces())


def connect(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=WAIT_SECS)
    return sock


def is_dropped(sock: socket.socket) -> bool:
    """Whether the other end closed or reset `sock` (reads until it does, bounded)."""
    sock.settimeout(WAIT_SECS)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


# ---- calls --------------------------------------------------------------------------------------


def test_a_call_carries_a_head_and_a_body_each_way_and_the_link_is_reused(server: PeerServer,
                                                                         pool: PeerPool) -> None:
    pieces = [b"a" * 10, os.urandom(PIECE), b"z"]
    head, body = call_body(pool, server.address, pieces)
    assert head == {"status": 200, "got": len(b"".join(pieces)), "asked": 3}
    assert body == b"".join(pieces)

    for _ in range(3):
        assert call_body(pool, server.address, [b"again"]) == ({"status": 200, "got": 5, "asked": 1}, b"again")
    assert (server.links_accepted, pool.links_made) == (1, 1)


def test_pieces_cross_both_ways_at_once_and_each_half_closes_on_its_own(server: PeerServer,
                                                                        pool: PeerPool) -> None:
    link = pool.open(server.address, {"kind": "echo"})
    assert link.read_head() == {"status": 200}
    echoed = link.pieces()
    for word in (b"one", b"two", b"three"):
        link.send(word)
        assert next(echoed) == word.upper()  # each piece crossed on its own, before the next was sent
    link.end()  # our half-close: the server still sends, then ends
    assert list(echoed) == [b"trailer"]
    link.close()

    # The other order: the server ends first, and the opener's body follows.
    link = pool.open(server.address, {"kind": "answer-first"})
    assert link.read_head() == {"status": 200}
    assert list(link.pieces()) == []
    link.send(b"late ")
    link.send(b"body")
    link.end()
    link.close()
    assert call_body(pool, server.address, [b"x"])[1] == b"x"
    assert (server.links_accepted, pool.links_made) == (1, 1)  # both calls ended cleanly: one link


def test_the_last_write_of_a_direction_can_carry_its_end(make_server: Callable[..., PeerServer],
                                                        pool: PeerPool) -> None:
    def short(head: dict[str, Any], link: PeerLink) -> None:
        body = b"".join(link.pieces())
        link.send_head({"status": 204, "got": len(body), "right": body == b"ping" * head["n"]}, end=True)

    server = make_server({"short": short})
    for n in (1, 0, peering.MAX_PIECE_BYTES // 2 + 1):  # one frame, none, several (over 1 MiB)
        with pool.open(server.address, {"kind": "short", "n": n}) as link:
            link.send(b"ping" * n, end=True)
            assert link.read_head() == {"status": 204, "got": 4 * n, "right": True}
            assert list(link.pieces()) == []
            assert link.is_clean()
            with pytest.raises(RuntimeError):
                link.send(b"after the end")
    assert (server.links_accepted, pool.links_made) == (1, 1)


def test_a_handler_that_ignores_a_short_body_keeps_the_link(make_server: Callable[..., PeerServer],
                                                            pool: PeerPool) -> None:
    def head_only(head: dict[str, Any], link: PeerLink) -> None:
        link.send_head({"status": 200}, end=True)  # never reads the body

    server = make_server({"head-only": head_only})
    for body in (b"", b"short"):
        with pool.open(server.address, {"kind": "head-only"}) as link:
            link.send(body)
            link.end()
            assert link.read_head() == {"status": 200}
            assert list(link.pieces()) == []
    wait_until(lambda: server._idle, "the server waits for the next call")
    assert (server.links_accepted, pool.links_made) == (1, 1)


def test_a_piece_over_the_frame_limit_goes_as_several_frames(server: PeerServer, pool: PeerPool) -> None:
    big = os.urandom(peering.MAX_PIECE_BYTES * 2 + 3)
    assert call_body(pool, server.address, [big])[1] == big


def test_an_early_answer_reaches_the_opener_and_its_sends_fail_instead_of_hanging(
        server: PeerServer, pool: PeerPool) -> None:
    link = pool.open(server.address, {"kind": "gone"})
    sent = 0
    with pytest.raises(PeerCutError):
        for _ in range(1024):  # 256 MiB: far more than the sockets' buffers hold
            link.send(b"x" * PIECE)
            sent += 1
    assert sent < 1024
    assert link.read_head() == {"status": 410}
    assert list(link.pieces()) == []
    link.close()
    assert link.closed  # not clean: never reused
    assert call_body(pool, server.address, [b"next"])[1] == b"next"
    assert pool.links_made == 2


def test_an_abort_from_the_opener_cuts_the_handler_and_is_logged_in_one_line(
        make_server: Callable[..., PeerServer], pool: PeerPool, caplog: pytest.LogCaptureFixture) -> None:
    seen: queue.Queue[object] = queue.Queue()

    def reader(head: dict[str, Any], link: PeerLink) -> None:
        try:
            for piece in link.pieces():
                seen.put(piece)
        except PeerCutError as e:
            seen.put(e)
            raise

    server = make_server({"read": reader})
    caplog.set_level(logging.INFO, LOGGER)
    link = pool.open(server.address, {"kind": "read"})
    link.send(b"first")
    assert seen.get(timeout=WAIT_SECS) == b"first"
    link.abort()
    assert link.closed
    assert isinstance(seen.get(timeout=WAIT_SECS), PeerCutError)
    wait_until(lambda: any("cut" in r.getMessage() for r in caplog.records), "the cut is logged")
    cut_lines = [r for r in caplog.records if "peer call read" in r.getMessage()]
    assert len(cut_lines) == 1 and cut_lines[0].exc_info is None  # an expected cut: no traceback

    link = pool.open(server.address, {"kind": "read"})
    link.end()
    link.abort()
    assert (server.links_accepted, pool.links_made) == (2, 2)  # the aborted link was not reused


def test_an_abort_from_another_thread_wakes_a_blocked_reader(server: PeerServer, pool: PeerPool) -> None:
    """Full duplex in two threads: one waits for pieces that do not come, the other gives up on the call."""
    link = pool.open(server.address, {"kind": "echo"})
    reading = in_thread(lambda: list(link.pieces()))
    wait_until(lambda: link._head_in is not None, "the reader has the head and waits for pieces")
    link.abort()
    assert isinstance(reading.get(timeout=WAIT_SECS), PeerCutError)
    assert link.closed


@pytest.mark.parametrize("how", ["raises", "returns without end", "aborts"])
def test_a_serving_side_that_stops_before_its_end_gives_the_opener_a_cut(
        make_server: Callable[..., PeerServer], pool: PeerPool, caplog: pytest.LogCaptureFixture,
        how: str) -> None:
    def half_answer(head: dict[str, Any], link: PeerLink) -> None:
        link.send_head({"status": 200})
        link.send(b"part of it")
        if how == "raises":
            raise RuntimeError("the handler's own bug")
        if how == "aborts":
            link.abort()

    server = make_server({"half": half_answer})
    link = pool.open(server.address, {"kind": "half"})
    link.end()
    assert link.read_head() == {"status": 200}
    pieces = link.pieces()
    assert next(pieces) == b"part of it"
    with pytest.raises(PeerCutError):
        next(pieces)
    link.close()
    assert link.closed
    if how == "raises":
        wait_until(lambda: any(r.exc_info for r in caplog.records), "the handler's exception is logged")
        assert [r.levelno for r in caplog.records if r.exc_info] == [logging.ERROR]


def test_a_server_that_closes_without_an_end_frame_gives_a_cut(pool: PeerPool) -> None:
    """A peer that passes the handshake and hangs up mid-answer (no abort frame: the socket just closes)."""
    listener = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{listener.getsockname()[1]}"

    def half_a_peer() -> None:
        sock, _ = listener.accept()
        assert peering._serve_handshake(sock, SECRET, time.monotonic() + WAIT_SECS)
        sock.sendall(peering.ACCEPTED)
        head = msgpack.packb({"status": 200})
        sock.sendall(struct.pack("!BI", peering.HEAD, len(head)) + head + struct.pack("!BI", peering.DATA, 3) + b"abc")
        sock.close()

    thread = in_thread(half_a_peer)
    link = pool.open(address, {"kind": "any"})
    assert link.read_head() == {"status": 200}
    pieces = link.pieces()
    assert next(pieces) == b"abc"
    with pytest.raises(PeerCutError, match="cut before its end"):
        next(pieces)
    assert thread.get(timeout=WAIT_SECS) is None
    listener.close()


def test_an_unknown_kind_is_aborted(server: PeerServer, pool: PeerPool) -> None:
    link = pool.open(server.address, {"kind": "no such call"})
    with pytest.raises(PeerCutError):
        link.read_head()
    assert link.closed


# ---- the pool -----------------------------------------------------------------------------------


def test_idle_links_are_bounded_per_peer(server: PeerServer, make_pool: Callable[..., PeerPool]) -> None:
    pool = make_pool(max_idle_per_peer=2)
    links = [pool.open(server.address, {"kind": "body"}) for _ in range(4)]  # four calls at once
    for link in links:
        link.end()
        assert link.read_head()["status"] == 200
        assert list(link.pieces()) == []
        link.close()
    assert pool.idle_links(server.address) == 2
    assert sum(link.closed for link in links) == 2

    again = [pool.open(server.address, {"kind": "body"}) for _ in range(3)]
    assert (server.links_accepted, pool.links_made) == (5, 5)  # two reused, one new
    for link in again:
        link.abort()


def test_idle_links_expire(server: PeerServer, make_pool: Callable[..., PeerPool]) -> None:
    pool = make_pool(idle_secs=0.5)
    call_body(pool, server.address, [b"a"])
    call_body(pool, server.address, [b"b"])
    assert pool.links_made == 1
    time.sleep(0.6)
    call_body(pool, server.address, [b"c"])
    assert pool.links_made == 2


def test_a_link_the_server_let_go_is_not_reused(make_server: Callable[..., PeerServer], pool: PeerPool) -> None:
    server = make_server(idle_secs=0.1)  # the server lets idle links go before the pool does
    call_body(pool, server.address, [b"a"])
    wait_until(lambda: not pool._idle[server.address][0][1]._is_quiet(), "the server closed the idle link")
    assert call_body(pool, server.address, [b"b"])[1] == b"b"
    assert pool.links_made == 2


def test_an_unreachable_peer_is_a_clear_error(pool: PeerPool) -> None:
    unlistening = socket.socket()  # bound, not listening: connections are refused, and the port stays ours
    unlistening.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{unlistening.getsockname()[1]}"
    with pytest.raises(PeerUnreachableError, match=f"peer {address} is unreachable: .*refused"):
        pool.open(address, {"kind": "body"})
    unlistening.close()


# ---- the handshake --------------------------------------------------------------------------------


def test_an_opener_with_another_secret_is_refused(server: PeerServer, make_pool: Callable[..., PeerPool],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(PeerAuthError, match="does not know this cluster's secret"):
        make_pool(b"another secret").open(server.address, {"kind": "body"})
    assert server.links_accepted == 0
    assert SECRET.decode() not in caplog.text


def test_an_opener_that_cannot_prove_the_secret_is_dropped(server: PeerServer,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """A stranger that reads the server's proof but answers with a made-up one of its own."""
    caplog.set_level(logging.WARNING, LOGGER)
    sock = connect(server.address)
    sock.sendall(peering.MAGIC + os.urandom(peering.NONCE_BYTES))
    reply = sock.recv(len(peering.MAGIC) + peering.NONCE_BYTES + peering.PROOF_BYTES, socket.MSG_WAITALL)
    assert reply.startswith(peering.MAGIC)
    sock.sendall(os.urandom(peering.PROOF_BYTES))
    assert sock.recv(1) == b""  # dropped: no ACCEPTED byte
    sock.close()
    wait_until(lambda: "does not know the cluster's secret" in caplog.text, "the refusal is logged")
    assert server.links_accepted == 0
    assert SECRET.decode() not in caplog.text


def test_a_server_without_the_secret_is_refused_by_the_opener(pool: PeerPool) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{listener.getsockname()[1]}"

    def impostor() -> bytes:
        sock, _ = listener.accept()
        sock.settimeout(WAIT_SECS)
        sock.recv(len(peering.MAGIC) + peering.NONCE_BYTES, socket.MSG_WAITALL)
        sock.sendall(peering.MAGIC + os.urandom(peering.NONCE_BYTES + peering.PROOF_BYTES))
        rest = sock.recv(1024)  # the opener must not send its own proof
        sock.close()
        return rest

    thread = in_thread(impostor)
    with pytest.raises(PeerAuthError, match="does not know this cluster's secret"):
        pool.open(address, {"kind": "body"})
    assert thread.get(timeout=WAIT_SECS) == b""
    listener.close()


def test_a_stranger_that_is_not_a_peer_is_dropped_unread(server: PeerServer, pool: PeerPool) -> None:
    sock = connect(server.address)
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"x" * (1 << 20))
    except ConnectionResetError:
        pass  # dropped while we were still sending
    assert is_dropped(sock)
    sock.close()
    assert call_body(pool, server.address, [b"still serving"])[1] == b"still serving"


@pytest.mark.parametrize("sent", [b"", peering.MAGIC[:5]], ids=["silent", "slow"])
def test_a_slow_handshake_is_dropped_at_its_deadline(make_server: Callable[..., PeerServer], pool: PeerPool,
                                                     sent: bytes) -> None:
    server = make_server(handshake_secs=0.5)  # short for the test; a real peer still passes in far less
    sock = connect(server.address)
    sock.sendall(sent)
    assert is_dropped(sock)  # within the deadline, not at WAIT_SECS (that would fail the read)
    sock.close()
    assert server.links_accepted == 0
    assert call_body(pool, server.address, [b"a"])[1] == b"a"


def test_unauthenticated_connections_at_once_are_bounded(make_server: Callable[..., PeerServer],
                                                         pool: PeerPool) -> None:
    server = make_server(max_handshaking=2)
    strangers = [connect(server.address) for _ in range(2)]
    wait_until(lambda: server._handshaking == 2, "the two strangers hold both slots")
    third = connect(server.address)
    assert is_dropped(third)  # no slot: closed unread
    third.close()
    with pytest.raises(PeerUnreachableError):
        pool.open(server.address, {"kind": "body"})
    for sock in strangers:
        sock.close()
    wait_until(lambda: server._handshaking == 0, "the strangers' slots are free")
    assert call_body(pool, server.address, [b"a"])[1] == b"a"


def test_links_at_once_are_bounded(make_server: Callable[..., PeerServer], pool: PeerPool) -> None:
    server = make_server(max_links=1)
    link = pool.open(server.address, {"kind": "echo"})
    assert link.read_head() == {"status": 200}
    with pytest.raises(PeerUnreachableError):
        pool.open(server.address, {"kind": "echo"})
    link.end()
    link.abort()
    wait_until(lambda: server._links == 0, "the first link is gone")
    assert call_body(pool, server.address, [b"a"])[1] == b"a"


# ---- frames ----------------------------------------------------------------------------------------


def frame(kind: int, payload: bytes = b"", length: int | None = None) -> bytes:
    return struct.pack("!BI", kind, len(payload) if length is None else length) + payload


HEAD = frame(peering.HEAD, msgpack.packb({"kind": "body"}))


@pytest.mark.parametrize("garbage", [
    frame(9, b"x"),
    frame(peering.DATA, b"before any head"),
    HEAD + frame(peering.DATA, length=peering.MAX_PIECE_BYTES + 1),  # refused before it is read
    HEAD + frame(peering.DATA, b""),
    HEAD + frame(peering.END, b"x"),
    frame(peering.HEAD, b"\xc1"),  # not MsgPack
    frame(peering.HEAD, msgpack.packb([1, 2])),  # not a map
    HEAD + HEAD,
], ids=["unknown type", "data first", "oversized", "empty data", "end with payload", "not msgpack",
        "not a map", "two heads"])
def test_a_bad_frame_drops_the_link(make_server: Callable[..., PeerServer], pool: PeerPool,
                                    garbage: bytes) -> None:
    called: list[dict[str, Any]] = []

    def body(head: dict[str, Any], link: PeerLink) -> None:
        called.append(head)
        answer_after_body(head, link)

    server = make_server({"body": body})
    link = pool._connect(server.address)  # a peer that knows the secret, then misbehaves
    link._sock.sendall(garbage)
    assert is_dropped(link._sock)
    link._drop()
    assert len(called) <= 1  # a handler may have started on the good head before the bad frame


def test_a_bad_frame_from_the_server_drops_the_link_at_the_opener(pool: PeerPool) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{listener.getsockname()[1]}"

    def bad_peer() -> None:
        sock, _ = listener.accept()
        assert peering._serve_handshake(sock, SECRET, time.monotonic() + WAIT_SECS)
        sock.sendall(peering.ACCEPTED)
        sock.sendall(frame(peering.DATA, length=1 << 30))
        sock.settimeout(WAIT_SECS)
        while sock.recv(65536):
            pass
        sock.close()

    thread = in_thread(bad_peer)
    link = pool.open(address, {"kind": "any"})
    with pytest.raises(PeerCutError, match="dropped: it sent a frame of type 2"):
        link.read_head()
    assert link.closed
    assert thread.get(timeout=WAIT_SECS) is None
    listener.close()


# ---- backpressure ------------------------------------------------------------------------------------


def socket_buffers_max_bytes() -> int:
    """The most the kernel lets a loopback connection hold: the sender's and the receiver's buffers."""
    total = 0
    for name in ("tcp_wmem", "tcp_rmem"):
        try:
            total += int(Path(f"/proc/sys/net/ipv4/{name}").read_text().split()[2])
        except (OSError, IndexError, ValueError):
            total += 32 << 20
    return total


def test_a_consumer_that_stops_reading_stops_the_sender(make_server: Callable[..., PeerServer],
                                                        pool: PeerPool) -> None:
    release = threading.Event()
    taken: list[int] = []

    def slow(head: dict[str, Any], link: PeerLink) -> None:
        pieces = link.pieces()
        taken.append(len(next(pieces)))
        assert release.wait(WAIT_SECS)
        taken.extend(len(piece) for piece in pieces)
        link.send_head({"status": 200})
        link.end()

    server = make_server({"slow": slow})
    bound = socket_buffers_max_bytes() + 2 * PIECE  # the socket buffers, the piece in hand, one in flight
    total_pieces = bound // PIECE + 64
    sent = [0]
    link = pool.open(server.address, {"kind": "slow"})

    def send_all() -> dict[str, Any]:
        for _ in range(total_pieces):
            link.send(b"b" * PIECE)
            sent[0] += 1
        link.end()
        return link.read_head()

    done = in_thread(send_all)
    wait_until(lambda: taken == [PIECE], "the handler took one piece")
    last = -1
    while sent[0] != last:  # wait until the sender is stuck
        last = sent[0]
        time.sleep(0.3)
    assert done.empty()
    assert sent[0] * PIECE <= bound
    release.set()
    assert done.get(timeout=WAIT_SECS) == {"status": 200}
    assert len(taken) == total_pieces and set(taken) == {PIECE}
    link.close()


# ---- binding -----------------------------------------------------------------------------------------


def test_a_bind_range_takes_the_next_free_port() -> None:
    for _ in range(20):
        taken = socket.create_server(("127.0.0.1", 0))
        first = taken.getsockname()[1]
        if first >= 65535:
            taken.close()
            continue
        try:
            server = PeerServer(f"127.0.0.1:{first}-{first + 1}", SECRET, {})
        except OSError:  # someone else holds first + 1 just now: try another pair
            taken.close()
            continue
        try:
            assert server.address == f"127.0.0.1:{first + 1}"
            with pytest.raises(OSError, match="every port is taken"):
                PeerServer(f"127.0.0.1:{first}-{first + 1}", SECRET, {})
        finally:
            server.close()
            taken.close()
        return
    pytest.fail("no two free ports in a row on 127.0.0.1")


@pytest.mark.parametrize("bind", ["41000", "127.0.0.1", "127.0.0.1:", "127.0.0.1:x", "127.0.0.1:41001-41000",
                                  "127.0.0.1:70000", "127.0.0.1:-5", "127.0.0.1:0-10"])
def test_a_malformed_bind_is_a_config_error(bind: str) -> None:
    with pytest.raises(ConfigError, match="peer"):
        PeerServer(bind, SECRET, {})


def test_an_empty_secret_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        PeerPool(b"")


def test_a_closed_server_refuses_new_links_and_lets_its_idle_ones_go(server: PeerServer, pool: PeerPool) -> None:
    call_body(pool, server.address, [b"a"])
    server.close()
    with pytest.raises(PeerCutError):
        call_body(pool, server.address, [b"b"])  # the idle link was let go, and nobody accepts a new one


# ---- under gevent ---------------------------------------------------------------------------------------

GEVENT_SCRIPT = r'''
from gevent import monkey
monkey.patch_all()
import gevent
from ptth_lib.relay.cluster.peering import PeerCutError, PeerPool, PeerServer

def echo(head, link):
    link.send_head({"status": 200})
    for piece in link.pieces():
        link.send(piece)
    link.end()

def gone(head, link):
    link.send_head({"status": 410})
    link.end()

server = PeerServer("127.0.0.1:0", b"secret", {"echo": echo, "gone": gone})
server.start()
pool = PeerPool(b"secret")

def call(i):
    link = pool.open(server.address, {"kind": "echo"})
    got = []
    reader = gevent.spawn(lambda: got.extend(link.pieces()))  # both directions at once, in two greenlets
    expected = [b"%d:%d," % (i, j) for j in range(20)]
    for piece in expected:
        link.send(piece)
    link.end()
    reader.get(timeout=10)
    assert link.read_head() == {"status": 200} and got == expected, got
    link.close()

gevent.joinall([gevent.spawn(call, i) for i in range(50)], raise_error=True, timeout=30)
made = pool.links_made
gevent.joinall([gevent.spawn(call, i) for i in range(8)], raise_error=True, timeout=30)
assert pool.links_made == made, "idle links were not reused"

link = pool.open(server.address, {"kind": "gone"})
try:
    for _ in range(1024):
        link.send(b"x" * 262144)
    raise SystemExit("the sends never failed")
except PeerCutError:
    pass
assert link.read_head() == {"status": 410} and list(link.pieces()) == []
link.close()
pool.close()
server.close()
print("ok", made, server.links_accepted)
'''


def test_a_server_and_a_pool_work_under_gevent_monkey_patching() -> None:
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", GEVENT_SCRIPT], cwd=root, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok "), result.stdout
