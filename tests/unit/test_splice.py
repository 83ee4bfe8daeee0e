"""Tests for ptth_lib.forward.splice: the splice every proxy and the QUIC relay use, in-process.

Two kinds of ends drive it. Fake ends (scripted pieces, a write that can be
held) show exactly what the splice reads and writes and when; real TCP
connections on 127.0.0.1 (`TcpEnd` on both sides, the way the QUIC relay
joins two streams) show what the peers see: bytes, half-closes and resets.
Every test runs once with the directions in threads (the HTTP proxies) and
once in greenlets (QUIC). Every wait is bounded, so a hang fails the test.
"""

from __future__ import annotations

import os
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import gevent
import gevent.event
import gevent.queue
import gevent.socket
import pytest

from ptth_lib.forward.splice import (
    CutError,
    OpenSplices,
    PushEnd,
    Splice,
    TcpEnd,
    in_greenlets,
    in_threads,
)

# Far above what anything here takes; only a hang reaches it.
WAIT_SECS = 10.0
# "Nothing happens": how long a test watches for what must not come.
QUIET_SECS = 0.3
# TcpEnd's watch interval in threads, shortened so that the tests that wait for it are quick.
WATCH_SECS = 0.05
MiB = 1024 * 1024

TCP_CLOSE = 7  # tcpi_state after a reset (linux/tcp_states.h); a FIN gives CLOSE_WAIT (8)


@dataclass
class Mode:
    """How the splice's directions run, and the primitives a test uses alongside."""

    name: str
    runner: Callable[..., None]
    socket_module: Any  # socket, or gevent.socket
    make_queue: Callable[[], Any]
    make_event: Callable[[], Any]
    watch_secs: float | None  # TcpEnd's: threads poll, greenlets are killed instead

    def start(self, target: Callable[[], Any]) -> Callable[[float], Any]:
        """Run `target` beside the test; returns a function that waits for its result."""
        if self.name == "greenlets":
            greenlet = gevent.spawn(target)
            return lambda timeout: greenlet.get(timeout=timeout)
        done = threading.Event()
        box: list[Any] = []

        def run() -> None:
            box.append(target())
            done.set()

        threading.Thread(target=run, daemon=True).start()

        def result(timeout: float) -> Any:
            assert done.wait(timeout), "still running"
            return box[0]

        return result

    def sleep(self, secs: float) -> None:
        (gevent.sleep if self.name == "greenlets" else time.sleep)(secs)


THREADS = Mode("threads", in_threads, socket, queue.Queue, threading.Event, WATCH_SECS)
GREENLETS = Mode("greenlets", in_greenlets, gevent.socket, gevent.queue.Queue, gevent.event.Event, None)


@pytest.fixture(params=[THREADS, GREENLETS], ids=lambda m: m.name)
def mode(request: pytest.FixtureRequest) -> Mode:
    return request.param  # type: ignore[no-any-return]


def wait_until(predicate: Callable[[], bool], mode: Mode, timeout: float = WAIT_SECS) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "not within the deadline"
        mode.sleep(0.01)


# ---- fake ends ----------------------------------------------------------------------------

END = b""  # in FakeEnd.feed: the clean end of input


class FakeEnd(PushEnd):
    """An end whose input the test feeds and whose output it inspects; its write can be held."""

    def __init__(self, mode: Mode, label: str) -> None:
        self.mode = mode
        self.label = label
        self.inbox = mode.make_queue()
        self.written: list[bytes] = []
        self.reads = 0
        self.ended = False
        self.aborted: str | None = None
        self.closed = False
        self.write_open = mode.make_event()
        self.write_open.set()
        self.write_fails: CutError | None = None
        self.eof_on_abort = False  # abort() wakes a blocked read with b"", as shutdown(SHUT_RD) does

    def feed(self, *items: bytes | BaseException) -> None:
        for item in items:
            self.inbox.put(item)

    def read(self) -> bytes:
        self.reads += 1
        item = self.inbox.get(timeout=WAIT_SECS)
        if isinstance(item, BaseException):
            raise item
        return item  # type: ignore[no-any-return]

    def write(self, data: bytes) -> None:
        assert self.write_open.wait(WAIT_SECS), "a held write was never released"
        if self.aborted is not None:
            raise CutError(f"{self.label}: aborted while writing")
        if self.write_fails is not None:
            raise self.write_fails
        self.written.append(data)

    def end(self) -> None:
        self.ended = True

    def abort(self, reason: str) -> None:
        self.aborted = reason
        self.inbox.put(END if self.eof_on_abort else CutError(f"{self.label}: aborted"))  # wakes a blocked read
        self.write_open.set()  # and a blocked write

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fakes(mode: Mode) -> Iterator[tuple[FakeEnd, FakeEnd, Splice, Callable[[float], Any]]]:
    a, b = FakeEnd(mode, "a"), FakeEnd(mode, "b")
    splice = Splice(a, b, mode.runner)
    result = mode.start(splice.run)
    yield a, b, splice, result
    splice.abort("test over")
    result(WAIT_SECS)


