"""Streams carried to the node that owns them: request bodies, WebSockets, forwarded connections.

CLUSTER.md section 4. The **owner** of a request or a forwarded connection
is the node holding its client's connection (its id starts with the node's
id). It keeps the `Upload` or the `ForwardedConnection` with its pipes, and
runs the single process's loops on them (request_body.py, forward_api.py,
upgrade.py). Any other stream of that id may land on any node, which carries
it to the owner over a peer link of its own (peering.py): one link per
stream, for as long as the stream lasts. Three shapes of call:

- **download** (the owner's bytes go out on the stream's HTTP connection): a
  server's body GET (a request's body, or a WebSocket's bytes from its
  client) and `tcp_accept`. The opener sends its head; the owner answers a
  head (`{"status": 200}`, or an error's status and message), the bytes,
  and its end. The opener ends its own direction once its HTTP response is
  complete, so a link that closes before that is the GET gone: the owner
  aborts the stream, as a hang-up does in one process.
- **upload** (the stream's request body goes to the owner): `tcp_downstream`,
  `tcp_upstream`, and a WebSocket's 101 response POST (node.py's `respond`
  call, which passes it to `Streams.switched`). The opener streams the body
  and its end; the owner copies it into the pipe and answers
  `{"status", "message"}` once the pipe took it all, or at once when the
  connection is aborted (the link is then cut, and the opener cuts the
  POST).
- **call** (a head each way): `tcp_refuse`.

Keys never leave the node that got them: it checks a client's key itself and
passes a server's key as its tripcode, which the owner compares with the
server's registered one (as for response POSTs, node.py). A 403 from the
owner reaches the opener's `on_forbidden`, for the audit log.

Backpressure is end to end: the owner takes the next piece from a link only
when the pipe has room, and the opener reads the next piece only when its
HTTP connection took the last; each hop holds one piece beyond the sockets'
buffers.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import gevent
from werkzeug.wrappers import Request, Response

from ptth_lib.errors import ForbiddenError, HttpError
from ptth_lib.relay.cluster.peering import PeerCutError, PeerLink
from ptth_lib.relay.cluster.store import NODE_ID_CHARS, ClusterUnavailableError
from ptth_lib.relay.delivery import RELAY_CHUNK_BYTES, SMALL_BODY_BYTES, refuse
from ptth_lib.relay.forward_api import STREAM_HEADERS, pump_in, pump_out
from ptth_lib.relay.forwarding import ForwardedConnection, Pipe, PortForwarding
from ptth_lib.relay.rendezvous import PendingRequest, Rendezvous
from ptth_lib.relay.request_body import BODY_HEADERS, body_source, fetch
from ptth_lib.relay.responses import text
from ptth_lib.relay.upgrade import attach_reads, open_tunnel
from ptth_lib.wire import tripcode
from ptth_lib.wire.envelope import InlineAnswer, ServerResponseHead, encode_response_head
from ptth_lib.wsgi import connection_socket, cut_connection, iter_body, wait_for_hangup

if TYPE_CHECKING:
    from ptth_lib.relay.cluster.node import Node

logger = logging.getLogger(__name__)

OnForbidden = Callable[[str], None]


def _ignore(message: str) -> None:
    pass


# ---- the opener: the node that got the stream's HTTP request ----------------------------


def forward_body(node: Node, request_id: str, key: str, req: Request,
                 on_forbidden: OnForbidden = _ignore) -> Response:
    """A server's body GET for a request (or WebSocket) whose client is on another node."""
    head = {"kind": "body", "id": request_id, "tripcode": tripcode.derive(key)}
    return _download(node, request_id, head, req, BODY_HEADERS, on_forbidden)


def forward_tcp_accept(node: Node, conn_id: str, key: str, req: Request,
                       on_forbidden: OnForbidden = _ignore) -> Response:
    """A server's tcp_accept for a connection whose client is on another node."""
    head = {"kind": "tcp_accept", "id": conn_id, "tripcode": tripcode.derive(key)}
    return _download(node, conn_id, head, req, STREAM_HEADERS, on_forbidden)


def forward_tcp_refuse(node: Node, conn_id: str, key: str, reason: str,
                       on_forbidden: OnForbidden = _ignore) -> Response:
    """A server's tcp_refuse (its reason read already) for a connection whose client is on another node."""
    link = _open(node, conn_id, {"kind": "tcp_refuse", "id": conn_id, "tripcode": tripcode.derive(key),
                                 "reason": reason})
    if isinstance(link, Response):
        return link
    try:
        link.end()
        answer = link.read_head()
    except PeerCutError:
        link.close()
        return text(502, "the relay worker that holds this connection's client was cut off")
    _finish_call(link)
    return _answer_response(answer, on_forbidden)


