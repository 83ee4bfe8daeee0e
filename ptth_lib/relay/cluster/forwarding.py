"""TCP port forwarding across the nodes of a cluster (CLUSTER.md section 4).

`ClusterForwarding` is the `PortForwarding` the relay and forward_api.py
call, with the meeting point of connects and listens in Redis:

- a client's connect makes its connection here (its id starts with this
  node's id: this node owns it) and offers it with TCP_CONNECT, which hands
  it to a parked TCP listen's node (its inbox) or queues it, and counts it
  toward the client's and the server's limits;
- a server's TCP listen takes a queued connection, or parks (TCP_LISTEN) and
  waits here until the dispatcher (node.py) hands it one from the inbox; at
  its end without one it gives its place back (TCP_UNPARK). Having taken a
  connection, it tells the owner ("tcp_taken", over a peer link unless the
  owner is this node), which moves the connect's deadline as one process
  does, and answers whether its client still waits;
- a connection forgotten here (closed, aborted, refused, timed out) is
  settled in Redis, which lowers the counters (batched, as requests are).

Everything after the listen (accept, refuse, the four streams) runs on the
owner with the single process's code: cluster/streams.py carries the calls
that land elsewhere. A WebSocket counts toward its server's connections with
the same script.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gevent
import gevent.event

from ptth_lib.config import RelayConfig
from ptth_lib.errors import BadGatewayError, QueueFullError, TooManyListenersError
from ptth_lib.relay.cluster.peering import PeerCutError, PeerLink
from ptth_lib.relay.cluster.settling import Settler
from ptth_lib.relay.cluster.store import (
    NODE_ID_CHARS,
    ClusterUnavailableError,
    InboxConnection,
    Store,
    websocket_held_id,
)
from ptth_lib.relay.forwarding import (
    ID_BYTES,
    MAX_CONNECTIONS_PER_CLIENT,
    MAX_CONNECTIONS_PER_SERVER,
    MAX_LISTENS_PER_PORT,
    MAX_OFFERS_PER_PORT,
    MAX_PORTS_PER_SERVER,
    WEBSOCKET_PORT,
    ForwardedConnection,
    PortForwarding,
)
from ptth_lib.relay.rendezvous import ListenEndedError
from ptth_lib.wire.names import short_id

if TYPE_CHECKING:
    from ptth_lib.relay.cluster.node import Node

logger = logging.getLogger(__name__)


class ClusterForwarding(PortForwarding):
    """Forwarded connections of this node, and its TCP listens, met through Redis."""

    def __init__(self, config: RelayConfig, store: Store, node: Node, settler: Settler,
                 on_closed: Callable[[ForwardedConnection], None] = lambda conn: None) -> None:
        """`settler` settles forgotten connections in Redis (the node's, shared with its rendezvous)."""
        super().__init__(config, on_closed)
        self.store = store
        self.node = node
        self.settler = settler
        # TCP listens parked on this node, per (server, port), oldest first.
        self.waiters: defaultdict[tuple[str, str], list[gevent.event.AsyncResult]] = defaultdict(list)

    def owns(self, conn_id: str) -> bool:
        """Tell whether a connection id was made by this node (its client is here)."""
        return conn_id.startswith(self.node.id)

    # ---- clients ---------------------------------------------------------

    def _offer_new(self, client: str, server: str, port: str) -> ForwardedConnection:
        """A new connection, in the table, then offered across the cluster (TCP_CONNECT)."""
        conn = ForwardedConnection(self.node.id + secrets.token_urlsafe(ID_BYTES), client, server, port)
        self.connections[conn.id] = conn  # before the offer: its listen may tell us at once
        try:
            offered = self.store.tcp_connect(server, port, conn.id, client)
        except BaseException:
            self.connections.pop(conn.id, None)
            self.settler.add(conn.id)  # its answer was lost: the script may have counted it
            raise
        if offered.outcome in ("handed", "queued"):
            return conn
        self.connections.pop(conn.id, None)
        if offered.outcome == "port gone":
            raise BadGatewayError(f"server {server!r} is offline or does not forward port {port!r}")
        if offered.outcome == "client limit":
            raise QueueFullError(f"client {client!r} has {MAX_CONNECTIONS_PER_CLIENT} connections open")
        if offered.outcome == "server limit":
            raise QueueFullError(f"server {server!r} has {MAX_CONNECTIONS_PER_SERVER} connections open")
        raise QueueFullError(f"{MAX_OFFERS_PER_PORT} connections already wait for {server}:{port}")

    def taken(self, conn_id: str) -> bool:
        """A listen took connection `conn_id` (owned here): its server has DECIDE_WAIT_SECS from now.

        False if its client no longer waits (gone, or decided already).
        """
        conn = self.connections.get(conn_id)
        if conn is None or conn.aborted or conn.decision.ready() or conn.port == WEBSOCKET_PORT:
            return False
        conn.taken = time.monotonic()
        return True

    def serve_taken(self, head: dict[str, Any], link: PeerLink) -> None:
        """The peer call "tcp_taken": another node's listen took a connection owned here."""
        for _ in link.pieces():
            pass  # the opener sends only its end
        link.send_head({"status": 200 if self.taken(str(head.get("id", ""))) else 410}, end=True)

    def open_websocket(self, conn_id: str, client: str, server: str) -> ForwardedConnection:
        """As in one process, counted toward the server's connections across the cluster."""
        if self.closing:
            raise BadGatewayError("the relay is stopping")
        if self.store.tcp_open_websocket(server, conn_id).outcome != "opened":
            raise QueueFullError(f"server {server!r} has {MAX_CONNECTIONS_PER_SERVER} connections open")
        try:
            return super().open_websocket(conn_id, client, server)
        except BaseException:
            self.settler.add(websocket_held_id(conn_id))
            raise

    # ---- servers ---------------------------------------------------------

    def listen(self, server: str, port: str, timeout: float) -> ForwardedConnection | None:
        """Take a connection offered on `port` of `server`, waiting up to `timeout`; None if none came.

        The connection returned is a handle (its id and client's name): its
        owner holds the connection itself.
        """
        if self.closing:
            return None
        deadline = time.monotonic() + timeout
        me = gevent.getcurrent()
        self._parked.add(me)
        taken: tuple[str, str] | None = None
        try:
            while True:
                taken = self._take(server, port, deadline)
                if taken is None:
                    return None
                if self._tell_taken(taken[0]):
                    return ForwardedConnection(taken[0], taken[1], server, port)
                taken = None  # its client gave up meanwhile: the next one
        except ListenEndedError:  # the relay is stopping, or the server hung up
            if taken is not None:
                self._offer_again(server, port, *taken)
            return None
        finally:
            self._parked.discard(me)

    def _take(self, server: str, port: str, deadline: float) -> tuple[str, str] | None:
        """(connection id, client) taken from Redis or handed by the dispatcher; None at the deadline."""
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        listened = self.store.tcp_listen(server, port, self.node.id)
        if listened.outcome == "took":
            assert listened.connection_id is not None
            return listened.connection_id, listened.client or ""
        if listened.outcome == "too many":
            raise TooManyListenersError(f"server {server!r} already has {MAX_LISTENS_PER_PORT} "
                                        f"listens parked on port {port!r}")
        if listened.outcome == "too many ports":
            raise TooManyListenersError(f"server {server!r} already listens on {MAX_PORTS_PER_SERVER} port names")
        if listened.outcome == "unknown node":  # swept or Redis restarted: the heartbeat registers it again
            raise ClusterUnavailableError("this relay worker is rejoining the cluster; try again shortly")
        return self._wait(server, port, left)

    def _wait(self, server: str, port: str, timeout: float) -> tuple[str, str] | None:
        """Parked: wait for the dispatcher to hand over a connection; at the end, give the place back."""
        waiter: gevent.event.AsyncResult = gevent.event.AsyncResult()
        key = (server, port)
        waiting = self.waiters[key]
        waiting.append(waiter)
        try:
            handed: tuple[str, str] = waiter.get(timeout=timeout)
            return handed
        except (gevent.Timeout, ListenEndedError):
            if waiter.ready():
                late: tuple[str, str] = waiter.value  # handed over in the same instant
                return late
            try:
                # False: a connection is on its way to our inbox; the dispatcher,
                # finding no waiter, offers it again (hand_connection).
                self.store.tcp_unpark(server, port, self.node.id)
            except ClusterUnavailableError:
                pass  # the entry goes with Redis, or with this node's sweep
            return None
        finally:
            if waiter in waiting:
                waiting.remove(waiter)
            if not waiting:
                self.waiters.pop(key, None)

    def hand_connection(self, message: InboxConnection) -> None:
        """A connection from this node's inbox: to its port's oldest parked listen here, else back to Redis."""
        waiting = self.waiters.get((message.server, message.port), [])
        while waiting:
            waiter = waiting.pop(0)
            if not waiter.ready():
                waiter.set((message.connection_id, message.client))
                return
        self._offer_again(message.server, message.port, message.connection_id, message.client)

    def _offer_again(self, server: str, port: str, conn_id: str, client: str) -> None:
        try:
            again = self.store.tcp_offer_again(server, port, conn_id, client)
        except ClusterUnavailableError:
            again = None
        if again is None or again.outcome not in ("handed", "queued", "dropped"):
            logger.warning("connection %s to %s:%s could not be offered again: its client gets 504",
                           short_id(conn_id), server, port)

    def _tell_taken(self, conn_id: str) -> bool:
        """Tell the owner of `conn_id` that a listen took it; False if its client no longer waits."""
        if self.owns(conn_id):
            return self.taken(conn_id)
        try:
            link = self.node.owner_link(conn_id, {"kind": "tcp_taken", "id": conn_id})
        except ClusterUnavailableError:
            return False  # the node table cannot be read now; the connect times out (504)
        except PeerCutError as e:
            logger.warning("cannot reach relay node %s for connection %s: %s", conn_id[:NODE_ID_CHARS],
                           conn_id[:16], e)
            return False
        if link is None:
            return False  # its node stopped, and its client with it
        logger.debug("cluster forwarded tcp_taken %s to relay node %s", conn_id, conn_id[:NODE_ID_CHARS])
        try:
            link.end()
            answer = link.read_head()
            for _ in link.pieces():
                pass
        except PeerCutError:
            link.close()
            return False
        link.close()
        return answer.get("status") == 200

    # ---- both --------------------------------------------------------------

    def _forget(self, conn: ForwardedConnection) -> None:
        super()._forget(conn)
        if self.owns(conn.id):
            self.settler.add(websocket_held_id(conn.id) if conn.port == WEBSOCKET_PORT else conn.id)
