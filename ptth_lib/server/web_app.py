"""ptth_server as a reverse proxy for a local web app (`web_app_url`): one relayed request at a time.

A pool thread hands `WebApp.forward` a request the relay passed on; it goes
to the app on a connection of its own, any method, and the answer goes back
to the relay as a response POST (responder.py), streamed:

- A request body (PROTOCOL.md "Web apps") is fetched from the relay
  (`GET /7ZSFUKGV/http_request_body/{id}`) once the app has the request's
  head, and each piece goes to the app as it arrives: with Content-Length
  when the relay knows the length, else chunked. One piece is in hand at a
  time, so a slow app slows the client's upload. If that fetch breaks off,
  the app's connection is reset before the body is complete: the app sees
  its request fail, never a shorter body that looks whole.
- The app's response body goes to the relay as the app flushes it: every
  read takes what has arrived (`read1`), so a server-sent event crosses at
  once instead of waiting for a buffer to fill. An app that resets or closes
  mid-body cuts our POST off, so the relay cuts the client: never a short
  clean body.
- Headers: proxy_headers.py (hop-by-hop removal, the app's own Host,
  repeated headers, Location rewriting).
- A WebSocket handshake goes to the app like any GET; if it answers 101,
  the 101 head goes to the relay and the connection is handed to a thread
  of its own, which splices the app's socket with the relay's two streams
  (forward/splice.py and forward/http_streams.py, as TCP port forwarding
  does): the pool thread is free again at once, and at most MAX_WEBSOCKETS
  are open, so idle WebSockets never take the pool's room.
- Failures: an app that cannot be reached, or closes without answering,
  gets the client a 502 with a line that does not name the app (the log
  does); a slow app is left to the relay's request timeout (its 504), since
  APP_HEAD_TIMEOUT_SECS is longer than any the relay allows. Nothing is
  tried twice: an app's request is not known to be idempotent.

About 525 lines, over the house's 450: one exchange with the app, from its
head through both bodies to a WebSocket's hand-off, shares the connection
and its failure rules, and reads best in one place; the header rules
(proxy_headers.py) and chunked decoding (chunked.py) live apart.

Why http.client rather than requests or urllib3: the proxy needs the raw
HTTP exchange, which the standard library's client gives without working
around anything. It sends a request head and then whatever bytes we frame
(chunked, or not, or a reset mid-body); `HTTPResponse.read1` returns what
has arrived, chunk by chunk; `HTTPResponse.getheaders` keeps repeated
headers in order; and after a 101 the socket and the bytes already buffered
are there to take over. requests would decode bodies, merge repeated
headers, retry, and hide the socket; urllib3 would add a pool whose reused
connections could make a non-idempotent request go out twice. The relay
side of the exchange stays on requests, as for files.
"""

from __future__ import annotations

import http.client
import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import requests
import urllib3

from ptth_lib import __version__
from ptth_lib.config import ServerConfig
from ptth_lib.errors import PtthError, describe_answer, root_cause
from ptth_lib.forward.http_streams import RelayStreams
from ptth_lib.forward.limits import PIECE_BYTES, WATCH_SECS
from ptth_lib.forward.splice import OpenSplices, Splice, TcpEnd, in_threads, reset
from ptth_lib.requests_adapter import is_answered_early, response_socket
from ptth_lib.server.chunked import ChunkedDecoder, ChunkedError
from ptth_lib.server.proxy_headers import (
    PublicUrl,
    collect_response_headers,
    public_url,
    request_headers,
    rewrite_location,
)
from ptth_lib.wire.envelope import (
    API_KEY_HEADER,
    BODY_LENGTH_UNKNOWN,
    FEATURE_HEADER_LISTS,
    REQUEST_BODY_PATH,
    RESPONSE_HEAD_HEADER,
    RESPONSE_PATH,
    RelayRequest,
    ServerResponseHead,
    encode_response_head,
)
from ptth_lib.wire.names import short_id

logger = logging.getLogger(__name__)

