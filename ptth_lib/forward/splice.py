"""One forwarded connection's bytes, both ways: the splice every proxy and the QUIC relay use.

A splice joins two *ends*. An end is where one side's bytes come out and
the other side's go in, a piece at a time:

- `read()`: the next piece, as soon as there is one, however small; b""
  only at the clean end of the input (the far side's half-close);
- `pour(pieces)`: pass each piece on as it comes, then end the output (a
  half-close). Ends that are written piece by piece (`PushEnd`: a TCP socket,
  a QUIC stream) do `write(piece)` for each and `end()`; an HTTP POST hands
  the pieces to urllib3 as its chunked body (http_streams.py);
- `abort(reason)`: cut both directions, so the far side sees a reset, never a
  clean end; `close()`: let go of it once both directions are over.

An end reports a failure of its own side as `CutError("what: why")`.
`Splice` runs the two directions at once, in threads (the HTTP proxies) or
greenlets (everything QUIC): how they run is a parameter (`in_threads`,
`in_greenlets`), the copying is the same. What it guarantees:

- each piece is passed on as soon as it is read: nothing waits to fill a buffer;
- buffering is bounded by the ends (a piece in hand per direction), so a slow
  reader slows the writer;
- a clean end of one input ends the other output, and that direction only;
- any failure of either end, in either direction, or `abort()` from outside,
  aborts both ends: every side sees a reset;
- the byte counts each way, and the first reason a connection was cut, for
  the proxies' log lines.

A TCP socket (`TcpEnd`) in a thread waits for at most WATCH_SECS at a time,
and between waits runs a `watch` callback (the HTTP proxies check the relay's
connections) and notices an abort. Greenlets need no polling: once the splice
is cut, `in_greenlets` kills the direction that is still blocked.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

from ptth_lib.errors import PtthError
from ptth_lib.forward.limits import PIECE_BYTES, WATCH_SECS

logger = logging.getLogger(__name__)

# How the two directions of a splice run: each is called with the directions
# (functions to call at once) and a predicate that tells whether the splice is
# cut; it returns when every direction has.
Runner = Callable[[Sequence[Callable[[], None]], Callable[[], bool]], None]


class CutError(PtthError):
    """An end's side broke (or was aborted); the message is the reason, as "what: why"."""


class End(Protocol):
    """One side of a splice (see the module docstring)."""

    def read(self) -> bytes: ...

    def pour(self, pieces: Iterable[bytes]) -> None: ...

    def abort(self, reason: str) -> None: ...

    def close(self) -> None: ...


class PushEnd:
    """An end written a piece at a time: `pour` is `write` for each piece, then `end`."""

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def end(self) -> None:
        raise NotImplementedError

    def pour(self, pieces: Iterable[bytes]) -> None:
        for piece in pieces:
            self.write(piece)
        self.end()


class Splice:
    """Two ends joined both ways until both directions end, or one fails and both are cut."""

    def __init__(self, a: End, b: End, run: Runner) -> None:
        self.a, self.b = a, b
        self._run = run
        self._lock = threading.Lock()
        self.reason = ""  # why it was cut; "" while it is not
        self.a_to_b = 0  # bytes read from a and passed to b
        self.b_to_a = 0

    @property
    def aborted(self) -> bool:
        return bool(self.reason)

    def run(self) -> str:
        """Copy both ways until both directions are over; "" after a clean end, else why it was cut.

        Both ends are closed afterwards, whatever happened.
        """
        try:
            self._run([self._copy_a_to_b, self._copy_b_to_a], lambda: self.aborted)
        except BaseException:
            self.abort("stopped")  # e.g. the greenlet running the splice was killed
            raise
        finally:
            for end in (self.a, self.b):
                end.close()
        return self.reason

    def abort(self, reason: str) -> None:
        """Cut both ends (the first reason is kept); safe from any thread, and more than once."""
        with self._lock:
            if self.reason:
                return
            self.reason = reason or "aborted"
        for end in (self.a, self.b):
            end.abort(self.reason)

    def _copy_a_to_b(self) -> None:
        self._copy(self.a, self.b, a_to_b=True)

    def _copy_b_to_a(self) -> None:
        self._copy(self.b, self.a, a_to_b=False)

    def _copy(self, source: End, sink: End, a_to_b: bool) -> None:
        try:
            sink.pour(self._pieces(source, a_to_b))
        except CutError as e:
            self.abort(str(e))
        except Exception as e:  # a bug: still cut both ends, so nothing hangs
            logger.exception("splice failed")
            self.abort(f"internal error: {e!r}")

    def _pieces(self, source: End, a_to_b: bool) -> Iterator[bytes]:
        """The source's pieces as they come; a piece is counted once the sink has taken it."""
        while True:
            try:
                data = source.read()
            except CutError as e:
                # Keep this reason before the sink sees the exception: a sink that is an upload
                # ends its request as the exception passes, and the far side's answer to that
                # (a cut of the other stream) could otherwise be recorded first.
                self.abort(str(e))
                raise
            if not data:
                if self.reason:  # woken by abort(), not by the far side's end
                    raise CutError(self.reason)
                return
            yield data
            if a_to_b:
                self.a_to_b += len(data)
            else:
                self.b_to_a += len(data)


