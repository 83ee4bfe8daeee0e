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
past `NODE_TTL_SECS`) has lost its parked entries with it: it registers
again, ends its parked listens (204), the servers listen again at once, and
presence is rebuilt by their new listens. Once a second each node offers to
run PRESENCE (servers coming and going, audited once for the cluster) and
SWEEP (cleaning up after dead nodes); one node a second wins each.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gevent
import gevent.event
from werkzeug.wrappers import Request, Response

from ptth_lib.errors import ForbiddenError, HttpError
from ptth_lib.relay.cluster.peering import PeerLink, PeerPool, PeerServer
from ptth_lib.relay.cluster.rendezvous import ClusterRendezvous
from ptth_lib.relay.cluster.store import (
    NODE_ID_CHARS,
    ClusterUnavailableError,
    InboxAck,
    InboxConnection,
    InboxHead,
    InboxLeave,
    InboxMessage,
    InboxOffline,
    InboxRequeue,
    InboxTurn,
    NodeInfo,
    Store,
    new_node_id,
)
from ptth_lib.relay.cluster.streams import forward_answer, forward_upload
from ptth_lib.relay.delivery import copy_body, read_head, refuse
from ptth_lib.wire import tripcode
from ptth_lib.wire.envelope import API_KEY_HEADER, RESPONSE_HEAD_HEADER, InlineAnswer

if TYPE_CHECKING:
    from ptth_lib.relay.cluster.forwarding import ClusterForwarding
    from ptth_lib.relay.cluster.streams import Streams

logger = logging.getLogger(__name__)

# A node renews its registration this often; one not renewed for NODE_TTL_SECS (store.py)
# is dead, so a node may miss two beats (a long GC pause, a slow Redis).
HEARTBEAT_SECS = 2.0

# How often each node offers to run PRESENCE and SWEEP (one node a second wins each).
TICK_SECS = 1.0

# After a Redis error, the dispatcher waits this long before trying again.
RETRY_SECS = 1.0


