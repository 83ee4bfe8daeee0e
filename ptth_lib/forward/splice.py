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

A TCP peer that neither reads nor sends would keep both threads blocked on it
and blind to a relay that cut the streams meanwhile. So the threads wait on
the TCP socket for at most WATCH_SECS at a time, and in between look at the
state of the relay's connections: one that the relay closed or reset means
the connection is over.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections.abc import Iterator, Mapping
from urllib.parse import urlsplit

import certifi
import requests
import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection

from ptth_lib.errors import PtthError, describe_answer, root_cause

logger = logging.getLogger(__name__)

# Largest read from the TCP peer: one chunk of the POST body, the size of the
# relay's pieces (forwarding.PIECE_BYTES). Smaller reads happen whenever less
# is waiting, so a keystroke goes out at once.
READ_BYTES = 256 * 1024

# How long a thread waits on its TCP peer before it looks at the relay's side.
WATCH_SECS = 3.0

CONNECT_TIMEOUT_SECS = 10.0

# The relay answers a POST body with a line of text; more is not read.
MAX_ANSWER_BYTES = 4096

# Errors of the HTTP side that mean "the stream broke" rather than a bug.
HTTP_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, OSError)

# Linux's TCP_ESTABLISHED, the first byte of struct tcp_info.
_TCP_ESTABLISHED = 1


class SpliceAborted(PtthError, OSError):
    """Raised in the POST body to cut it: the connection is being aborted."""


class Splice:
    """The TCP socket of one forwarded connection and the two threads that feed it."""

    def __init__(self, sock: socket.socket, label: str) -> None:
        self._sock = sock
        self.label = label
        self._lock = threading.Lock()
        self._watched: dict[str, socket.socket] = {}  # the relay's streams still running
        self.aborted = False
        self.reason = ""
        self.bytes_out = 0  # from the TCP peer, into the tunnel
        self.bytes_in = 0   # from the tunnel, to the TCP peer

    def run(self, incoming: requests.Response, post_url: str, headers: dict[str, str]) -> None:
        """Copy both ways until both directions end or one fails; then close the socket.

        `incoming` is the streaming response carrying the far end's bytes; the
        TCP peer's bytes are POSTed to `post_url` with `headers`.
        """
        self._sock.settimeout(WATCH_SECS)
        in_sock = _response_socket(incoming)
        if in_sock is not None:
            self._watched["incoming"] = in_sock
        worker = threading.Thread(target=self._outgoing, args=(post_url, headers), daemon=True,
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
        try:
            # Linger 0: close() sends a reset instead of a FIN, so a cut never looks like an end.
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self._sock.shutdown(socket.SHUT_RD)  # wakes the reading thread, sends nothing
        except OSError:
            pass

    def _incoming(self, response: requests.Response) -> None:
        pieces = response.iter_content(None)
        while True:
            try:
                chunk = next(pieces, None)
            except HTTP_ERRORS as e:
                self.abort(f"relay stream: {root_cause(e)}")
                return
            if chunk is None:
                break
            try:
                self._send_to_peer(chunk)
            except OSError as e:
                self.abort(f"TCP peer: {e.strerror or e}")
                return
            if self.aborted:
                return
            self.bytes_in += len(chunk)
        self._watched.pop("incoming", None)
        try:
            self._sock.shutdown(socket.SHUT_WR)  # the far end's clean end: pass the half-close on
        except OSError:
            pass  # the peer has gone already; its reset shows on the other direction

    def _send_to_peer(self, data: bytes) -> None:
        """sendall, but looking at the relay's side while the peer reads nothing."""
        view = memoryview(data)
        while view and not self.aborted:
            try:
                sent = self._sock.send(view)
            except TimeoutError:
                self._check_relay()
                continue
            view = view[sent:]

    def _outgoing(self, url: str, headers: dict[str, str]) -> None:
        try:
            status, answer_headers, body = self._post(url, headers)
        except SpliceAborted:
            return
        except HTTP_ERRORS as e:
            self.abort(f"relay stream: {root_cause(e)}")
            return
        if status != 200:
            self.abort(f"relay answered {describe_answer(status, answer_headers, body)}")

    def _post(self, url: str, headers: dict[str, str]) -> tuple[int, Mapping[str, str], bytes]:
        """POST the TCP peer's bytes as a chunked body; return the relay's status, headers and answer.

        urllib3's connection directly rather than requests: the socket must be
        at hand to watch, and the upload must have no timeout (a quiet peer
        is not a stalled one). A connection never follows a redirect, so the
        key goes nowhere but to `url`.
        """
        parts = urlsplit(url)
        conn: HTTPConnection
        if parts.scheme == "https":
            conn = HTTPSConnection(parts.hostname or "", parts.port, timeout=CONNECT_TIMEOUT_SECS,
                                   ca_certs=certifi.where())
        else:
            conn = HTTPConnection(parts.hostname or "", parts.port, timeout=CONNECT_TIMEOUT_SECS)
        try:
            conn.connect()
            conn.timeout = None  # request() applies it to the socket: none while streaming
            self._watched["outgoing"] = conn.sock
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            conn.request("POST", path, body=self._read_peer(), headers=headers, chunked=True)
            self._watched.pop("outgoing", None)  # the body is done: the relay may close now
            answer = conn.getresponse()
            return answer.status, answer.headers, answer.read(MAX_ANSWER_BYTES)
        finally:
            self._watched.pop("outgoing", None)
            conn.close()

    def _read_peer(self) -> Iterator[bytes]:
        while True:
            try:
                data = self._sock.recv(READ_BYTES)
            except TimeoutError:
                self._check_relay()
                if self.aborted:
                    raise SpliceAborted(self.reason) from None
                continue
            except OSError as e:
                self.abort(f"TCP peer: {e.strerror or e}")
                raise SpliceAborted(self.reason) from e
            if self.aborted:
                raise SpliceAborted(self.reason)  # woken by abort(), not the peer's EOF
            if not data:
                return  # the peer's half-close: the POST body ends with its last chunk
            self.bytes_out += len(data)
            yield data

    def _check_relay(self) -> None:
        """Abort if the relay has closed or reset one of our streams that should be running."""
        for name, sock in list(self._watched.items()):
            if not _is_established(sock):
                self.abort(f"relay stream: the relay closed the {name} connection")
                return


def _response_socket(r: requests.Response) -> socket.socket | None:
    """The socket under a streaming response (urllib3 2's public `connection`)."""
    conn = getattr(r.raw, "connection", None)
    sock = getattr(conn, "sock", None)
    return sock if isinstance(sock, socket.socket) else None


def _is_established(sock: socket.socket) -> bool:
    """Tell whether a TCP connection is still open both ways (True where we cannot tell)."""
    tcp_info = getattr(socket, "TCP_INFO", None)
    if tcp_info is None:
        return True
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, tcp_info, 1)[0]
    except (OSError, IndexError):
        return sock.fileno() != -1
    return state == _TCP_ESTABLISHED