def in_threads(directions: Sequence[Callable[[], None]], is_cut: Callable[[], bool]) -> None:
    """Run the first direction in this thread and the others in threads of their own.

    Threads cannot be stopped from outside: every end used with this runner
    must notice an abort by itself (TcpEnd polls every WATCH_SECS).
    """
    first, *rest = directions
    name = threading.current_thread().name
    threads = [threading.Thread(target=d, daemon=True, name=f"{name}-{i + 1}") for i, d in enumerate(rest)]
    for t in threads:
        t.start()
    first()
    for t in threads:
        t.join()


def in_greenlets(directions: Sequence[Callable[[], None]], is_cut: Callable[[], bool]) -> None:
    """Run each direction in a greenlet; once the splice is cut, kill those still blocked."""
    import gevent

    greenlets = [gevent.spawn(d) for d in directions]
    try:
        for _ in gevent.iwait(greenlets):
            if is_cut():
                break  # e.g. a write to a TCP peer that reads nothing would never return
    finally:
        gevent.killall(greenlets)


class TcpEnd(PushEnd):
    """A TCP socket as a splice end: `end()` is shutdown(SHUT_WR), `abort()` a reset.

    With `watch_secs` (in threads), reads and writes wait at most that long at
    a time, then notice an abort and call `watch`, which returns "" or a
    reason to cut the connection. Without (in greenlets), they block.
    """

    def __init__(self, sock: socket.socket, label: str = "TCP peer", watch: Callable[[], str] | None = None,
                 watch_secs: float | None = WATCH_SECS, read_bytes: int = PIECE_BYTES) -> None:
        self.sock = sock
        self.label = label
        self._watch = watch
        self._read_bytes = read_bytes
        self._aborted = ""
        if watch_secs is not None:
            sock.settimeout(watch_secs)

    def read(self) -> bytes:
        while True:
            try:
                data = self.sock.recv(self._read_bytes)
            except TimeoutError:
                self._check()
                continue
            except OSError as e:
                raise CutError(f"{self.label}: {e.strerror or e}") from None
            if self._aborted:
                raise CutError(self._aborted)  # woken by abort()'s shutdown, not by the peer's end
            return data

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._aborted:
                raise CutError(self._aborted)
            try:
                sent = self.sock.send(view)
            except TimeoutError:
                self._check()
                continue
            except OSError as e:
                raise CutError(f"{self.label}: {e.strerror or e}") from None
            view = view[sent:]

    def end(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)  # the far side's clean end, passed on as a half-close
        except OSError:
            pass  # the peer has gone already; its reset shows in the other direction

    def abort(self, reason: str) -> None:
        self._aborted = reason
        _linger_zero(self.sock)  # close() then sends a reset, not a FIN: a cut never looks like an end
        try:
            self.sock.shutdown(socket.SHUT_RD)  # wakes a blocked read; sends nothing
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()

    def _check(self) -> None:
        if self._aborted:
            raise CutError(self._aborted)
        reason = self._watch() if self._watch is not None else ""
        if reason:
            raise CutError(reason)


def reset(sock: socket.socket) -> None:
    """Close a TCP socket with a reset: its peer sees a refused or cut connection, not an end."""
    _linger_zero(sock)
    sock.close()


def _linger_zero(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


class OpenSplices:
    """The splices a proxy is running, so that stopping it can cut them all."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: set[Splice] = set()

    @contextmanager
    def running(self, splice: Splice) -> Iterator[Splice]:
        """Count `splice` as open for the duration of the block."""
        with self._lock:
            self._open.add(splice)
        try:
            yield splice
        finally:
            with self._lock:
                self._open.discard(splice)

    def abort_all(self, reason: str) -> None:
        with self._lock:
            splices = list(self._open)
        for splice in splices:
            splice.abort(reason)