# Connecting to the app: it is local, so this is long; a refusal comes at once anyway.
APP_CONNECT_TIMEOUT_SECS = 10.0
# Waiting for the app's response head. The relay's request_timeout_secs is at
# most 3600 s (config.keys.check_timeout), so a slow app always gets the relay's
# 504 first: answering sooner would turn a slow app into a 502 of ours.
APP_HEAD_TIMEOUT_SECS = 3700.0
# One blocking read or write on the app's connection (a read only starts once
# bytes have arrived; a write waits while the app does not read the upload).
APP_IO_TIMEOUT_SECS = 300.0
# An app body silent for this long is given up. A client that left is noticed
# sooner (the relay answers the POST early, seen every WATCH_SECS), and the
# relay cuts a body stalled for long (rendezvous.BODY_STALL_SECS) before this.
APP_BODY_IDLE_SECS = 3600.0
# The relay's request body: its head, and each piece. The relay passes pieces
# on as the client sends them, so this bounds a client that stalls.
BODY_FETCH_TIMEOUT_SECS = 150.0
# WebSockets open at once, each in two threads (about 64 KiB of memory each
# while idle) with three sockets; more are answered 503. ServerLoop raises the
# open-files limit to make room. bench/ holds 1,000 idle ones.
MAX_WEBSOCKETS = 2000
# A response head's 1xx interim answers (103 Early Hints) are skipped; at most this many.
MAX_INTERIM_RESPONSES = 16
# Header lines of one skipped interim answer, at most (http.client allows 100 per head).
MAX_INTERIM_HEADER_LINES = 100

# What the client reads when the app cannot be had; never the app's address.
_UNREACHABLE_TEXT = b"502 Bad Gateway: the web app behind this server is not answering.\n"
_TIMEOUT_TEXT = b"504 Gateway Timeout: the web app behind this server did not answer in time.\n"
_BUSY_TEXT = b"503 Service Unavailable: this server has too many WebSockets open; try again later.\n"
_UPLOAD_CUT_TEXT = b"502 Bad Gateway: the request body broke off before the web app had it all.\n"


class AppCutError(PtthError):
    """Raised inside a response body: the app's body broke off (or the upload must stop); cut the POST."""


@dataclass
class _Exchange:
    """An app's connection with the response head read."""

    conn: http.client.HTTPConnection
    sock: socket.socket
    response: http.client.HTTPResponse

    def close(self) -> None:
        self.response.close()
        self.conn.close()


# Post a response to the relay without retrying: (request id, head, body pieces, length or None).
Post = Callable[[str, ServerResponseHead, Iterator[bytes], "int | None"], None]