def forward_tcp_downstream(node: Node, conn_id: str, key: str, req: Request,
                           on_forbidden: OnForbidden = _ignore) -> Response:
    """A server's tcp_downstream for a connection whose client is on another node."""
    head = {"kind": "tcp_downstream", "id": conn_id, "tripcode": tripcode.derive(key)}
    return forward_upload(node, conn_id, head, req, on_forbidden)


def forward_tcp_upstream(node: Node, conn_id: str, client: str, req: Request) -> Response:
    """A client's tcp_upstream (its key checked here: `client` is its name) for a connection held elsewhere."""
    return forward_upload(node, conn_id, {"kind": "tcp_upstream", "id": conn_id, "client": client}, req)


def forward_upload(node: Node, owned_id: str, head: dict[str, Any], req: Request,
                   on_forbidden: OnForbidden = _ignore) -> Response:
    """Carry a POST's body to the owner of `owned_id` as it arrives; answer with the owner's answer.

    An early answer (the owner's connection aborted, a 403) stops reading the
    POST: as `refuse` does, a small body is left for gunicorn to discard, and
    a large or chunked one is cut once the answer is out. A link cut before
    the answer cuts the POST at once.
    """
    environ = req.environ
    link = _open(node, owned_id, head, req)
    if isinstance(link, Response):
        return link
    sender = gevent.spawn(_send_body, link, environ)
    try:
        answer = link.read_head()
    except PeerCutError:
        sender.kill()
        link.close()
        cut_connection(environ)
        return text(410, "the connection was closed")
    if not sender.dead and _status(answer) != 200:
        sender.kill()  # an early answer: stop reading the POST
        link.abort()
        response = _answer_response(answer, on_forbidden)
        length = req.content_length
        if length is None or length > SMALL_BODY_BYTES:
            response.call_on_close(lambda: cut_connection(environ))
        return response
    sender.join()
    _finish_call(link)
    return _answer_response(answer, on_forbidden)


def forward_answer(node: Node, answer: InlineAnswer, code: str) -> None:
    """Carry a small answer that rode on a listen to the node that holds its client (a greenlet).

    The owner takes it as the response POST it stands for (kind "respond",
    `code` the server's tripcode), so it is checked and answered the same
    way; its answer is only logged: nobody waits for it.
    """
    head = {"kind": "respond", "id": answer.request_id, "tripcode": code,
            "head": encode_response_head(answer.head), "length": len(answer.body)}
    link = _open(node, answer.request_id, head)
    if isinstance(link, Response):
        logger.info("answer %s not carried to its owner: %s", answer.request_id, link.get_data(as_text=True).strip())
        return
    try:
        if answer.body:
            link.send(answer.body)
        link.end()
        reply = link.read_head()
    except PeerCutError as e:
        link.close()
        logger.info("answer %s: its owner was cut off: %s", answer.request_id, e)
        return
    _finish_call(link)
    if _status(reply) != 200:
        logger.info("answer %s: its owner answered %s %s", answer.request_id, _status(reply), reply.get("message"))


def _download(node: Node, owned_id: str, head: dict[str, Any], req: Request, headers: dict[str, str],
              on_forbidden: OnForbidden) -> Response:
    """A response whose body is what the owner of `owned_id` sends over a peer link, piece by piece."""
    link = _open(node, owned_id, head)
    if isinstance(link, Response):
        return link
    try:
        answer = link.read_head()
    except PeerCutError:
        link.close()
        return text(502, "the relay worker that holds this stream's client was cut off")
    if _status(answer) != 200:
        _finish_call(link)
        return _answer_response(answer, on_forbidden)
    environ = req.environ
    sock = connection_socket(environ)

    def body() -> Iterator[bytes]:
        # The server sends nothing more on this connection: a hang-up is the GET gone.
        watcher = gevent.spawn(_abort_on_hangup, sock, link) if sock is not None else None
        ended = False
        try:
            yield b""  # the status and headers go out now
            # Each piece is read from the link when the connection took the last one.
            yield from link.pieces()
            ended = True
        except PeerCutError:
            cut_connection(environ)  # the owner cut the stream: the server must see a cut too
        finally:
            if watcher is not None:
                watcher.kill(block=False)
            if ended:
                _finish_call(link)
            else:
                link.abort()  # closed early: its server is gone

    return Response(body(), 200, headers=headers)