def test_each_piece_crosses_alone_and_at_once(fakes: Any, mode: Mode) -> None:
    a, b, splice, result = fakes
    for i in range(20):
        a.feed(bytes([i]))
        wait_until(lambda i=i: len(b.written) == i + 1, mode)  # before the next piece exists
        b.feed(bytes([100 + i]))
        wait_until(lambda i=i: len(a.written) == i + 1, mode)
    assert b.written == [bytes([i]) for i in range(20)]
    assert a.written == [bytes([100 + i]) for i in range(20)]
    a.feed(END)
    b.feed(END)
    assert result(WAIT_SECS) == ""
    assert (splice.a_to_b, splice.b_to_a) == (20, 20)
    assert a.closed and b.closed and a.aborted is None and b.aborted is None


def test_a_held_writer_holds_the_reader_to_one_piece(fakes: Any, mode: Mode) -> None:
    """Bounded buffering: while b takes nothing, the splice reads no more than the piece in hand."""
    a, b, splice, _result = fakes
    b.write_open.clear()
    a.feed(*[b"x" * 1000] * 10)
    wait_until(lambda: a.reads == 1, mode)
    mode.sleep(QUIET_SECS)
    assert a.reads == 1 and b.written == [] and splice.a_to_b == 0
    b.write_open.set()
    wait_until(lambda: len(b.written) == 10, mode)
    wait_until(lambda: splice.a_to_b == 10 * 1000, mode)  # a piece counts once b has taken it


@pytest.mark.parametrize("first", ["a", "b"])
def test_a_half_close_crosses_and_the_other_way_goes_on(fakes: Any, mode: Mode, first: str) -> None:
    a, b, _splice, result = fakes
    closing, other = (a, b) if first == "a" else (b, a)
    closing.feed(b"last words", END)
    wait_until(lambda: other.ended, mode)
    assert other.written == [b"last words"] and not closing.ended
    for i in range(3):  # the other direction still carries bytes
        other.feed(b"answer %d" % i)
    wait_until(lambda: len(closing.written) == 3, mode)
    other.feed(END)
    assert result(WAIT_SECS) == ""
    assert closing.ended and other.ended and closing.aborted is None and other.aborted is None


@pytest.mark.parametrize("where", ["a reads", "b reads", "a writes", "b writes"])
def test_a_cut_anywhere_aborts_both_ends_and_nothing_ends_cleanly(fakes: Any, mode: Mode, where: str) -> None:
    a, b, _splice, result = fakes
    side, what = where.split()
    end, other = (a, b) if side == "a" else (b, a)
    if what == "reads":
        end.feed(b"before", CutError(f"{side}: reset by peer"))
    else:
        end.write_fails = CutError(f"{side}: broken pipe")
        other.feed(b"to the broken side")
    reason = result(WAIT_SECS)
    assert reason == (f"{side}: reset by peer" if what == "reads" else f"{side}: broken pipe")
    assert a.aborted == reason and b.aborted == reason
    assert not a.ended and not b.ended, "a cut must never be passed on as a clean end"
    assert a.closed and b.closed


def test_abort_from_outside_wakes_blocked_reads(fakes: Any, mode: Mode) -> None:
    a, b, splice, result = fakes
    mode.sleep(QUIET_SECS)  # both directions wait in read()
    splice.abort("the proxy is stopping")
    assert result(WAIT_SECS) == "the proxy is stopping"
    assert a.aborted == b.aborted == "the proxy is stopping" and not a.ended and not b.ended


def test_abort_during_a_blocked_write(fakes: Any, mode: Mode) -> None:
    a, b, splice, result = fakes
    b.write_open.clear()
    a.feed(b"stuck")
    wait_until(lambda: a.reads == 1, mode)
    splice.abort("cut while writing")
    assert result(WAIT_SECS) == "cut while writing"
    assert b.written == [] and not b.ended


def test_the_first_reason_is_kept(fakes: Any, mode: Mode) -> None:
    a, b, splice, result = fakes
    a.feed(CutError("a: first"))
    wait_until(lambda: splice.aborted, mode)
    splice.abort("second")
    b.feed(CutError("b: third"))
    assert result(WAIT_SECS) == "a: first"