class WebApp:
    """Forwards relayed requests to the web app; used from the pool's threads."""

    def __init__(self, config: ServerConfig, post: Post, session: Callable[[], requests.Session],
                 new_session: Callable[[], requests.Session], abort: threading.Event,
                 relay_features: Callable[[], frozenset[str]]) -> None:
        """`post` answers the relay (Responder.post_once); `session` is this thread's Session,
        `new_session` makes one; `abort` set means stop now; `relay_features` are the relay's latest."""
        assert config.web_app_url is not None and config.api_key is not None
        self.url = config.web_app_url
        parts = urlsplit(self.url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port
        self._path = parts.path.rstrip("/")
        self._name = config.name
        self._api_key: str = config.api_key
        base = config.relay_url.rstrip("/")
        self._body_url = base + REQUEST_BODY_PATH
        self._response_url = base + RESPONSE_PATH
        self._post = post
        self._session = session
        self._new_session = new_session
        self._abort = abort
        self._relay_features = relay_features
        self._websockets = threading.BoundedSemaphore(MAX_WEBSOCKETS)
        self._open = OpenSplices()

    def stop(self) -> None:
        """Cut every open WebSocket (both sides see a reset)."""
        self._open.abort_all("ptth_server is stopping")

    def forward(self, req: RelayRequest, client: str) -> None:
        """Answer one request from the app; `client` is the client's address, for the log."""
        if req.upgrade == "websocket":
            self._websocket(req, client)
            return
        exchange = self._exchange(req, client)
        if exchange is not None:
            try:
                self._answer(req, client, exchange)
            finally:
                exchange.close()

    # ---- the exchange with the app --------------------------------------

    def _exchange(self, req: RelayRequest, client: str) -> _Exchange | None:
        """Send the request (head, then body) and read the app's head; None once a failure is answered."""
        what = f"request {req.id} from {client}: {req.method} {req.uri}"
        conn = self._connection()
        try:
            conn.connect()
        except OSError as e:
            logger.warning("%s: cannot connect to the web app at %s: %s; answering 502", what, self.url,
                           root_cause(e))
            self._fail(req.id, 502, _UNREACHABLE_TEXT)
            return None
        assert conn.sock is not None
        sock: socket.socket = conn.sock
        try:
            conn.putrequest(req.method, self._path + req.uri, skip_accept_encoding=True)
            for name, value in request_headers(req.headers, req.body, req.upgrade == "websocket"):
                conn.putheader(name, value)
            sock.settimeout(APP_IO_TIMEOUT_SECS)
            conn.endheaders()
        except (OSError, ValueError, http.client.HTTPException) as e:
            conn.close()
            logger.warning("%s: cannot send it to the web app at %s: %s; answering 502", what, self.url,
                           root_cause(e))
            self._fail(req.id, 502, _UNREACHABLE_TEXT)
            return None
        if req.body is not None:
            cut = self._send_body(req, sock)
            if cut:
                reset(sock)  # the app sees its request fail, never a shortened body as complete
                conn.sock = None
                logger.warning("%s: %s; the web app's request was reset", what, cut)
                self._fail(req.id, 502, _UPLOAD_CUT_TEXT)
                return None
        try:
            sock.settimeout(APP_HEAD_TIMEOUT_SECS)
            response = conn.getresponse()
            sock.settimeout(APP_IO_TIMEOUT_SECS)
        except TimeoutError:
            conn.close()
            logger.warning("%s: the web app at %s sent no answer in %.0f s; answering 504", what, self.url,
                           APP_HEAD_TIMEOUT_SECS)
            self._fail(req.id, 504, _TIMEOUT_TEXT)
            return None
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            logger.warning("%s: the web app at %s did not answer: %s; answering 502", what, self.url,
                           root_cause(e) if isinstance(e, OSError) else type(e).__name__)
            self._fail(req.id, 502, _UNREACHABLE_TEXT)
            return None
        return _Exchange(conn, sock, response)

    def _connection(self) -> http.client.HTTPConnection:
        if self._https:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                self._host, self._port, timeout=APP_CONNECT_TIMEOUT_SECS, context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=APP_CONNECT_TIMEOUT_SECS)
        conn.response_class = _AppResponse
        return conn

    def _send_body(self, req: RelayRequest, sock: socket.socket) -> str:
        """Copy the request body from the relay to the app, piece by piece; "" or why it broke off.

        An app that answers (or closes) before it has the whole body ends the
        copy early: its answer is then read as usual.
        """
        assert req.body is not None
        chunked = req.body == BODY_LENGTH_UNKNOWN
        url = self._body_url.format(id=quote(req.id, safe=""))
        sent = 0
        try:
            with self._session().get(url, headers={API_KEY_HEADER: self._api_key}, stream=True,
                                     timeout=(APP_CONNECT_TIMEOUT_SECS, BODY_FETCH_TIMEOUT_SECS)) as r:
                if r.status_code != 200:
                    answer = r.raw.read(4096, decode_content=True)
                    return f"the relay answered {describe_answer(r.status_code, r.headers, answer)} to the body fetch"
                for piece in r.iter_content(None):
                    if not piece:
                        continue
                    if self._abort.is_set():
                        return "ptth_server is stopping"
                    if not chunked and sent + len(piece) > req.body:
                        return f"the request body is longer than its length ({req.body} bytes)"
                    if _is_readable(sock):
                        return ""  # the app answered, or closed, without the rest: read its answer
                    try:
                        sock.sendall(b"%x\r\n%b\r\n" % (len(piece), piece) if chunked else piece)
                    except OSError:
                        return ""  # likewise: its answer (if any) tells
                    sent += len(piece)
        except (requests.RequestException, urllib3.exceptions.HTTPError) as e:
            return f"the request body broke off after {sent} bytes: {root_cause(e)}"
        if not chunked and sent != req.body:
            return f"the request body ended after {sent} of {req.body} bytes"
        if chunked:
            try:
                sock.sendall(b"0\r\n\r\n")
            except OSError:
                pass  # the app closed: its answer (if any) tells
        return ""

    # ---- the answer to the relay ------------------------------------------

    def _answer(self, req: RelayRequest, client: str, exchange: _Exchange) -> None:
        """Pass the app's response to the relay, its body streamed as the app sends it."""
        response = exchange.response
        status = response.status
        what = f"request {req.id} from {client}: {req.method} {req.uri}"
        if not 200 <= status <= 599:
            logger.warning("%s: the web app at %s answered status %d; answering 502", what, self.url, status)
            self._fail(req.id, 502, _UNREACHABLE_TEXT)
            return
        head = self._head(req, status, response.getheaders())
        has_body = req.method != "HEAD" and status not in (204, 304)
        length: int | None
        if not has_body:
            length = 0
        elif response.chunked or response.length is None:
            head.headers.pop("content-length", None)  # the app's framing, not the message's length
            length = None
        else:
            length = response.length
            head.headers["content-length"] = str(length).encode("ascii")
        logger.info("%s -> %d (web app)", what, status)
        self._post(req.id, head, self._pieces(exchange) if has_body else iter(()), length)

    def _head(self, req: RelayRequest, status: int, pairs: list[tuple[str, str]]) -> ServerResponseHead:
        headers, multi = collect_response_headers(pairs, FEATURE_HEADER_LISTS in self._relay_features())
        multi.pop("content-length", None)
        public: PublicUrl = public_url(req.headers, self._name)
        for name in ("location", "content-location"):
            if name in headers:
                headers[name] = rewrite_location(headers[name], self.url, public)
        return ServerResponseHead(status, headers, multi)

    def _pieces(self, exchange: _Exchange) -> Iterator[bytes]:
        """The app's body, each piece as soon as it has arrived; AppCutError if it breaks off.

        Read from the socket directly (chunked.py decodes a chunked body), so
        that waiting is a select() we can interrupt: while the app sends
        nothing, every WATCH_SECS, has the relay answered the POST early (the
        client left), or is the server stopping?
        """
        response, sock = exchange.response, exchange.sock
        decoder = ChunkedDecoder() if response.chunked else None
        left = None if decoder is not None else response.length  # None: until the app closes
        try:
            pending = _take_buffered(response, sock)
        except OSError as e:
            raise AppCutError(f"the web app's body broke off: {root_cause(e)}") from None
        # The response stays open to the end: it holds the socket if http.client has closed
        # the connection already (the app said Connection: close).
        quiet_since = time.monotonic()
        while left != 0:
            if not pending:
                try:
                    if not _wait_readable(sock):
                        if self._abort.is_set():
                            raise AppCutError("ptth_server is stopping")
                        if is_answered_early():
                            raise AppCutError("the client left (the relay answered early)")
                        if time.monotonic() - quiet_since > APP_BODY_IDLE_SECS:
                            raise AppCutError(f"the web app sent nothing for {APP_BODY_IDLE_SECS:.0f} s")
                        continue
                    pending = sock.recv(PIECE_BYTES)
                except OSError as e:
                    raise AppCutError(f"the web app's body broke off: {root_cause(e)}") from None
                if not pending:
                    if (decoder is not None and not decoder.done) or left:
                        raise AppCutError("the web app closed the connection before the end of its body")
                    return
                quiet_since = time.monotonic()
            if decoder is not None:
                try:
                    piece = decoder.feed(pending)
                except ChunkedError as e:
                    raise AppCutError(f"the web app's body is malformed: {e}") from None
            elif left is not None:
                piece = pending[:left]
                left -= len(piece)
            else:
                piece = pending
            pending = b""
            if piece:
                yield piece
            if (decoder is not None and decoder.done) or left == 0:
                return

    def _fail(self, request_id: str, status: int, text: bytes) -> None:
        head = ServerResponseHead(status, {"content-type": b"text/plain; charset=utf-8",
                                           "content-length": str(len(text)).encode("ascii")})
        self._post(request_id, head, iter((text,)), len(text))

    # ---- WebSocket ---------------------------------------------------------

    def _websocket(self, req: RelayRequest, client: str) -> None:
        """Pass a handshake to the app; after its 101, splice in a thread of its own."""
        if not self._websockets.acquire(blocking=False):
            logger.warning("request %s from %s: WebSocket %s refused: %d are open already; answering 503",
                           req.id, client, req.uri, MAX_WEBSOCKETS)
            self._fail(req.id, 503, _BUSY_TEXT)
            return
        handed_over = False
        try:
            exchange = self._exchange(req, client)
            if exchange is None:
                return
            if exchange.response.status != 101:  # a refusal, a redirect...: an ordinary answer
                try:
                    self._answer(req, client, exchange)
                finally:
                    exchange.close()
                return
            head = self._head(req, 101, exchange.response.getheaders())
            head.headers.update({"upgrade": b"websocket", "connection": b"Upgrade"})
            try:
                leftover = _take_buffered(exchange.response, exchange.sock)
            except OSError as e:
                exchange.close()
                logger.info("request %s from %s: WebSocket %s: the web app closed it at once: %s", req.id,
                            client, req.uri, root_cause(e))
                self._fail(req.id, 502, _UNREACHABLE_TEXT)
                return
            exchange.conn.sock = None  # the socket is the splice's now (TcpEnd closes it)
            exchange.response.close()  # its file on the socket; the socket stays open
            logger.info("request %s from %s: WebSocket %s open (web app)", req.id, client, req.uri)
            threading.Thread(target=self._splice, args=(req, client, exchange.sock, leftover, head),
                             name=f"ptth-websocket-{short_id(req.id)}", daemon=True).start()
            handed_over = True
        finally:
            if not handed_over:
                self._websockets.release()

    def _splice(self, req: RelayRequest, client: str, sock: socket.socket, leftover: bytes,
                head: ServerResponseHead) -> None:
        """Copy bytes both ways until both sides end, or one is cut and both are."""
        try:
            session = self._new_session()
            session.proxies.clear()  # straight to the relay, as RelayStreams' POST goes
            url = self._body_url.format(id=quote(req.id, safe=""))

            def open_incoming() -> requests.Response:
                r = session.get(url, headers={API_KEY_HEADER: self._api_key}, stream=True,
                                timeout=(APP_CONNECT_TIMEOUT_SECS, BODY_FETCH_TIMEOUT_SECS))
                if r.status_code != 200:
                    answer = r.raw.read(4096, decode_content=True)
                    r.close()
                    raise requests.ConnectionError(
                        f"relay answered {describe_answer(r.status_code, r.headers, answer)} to the body fetch")
                sock = response_socket(r)
                if sock is not None:
                    sock.settimeout(None)  # a WebSocket may be quiet for hours
                return r

            streams = RelayStreams(open_incoming, self._response_url.format(id=quote(req.id, safe="")),
                                   {API_KEY_HEADER: self._api_key, RESPONSE_HEAD_HEADER: encode_response_head(head),
                                    "User-Agent": f"ptth_server/{__version__}"})
            splice = Splice(_AppSocketEnd(sock, leftover, label="web app", watch=streams.check), streams,
                            in_threads)
            with self._open.running(splice):
                reason = splice.run()
            session.close()
            logger.info("request %s from %s: WebSocket %s closed%s: %d bytes in, %d out", req.id, client, req.uri,
                        f" ({reason})" if reason else "", splice.b_to_a, splice.a_to_b)
        finally:
            self._websockets.release()


