"""Delivery both ways between the rendezvous and a server's connections.

- To the server: a listen's answer may be lost on the way (a NAT box or
  proxy cutting the connection as it is written). For a server that
  acknowledges, `hold_lease` keeps the batch until the acknowledgement and
  puts it back in the queue without one (exactly once, PROTOCOL.md
  "Acknowledged delivery"); for one that does not, `requeue_if_lost` takes
  the batch back if the listen's connection dies (a best guess).
- From the server: `deliver_answer` hands a small answer that rode on a
  listen to its client whole; `deliver` streams a response POST's body to the waiting
  client through the rendezvous and answers the POST only when the client
  has it all (P7); a body that breaks off, or a client that leaves, cuts
  both connections instead of ending cleanly. `refuse` answers a POST
  without reading its body.

The connections are reached through wsgi.py; the relay's state stays in
rendezvous.py.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterator

import gevent
from werkzeug.wrappers import Request, Response

from ptth_lib.errors import HttpError, ProtocolError
from ptth_lib.relay.rendezvous import (
    ACK_AFTER_CLOSE_SECS,
    LEASE_SECS,
    Lease,
    PendingRequest,
    Rendezvous,
)
from ptth_lib.relay.responses import text
from ptth_lib.wire.envelope import (
    MAX_ANSWERS_BYTES,
    RESPONSE_HEAD_HEADER,
    BadAnswer,
    InlineAnswer,
    ServerResponseHead,
    decode_answers,
    decode_response_head,
)
from ptth_lib.wsgi import connection_ended, cut_connection, iter_body

logger = logging.getLogger(__name__)

# Largest piece of a server's POST body handed to the client at once: the
# server's own chunk size, so each chunk crosses the relay as one piece.
RELAY_CHUNK_BYTES = 256 * 1024

# How long after a listen's answer the relay watches its connection for a
# cut (see requeue_if_lost); ptth_server re-polls within milliseconds.
LISTEN_LEASE_SECS = 10.0
# For a server that does not acknowledge (spec 002): when a listen's connection
# ends, requests still unanswered this long afterwards are taken back.
LISTEN_CLOSE_GRACE_SECS = 0.3

# A refused POST body up to this size is read and dropped, so the connection
# can be reused; past it, reading would cost more than a new connection.
SMALL_BODY_BYTES = 64 * 1024


def deliver(rv: Rendezvous, p: PendingRequest, req: Request,
            on_switch: Callable[[PendingRequest, ServerResponseHead, Request], Response] | None = None,
            ) -> Response:
    """P5 to P7 for the response POST of `p`: hand the head to the client, copy the body.

    Answers 200 once the client has it all, 400 if the body broke off, 410
    if the client left. A head 101 (only for a WebSocket handshake) goes to
    `on_switch`, which answers the POST instead.
    """
    environ = req.environ
    try:
        head = read_head(rv, p, req.headers.get(RESPONSE_HEAD_HEADER))
    except HttpError as e:
        return refuse(e.status, str(e), req)
    if head.status_code == 101:
        if on_switch is None:
            rv.fail(p, "the relay cannot carry this WebSocket")
            return refuse(501, "the relay cannot carry a WebSocket here", req)
        try:
            return on_switch(p, head, req)
        except HttpError as e:
            rv.fail(p, str(e), e.status)
            return refuse(e.status, str(e), req)
    rv.start_response(p, head)
    status, message = copy_body(rv, p, iter_body(environ, RELAY_CHUNK_BYTES), req.content_length)
    if status != 200:
        cut_connection(environ)
    return text(status, message)


def read_answers(req: Request) -> list[InlineAnswer | BadAnswer]:
    """The answers a POSTed listen carries (PROTOCOL.md); HttpError 411/413/400 if they cannot be read.

    Read whole, at most MAX_ANSWERS_BYTES, and only after the server's key
    was checked.
    """
    length = req.content_length
    if length is None:
        raise HttpError("a listen carrying answers needs a Content-Length", 411)
    if length > MAX_ANSWERS_BYTES:
        raise HttpError(f"a listen's answers may take {MAX_ANSWERS_BYTES} bytes at most", 413)
    data = b"".join(iter_body(req.environ, RELAY_CHUNK_BYTES))
    if len(data) != length:
        raise HttpError("the listen's body broke off", 400)
    try:
        return decode_answers(data)
    except ProtocolError as e:
        raise HttpError(f"malformed answers: {e}", 400) from None


def deliver_answer(rv: Rendezvous, p: PendingRequest, answer: InlineAnswer) -> None:
    """A complete small response a listen carried: head and body to the client of `p`, at once.

    Nothing waits for the client to read it: it is whole, and small, and the
    client's own greenlet sends it (or drops it, if the client left). A body
    that does not match its head fails `p` (502), as a response POST would.
    """
    head, body = answer.head, answer.body
    length = head.headers.get("content-length")
    # A HEAD, 204 or 304 answer's body is not sent on (the client's side skips it, as for a POST).
    bodiless = p.request.method == "HEAD" or head.status_code in (204, 304)
    if not bodiless and (length is None or int(length) != len(body)):
        logger.warning("bad answer for request %s from server %s: its body does not match its content-length",
                       p.request.id, p.server.registered.name)
        rv.fail(p, f"server {p.server.registered.name!r} sent a bad response: its length is wrong")
        return
    rv.start_response(p, head)
    rv.put_whole_body(p, body)


def read_head(rv: Rendezvous, p: PendingRequest, header: str | None) -> ServerResponseHead:
    """The response head a server's POST carries for `p`; a bad one fails `p` (502) and raises 400."""
    try:
        head = decode_response_head(header)
        if head.status_code == 101 and p.request.upgrade is None:
            raise ProtocolError("status 101 answers only an upgrade request")
    except ProtocolError as e:
        logger.warning("bad response head for request %s from server %s: %s", p.request.id,
                       p.server.registered.name, e)
        rv.fail(p, f"server {p.server.registered.name!r} sent a bad response: {e}")
        raise HttpError(f"bad response head: {e}", 400) from None
    return head


