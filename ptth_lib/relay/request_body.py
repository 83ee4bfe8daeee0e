"""A client's request body, fetched by the server that took the request (PROTOCOL.md "Web apps").

The client's greenlet holds the request and waits for the response head; its
body stays unread on the client's connection until the server asks for it
with `GET /7ZSFUKGV/http_request_body/{id}`. That GET's greenlet then reads
the client's connection piece by piece and writes each piece to the server
before reading the next: a slow server slows the client's upload, and at
most one piece (256 KiB) is in the relay at a time. Nothing is read before
the server wants it, so `Expect: 100-continue` is answered then (wsgi.py),
and a server that answers without the body (a 405, say) costs the client no
upload: the relay closes the connection after the answer instead.

An `Upload` is one body's state: waiting, being fetched, done, or broken
(the client's upload broke off, was shorter than its Content-Length, or
passed `max_request_body_bytes`). A broken body is never passed on as
complete: the server's GET is cut, not ended.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.event

from ptth_lib.errors import ForbiddenError, PtthError, UnknownRequestError
from ptth_lib.relay.forwarding import WEBSOCKET_PORT, ForwardedConnection, PortForwarding
from ptth_lib.relay.rendezvous import ListenEndedError, PendingRequest, Rendezvous
from ptth_lib.wsgi import (
    connection_socket,
    has_hung_up,
    iter_body,
    send_continue,
    wait_for_hangup,
)

logger = logging.getLogger(__name__)

# Largest piece read from the client's connection at once: the size the
# relay uses for response bodies and forwarded connections (forwarding.py).
PIECE_BYTES = 256 * 1024

# While a body waits for the server, how often the client's connection is
# looked at for a hang-up (a poll of one socket: cheap).
HANGUP_CHECK_SECS = 1.0

# In a cluster, the client's greenlet attaches the body to its request when its
# OFFER's answer is read; under load a server's body GET may come a moment
# before (cluster/rendezvous.py). It waits this long for it, looking this often.
# (In one process the body is attached before any listen can take the request.)
ATTACH_WAIT_SECS = 1.0
ATTACH_POLL_SECS = 0.01

# After an answer given without reading the body, how long the relay reads
# and drops what the client still sends before closing, so that the close
# does not reset the connection under the answer (wsgi.close_after_answer).
LINGER_SECS = 2.0

# The server's body GET: bytes as they come, never buffered by a proxy on the way.
BODY_HEADERS = {"Content-Type": "application/octet-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}

WAITING = "waiting"
FETCHING = "fetching"
DONE = "done"
BROKEN = "broken"
REFUSED = "refused"  # answered without it


class UploadBrokeOffError(PtthError):
    """The client's body could not be passed on whole; the server's GET must see a cut."""


class Upload:
    """One client's request body, from the request to the end of its fetch."""

    def __init__(self, environ: dict[str, Any], length: int | None, limit: int) -> None:
        """`length`: the Content-Length, None when chunked; `limit`: max_request_body_bytes (0: none)."""
        self.environ = environ
        self.length = length
        self.limit = limit
        self.state = WAITING
        self.received = 0
        self.last_active = 0.0  # time.monotonic() of the last piece passed on
        self.finished = gevent.event.Event()  # set once DONE or BROKEN

    def start(self) -> bool:
        """The server asks for the body: True the first time, while nobody answered without it."""
        if self.state != WAITING:
            return False
        self.state = FETCHING
        self.last_active = time.monotonic()
        return True

    def refuse(self) -> bool:
        """The answer came before the server asked for the body: True if it never will get it now."""
        if self.state != WAITING:
            return False
        self.state = REFUSED
        return True

    def _end(self, state: str) -> None:
        self.state = state
        self.finished.set()