class _AppSocketEnd(TcpEnd):
    """The app's socket after a 101, with the bytes http.client had already read past the head."""

    def __init__(self, sock: socket.socket, leftover: bytes, label: str, watch: Callable[[], str]) -> None:
        super().__init__(sock, label=label, watch=watch)
        self._leftover = leftover

    def read(self) -> bytes:
        if self._leftover:
            data, self._leftover = self._leftover, b""
            return data
        return super().read()


class _AppResponse(http.client.HTTPResponse):
    """http.client's response, skipping every 1xx interim answer but 101 (it only skips 100)."""

    def _read_status(self) -> tuple[str, int, str]:
        for _ in range(MAX_INTERIM_RESPONSES):
            version, status, reason = super()._read_status()  # type: ignore[misc]
            if not 101 < status < 200:
                return version, status, reason
            for _ in range(MAX_INTERIM_HEADER_LINES + 1):  # its header lines, up to the blank one
                line = self.fp.readline(http.client._MAXLINE + 1)  # type: ignore[attr-defined]
                if line in (b"\r\n", b"\n", b""):
                    break
            else:
                raise http.client.HTTPException("interim answer with too many header lines")
        raise http.client.HTTPException("too many interim answers")


def _take_buffered(response: http.client.HTTPResponse, sock: socket.socket) -> bytes:
    """The bytes past the head that http.client has read already (the start of the body, or after
    a 101 the app's first frames), taken without waiting: the socket is non-blocking meanwhile."""
    fp = response.fp
    if fp is None:
        return b""
    timeout = sock.gettimeout()
    sock.settimeout(0.0)
    try:
        if not fp.peek(1):  # a look at the buffer (if it is empty, at most what has arrived)
            return b""
        return bytes(fp.read1(PIECE_BYTES))
    except (BlockingIOError, ssl.SSLWantReadError):
        return b""
    finally:
        sock.settimeout(timeout)


def _wait_readable(sock: socket.socket) -> bool:
    """Wait up to WATCH_SECS for the app to send something (or close); True if it has."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True  # decrypted already, so select() would not see it
    readable, _, _ = select.select([sock], [], [], WATCH_SECS)
    return bool(readable)


def _is_readable(sock: socket.socket) -> bool:
    """Tell whether the app has sent something (or closed) already."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)
