"""ClusterRendezvous: the rendezvous of rendezvous.py with its meeting point in Redis.

A request is owned by the node (relay worker) that holds its client: its
`PendingRequest` lives in that node's `pending` table, as in the single
process, and its id starts with the node's id (node.py), so whichever node
gets the server's answer can carry it there (peering.py). What the nodes
share goes through `store.py`, one script per step:

- `submit` offers the request's head (OFFER): a node with a listen of that
  server parked gets it in its inbox, or the head waits in the server's queue;
- `listen` takes the queued heads or parks (PARK), then waits here, on this
  node, until the dispatcher (node.py) hands it a head from the inbox, and
  at its end without one gives its place back (UNPARK);
- `wait_for_head` asks at the request's timeout whether it was ever picked up
  (WITHDRAW): 502 if not, else 504 as today.

Everything after the hand-over (the response head, the body's queue, the
client's share) is the single-process code, inherited. What the cluster does
not do yet (CLUSTER.md sections 2, 4 and 5): acknowledged delivery across
nodes (a listen's answer lost on the way is not taken back), fair shares and
the unanswered count across nodes (each node keeps its own), request bodies,
WebSocket and TCP forwarding (501: "not in cluster mode yet"), and presence
events for the audit log.
"""

from __future__ import annotations

import base64
import logging
import secrets
from collections import defaultdict
from collections.abc import Callable

import gevent
import gevent.event

from ptth_lib.config import RelayConfig
from ptth_lib.errors import (
    BadGatewayError,
    GatewayTimeoutError,
    HttpError,
    QueueFullError,
    RequestHeadTooLargeError,
    TooManyListenersError,
    UnknownServerError,
)
from ptth_lib.relay.cluster.store import ClusterUnavailableError, InboxHead, QueuedHead, Store
from ptth_lib.relay.rendezvous import (
    Lease,
    ListenEndedError,
    PendingRequest,
    Rendezvous,
    ServerState,
    format_rfc3339,
)
from ptth_lib.wire.envelope import (
    MAX_REQUEST_HEAD_BYTES,
    RelayRequest,
    ServerResponseHead,
    decode_request_item,
    encode_request_item,
    head_size,
)

logger = logging.getLogger(__name__)

# The random part of a cluster request id, after the node id: 80 bits, as single-process ids.
_ID_BYTES = 10


class TakenHead:
    """A request head a listen took from Redis: its client is held by the node its id names.

    Only `request` is used of it: the listen's answer is built from it.
    """

    __slots__ = ("request",)

    def __init__(self, request: RelayRequest) -> None:
        self.request = request