def test_a_read_failure_stays_the_reason_when_the_sink_makes_the_far_side_cut_first(mode: Mode) -> None:
    """An upload sink ends its request as a read failure passes through it; the far side then cuts
    the other direction, which a busy machine may notice first. The read failure is the reason."""
    a = FakeEnd(mode, "a")
    splice: Splice | None = None

    class UploadEnd(FakeEnd):
        def pour(self, pieces: Any) -> None:
            try:
                super().pour(pieces)
            except CutError:
                self.feed(CutError("b: the far side cut the other stream"))
                wait_until(lambda: splice is not None and splice.aborted and a.aborted is not None, mode)
                raise

    b = UploadEnd(mode, "b")
    splice = Splice(a, b, mode.runner)
    result = mode.start(splice.run)
    a.feed(CutError("a: reset by peer"))
    assert result(WAIT_SECS) == "a: reset by peer"


def test_an_end_that_ends_after_an_abort_is_still_cut(fakes: Any, mode: Mode) -> None:
    """A read that returns b"" after abort() (a shut-down socket does) is not the far side's end."""
    a, b, splice, result = fakes
    a.eof_on_abort = True
    mode.sleep(QUIET_SECS)  # both directions wait in read()
    splice.abort("cut")
    assert result(WAIT_SECS) == "cut"
    assert not b.ended, "b was ended cleanly after a cut"


def test_a_bug_in_an_end_still_cuts_both(mode: Mode, caplog: pytest.LogCaptureFixture) -> None:
    a, b = FakeEnd(mode, "a"), FakeEnd(mode, "b")
    a.feed(ValueError("not a piece"))
    reason = mode.start(Splice(a, b, mode.runner).run)(WAIT_SECS)
    assert reason.startswith("internal error: ValueError")
    assert a.aborted == b.aborted == reason
    assert "splice failed" in caplog.text


def test_open_splices_are_cut_by_abort_all(mode: Mode) -> None:
    opened = OpenSplices()
    a, b = FakeEnd(mode, "a"), FakeEnd(mode, "b")
    splice = Splice(a, b, mode.runner)

    def run() -> str:
        with opened.running(splice):
            return splice.run()

    result = mode.start(run)
    mode.sleep(QUIET_SECS)
    opened.abort_all("stopping")
    assert result(WAIT_SECS) == "stopping"
    opened.abort_all("again")  # nothing open any more: nothing happens
    assert splice.reason == "stopping"


# ---- TCP ends, and what TCP peers see ---------------------------------------------------

def tcp_pair(mode: Mode) -> tuple[socket.socket, socket.socket]:
    """A TCP connection on 127.0.0.1: (the peer's side, the splice's side)."""
    with mode.socket_module.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        peer = mode.socket_module.create_connection(listener.getsockname(), timeout=WAIT_SECS)
        mine, _ = listener.accept()
    peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    mine.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return peer, mine


@dataclass
class Joined:
    """Two TCP peers whose connections the splice joins, as the QUIC relay joins two streams."""

    a: socket.socket
    b: socket.socket
    splice: Splice
    result: Callable[[float], Any]


@pytest.fixture
def joined(mode: Mode) -> Iterator[Joined]:
    peer_a, mine_a = tcp_pair(mode)
    peer_b, mine_b = tcp_pair(mode)
    splice = Splice(TcpEnd(mine_a, "peer a", watch_secs=mode.watch_secs),
                    TcpEnd(mine_b, "peer b", watch_secs=mode.watch_secs), mode.runner)
    j = Joined(peer_a, peer_b, splice, mode.start(splice.run))
    for peer in (peer_a, peer_b):
        peer.settimeout(WAIT_SECS)
    yield j
    splice.abort("test over")
    j.result(WAIT_SECS)
    peer_a.close()
    peer_b.close()


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        data = sock.recv(n - len(got))
        assert data, f"the end came after {len(got)} of {n} bytes"
        got += data
    return bytes(got)


def recv_all(sock: socket.socket) -> bytes:
    got = bytearray()
    while data := sock.recv(MiB):
        got += data
    return bytes(got)


def reset_close(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def tcp_state(sock: socket.socket) -> int:
    return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0])


def assert_reset(sock: socket.socket, mode: Mode) -> None:
    """The peer was reset (not ended), whether or not bytes still wait unread for it."""
    wait_until(lambda: tcp_state(sock) == TCP_CLOSE, mode)


def test_bytes_cross_both_ways_byte_for_byte(joined: Joined, mode: Mode) -> None:
    up, down = os.urandom(3 * MiB + 7), os.urandom(2 * MiB + 3)
    got: dict[str, bytes] = {}

    def send_and_end(sock: socket.socket, data: bytes) -> None:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)

    senders = [mode.start(lambda: send_and_end(joined.a, up)), mode.start(lambda: send_and_end(joined.b, down))]
    got["b"] = recv_all(joined.b)
    got["a"] = recv_all(joined.a)
    for sender in senders:
        sender(WAIT_SECS)
    assert got["b"] == up and got["a"] == down
    assert joined.result(WAIT_SECS) == ""
    assert (joined.splice.a_to_b, joined.splice.b_to_a) == (len(up), len(down))