def _open(node: Node, owned_id: str, head: dict[str, Any], req: Request | None = None) -> PeerLink | Response:
    """A link to the owner of `owned_id` with `head` sent; or the answer when there is none.

    With `req` (a POST), the answer does not read its body.
    """
    def answer(status: int, message: str) -> Response:
        return refuse(status, message, req) if req is not None else text(status, message)

    try:
        link = node.owner_link(owned_id, head)
    except ClusterUnavailableError as e:  # this node cannot reach Redis, or is not in the cluster yet
        return answer(e.status, str(e))
    except PeerCutError as e:
        logger.warning("cannot reach relay node %s for %s %s: %s", owned_id[:NODE_ID_CHARS], head.get("kind"),
                       owned_id[:64], e)
        return answer(502, "the relay worker that holds this stream's client cannot be reached")
    if link is None:
        return answer(404, f"no request or connection {owned_id[:64]!r} is in flight (the relay worker "
                           "that held its client has stopped)")
    logger.debug("cluster forwarded %s %s to relay node %s", head.get("kind"), owned_id, owned_id[:NODE_ID_CHARS])
    return link


def _send_body(link: PeerLink, environ: dict[str, Any]) -> None:
    """Copy a POST's body onto `link` as it arrives, then its end; abort the link if the body breaks off."""
    try:
        for piece in iter_body(environ, RELAY_CHUNK_BYTES):
            link.send(piece)
    except PeerCutError:
        return  # the owner answered early, or went: the answer says which
    except Exception as e:  # noqa: BLE001 - the WSGI server's body reader: OSError or its parse errors
        logger.info("a forwarded request body broke off: %s", type(e).__name__)
        link.abort()
        return
    link.end()


def _abort_on_hangup(sock: Any, link: PeerLink) -> None:
    if wait_for_hangup(sock):
        link.abort()


def _finish_call(link: PeerLink) -> None:
    """End our direction and read the owner's end, so a clean link goes back to the pool."""
    try:
        link.end()
        for _ in link.pieces():
            pass  # nothing is expected but the end
    except PeerCutError:
        pass
    link.close()


def _status(answer: dict[str, Any]) -> int:
    status = answer.get("status")
    return status if isinstance(status, int) and 100 <= status <= 599 else 502


def _answer_response(answer: dict[str, Any], on_forbidden: OnForbidden) -> Response:
    status, message = _status(answer), str(answer.get("message", ""))
    if status == 403:
        on_forbidden(message)
    return text(status, message)


# ---- the owner: the node that holds the stream's client ---------------------------------


