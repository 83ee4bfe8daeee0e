"""One forwarded TCP connection at either proxy: a TCP socket joined to two HTTP streams.

Both ends of port forwarding (ptth_client and ptth_server) do the same once
the relay has opened the connection: the far end's bytes arrive as the body
of a streaming response (connect's at the client, accept's at the server) and
go to the TCP peer; the TCP peer's bytes go out as the chunked body of a POST
(upstream at the client, downstream at the server). Two threads, one per
direction, each blocking on one side, so a slow reader slows its writer.

Each direction ends on its own: the TCP peer's EOF ends the POST body with its
last chunk, and the response body's last chunk becomes `shutdown(SHUT_WR)`
towards the TCP peer, so a half-close crosses the tunnel as one. Anything else
(a cut HTTP stream, a reset TCP peer, a refused POST) aborts both directions:
the POST is cut, not ended, which the relay passes on to the other proxy, and
the TCP socket is closed with a reset, so no peer mistakes a cut for an end.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Iterator

import requests
import urllib3

from .errors import PtthError, root_cause

logger = logging.getLogger(__name__)

# Largest read from the TCP peer: one chunk of the POST body, the size of the
# relay's pieces (forwarding.PIECE_BYTES). Smaller reads happen whenever less
# is waiting, so a keystroke goes out at once.
READ_BYTES = 256 * 1024

# Errors of the HTTP side that mean "the stream broke" rather than a bug.
HTTP_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, OSError)


class SpliceAborted(PtthError, OSError):
    """Raised in the POST body to cut it: the connection is being aborted."""


class Splice:
    """The TCP socket of one forwarded connection and the two threads that feed it."""

    def __init__(self, sock: socket.socket, label: str) -> None:
        self._sock = sock
        self.label = label
        self._lock = threading.Lock()
        self._sending = False
        self.aborted = False
        self.reason = ""
        self.bytes_out = 0  # from the TCP peer, into the tunnel
        self.bytes_in = 0   # from the tunnel, to the TCP peer

    def run(self, incoming: Iterable[bytes], post_outgoing: Callable[[Iterator[bytes]], int]) -> None:
        """Copy both ways until both directions end or one fails; then close the socket.

        `incoming` is the far end's bytes (a response body's chunks).
        `post_outgoing(body)` POSTs `body` and returns the relay's status.
        """
        worker = threading.Thread(target=self._outgoing, args=(post_outgoing,), daemon=True,
                                  name=f"{threading.current_thread().name}-out")
        worker.start()
        self._incoming(incoming)
        worker.join()
        self._sock.close()

    def abort(self, reason: str) -> None:
        """Stop both directions; the TCP peer gets a reset when the socket closes."""
        with self._lock:
            if self.aborted:
                return
            self.aborted = True
            self.reason = reason
            sending = self._sending
        try:
            # Linger 0: close() sends a reset instead of a FIN, so a cut never looks like an end.
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self._sock.shutdown(socket.SHUT_RD)  # wakes the reading thread, sends nothing
            if sending:  # the peer reads nothing: the writing thread waits in sendall
                self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _incoming(self, chunks: Iterable[bytes]) -> None:
        pieces = iter(chunks)
        while True:
            try:
                chunk = next(pieces, None)
            except HTTP_ERRORS as e:
                self.abort(f"relay stream: {root_cause(e)}")
                return
            if chunk is None:
                break
            with self._lock:
                if self.aborted:
                    return
                self._sending = True
            try:
                self._sock.sendall(chunk)
            except OSError as e:
                self.abort(f"TCP peer: {e.strerror or e}")
                return
            finally:
                self._sending = False
            self.bytes_in += len(chunk)
        try:
            self._sock.shutdown(socket.SHUT_WR)  # the far end's clean end: pass the half-close on
        except OSError:
            pass  # the peer has gone already; its reset shows on the other direction

    def _outgoing(self, post: Callable[[Iterator[bytes]], int]) -> None:
        try:
            status = post(self._read_peer())
        except SpliceAborted:
            return
        except HTTP_ERRORS as e:
            self.abort(f"relay stream: {root_cause(e)}")
            return
        if status != 200:
            self.abort(f"relay answered {status}")

    def _read_peer(self) -> Iterator[bytes]:
        while True:
            try:
                data = self._sock.recv(READ_BYTES)
            except OSError as e:
                self.abort(f"TCP peer: {e.strerror or e}")
                raise SpliceAborted(self.reason) from e
            if self.aborted:
                raise SpliceAborted(self.reason)  # woken by abort(), not the peer's EOF
            if not data:
                return  # the peer's half-close: the POST body ends with its last chunk
            self.bytes_out += len(data)
            yield data