def test_keystrokes_cross_alone(joined: Joined) -> None:
    for i in range(100):
        joined.a.sendall(bytes([i]))
        assert joined.b.recv(16) == bytes([i])  # exactly the one byte: nothing waited for more
        joined.b.sendall(bytes([255 - i]))
        assert joined.a.recv(16) == bytes([255 - i])


@pytest.mark.parametrize("first", ["a", "b"])
def test_a_half_close_crosses_as_a_half_close(joined: Joined, first: str) -> None:
    closing, other = (joined.a, joined.b) if first == "a" else (joined.b, joined.a)
    closing.sendall(b"question")
    closing.shutdown(socket.SHUT_WR)
    assert recv_all(other) == b"question"  # then the end of input, cleanly
    other.sendall(b"answer after the end")
    assert recv_exactly(closing, 20) == b"answer after the end"
    other.shutdown(socket.SHUT_WR)
    assert recv_all(closing) == b""
    assert joined.result(WAIT_SECS) == ""


@pytest.mark.parametrize("first", ["a", "b"])
def test_a_reset_crosses_as_a_reset(joined: Joined, mode: Mode, first: str) -> None:
    resetting, other = (joined.a, joined.b) if first == "a" else (joined.b, joined.a)
    resetting.sendall(b"x")
    assert other.recv(1) == b"x"
    reset_close(resetting)
    with pytest.raises(ConnectionResetError):
        other.recv(1)
    assert joined.result(WAIT_SECS) == f"peer {first}: Connection reset by peer"


def test_a_reader_that_stops_stops_the_writer(joined: Joined, mode: Mode) -> None:
    """b reads nothing: a's sends block once the kernel buffers and one piece are full; nothing is lost."""
    joined.a.settimeout(1.0)
    block = bytes(range(256)) * 256  # 64 KiB
    sent = 0
    try:
        while sent < 256 * MiB:
            sent += joined.a.send(block)
    except TimeoutError:
        pass
    assert sent < 64 * MiB, f"{sent / MiB:.0f} MiB went in with nobody reading"
    joined.a.settimeout(WAIT_SECS)
    joined.a.shutdown(socket.SHUT_WR)
    got = recv_all(joined.b)
    assert len(got) == sent and got == (block * (sent // len(block) + 1))[:sent]


def test_abort_during_a_blocked_write_resets_both_peers(joined: Joined, mode: Mode) -> None:
    joined.a.settimeout(1.0)
    try:
        while True:
            joined.a.send(b"\0" * 65536)  # b reads nothing: the splice's write to b blocks
    except TimeoutError:
        pass
    started = time.monotonic()
    joined.splice.abort("stopping")
    assert joined.result(WAIT_SECS) == "stopping"
    assert time.monotonic() - started < 2.0
    assert_reset(joined.b, mode)  # with its bytes still unread: a reset, not an end
    assert_reset(joined.a, mode)


def test_abort_while_both_are_quiet_resets_both_peers(joined: Joined, mode: Mode) -> None:
    joined.splice.abort("stopping")
    assert joined.result(WAIT_SECS) == "stopping"
    for peer in (joined.a, joined.b):
        with pytest.raises(ConnectionResetError):
            peer.recv(1)


def test_a_zero_length_write_sends_nothing(mode: Mode) -> None:
    peer, mine = tcp_pair(mode)
    with peer, mine:
        TcpEnd(mine, watch_secs=mode.watch_secs).write(b"")
        peer.settimeout(QUIET_SECS)
        with pytest.raises(TimeoutError):
            peer.recv(1)


def test_the_watch_cuts_a_quiet_connection() -> None:
    """Threads: while the peers are silent the watch runs every few moments; its reason cuts."""
    peer_a, mine_a = tcp_pair(THREADS)
    peer_b, mine_b = tcp_pair(THREADS)
    calls: list[float] = []

    def watch() -> str:
        calls.append(time.monotonic())
        return "relay stream: the relay closed the incoming connection" if len(calls) >= 3 else ""

    splice = Splice(TcpEnd(mine_a, watch=watch, watch_secs=WATCH_SECS), TcpEnd(mine_b, watch_secs=WATCH_SECS),
                    in_threads)
    with peer_a, peer_b:
        assert THREADS.start(splice.run)(WAIT_SECS) == "relay stream: the relay closed the incoming connection"
        for peer in (peer_a, peer_b):
            peer.settimeout(WAIT_SECS)
            with pytest.raises(ConnectionResetError):
                peer.recv(1)
    assert len(calls) >= 3
