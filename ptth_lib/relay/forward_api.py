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
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import gevent
from flask import Flask, Response, jsonify, request

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
from ptth_lib.wire.names import PORT_NAME_RE
from ptth_lib.wsgi import (
    connection_socket,
    cut_connection,
    end_on_hangup,
    iter_body,
    reads_promptly,
    wait_for_hangup,
)

if TYPE_CHECKING:
    from ptth_lib.relay.relay import Relay

logger = logging.getLogger(__name__)

# Pieces already queued are joined into one write up to this size: fewer,
# larger writes when the sender is ahead, and no waiting when it is not.
MAX_WRITE_BYTES = 2 * PIECE_BYTES

# A server's refusal reason; anything longer is not read.
MAX_REFUSAL_BYTES = 1024

_STREAM_HEADERS = {
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

    @app.post(TCP_LISTEN_PATH.format(name="<server>", port="<port>"))
    def _listen(server: str, port: str) -> Response:
        _check_port_name(port)
        server_is(server)
        sock = connection_socket(request.environ)
        watcher = gevent.spawn(end_on_hangup, sock, gevent.getcurrent(), ListenEndedError) if sock else None
        try:
            conn = fw.listen(server, port, relay.config.listen_timeout_secs)
        finally:
            if watcher is not None:
                watcher.kill()
        if conn is None:
            return Response(status=204)
        logger.debug("tcp listen of %s:%s takes connection %s", server, port, conn.id[:8])
        return Response(status=200, headers={CONNECTION_ID_HEADER: conn.id, CLIENT_NAME_HEADER: conn.client})

    @app.post(TCP_ACCEPT_PATH.format(id="<conn_id>"))
    def _accept(conn_id: str) -> Response:
        conn = fw.find_for_server(conn_id, server_is)
        _need_prompt_reads()
        fw.accept(conn)
        metrics.tcp_connections.labels("accepted").inc()
        logger.info("connection %s open", conn.describe())
        return stream_out(fw, conn, conn.up, "accept", request.environ)

    @app.post(TCP_REFUSE_PATH.format(id="<conn_id>"))
    def _refuse(conn_id: str) -> Response:
        conn = fw.find_for_server(conn_id, server_is)
        reason = b""
        environ = request.environ
        for piece in iter_body(environ, MAX_REFUSAL_BYTES + 1):
            reason += piece
            if len(reason) > MAX_REFUSAL_BYTES:  # never read the rest, chunked or not
                resp = text(413, f"a refusal reason is at most {MAX_REFUSAL_BYTES} bytes")
                resp.call_on_close(lambda: cut_connection(environ))
                return resp
        fw.refuse(conn, reason.decode("utf-8", "replace"))
        return text(200, "refused")

    @app.post(TCP_DOWNSTREAM_PATH.format(id="<conn_id>"))
    def _downstream(conn_id: str) -> Response:
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
    def _upstream(conn_id: str) -> Response:
        conn = fw.attach_upstream(conn_id, client())
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
        ended = False
        # Nothing else notices a proxy that is gone while no bytes flow this way.
        watcher = gevent.spawn(watch)
        try:
            yield b""  # an empty first piece: the status and headers go out now
            while (piece := pipe.get()) is not None:
                yield piece + pipe.get_ready(MAX_WRITE_BYTES - len(piece))
            ended = True
        except PipeAbortedError:
            cut_connection(environ)  # a cut, not the last chunk: the proxy must not see a clean end
            return
        finally:
            watcher.kill(block=False)
            if ended:
                fw.finish(conn, stream)
            else:  # the WSGI server closed us early: its peer is gone
                fw.abort(conn, f"{stream} stream closed")

    return Response(body(), 200, headers=_STREAM_HEADERS)


def stream_in(fw: PortForwarding, conn: ForwardedConnection, pipe: Pipe, stream: str,
              environ: dict[str, Any]) -> Response:
    """Copy this request's body into `pipe`; its clean end ends the pipe (a half-close).

    Also a WebSocket's bytes from the server to the client (upgrade.py).
    """
    fw.add_socket(conn, stream, connection_socket(environ))
    try:
        for piece in iter_body(environ, PIECE_BYTES):
            pipe.put(piece)
        pipe.end()
    except PipeAbortedError:
        cut_connection(environ)
        return text(410, "the connection was closed")
    except Exception as e:  # noqa: BLE001 - the WSGI server's body reader: OSError or its parse errors
        fw.abort(conn, f"{stream} broke off ({type(e).__name__})")
        cut_connection(environ)
        return text(400, f"{stream} broke off")
    fw.finish(conn, stream)
    return text(200, f"{stream} ended")