def fetch(rv: Rendezvous, p: PendingRequest, upload: Upload, cut: Callable[[], bool]) -> Iterator[bytes]:
    """The body of the server's GET: the client's body, piece by piece as it arrives.

    Call only after `upload.start()`. When the client's body breaks off or
    passes the limit, `cut()` cuts the server's GET (UploadBrokeOffError
    when it cannot) and the client is answered 400 or 413. The GET is the
    server's connection, or, in a cluster, the peer link to the node that
    has it (cluster/streams.py).
    """
    client_environ = upload.environ
    failure: tuple[str, int] | None = None
    ended = False
    try:
        send_continue(client_environ)
        yield b""  # the status and headers go out now
        for piece in iter_body(client_environ, PIECE_BYTES):
            upload.received += len(piece)
            if upload.limit and upload.received > upload.limit:
                raise _Broken(f"request body passed max_request_body_bytes ({upload.limit})", 413)
            upload.last_active = time.monotonic()
            yield piece
        if upload.length is not None and upload.received != upload.length:
            raise _Broken(f"request body ended after {upload.received} of its {upload.length} bytes", 400)
        ended = True
    except _Broken as e:
        failure = e.args[0], e.args[1]
    except Exception as e:  # noqa: BLE001 - the WSGI server's body reader: OSError or its parse errors
        failure = f"the client's upload broke off ({type(e).__name__})", 400
    finally:
        if not ended and failure is None:
            # The server's GET went away mid-body (GeneratorExit). The client's
            # connection cannot carry another request now: its answer closes it.
            logger.info("request %s: the server stopped fetching the body", p.request.id)
            upload._end(BROKEN)
    if failure is None:
        upload._end(DONE)
        logger.debug("request %s: body of %d bytes fetched", p.request.id, upload.received)
        return
    reason, status = failure
    logger.info("request %s: %s; cutting the server's fetch", p.request.id, reason)
    upload._end(BROKEN)
    rv.fail(p, reason, status)
    if not cut():
        raise UploadBrokeOffError(reason)


def body_source(rv: Rendezvous, fw: PortForwarding, request_id: str, key_matches: Callable[[str], bool],
                wait_secs: float) -> ForwardedConnection | tuple[PendingRequest, Upload]:
    """What a server's body GET of `request_id` reads: a WebSocket's connection, or a request's body.

    `key_matches(tripcode)` says whether the GET's key is the one of the
    server with that tripcode (ForbiddenError if not). For a WebSocket
    handshake whose 101 has not come yet, waits up to `wait_secs` for it.
    UnknownRequestError (404) for an unknown request, one without a body, or
    a body fetched already. The GET's node calls this, or in a cluster the
    node that holds the request's client (cluster/streams.py).
    """
    conn = fw.connections.get(request_id)
    if conn is not None and conn.port == WEBSOCKET_PORT:
        state = rv.servers.get(conn.server)
        if state is None or not key_matches(state.registered.tripcode):
            raise ForbiddenError(f"request {request_id!r} belongs to another server")
        return conn
    p = rv.pending.get(request_id)
    if p is None or p.cancelled:
        raise UnknownRequestError(f"no request {request_id[:64]!r} is in flight")
    if not key_matches(p.server.registered.tripcode):
        raise ForbiddenError(f"request {request_id!r} belongs to another server")
    if p.request.upgrade is not None:  # the 101 may come after this GET
        p.head_ready.wait(wait_secs)
        if p.tunnel is None:
            raise UnknownRequestError(f"request {request_id[:64]!r} was not switched to a WebSocket")
        tunnel: ForwardedConnection = p.tunnel
        return tunnel
    deadline = time.monotonic() + ATTACH_WAIT_SECS
    while p.upload is None and p.request.body is not None and time.monotonic() < deadline:
        gevent.sleep(ATTACH_POLL_SECS)
    upload = p.upload
    if not isinstance(upload, Upload) or not upload.start():
        raise UnknownRequestError(f"request {request_id[:64]!r} has no body to fetch (none, or fetched already)")
    return p, upload


class _Broken(Exception):
    """(reason, status): the body cannot be passed on whole."""


def watch_client(upload: Upload, waiter: gevent.Greenlet) -> None:
    """End `waiter` (ListenEndedError) if the client hangs up before the response head.

    Before the fetch the body is unread, so only a poll tells an end from
    data; during it, the fetch sees the end; after it, the client sends
    nothing more, so a readable connection means it hung up.
    """
    sock = connection_socket(upload.environ)
    if sock is None:
        return
    while upload.state == WAITING:
        if has_hung_up(sock):
            gevent.kill(waiter, ListenEndedError)
            return
        gevent.sleep(HANGUP_CHECK_SECS)
    upload.finished.wait()
    if upload.state == DONE and wait_for_hangup(sock):
        gevent.kill(waiter, ListenEndedError)
