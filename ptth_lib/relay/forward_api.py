"""The relay's routes for TCP port forwarding (spec 003), thin over forwarding.py.

All POSTs (PROTOCOL.md has the details):

- servers, with their own key as for http_listen:
  `/7ZSFUKGV/tcp_listen/<server>/<port>` (long-poll: 200 with the connection
  id in a header, or 204), `/7ZSFUKGV/tcp_accept/<id>` (response body: the
  client's bytes), `/7ZSFUKGV/tcp_refuse/<id>` (request body: the reason),
  `/7ZSFUKGV/tcp_downstream/<id>` (request body: bytes for the client);
- clients, with a key from a `[[clients]]` table:
  `/frontend/tcp/connect/<server>/<port>` (200 once the server accepts, with
  the id in a header; response body: the server's bytes) and
  `/frontend/tcp/upstream/<id>` (request body: bytes for the server), and
  `/frontend/tcp/check` (which client a key is, and what it may reach).

Bytes move as HTTP/1.1 chunks and each hop passes a chunk on as soon as it
has it: the relay reads request bodies with `wsgi.iter_body` (never
`read(n)`, which waits for n bytes), and writes each piece as a chunk of its
own. Who is asking (a server's key, a client's key, the address) is the
`Relay`'s to check (relay.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import gevent
from flask import Flask, Response, jsonify, request
from werkzeug.wrappers import Response as WsgiResponse

from ptth_lib.config import RegisteredClient
from ptth_lib.errors import BadNameError, ForbiddenError, HttpError, RefusedError
from ptth_lib.relay.forwarding import (
    PIECE_BYTES,
    ForwardedConnection,
    Pipe,
    PipeAbortedError,
    PortForwarding,
)
from ptth_lib.relay.rendezvous import ListenEndedError
from ptth_lib.relay.responses import text
from ptth_lib.wire.envelope import (
    API_KEY_HEADER,
    CLIENT_NAME_HEADER,
    CONNECTION_ID_HEADER,
    TCP_ACCEPT_PATH,
    TCP_CHECK_PATH,
    TCP_CONNECT_PATH,
    TCP_DOWNSTREAM_PATH,
    TCP_LISTEN_PATH,
    TCP_REFUSE_PATH,
    TCP_UPSTREAM_PATH,
)
from ptth_lib.wire.names import PORT_NAME_RE, short_id
from ptth_lib.wsgi import (
    connection_socket,
    cut_connection,
    iter_body,
    reads_promptly,
    wait_for_hangup,
    watch_for_hangup,
)

if TYPE_CHECKING:
    from ptth_lib.relay.cluster.node import Node
    from ptth_lib.relay.relay import Relay

logger = logging.getLogger(__name__)

# Pieces already queued are joined into one write up to this size: fewer,
# larger writes when the sender is ahead, and no waiting when it is not.
MAX_WRITE_BYTES = 2 * PIECE_BYTES

# A server's refusal reason; anything longer is not read.
MAX_REFUSAL_BYTES = 1024

STREAM_HEADERS = {
    "Content-Type": "application/octet-stream",
    "Cache-Control": "no-store",
    "X-Accel-Buffering": "no",  # nginx: pass each chunk on at once
}


# ptth_tcp_connections{outcome} for a connect that got no connection.
_OUTCOMES = {502: "failed", 504: "timed_out"}


def register(app: Flask, relay: Relay) -> None:
    """Add the port forwarding routes to the relay's app."""
    fw = relay.forwarding
    metrics = relay.metrics

    def server_is(name: str) -> None:
        relay.authenticate_server(name, request)

    def client() -> RegisteredClient:
        try:
            return fw.authenticate_client(request.headers.get(API_KEY_HEADER))
        except ForbiddenError as e:
            metrics.tcp_auth_rejected.inc()
            relay.audit.record("client_key_rejected", address=relay.client_address(request), reason=str(e))
            raise

    def elsewhere(conn_id: str) -> Node | None:
        """In a cluster, the node to carry a call for `conn_id` with, when another node holds its client."""
        node = relay.node
        return node if node is not None and not conn_id.startswith(node.id) else None

    def server_key() -> str:
        """The server's key, for a call the connection's owner checks (cluster/streams.py)."""
        key = request.headers.get(API_KEY_HEADER)
        if not key:
            raise ForbiddenError("missing X-ApiKey header")
        return key

    def forbidden(conn_id: str) -> Callable[[str], None]:
        """What the owner's 403 does here: count and audit it, as a refused key here."""
        return lambda message: relay.reject_backend_key(request, ForbiddenError(message), request=conn_id[:64])

    @app.post(TCP_LISTEN_PATH.format(name="<server>", port="<port>"))
    def _listen(server: str, port: str) -> Response:
        _check_port_name(port)
        server_is(server)
        sock = connection_socket(request.environ)
        # Parked like a server's listen (relay.py), and as many: watched without a greenlet of its own.
        stop_watching = watch_for_hangup(sock, gevent.getcurrent(), ListenEndedError) if sock else None
        try:
            conn = fw.listen(server, port, relay.config.listen_timeout_secs)
        finally:
            if stop_watching is not None:
                stop_watching()
        if conn is None:
            return Response(status=204)
        logger.debug("tcp listen of %s:%s takes connection %s", server, port, short_id(conn.id))
        return Response(status=200, headers={CONNECTION_ID_HEADER: conn.id, CLIENT_NAME_HEADER: conn.client})

    @app.post(TCP_ACCEPT_PATH.format(id="<conn_id>"))
    def _accept(conn_id: str) -> WsgiResponse:
        if (node := elsewhere(conn_id)) is not None:
            _need_prompt_reads()
            from ptth_lib.relay.cluster import streams  # cluster mode only: it imports redis
            resp = streams.forward_tcp_accept(node, conn_id, server_key(), request, forbidden(conn_id))
            if resp.status_code == 200:
                metrics.tcp_connections.labels("accepted").inc()
            return resp
        conn = fw.find_for_server(conn_id, server_is)
        _need_prompt_reads()
        fw.accept(conn)
        metrics.tcp_connections.labels("accepted").inc()
        logger.info("connection %s open", conn.describe())
        return stream_out(fw, conn, conn.up, "accept", request.environ)

    @app.post(TCP_REFUSE_PATH.format(id="<conn_id>"))
    def _refuse(conn_id: str) -> WsgiResponse:
        node = elsewhere(conn_id)
        conn = fw.find_for_server(conn_id, server_is) if node is None else None
        reason = b""
        environ = request.environ
        for piece in iter_body(environ, MAX_REFUSAL_BYTES + 1):
            reason += piece
            if len(reason) > MAX_REFUSAL_BYTES:  # never read the rest, chunked or not
                resp = text(413, f"a refusal reason is at most {MAX_REFUSAL_BYTES} bytes")
                resp.call_on_close(lambda: cut_connection(environ))
                return resp
        if conn is None:
            assert node is not None
            from ptth_lib.relay.cluster import streams  # cluster mode only: it imports redis
            return streams.forward_tcp_refuse(node, conn_id, server_key(), reason.decode("utf-8", "replace"),
                                              forbidden(conn_id))
        fw.refuse(conn, reason.decode("utf-8", "replace"))
        return text(200, "refused")

    @app.post(TCP_DOWNSTREAM_PATH.format(id="<conn_id>"))
    def _downstream(conn_id: str) -> WsgiResponse:
        if (node := elsewhere(conn_id)) is not None:
            from ptth_lib.relay.cluster import streams  # cluster mode only: it imports redis
            return streams.forward_tcp_downstream(node, conn_id, server_key(), request, forbidden(conn_id))
        conn = fw.attach_downstream(fw.find_for_server(conn_id, server_is))
        return stream_in(fw, conn, conn.down, "downstream", request.environ)

    @app.post(TCP_CHECK_PATH)
    def _check() -> Response:
        who = client()
        return jsonify({"client": who.name, "allow": sorted(who.allow)})

    @app.post(TCP_CONNECT_PATH.format(server="<server>", port="<port>"))
    def _connect(server: str, port: str) -> Response:
        _check_port_name(port)
        who = client()
        _need_prompt_reads()
        try:
            conn = fw.connect(who, server, port)
        except ForbiddenError as e:
            relay.audit.record("tcp_connect_forbidden", client=who.name, server=server[:64], port=port,
                               address=relay.client_address(request), reason=str(e))
            metrics.tcp_connections.labels("forbidden").inc()
            raise
        except HttpError as e:
            outcome = "refused" if isinstance(e, RefusedError) else _OUTCOMES.get(e.status, "rejected")
            metrics.tcp_connections.labels(outcome).inc()
            raise
        resp = stream_out(fw, conn, conn.down, "connect", request.environ)
        resp.headers[CONNECTION_ID_HEADER] = conn.id
        return resp

    @app.post(TCP_UPSTREAM_PATH.format(id="<conn_id>"))
    def _upstream(conn_id: str) -> WsgiResponse:
        if (node := elsewhere(conn_id)) is not None:
            from ptth_lib.relay.cluster import streams  # cluster mode only: it imports redis
            return streams.forward_tcp_upstream(node, conn_id, client().name, request)
        conn = fw.attach_upstream(conn_id, client().name)
        return stream_in(fw, conn, conn.up, "upstream", request.environ)


