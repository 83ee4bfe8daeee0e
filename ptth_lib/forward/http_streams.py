"""The relay's two HTTP streams of one forwarded connection, as one splice end (spec 003).

At either HTTP proxy (ptth_client, ptth_server) the far end's bytes arrive
as the body of a streaming response (connect's at the client, accept's at
the server), read chunk by chunk as each arrives; the TCP peer's bytes go out
as the chunked body of a POST (upstream at the client, downstream at the
server), a generator that urllib3 pulls each piece from and sends as one
chunk at once. `RelayStreams` is the two as one end for `splice.Splice`:

- `read()`: the response's next chunk; b"" at its last chunk, the far side's
  half-close (a web app's WebSocket opens that response at the first read,
  so that the POST does not wait for it: `incoming` may be a function);
- `pour(pieces)`: the POST; the generator's end is the body's last chunk (our
  half-close), and the relay must then answer 200; a piece that cannot be had
  (the splice is being cut) cuts the body off, which the relay takes as a cut;
- `abort()`: shuts down both HTTP connections, which the relay also takes as
  a cut, and wakes whatever waits on them;
- `check()`: for the TCP end's watch: whether the relay has closed or reset
  one of the two connections while no bytes flowed.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from urllib.parse import urlsplit

import certifi
import requests
import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection

from ptth_lib.errors import describe_answer, root_cause
from ptth_lib.forward.limits import MAX_ANSWER_BYTES, RELAY_CONNECT_TIMEOUT_SECS
from ptth_lib.forward.splice import CutError
from ptth_lib.requests_adapter import response_socket

# Errors of the HTTP side that mean "the stream broke" rather than a bug.
HTTP_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, OSError)

# Linux's TCP_ESTABLISHED, the first byte of struct tcp_info.
_TCP_ESTABLISHED = 1


class RelayStreams:
    """The response carrying the far side's bytes and the POST carrying ours, as one splice end."""

    def __init__(self, incoming: requests.Response | Callable[[], requests.Response], post_url: str,
                 headers: Mapping[str, str]) -> None:
        """`incoming` is the response, or a function that opens it (raising HTTP_ERRORS or CutError)."""
        self._post_url = post_url
        self._headers = dict(headers)
        # The relay's connections that should be open: watched while the TCP peer is quiet,
        # shut down by abort(). The response's leaves at its clean end, the POST's with its body.
        self._open: dict[str, socket.socket] = {}
        self._aborted = ""
        self._incoming: requests.Response | None = None
        self._chunks: Iterator[bytes] = iter(())
        self._open_incoming: Callable[[], requests.Response] | None = None
        if callable(incoming):
            self._open_incoming = incoming
        else:
            self._use(incoming)

    def _use(self, incoming: requests.Response) -> None:
        self._incoming = incoming
        self._chunks = incoming.iter_content(None)  # each chunk as it arrives, never a sized read
        in_sock = response_socket(incoming)
        if in_sock is not None:
            self._open["incoming"] = in_sock
            if self._aborted:  # cut while it was being opened
                self.abort(self._aborted)

    def read(self) -> bytes:
        if self._open_incoming is not None:
            opener, self._open_incoming = self._open_incoming, None
            try:
                self._use(opener())
            except HTTP_ERRORS as e:
                raise CutError(f"relay stream: {root_cause(e)}") from None
        while True:
            try:
                chunk: bytes | None = next(self._chunks, None)
            except HTTP_ERRORS as e:
                raise CutError(f"relay stream: {root_cause(e)}") from None
            if chunk is None:
                self._open.pop("incoming", None)  # ended cleanly: the relay may close it now
                return b""
            if chunk:
                return chunk

    def pour(self, pieces: Iterable[bytes]) -> None:
        try:
            status, headers, body = self._post(pieces)
        except HTTP_ERRORS as e:
            raise CutError(f"relay stream: {root_cause(e)}") from None
        if status != 200:
            raise CutError(f"relay answered {describe_answer(status, headers, body)}")

    def check(self) -> str:
        """Why the connection is over if the relay closed or reset one of our streams, else ""."""
        for name, sock in list(self._open.items()):
            if not _is_established(sock):
                return f"relay stream: the relay closed the {name} connection"
        return ""

    def abort(self, reason: str) -> None:
        self._aborted = reason
        for sock in list(self._open.values()):
            try:
                sock.shutdown(socket.SHUT_RDWR)  # mid-body: the relay sees a cut, never an end
            except OSError:
                pass

    def close(self) -> None:
        if self._incoming is not None:
            self._incoming.close()

    def _post(self, pieces: Iterable[bytes]) -> tuple[int, Mapping[str, str], bytes]:
        """POST the pieces as a chunked body; return the relay's status, headers and answer.

        urllib3's connection directly rather than requests: the socket must be
        at hand to watch, and the upload must have no timeout (a quiet peer
        is not a stalled one). A connection never follows a redirect, so the
        key goes nowhere but to the URL.
        """
        parts = urlsplit(self._post_url)
        conn: HTTPConnection
        if parts.scheme == "https":
            conn = HTTPSConnection(parts.hostname or "", parts.port, timeout=RELAY_CONNECT_TIMEOUT_SECS,
                                   ca_certs=certifi.where())
        else:
            conn = HTTPConnection(parts.hostname or "", parts.port, timeout=RELAY_CONNECT_TIMEOUT_SECS)
        try:
            conn.connect()
            conn.timeout = None  # request() applies it to the socket: none while streaming
            self._open["outgoing"] = conn.sock
            if self._aborted:
                raise CutError(self._aborted)
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            # preload_content=False: the answer is read below, at most MAX_ANSWER_BYTES of it
            # (preloaded, it was read whole and read() then returned nothing of it).
            conn.request("POST", path, body=pieces, headers=self._headers, chunked=True, preload_content=False)
            self._open.pop("outgoing", None)  # the body is done: the relay may close now
            answer = conn.getresponse()
            return answer.status, answer.headers, answer.read(MAX_ANSWER_BYTES)
        finally:
            self._open.pop("outgoing", None)
            conn.close()


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
