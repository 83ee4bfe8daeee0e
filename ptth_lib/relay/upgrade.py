"""WebSocket through the tunnel: a client's connection carried as a forwarded connection.

A client's `GET` with `Upgrade: websocket` goes to a server that announced
`websocket` as a request with `"upgrade": "websocket"` (PROTOCOL.md "Web
apps"). When the app switches protocols, the server's response POST carries
head 101, and from then on the WebSocket is a TCP connection of port
forwarding (forwarding.py), with the same bounded pipes, half-closes, cuts
and idle limit (`tcp_idle_timeout_secs`):

    client socket --read-->  [up pipe]   --body GET of the id-->       server
    client socket <-write--  [down pipe] <--response POST's body--     server

Its four streams are the client's connection written ("connect") and read
("upstream"), the server's body GET ("accept") and response POST
("downstream"). The client's side leaves HTTP: `SwitchedResponse` takes the
connection over from gunicorn (wsgi.py), writes `HTTP/1.1 101 Switching
Protocols` and the app's handshake headers, then carries raw bytes. A 101 is
only ever written to a client whose request was a WebSocket handshake.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any

import gevent
from werkzeug.wrappers import Response

from ptth_lib.errors import HttpError, UnknownRequestError
from ptth_lib.relay.forward_api import MAX_WRITE_BYTES, stream_in, stream_out
from ptth_lib.relay.forwarding import (
    PIECE_BYTES,
    ForwardedConnection,
    PipeAbortedError,
    PortForwarding,
)
from ptth_lib.relay.rendezvous import PendingRequest, Rendezvous
from ptth_lib.wire.envelope import ServerResponseHead
from ptth_lib.wsgi import handled, take_over

logger = logging.getLogger(__name__)

# The upgrade a relayed request may ask for.
WEBSOCKET = "websocket"


def wants_websocket(environ: dict[str, Any]) -> bool:
    """Tell whether a request is a WebSocket handshake.

    An Upgrade header that Connection does not name is no upgrade (RFC 9110
    7.8), and one to another protocol (`h2c`, as `curl --http2` sends) is
    ignored, as RFC 9110 lets a server do: either way it is dropped as
    hop-by-hop and the request is answered as usual. (nginx's usual config,
    the README's, names `upgrade` in Connection whenever Upgrade is there.)
    """
    upgrade = environ.get("HTTP_UPGRADE", "")
    connection = {t.strip().lower() for t in environ.get("HTTP_CONNECTION", "").split(",")}
    if not upgrade or "upgrade" not in connection:
        return False
    protocols = {t.strip().lower().partition("/")[0] for t in upgrade.split(",")}
    if WEBSOCKET not in protocols:
        return False
    if environ.get("REQUEST_METHOD") != "GET":
        raise HttpError("a WebSocket handshake is a GET", status=400)
    return True


def server_switched(fw: PortForwarding, rv: Rendezvous, p: PendingRequest, head: ServerResponseHead,
                    environ: dict[str, Any]) -> Response:
    """The server's response POST with head 101: its body is the app's bytes for the client."""
    conn = open_tunnel(fw, rv, p, head)
    return stream_in(fw, conn, conn.down, "downstream", environ)


def open_tunnel(fw: PortForwarding, rv: Rendezvous, p: PendingRequest, head: ServerResponseHead,
                ) -> ForwardedConnection:
    """The app switched: carry the WebSocket of `p` as a connection, and hand the 101 to its client.

    The caller then copies the response POST's body into the connection's
    down pipe (its "downstream" stream): the POST's own body, or in a
    cluster, a peer link's (cluster/streams.py).
    """
    conn = fw.open_websocket(p.request.id, f"websocket from {p.share.key[1] if p.share else '?'}",
                             p.server.registered.name)
    conn.attached.add("downstream")
    p.tunnel = conn
    rv.start_response(p, head)  # the client's greenlet takes its connection over
    return conn


def server_reads(fw: PortForwarding, conn: ForwardedConnection, environ: dict[str, Any]) -> Response:
    """The server's body GET of a WebSocket: the client's bytes for the app."""
    attach_reads(conn)
    return stream_out(fw, conn, conn.up, "accept", environ)


def attach_reads(conn: ForwardedConnection) -> None:
    """The server's body GET of a WebSocket becomes its "accept" stream; 404 if it has one already."""
    if "accept" in conn.attached:
        raise UnknownRequestError(f"the client's bytes of {conn.id[:64]!r} are being fetched already")
    conn.attached.add("accept")


class SwitchedResponse(Response):
    """The client's side once the app switched to WebSocket: no longer HTTP after the 101.

    Called by the WSGI server like any response, it takes the connection
    over, carries the bytes both ways until both directions have ended (or
    the connection is aborted), and tells gunicorn the connection was handled.
    """

    def __init__(self, fw: PortForwarding, conn: ForwardedConnection, headers: list[tuple[str, str]],
                 on_end: Callable[[], None]) -> None:
        super().__init__(status=101)
        self._fw = fw
        self._conn = conn
        self._head = ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n").encode("latin-1")
        self.call_on_close(on_end)

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        fw, conn = self._fw, self._conn
        try:
            sock, ahead = take_over(environ)
            fw.add_socket(conn, "connect", sock)
            fw.add_socket(conn, "upstream", sock)
            conn.attached.update(("connect", "upstream"))
            sock.sendall(self._head)
            reader = gevent.spawn(self._client_to_app, sock, ahead)
            try:
                self._app_to_client(sock)
            finally:
                reader.join()
        except OSError as e:
            fw.abort(conn, f"the client's connection broke ({type(e).__name__})")
        finally:
            self.close()
            logger.info("websocket %s closed: %d bytes to the app, %d to the client", conn.describe(),
                        conn.up.bytes, conn.down.bytes)
        return handled()

    def _app_to_client(self, sock: socket.socket) -> None:
        fw, conn, pipe = self._fw, self._conn, self._conn.down
        try:
            while (piece := pipe.get()) is not None:
                sock.sendall(piece + pipe.get_ready(MAX_WRITE_BYTES - len(piece)))
            sock.shutdown(socket.SHUT_WR)  # the app's half-close, passed on
        except PipeAbortedError:
            return  # abort() shut the socket: the client sees a cut
        except OSError as e:
            fw.abort(conn, f"writing to the client failed ({type(e).__name__})")
            return
        fw.finish(conn, "connect")

    def _client_to_app(self, sock: socket.socket, ahead: bytes) -> None:
        fw, conn, pipe = self._fw, self._conn, self._conn.up
        try:
            if ahead:
                pipe.put(ahead)
            while data := sock.recv(PIECE_BYTES):
                pipe.put(data)
            pipe.end()  # the client's half-close, passed on
        except PipeAbortedError:
            return
        except OSError as e:
            fw.abort(conn, f"reading from the client failed ({type(e).__name__})")
            return
        fw.finish(conn, "upstream")