class Node:
    """This worker's place in the cluster: its id, its peers, its inbox."""

    def __init__(self, store: Store, peer_bind: str, config_hash: str) -> None:
        """A node not yet registered: `start` joins the cluster, as soon as Redis answers."""
        self.store = store
        self.config_hash = config_hash
        self.peer_address = ""
        self.id = new_node_id()
        self.epoch = ""
        self._secret: str | None = None  # the peer secret (hex) once registered; put back after a Redis restart
        self.joined = gevent.event.Event()  # set while registered; until then, 503
        self.rendezvous: ClusterRendezvous | None = None
        # Port forwarding across nodes, and the owner's side of streams other nodes carry here
        # (cluster/forwarding.py, cluster/streams.py); set by build() with `calls`.
        self.forwarding: ClusterForwarding | None = None
        self.streams: Streams | None = None
        self._peer_bind = peer_bind
        self.pool: PeerPool | None = None
        # The calls other nodes make to this one over peer links, by kind: the parts of the
        # cluster that carry a stream to its owner add theirs before `start`.
        self.calls: dict[str, Callable[[dict[str, Any], PeerLink], None]] = {"respond": self._serve_response}
        self.peers: PeerServer | None = None
        self.table: dict[str, str] = {}  # node id -> peer address, refreshed by the heartbeat
        self.live: list[NodeInfo] = []  # the live nodes as last read, config hashes included (cluster/ops.py)
        self.label = ""
        self._relabel()

    def info(self) -> NodeInfo:
        return NodeInfo(self.id, self.peer_address, self.config_hash, socket.gethostname(), os.getpid())

    def _relabel(self) -> None:
        self.label = f"{socket.gethostname()}/{os.getpid()}/{self.id}"
        if self.rendezvous is not None:
            self.rendezvous.node_id = self.id

    def _register(self) -> bytes:
        """Register this node, keeping its id if it is free (its requests in flight stay reachable).

        Returns the cluster's peer secret; ClusterUnavailableError while Redis cannot be reached.
        """
        while True:
            registered = self.store.register(self.info(), self._secret)
            if registered.outcome == "registered":
                self.epoch = registered.epoch
                self._secret = registered.secret
                return bytes.fromhex(registered.secret)
            self.id = new_node_id()
            self._relabel()

    def attach(self, rendezvous: ClusterRendezvous) -> None:
        """Serve `rendezvous`: the dispatcher hands it heads, the peer listener its POSTs."""
        self.rendezvous = rendezvous
        rendezvous.node_id = self.id
        rendezvous.joined = self.joined

    def start(self) -> list[gevent.Greenlet]:
        """Join the cluster, then run the heartbeat, the dispatcher and the ticks.

        A worker joins before it serves its first request when Redis answers
        (a worker recycled by max_requests then never answers 503); while
        Redis cannot be reached, it answers 503 and joins as soon as it can.
        """
        try:
            self._open(self._register())
        except ClusterUnavailableError:
            return [gevent.spawn(self._live)]
        return [gevent.spawn(self._run)]

    def _live(self) -> None:
        self._open(self._join())
        self._run()

    def _open(self, secret: bytes) -> None:
        """Listen for peers and publish where; then this node is in the cluster."""
        if self.peers is None:
            self.peers = PeerServer(self._peer_bind, secret, self.calls)
            self.peers.start()
            self.peer_address = self.peers.address
            self.pool = PeerPool(secret)
        while True:
            try:
                self.store.heartbeat(self.info(), self.epoch)  # publishes the peer address
                self._refresh_table()
                break
            except ClusterUnavailableError:
                gevent.sleep(RETRY_SECS)
        self.joined.set()
        logger.info("relay node %s up, peer links on %s, %d nodes in the cluster", self.label,
                    self.peer_address, len(self.table))

    def _run(self) -> None:
        gevent.joinall([gevent.spawn(self._heartbeat), gevent.spawn(self._dispatch), gevent.spawn(self._ticks)])

    def _join(self) -> bytes:
        """Register, trying again every second while Redis cannot be reached (store.py logs it once)."""
        while True:
            try:
                return self._register()
            except ClusterUnavailableError:
                gevent.sleep(RETRY_SECS)

    def close(self) -> None:
        """This worker starts to stop (gunicorn's graceful stop: SIGTERM, or max_requests).

        Nothing to undo here: the rendezvous has ended this node's parked
        listens, so no new request comes to it. Its peer listener, heartbeat
        and dispatcher go on while the process lives, because its own clients
        still wait for their answers, which other nodes carry here; a head
        still arriving in its inbox is offered again. When the process has
        exited, its registration expires (NODE_TTL_SECS) and the sweeper
        cleans up after it.
        """

    # ---- the greenlets -------------------------------------------------------------

    def _refresh_table(self) -> None:
        self.live = self.store.live_nodes()
        self.table = {n.node: n.peer for n in self.live if n.peer}

    def _heartbeat(self) -> None:
        while True:
            gevent.sleep(HEARTBEAT_SECS)
            try:
                outcome = self.store.heartbeat(self.info(), self.epoch)
                if outcome != "alive":
                    self._rejoin(outcome)
                self._refresh_table()
            except ClusterUnavailableError:
                continue  # store.py logged it once; the next beat tries again

    def _rejoin(self, why: str) -> None:
        """Our registration is gone (swept after a pause, or Redis restarted), and our parked entries with it."""
        logger.warning("relay node %s: %s; registering again and ending its parked listens", self.label,
                       "Redis restarted" if why == "restarted" else "it was taken for dead (paused too long)")
        known = self._secret
        secret = self._register()
        # Changed only if another node put a new one there first: one that started after the restart.
        if self.peers is not None and self.pool is not None and secret.hex() != known:
            self.peers.set_secret(secret)
            self.pool.set_secret(secret)
        self.store.heartbeat(self.info(), self.epoch)
        rv = self.rendezvous
        if rv is not None:
            for name in list(rv.servers):
                rv.end_listens(name)

    def _ticks(self) -> None:
        """Offer to run PRESENCE and SWEEP each second; the node that wins the second runs them."""
        while True:
            gevent.sleep(TICK_SECS)
            try:
                presence = self.store.presence(self.id)
                rv = self.rendezvous
                if rv is not None:
                    for event in presence.events:
                        rv.announce(event.server, event.online, event.host, event.version)
                    rv.presence_log.tick()
                swept = self.store.sweep(self.id)
                if swept.swept:
                    logger.info("relay nodes %s stopped answering; their share of the work was taken back",
                                ", ".join(swept.swept))
            except ClusterUnavailableError:
                continue

    def _dispatch(self) -> None:
        while True:
            try:
                messages = self.store.wait_inbox(self.id)
            except ClusterUnavailableError:
                gevent.sleep(RETRY_SECS)
                continue
            for message in messages:
                try:
                    self._handle(message)
                except ClusterUnavailableError:
                    pass  # logged once by store.py; the message's request ends at its timeout

    def _handle(self, message: InboxMessage) -> None:
        rv = self.rendezvous
        if rv is None:
            return
        if isinstance(message, InboxHead):
            rv.hand_over(message)
        elif isinstance(message, InboxOffline):
            rv.fail_offline(message.request_id, message.server)
        elif isinstance(message, InboxRequeue):
            rv.offer_again(message.request_id, message.server)
        elif isinstance(message, InboxLeave):
            rv.end_listens(message.server)
        elif isinstance(message, InboxAck):
            rv.acked(message.server, message.batch_id)
        elif isinstance(message, InboxTurn):
            rv.turn(message.server, message.client)
        elif isinstance(message, InboxConnection) and self.forwarding is not None:
            self.forwarding.hand_connection(message)

    # ---- response POSTs for another node's requests -------------------------------

    def forward_response(self, request_id: str, req: Request) -> Response:
        """Carry a server's response POST to the node that holds the request's client."""
        key = req.headers.get(API_KEY_HEADER)
        if not key:
            return refuse(403, "missing X-ApiKey header", req)
        if not self.joined.is_set():
            return refuse(503, "this relay worker has not joined the cluster yet; try again shortly", req)
        return forward_upload(self, request_id, {
            "kind": "respond", "id": request_id, "tripcode": tripcode.derive(key),
            "head": req.headers.get(RESPONSE_HEAD_HEADER), "length": req.content_length}, req)

    def forward_answer(self, answer: InlineAnswer, code: str) -> None:
        """Carry a small answer a listen brought to the node that holds its client, in a greenlet of its own."""
        gevent.spawn(forward_answer, self, answer, code)

    def owner_link(self, owned_id: str, head: dict[str, Any]) -> PeerLink | None:
        """A peer link to the node that owns `owned_id` (a request or connection id), `head` sent.

        None if no live node has that id (it stopped, or the id was never
        made); PeerCutError (PeerUnreachableError) if the node cannot be reached.
        """
        if self.pool is None:
            raise ClusterUnavailableError("this relay worker has not joined the cluster yet; try again shortly")
        address = self._peer_of(owned_id[:NODE_ID_CHARS])
        return None if address is None else self.pool.open(address, head)

    def _peer_of(self, node: str) -> str | None:
        """The peer address of `node`; a node not in our copy of the table may have started since."""
        address = self.table.get(node)
        if address is None and node != self.id:
            try:
                self._refresh_table()
            except ClusterUnavailableError:
                return None
            address = self.table.get(node)
        return address

    def _serve_response(self, head: dict[str, Any], link: PeerLink) -> None:
        """On the owner: the POST another node got, with its body coming over `link`."""
        rv = self.rendezvous
        status, message = 404, "this relay node serves no requests"
        try:
            if rv is not None:
                p = rv.claim_by_tripcode(str(head["id"]), str(head["tripcode"]))
                response_head = read_head(rv, p, head.get("head"))
                if response_head.status_code == 101:  # a WebSocket: the body is the app's bytes, for long
                    if self.streams is None:
                        rv.fail(p, "the relay cannot carry this WebSocket", 501)
                        raise HttpError("the relay cannot carry a WebSocket here", 501)
                    status, message = self.streams.switched(p, response_head, link)
                else:
                    rv.start_response(p, response_head)
                    length = head.get("length")
                    status, message = copy_body(rv, p, link.pieces(), length if isinstance(length, int) else None)
        except ForbiddenError as e:
            status, message = e.status, str(e)
        except HttpError as e:
            status, message = e.status, str(e)
        link.send_head({"status": status, "message": message})
        link.end()