class ClusterRendezvous(Rendezvous):
    """The `Rendezvous` the `Relay` calls, for one node of a cluster."""

    def __init__(self, config: RelayConfig, store: Store, node_id: str,
                 on_event: Callable[..., None] = lambda event, **fields: None) -> None:
        super().__init__(config, on_event)
        self.store = store
        self.node_id = node_id
        # Parked listens of this node waiting for a head, per server, oldest first.
        self.waiters: defaultdict[str, list[gevent.event.AsyncResult]] = defaultdict(list)

    # ---- ids ---------------------------------------------------------------

    def new_id(self) -> str:
        """A request id naming this node: its id, then 80 random bits in base32 (24 characters)."""
        return self.node_id + base64.b32encode(secrets.token_bytes(_ID_BYTES)).decode("ascii")

    def owns(self, request_id: str) -> bool:
        """Tell whether a request id was made by this node (its client is here)."""
        return request_id.startswith(self.node_id)

    # ---- backend side: servers -----------------------------------------------

    def listen(self, server: ServerState, timeout: float, max_requests: int | None = None,
               lease: bool = False) -> tuple[list[PendingRequest], Lease | None]:
        """Take the heads queued for `server`, or park here until one comes (at most `timeout`)."""
        if self.closing:
            return [], None
        name = server.registered.name
        server.touch()
        parked = self.store.park(name, self.node_id, max_requests, sorted(server.features))
        if parked.outcome == "too many":
            raise TooManyListenersError(f"server {name!r} already has listens parked on every side")
        if parked.outcome == "took":
            return [self._taken(h) for h in parked.heads], None  # type: ignore[misc]  # only .request is read
        head = self._wait(server, name, timeout)
        return ([self._taken(head)] if head is not None else []), None  # type: ignore[list-item]

    def _wait(self, server: ServerState, name: str, timeout: float) -> QueuedHead | None:
        """Wait for the dispatcher to hand this listen a head; None at the timeout or the listen's end."""
        waiter: gevent.event.AsyncResult = gevent.event.AsyncResult()
        waiting = self.waiters[name]
        waiting.append(waiter)
        me = gevent.getcurrent()
        server.parked.add(me)
        server.listeners += 1
        try:
            head: QueuedHead = waiter.get(timeout=timeout)
            return head
        except (gevent.Timeout, ListenEndedError):
            if waiter.ready():
                handed: QueuedHead = waiter.value  # handed over in the same instant
                return handed
            if not self._unpark(name):
                # No entry of ours was left: a head is on its way to our inbox. The
                # dispatcher, finding no waiter, offers it again (`hand_over`).
                pass
            return None
        finally:
            server.listeners -= 1
            server.parked.discard(me)
            if waiter in waiting:
                waiting.remove(waiter)
            if not waiting:
                self.waiters.pop(name, None)

    def _unpark(self, name: str) -> bool:
        try:
            return self.store.unpark(name, self.node_id)
        except ClusterUnavailableError:
            return True  # Redis is away; the entry is dropped with it, or by the sweeper

    @staticmethod
    def _taken(head: QueuedHead) -> TakenHead:
        return TakenHead(decode_request_item(head.head))

    def hand_over(self, message: InboxHead) -> None:
        """A head from this node's inbox: to the oldest parked listen of its server here, else back to Redis."""
        waiting = self.waiters.get(message.server, [])
        while waiting:
            waiter = waiting.pop(0)
            if not waiter.ready():
                waiter.set(message.head)
                return
        try:
            self.store.offer(message.server, message.head, front=True)
        except ClusterUnavailableError:
            logger.warning("request %s for server %s lost with Redis: its client gets 502 at its timeout",
                           message.head.request_id, message.server)

    def ack(self, server: ServerState, lease_id: str) -> None:
        """Acknowledgements are not carried across nodes yet: every listen is answered without a lease."""

    def requeue(self, batch: list[PendingRequest], delivered: bool = True) -> int:
        """A listen's answer may be lost: not taken back across nodes yet (the client gets 504)."""
        return 0

    def leave(self, server: ServerState) -> None:
        """A process of this server is stopping: end its listens parked on this node."""
        super().leave(server)

    def close(self) -> None:
        """This node is stopping: end its parked listens (204), each giving its place back."""
        super().close()

    def watch_presence(self, interval_secs: float = 1.0) -> None:
        """Presence events are not gathered across nodes yet: nothing to watch here."""
        while True:
            gevent.sleep(3600)

    def describe_servers(self) -> list[dict[str, object]]:
        """Every registered server as the JSON lists show it, online as the whole cluster sees it."""
        names = sorted(self.servers)
        presence = self.store.presence(names)
        out = []
        for name in names:
            state = self.servers[name]
            wall, online = presence[name]
            out.append({
                "name": name,
                "display_name": state.registered.display_name,
                "online": online,
                "last_seen": format_rfc3339(wall) if wall is not None else None,
                "version": state.version,
                "host": state.host,
            })
        return out

    # ---- frontend side: clients ------------------------------------------------

    def submit(self, name: str, method: str, uri: str, headers: dict[str, bytes],
               client: str = "", body: int | None = None, upgrade: str | None = None) -> PendingRequest:
        """Offer a client request to server `name` across the cluster (OFFER)."""
        server = self.servers.get(name)
        if server is None:
            raise UnknownServerError(f"no server named {name!r} is registered at this relay")
        if body is not None or upgrade is not None:
            what = "request bodies" if body is not None else "WebSocket connections"
            raise HttpError(f"this relay runs as a cluster, which does not carry {what} yet", status=501)
        size = head_size(method, uri, headers)
        if size > MAX_REQUEST_HEAD_BYTES:
            raise RequestHeadTooLargeError(f"request head of {size} bytes is over the relay's limit of "
                                           f"{MAX_REQUEST_HEAD_BYTES}")
        share = self.shares.take((name, client)) if client else None
        request = RelayRequest(self.new_id(), method, uri, headers)
        p = PendingRequest(request, server, head_size=size, share=share)
        self.pending[request.id] = p
        try:
            offered = self.store.offer(name, QueuedHead(request.id, encode_request_item(request)))
        except BaseException:
            self.forget(p)
            raise
        if offered.outcome == "offline":
            self.forget(p)
            raise BadGatewayError(f"server {name!r} is offline (not connected to the relay)")
        if offered.outcome == "full":
            self.forget(p)
            raise QueueFullError(f"server {name!r} has too many requests waiting; try again later")
        return p

    def wait_for_head(self, p: PendingRequest, last_active: Callable[[], float] | None = None,
                      ) -> ServerResponseHead:
        """Wait for the response head; at the timeout, ask Redis whether the request was picked up.

        Still in the server's queue (WITHDRAW takes it out): 502, as a request
        never picked up in the single process. Picked up: the server has had
        it, and gets as long again to answer before 504.
        """
        timeout = self.config.request_timeout_secs
        name = p.server.registered.name
        try:
            if not p.head_ready.wait(timeout):
                if self.store.withdraw(name, p.request.id):
                    raise BadGatewayError(f"server {name!r} did not pick up the request in {timeout:.0f} s")
                if not p.head_ready.wait(timeout):
                    raise GatewayTimeoutError(f"server {name!r} did not answer in {timeout:.0f} s")
            if p.failure is not None or p.head is None:
                reason = p.failure or f"server {name!r} sent no response"
                raise BadGatewayError(reason) if p.failure_status == 502 else HttpError(reason, p.failure_status)
        except BaseException:
            self.forget(p)
            raise
        return p.head
