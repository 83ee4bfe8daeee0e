"""One node of a relay cluster: one relay worker process (CLUSTER.md sections 2, 3 and 6).

A node has an id (8 characters of base32, claimed in Redis), which starts
every request id it makes, so any node can tell which one holds a request's
client. It keeps itself registered (a heartbeat every `HEARTBEAT_SECS`, with
the address of its peer listener), keeps a copy of the table of live nodes,
and runs the dispatcher: the one greenlet that takes the heads other nodes'
OFFERs put in its inbox and hands each to a listen parked here.

A server's response POST for a request owned by another node is carried
there over a peer link (peering.py): `forward_response` on the node that
got the POST, `_serve_response` on the owner, which runs the single
process's delivery (delivery.py) with the body coming from the link.

A node whose registration expired (Redis restarted, or the node was paused
past `NODE_TTL_SECS`) has lost its parked entries with it: it ends its
parked listens (204), the servers listen again at once, and presence is
rebuilt by their new listens.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
import socket
from typing import Any

import gevent
from werkzeug.wrappers import Request, Response

from ptth_lib.errors import ForbiddenError, HttpError
from ptth_lib.relay.cluster.peering import PeerCutError, PeerLink, PeerPool, PeerServer
from ptth_lib.relay.cluster.rendezvous import ClusterRendezvous
from ptth_lib.relay.cluster.store import ClusterUnavailableError, Store
from ptth_lib.relay.delivery import RELAY_CHUNK_BYTES, copy_body, read_head, refuse
from ptth_lib.relay.responses import text
from ptth_lib.wire import tripcode
from ptth_lib.wire.envelope import API_KEY_HEADER, RESPONSE_HEAD_HEADER
from ptth_lib.wsgi import cut_connection, iter_body

logger = logging.getLogger(__name__)

# Characters of a node id: 40 random bits of base32, claimed with SET NX, so unique among
# live nodes; request ids then have 8 + 16 characters, inside the protocol's 64.
NODE_ID_CHARS = 8

# A node renews its registration this often; one not renewed for NODE_TTL_SECS is dead
# (its POSTs answer 404), so a node may miss two beats (a long GC pause, a slow Redis).
HEARTBEAT_SECS = 2.0
NODE_TTL_SECS = 6.0

# After a Redis error, the dispatcher and the heartbeat wait this long before trying again.
RETRY_SECS = 1.0

# The owner's answer to a forwarded POST comes once the client has the whole body, which
# can take as long as a slow client takes; the link carries the body meanwhile.
ANSWER_WAIT_SECS = 600.0


def new_node_id() -> str:
    """A fresh node id: 8 characters of base32."""
    return base64.b32encode(secrets.token_bytes(5)).decode("ascii")


class Node:
    """This worker's place in the cluster: its id, its peers, its inbox."""

    def __init__(self, store: Store, peer_bind: str) -> None:
        self.store = store
        self.id = self._claim_id(store)
        self.rendezvous: ClusterRendezvous | None = None
        self.pool = PeerPool(store.cluster_secret())
        self.peers = PeerServer(peer_bind, store.cluster_secret(), {"respond": self._serve_response})
        self.table: dict[str, str] = {}  # node id -> peer address, refreshed by the heartbeat
        self.label = f"{socket.gethostname()}/{os.getpid()}/{self.id}"

    @staticmethod
    def _claim_id(store: Store) -> str:
        while True:
            node_id = new_node_id()
            if store.register_node(node_id, "", NODE_TTL_SECS, new=True):
                return node_id

    def attach(self, rendezvous: ClusterRendezvous) -> None:
        """Serve `rendezvous`: the dispatcher hands it heads, the peer listener its POSTs."""
        self.rendezvous = rendezvous

    def start(self) -> list[gevent.Greenlet]:
        """Listen for peers, register, and run the heartbeat and the dispatcher."""
        self.peers.start()
        self.store.register_node(self.id, self.peers.address, NODE_TTL_SECS)
        self.table = self.store.live_nodes()
        logger.info("relay node %s up, peer links on %s, %d nodes in the cluster", self.label,
                    self.peers.address, len(self.table))
        return [gevent.spawn(self._heartbeat), gevent.spawn(self._dispatch)]

    def close(self) -> None:
        """This node is stopping: it is no longer alive for the others."""
        self.peers.close()
        self.pool.close()
        try:
            self.store.drop_node(self.id)
        except ClusterUnavailableError:
            pass

    # ---- the greenlets -------------------------------------------------------------

    def _heartbeat(self) -> None:
        while True:
            gevent.sleep(HEARTBEAT_SECS)
            try:
                if not self.store.register_node(self.id, self.peers.address, NODE_TTL_SECS):
                    self._lost_registration()
                self.table = self.store.live_nodes()
            except ClusterUnavailableError:
                continue  # store.py logged it once; the next beat tries again

    def _lost_registration(self) -> None:
        """Our registration expired: Redis restarted or we were paused. Our parked entries are gone too."""
        logger.warning("relay node %s: its registration in Redis was lost (Redis restarted, or this worker "
                       "was paused); registering again and ending its parked listens", self.label)
        if not self.store.register_node(self.id, self.peers.address, NODE_TTL_SECS, new=True):
            logger.error("relay node %s: its id was taken by another node meanwhile", self.label)
        rv = self.rendezvous
        if rv is not None:
            for server in rv.servers.values():
                server.wake_listeners()

    def _dispatch(self) -> None:
        while True:
            try:
                messages = self.store.wait_inbox(self.id)
            except ClusterUnavailableError:
                gevent.sleep(RETRY_SECS)
                continue
            rv = self.rendezvous
            for message in messages:
                if rv is not None:
                    rv.hand_over(message)

    # ---- response POSTs for another node's requests -------------------------------

    def forward_response(self, request_id: str, req: Request) -> Response:
        """Carry a server's response POST to the node that holds the request's client."""
        key = req.headers.get(API_KEY_HEADER)
        if not key:
            return refuse(403, "missing X-ApiKey header", req)
        address = self.table.get(request_id[:NODE_ID_CHARS])
        if address is None:
            return refuse(404, f"no request {request_id[:64]!r} is in flight (the relay worker that held its "
                               "client has stopped)", req)
        environ = req.environ
        try:
            link = self.pool.open(address, {"kind": "respond", "id": request_id, "tripcode": tripcode.derive(key),
                                            "head": req.headers.get(RESPONSE_HEAD_HEADER),
                                            "length": req.content_length})
        except PeerCutError as e:
            logger.warning("cannot reach relay node %s for request %s: %s", request_id[:NODE_ID_CHARS],
                           request_id, e)
            return refuse(502, "the relay worker that holds this request's client cannot be reached", req)
        sender = gevent.spawn(_send_body, link, environ)
        try:
            answer = link.read_head()
        except PeerCutError:
            sender.kill()
            link.close()
            cut_connection(environ)
            return text(410, "the client is gone")
        status, message = int(answer.get("status", 502)), str(answer.get("message", ""))
        if not sender.dead and status != 200:
            sender.kill()  # an early answer (410: the client left): stop reading the server
            link.abort()
            cut_connection(environ)
        else:
            sender.join()
        link.close()
        return text(status, message)

    def _serve_response(self, head: dict[str, Any], link: PeerLink) -> None:
        """On the owner: the POST another node got, with its body coming over `link`."""
        rv = self.rendezvous
        status, message = 404, "this relay node serves no requests"
        try:
            if rv is not None:
                p = rv.claim_by_tripcode(str(head["id"]), str(head["tripcode"]))
                response_head = read_head(rv, p, head.get("head"))
                if response_head.status_code == 101:
                    rv.fail(p, "the relay cannot carry this WebSocket", 501)
                    raise HttpError("this relay runs as a cluster, which does not carry WebSockets yet", 501)
                rv.start_response(p, response_head)
                length = head.get("length")
                status, message = copy_body(rv, p, link.pieces(), length if isinstance(length, int) else None)
        except ForbiddenError as e:
            status, message = e.status, str(e)
        except HttpError as e:
            status, message = e.status, str(e)
        link.send_head({"status": status, "message": message})
        link.end()


def _send_body(link: PeerLink, environ: dict[str, Any]) -> None:
    """Copy a POST's body onto `link` as it arrives; abort the link if the body breaks off."""
    try:
        for piece in iter_body(environ, RELAY_CHUNK_BYTES):
            link.send(piece)
    except PeerCutError:
        return
    except Exception as e:  # noqa: BLE001 - the WSGI server's body reader: OSError or its parse errors
        logger.info("a forwarded response body broke off: %s", type(e).__name__)
        link.abort()
        return
    link.end()
