"""TCP end servers and end-client helpers for the port forwarding fault tests.

Unlike tcp_peers.py, RecordingServer records how each connection ended (the
peer's clean end, or a reset), so a test can tell a cut from a clean end, and
lets the test close or reset a connection from the server's side. The others
stop reading (HoldingServer, until released) or never read (FloodServer),
with a deterministic stream too large to hold in memory.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time

from tcp_peers import TcpServer


class Peer:
    """One connection accepted by a RecordingServer, as the server saw it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.received = 0
        self.ended = threading.Event()
        self.how = ""  # "eof" (the client's clean end), "reset", or "error: ..."
        self._cut = ""  # what the test asked for: "close" or "reset"

    def cut(self, how: str) -> None:
        """End the connection from the server's side: "close" (a FIN) or "reset" (an RST)."""
        assert how in ("close", "reset")
        self._cut = how
        if how == "reset":
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.shutdown(socket.SHUT_RD)  # wakes the handler's recv; sends nothing

    def wait_ended(self, timeout: float) -> str:
        """How the connection ended; AssertionError if it is still open after `timeout`."""
        if not self.ended.wait(timeout):
            raise AssertionError(f"the end server's connection is still open after {timeout:.0f} s "
                                 f"({self.received} bytes received)")
        return self.how


class RecordingServer(TcpServer):
    """Echoes what it receives and records how each connection ended."""

    def __init__(self) -> None:
        self.peers: list[Peer] = []
        self._new_peer = threading.Condition()
        super().__init__()

    def handle(self, sock: socket.socket) -> None:
        peer = Peer(sock)
        with self._new_peer:
            self.peers.append(peer)
            self._new_peer.notify_all()
        try:
            while True:
                data = sock.recv(65536)
                if peer._cut:
                    break
                if not data:
                    peer.how = "eof"
                    sock.shutdown(socket.SHUT_WR)
                    break
                peer.received += len(data)
                sock.sendall(data)
        except ConnectionResetError:
            peer.how = "reset"
        except OSError as e:
            peer.how = f"error: {e}"
        finally:
            sock.close()  # SO_LINGER 0 for a "reset" cut: an RST instead of a FIN
            peer.ended.set()

    def wait_peer(self, count: int, timeout: float = 20.0) -> Peer:
        """The `count`th connection accepted (1-based), waiting for it."""
        with self._new_peer:
            if not self._new_peer.wait_for(lambda: len(self.peers) >= count, timeout):
                raise AssertionError(f"the end server got {len(self.peers)} connections, not {count}")
            return self.peers[count - 1]


# ---- a deterministic stream too large to hold --------------------------------

BLOCK_BYTES = 1 << 20
_FILLER = random.Random(20240203).randbytes(BLOCK_BYTES - 8)


def pattern_block(index: int) -> bytes:
    """Block `index` of the stream: its number, then fixed random bytes.

    A lost, repeated or reordered piece shifts the stream, which the random
    filler shows; a shift by whole blocks changes the numbers.
    """
    return index.to_bytes(8, "big") + _FILLER


class PatternChecker:
    """Checks a received stream against pattern_block(0), pattern_block(1), ... as it arrives."""

    def __init__(self) -> None:
        self.total = 0
        self._pending = bytearray()
        self._block = 0
        self.error = ""

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        if self.error:
            return
        self._pending += data
        while len(self._pending) >= BLOCK_BYTES:
            self._check(bytes(self._pending[:BLOCK_BYTES]))
            del self._pending[:BLOCK_BYTES]

    def finish(self) -> None:
        if self._pending and not self.error:
            self._check(bytes(self._pending))

    def _check(self, got: bytes) -> None:
        want = pattern_block(self._block)[:len(got)]
        if got != want:
            at = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
            self.error = f"stream differs at byte {self._block * BLOCK_BYTES + at}"
        self._block += 1


class HoldingServer(TcpServer):
    """Reads nothing until `release` is set; then reads to the end, checking the pattern,
    and answers "COUNT ok" (or where the stream first differed)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        super().__init__()

    def handle(self, sock: socket.socket) -> None:
        checker = PatternChecker()
        self.release.wait()
        while data := sock.recv(1 << 20):
            checker.feed(data)
        checker.finish()
        sock.sendall(f"{checker.total} {checker.error or 'ok'}\n".encode())


class FloodServer(TcpServer):
    """Sends the pattern stream as fast as it is taken; reads nothing. Stops when cut."""

    def handle(self, sock: socket.socket) -> None:
        index = 0
        while True:
            sock.sendall(pattern_block(index))
            index += 1


# ---- either end's view ------------------------------------------------------

TCP_CLOSE = 7  # tcpi_state after a reset (linux/tcp_states.h)


def tcp_state(sock: socket.socket) -> int:
    """The kernel's TCP state of `sock`, without reading from it (struct tcp_info's first byte)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


def wait_reset_unread(sock: socket.socket, timeout: float) -> None:
    """Wait until `sock` has been reset, without reading a byte of what is queued for it.

    For a peer that reads nothing: a reset shows as the state TCP_CLOSE, while
    a FIN waits behind the unread bytes and would only show once they are read.
    """
    end = time.monotonic() + timeout
    while tcp_state(sock) != TCP_CLOSE:
        if time.monotonic() > end:
            raise AssertionError(f"not reset within {timeout:.0f} s (TCP state {tcp_state(sock)})")
        time.sleep(0.1)


# ---- the end client's view ----------------------------------------------------

def reset_close(sock: socket.socket) -> None:
    """Close abruptly: SO_LINGER 0 makes close() send an RST."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def wait_cut(sock: socket.socket, timeout: float) -> tuple[str, bytes]:
    """Read until the connection ends; ("reset" or "eof", bytes read meanwhile).

    AssertionError if it is still open after `timeout`: a hang fails the test.
    """
    sock.settimeout(timeout)
    end = time.monotonic() + timeout
    got = bytearray()
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return "reset", bytes(got)
        except TimeoutError:
            raise AssertionError(f"the end client's connection is still open after {timeout:.0f} s "
                                 f"(read {len(got)} bytes meanwhile)") from None
        if not data:
            return "eof", bytes(got)
        got += data
        left = end - time.monotonic()
        if left <= 0:
            raise AssertionError(f"the end client's connection still carries bytes after {timeout:.0f} s "
                                 f"(read {len(got)} bytes meanwhile)")
        sock.settimeout(left)