def _check_port_name(port: str) -> None:
    if not PORT_NAME_RE.match(port):
        raise BadNameError("a port name is 1-64 characters of A-Z a-z 0-9 _ -")


def _need_prompt_reads() -> None:
    if not reads_promptly(request.environ):
        raise HttpError("TCP port forwarding needs the relay under gunicorn (conf/gunicorn.conf.py)",
                        status=501)


def stream_out(fw: PortForwarding, conn: ForwardedConnection, pipe: Pipe, stream: str,
               environ: dict[str, Any]) -> Response:
    """A response whose body is what `pipe` carries, chunk by chunk, as it arrives.

    Also a WebSocket's bytes from the client to the server (upgrade.py).
    """
    sock = connection_socket(environ)
    fw.add_socket(conn, stream, sock)

    def watch() -> None:
        if sock is not None and wait_for_hangup(sock):
            fw.abort(conn, f"{stream} stream: the peer hung up")

    def body() -> Iterator[bytes]:
        # Nothing else notices a proxy that is gone while no bytes flow this way.
        watcher = gevent.spawn(watch)
        try:
            yield b""  # an empty first piece: the status and headers go out now
            yield from pump_out(fw, conn, pipe, stream, lambda: cut_connection(environ))
        finally:
            watcher.kill(block=False)

    return Response(body(), 200, headers=STREAM_HEADERS)