class Streams:
    """The owner's side: the calls other nodes make for the streams of requests and connections held here."""

    def __init__(self, rv: Rendezvous, fw: PortForwarding) -> None:
        self.rv = rv
        self.fw = fw

    def calls(self) -> dict[str, Callable[[dict[str, Any], PeerLink], None]]:
        """The peer calls this serves, by kind (node.py's `calls`)."""
        return {"body": self.serve_body, "tcp_accept": self.serve_tcp_accept, "tcp_refuse": self.serve_tcp_refuse,
                "tcp_downstream": self.serve_tcp_downstream, "tcp_upstream": self.serve_tcp_upstream}

    def serve_body(self, head: dict[str, Any], link: PeerLink) -> None:
        """A server's body GET: the request's body (fetched from its client here), or a WebSocket's bytes."""
        rid, code = str(head.get("id", "")), str(head.get("tripcode", ""))
        try:
            source = body_source(self.rv, self.fw, rid, lambda registered: hmac.compare_digest(code, registered),
                                 self.rv.config.request_timeout_secs)
            if isinstance(source, ForwardedConnection):
                attach_reads(source)
        except HttpError as e:
            _answer(link, e.status, str(e))
            return
        if isinstance(source, ForwardedConnection):
            self._pipe_out(source, source.up, "accept", link)
            return
        p, upload = source

        def cut() -> bool:
            link.abort()
            return True
        _serve_download(link, fetch(self.rv, p, upload, cut), lambda: None)

    def serve_tcp_accept(self, head: dict[str, Any], link: PeerLink) -> None:
        """A server accepts a connection held here: its answer's body is the client's bytes."""
        fw = self.fw
        try:
            conn = fw.find_for_server(str(head.get("id", "")), self._server_is(head))
            fw.accept(conn)
        except HttpError as e:
            _answer(link, e.status, str(e))
            return
        logger.info("connection %s open", conn.describe())
        self._pipe_out(conn, conn.up, "accept", link)

    def serve_tcp_refuse(self, head: dict[str, Any], link: PeerLink) -> None:
        try:
            conn = self.fw.find_for_server(str(head.get("id", "")), self._server_is(head))
            self.fw.refuse(conn, str(head.get("reason", "")))
        except HttpError as e:
            _answer(link, e.status, str(e))
            return
        _answer(link, 200, "refused")

    def serve_tcp_downstream(self, head: dict[str, Any], link: PeerLink) -> None:
        """The server's bytes for a connection held here."""
        fw = self.fw
        try:
            conn = fw.attach_downstream(fw.find_for_server(str(head.get("id", "")), self._server_is(head)))
        except HttpError as e:
            _answer(link, e.status, str(e))
            return
        self._pipe_in(conn, conn.down, "downstream", link)

    def serve_tcp_upstream(self, head: dict[str, Any], link: PeerLink) -> None:
        """The client's bytes for a connection held here (the client's key was checked by the opener)."""
        try:
            conn = self.fw.attach_upstream(str(head.get("id", "")), str(head.get("client", "")))
        except HttpError as e:
            _answer(link, e.status, str(e))
            return
        self._pipe_in(conn, conn.up, "upstream", link)

    def switched(self, p: PendingRequest, head: ServerResponseHead, link: PeerLink) -> tuple[int, str]:
        """A 101 response POST for a WebSocket held here: its body over `link` is the app's bytes.

        Answers the POST's answer once the app's side has ended, as upgrade.py's `server_switched`.
        """
        try:
            conn = open_tunnel(self.fw, self.rv, p, head)
        except HttpError as e:
            self.rv.fail(p, str(e), e.status)
            raise
        self.fw.add_cut(conn, "downstream", link.abort)
        return pump_in(self.fw, conn, conn.down, "downstream", link.pieces())

    def _server_is(self, head: dict[str, Any]) -> Callable[[str], None]:
        """A check that the call's key (its tripcode) is server `name`'s; ForbiddenError if not."""
        code = str(head.get("tripcode", ""))

        def check(name: str) -> None:
            state = self.rv.servers.get(name)
            if state is None or not hmac.compare_digest(code, state.registered.tripcode):
                raise ForbiddenError(f"wrong API key for server {name!r}")
        return check

    def _pipe_out(self, conn: ForwardedConnection, pipe: Pipe, stream: str, link: PeerLink) -> None:
        """`pipe` out over `link` as stream `stream`; the link cut early aborts the connection."""
        fw = self.fw
        fw.add_cut(conn, stream, link.abort)
        _serve_download(link, pump_out(fw, conn, pipe, stream, link.abort),
                        lambda: fw.abort(conn, f"{stream} stream: the peer hung up"))

    def _pipe_in(self, conn: ForwardedConnection, pipe: Pipe, stream: str, link: PeerLink) -> None:
        """The link's pieces into `pipe` as stream `stream`; then the answer."""
        self.fw.add_cut(conn, stream, link.abort)
        status, message = pump_in(self.fw, conn, pipe, stream, link.pieces())
        if status == 200:
            _answer(link, status, message)
        else:
            link.abort()  # the opener cuts its POST


def _serve_download(link: PeerLink, pieces: Iterator[bytes], on_cut: Callable[[], None]) -> None:
    """Answer 200, then send `pieces` and the end; `on_cut()` if the opener's link closes before its end.

    `pieces` is closed when the link is cut, so its stream learns that its taker went.
    """
    watcher = gevent.spawn(_watch_opener, link, on_cut)
    try:
        link.send_head({"status": 200})
        for piece in pieces:
            if piece:
                link.send(piece)
        if not link.closed:
            link.end()
    except PeerCutError:
        pass  # the opener went: the watcher says so
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:
            close()
    watcher.join()


def _watch_opener(link: PeerLink, on_cut: Callable[[], None]) -> None:
    """Read the opener's direction: its end (the stream was taken whole) or a cut."""
    try:
        for _ in link.pieces():
            pass
    except PeerCutError:
        on_cut()


def _answer(link: PeerLink, status: int, message: str) -> None:
    """A head-only answer, and our end; the opener's end is read by the peer server after us."""
    try:
        link.send_head({"status": status, "message": message}, end=True)
    except PeerCutError:
        pass