def copy_body(rv: Rendezvous, p: PendingRequest, pieces: Iterator[bytes], declared: int | None,
              ) -> tuple[int, str]:
    """Copy a response body from `pieces` to the client of `p`; the answer for the server's POST.

    200 once the client has it all; 410 as soon as the client is gone (the
    caller cuts the upload: it need not read the rest); 400 if the body broke
    off or came short of `declared`. `pieces` is the POST's own body, or, in a
    cluster, the pieces another node reads from it (cluster/peering.py).
    """
    received = 0
    complete = True
    while True:
        try:
            chunk = next(pieces, b"")
        except Exception as e:  # noqa: BLE001 - the body's reader: OSError, the WSGI server's or a peer link's errors
            logger.warning("response body of request %s broke off: %s", p.request.id, type(e).__name__)
            complete = False
            break
        if not chunk:
            break
        received += len(chunk)
        if not rv.put_chunk(p, chunk):
            logger.info("client of request %s is gone; stopping the server's upload", p.request.id)
            return 410, "the client is gone"
    if declared is not None and received != declared:
        complete = False
    delivered = rv.end_body(p, complete)
    if not complete:
        return 400, "response body broke off"
    if not delivered:
        return 410, "the client is gone"
    return 200, "delivered"


def hold_lease(rv: Rendezvous, sock: socket.socket | None, lease: Lease) -> None:
    """Wait for the server to acknowledge a batch; without it, the batch goes back to the queue.

    The acknowledgement comes with the server's next listen, within
    milliseconds and on whatever connection (a proxy in front may use a new
    one for every request); `Rendezvous.ack` then ends this greenlet. If the
    listen's connection ends first, the answer may not have arrived: then a
    shorter wait.
    """
    try:
        deadline = time.monotonic() + LEASE_SECS
        ended = sock is not None and connection_ended(sock, LEASE_SECS)
        if not lease.acked.is_set():
            lease.acked.wait(ACK_AFTER_CLOSE_SECS if ended else max(0.0, deadline - time.monotonic()))
        # A connection this relay closed itself lost nothing: it is stopping, and gunicorn closes
        # kept-alive connections after their answer. The server's next listen may take a while
        # to find another worker (the relay learns it is stopping within WORKER_CHECK_SECS).
        if ended and rv.closing and not lease.acked.is_set():
            lease.acked.wait(max(0.0, deadline - time.monotonic()))
    except gevent.GreenletExit:
        return  # acknowledged
    if not lease.acked.is_set():
        returned = rv.expire_lease(lease)
        if returned:
            logger.info("listen of %s not acknowledged; %d requests back in the queue",
                        lease.server.registered.name, returned)

def requeue_if_lost(rv: Rendezvous, sock: socket.socket, batch: list[PendingRequest]) -> None:
    """For a server that does not acknowledge: take a listen's requests back if its connection dies.

    A connection cut by a NAT box or proxy just as the answer is written can
    swallow it (the write succeeds, then the connection resets). Such a
    server re-polls on the same connection at once, so its next bytes there
    confirm that the answer arrived; an end of file instead means it may not
    have, and the requests go back to the queue for the next listen. This is
    a guess (a proxy that closes after every answer makes it wrong, and a slow
    answer is then handed out twice); servers that acknowledge get exactly
    once instead (`hold_lease`).
    """
    if not connection_ended(sock, LISTEN_LEASE_SECS):
        return
    # Some clients close after every listen: give the server a moment to answer.
    gevent.sleep(LISTEN_CLOSE_GRACE_SECS)
    returned = rv.requeue(batch)
    if returned:
        logger.info("listen connection lost after taking %d requests; %d back in the queue",
                    len(batch), returned)


def refuse(status: int, message: str, req: Request) -> Response:
    """Answer a server's POST without reading its body.

    A small body is left for the WSGI server to discard; a large or chunked
    one is not read at all: the connection is shut once the answer is out.
    """
    resp = text(status, message)
    length = req.content_length
    if length is None or length > SMALL_BODY_BYTES:
        environ = req.environ
        resp.call_on_close(lambda: cut_connection(environ))
    return resp