def pump_out(fw: PortForwarding, conn: ForwardedConnection, pipe: Pipe, stream: str,
             cut: Callable[[], object]) -> Iterator[bytes]:
    """What `pipe` carries, piece by piece (ready pieces joined), until its clean end.

    At an abort, `cut()` is called (the taker must see a cut, not a clean end)
    and the pieces stop; a taker that stops taking (the generator closed
    early) aborts the connection. The taker is a response body, or, in a
    cluster, the peer link to the node where the stream's HTTP connection is
    (cluster/streams.py).
    """
    ended = False
    try:
        while (piece := pipe.get()) is not None:
            yield piece + pipe.get_ready(MAX_WRITE_BYTES - len(piece))
        ended = True
    except PipeAbortedError:
        cut()
        return
    finally:
        if ended:
            fw.finish(conn, stream)
        elif not conn.aborted:  # the taker stopped early: its peer is gone
            fw.abort(conn, f"{stream} stream closed")


def stream_in(fw: PortForwarding, conn: ForwardedConnection, pipe: Pipe, stream: str,
              environ: dict[str, Any]) -> Response:
    """Copy this request's body into `pipe`; its clean end ends the pipe (a half-close).

    Also a WebSocket's bytes from the server to the client (upgrade.py).
    """
    fw.add_socket(conn, stream, connection_socket(environ))
    status, message = pump_in(fw, conn, pipe, stream, iter_body(environ, PIECE_BYTES))
    if status != 200:
        cut_connection(environ)
    return text(status, message)


def pump_in(fw: PortForwarding, conn: ForwardedConnection, pipe: Pipe, stream: str,
            pieces: Iterator[bytes]) -> tuple[int, str]:
    """Copy `pieces` into `pipe`; their clean end ends the pipe (a half-close). The answer for the sender.

    200 at the clean end; 410 if the connection was aborted meanwhile; 400
    (and the connection aborted) if the pieces broke off. `pieces` is a
    request body, or, in a cluster, a peer link's (cluster/streams.py); on
    anything but 200 the caller cuts whatever they come from.
    """
    try:
        for piece in pieces:
            pipe.put(piece)
        pipe.end()
    except PipeAbortedError:
        return 410, "the connection was closed"
    except Exception as e:  # noqa: BLE001 - the body's reader: OSError, the WSGI server's or a peer link's errors
        fw.abort(conn, f"{stream} broke off ({type(e).__name__})")
        return 400, f"{stream} broke off"
    fw.finish(conn, stream)
    return 200, f"{stream} ended"
