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

Everything after the hand-over (the response head, the body's queue) is the
single-process code, inherited. A request ends with a SETTLE, which frees its
place in Redis's counts; the node batches the settles of many requests into
one round trip (settling.py).

Acknowledged delivery works across nodes: a listen's batch is held under a
lease of the node that answered the listen, the acknowledgement reaches that
node through its inbox, and a lease that runs out makes each request's owner
offer it again if the server has not started to answer it. Fair shares are
counted in Redis: a request over its address's share waits here until a
request of that address ends on any node (InboxTurn).

Request bodies and WebSockets need a server that announced them (OFFER's
"no feature": 501, as in one process); their streams are carried to this
node by cluster/streams.py.
"""

from __future__ import annotations

import base64
import logging
import secrets
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import gevent
import gevent.event

from ptth_lib.config import RelayConfig
from ptth_lib.errors import (
    BadGatewayError,
    HttpError,
    QueueFullError,
    RequestHeadTooLargeError,
    TooManyFromAddressError,
    TooManyListenersError,
    UnknownServerError,
)
from ptth_lib.relay.cluster.settling import Settler
from ptth_lib.relay.cluster.store import (
    ClusterUnavailableError,
    InboxHead,
    OfferResult,
    QueuedHead,
    Store,
)
from ptth_lib.relay.rendezvous import (
    Lease,
    ListenEndedError,
    PendingRequest,
    Rendezvous,
    ServerState,
    format_rfc3339,
)
from ptth_lib.relay.shares import MAX_WAITING_PER_ADDRESS, TURN_WAIT_SECS
from ptth_lib.wire import tripcode
from ptth_lib.wire.envelope import (
    FEATURE_BODIES,
    FEATURE_WEBSOCKET,
    MAX_REQUEST_HEAD_BYTES,
    RelayRequest,
    decode_request_item,
    encode_request_item,
    head_size,
)

logger = logging.getLogger(__name__)

# The random part of a cluster request id, after the node id: 80 bits, as single-process ids.
_ID_BYTES = 10



# While an address waits for its turn, how often its requests ask Redis again (a turn
# announced while no request of it waited here is not heard).
TURN_RECHECK_SECS = 1.0
# (server, address) pairs with requests waiting for a turn on this node, at most.
MAX_TURN_KEYS = 10_000


@dataclass(eq=False)
class _Turn:
    """The requests of one address waiting here for a turn at one server."""

    waiting: int = 0
    freed: gevent.event.Event = field(default_factory=gevent.event.Event)


def _taken(head: QueuedHead, server: str) -> PendingRequest:
    """A head a listen took, in the place of a PendingRequest: only `.request` is read of it."""
    return TakenHead(decode_request_item(head.head), server)  # type: ignore[return-value]


class TakenHead:
    """A request head a listen took from Redis: its client is held by the node its id names.

    Only `request` is used of it by the relay: the listen's answer is built
    from it; `requeue` reads `server_name`.
    """

    __slots__ = ("request", "server_name")

    def __init__(self, request: RelayRequest, server_name: str) -> None:
        self.request = request
        self.server_name = server_name


class ClusterRendezvous(Rendezvous):
    """The `Rendezvous` the `Relay` calls, for one node of a cluster."""

    shared = True

    def __init__(self, config: RelayConfig, store: Store, node_id: str,
                 on_event: Callable[..., None] = lambda event, **fields: None) -> None:
        super().__init__(config, on_event)
        self.store = store
        self.node_id = node_id  # the node's id, which it may change when it registers again
        self.joined = gevent.event.Event()  # the node's: set while it is registered in Redis
        # Parked listens of this node waiting for a head, per server, oldest first.
        self.waiters: defaultdict[str, list[gevent.event.AsyncResult]] = defaultdict(list)
        # The heads of this node's requests offered to Redis and not yet settled, by id (to offer again).
        self.offered: dict[str, QueuedHead] = {}
        # Of those, the ids offered again after a lost listen (bounded by `offered`; see _claim).
        self.reoffered: set[str] = set()
        # Batches of this node's listens that PARK recorded in Redis (leases:{N}), until acknowledged
        # or expired; a batch of heads that came through the inbox has no record (see expire_lease).
        self.recorded: set[str] = set()
        # Requests waiting for their client's turn, per (server, fairness key).
        self._turns: dict[tuple[str, str], _Turn] = {}
        self.settler = Settler(store, lambda: self.node_id)  # ended requests, settled in batches

    # ---- ids ---------------------------------------------------------------

    def new_id(self) -> str:
        """A request id naming this node: its id, then 80 random bits in base32 (24 characters)."""
        return self.node_id + base64.b32encode(secrets.token_bytes(_ID_BYTES)).decode("ascii")

    def _claim(self, request_id: str, matches: Callable[[str], bool]) -> PendingRequest:
        """As in one process; and a request offered again whose first hand-out is answered after all
        (its acknowledgement came late) is taken out of the queue, so no server gets it twice."""
        p = super()._claim(request_id, matches)
        if request_id in self.reoffered:
            self.reoffered.discard(request_id)
            try:
                self.store.withdraw(p.server.registered.name, request_id)
            except ClusterUnavailableError:
                pass  # its deadline drops it
        return p

    def _check_joined(self) -> None:
        if not self.joined.is_set():
            raise ClusterUnavailableError("this relay worker cannot reach the relay's shared state (Redis) yet; "
                                          "try again shortly")

    def owns(self, request_id: str) -> bool:
        """Tell whether a request id was made by this node (its client is here)."""
        return request_id.startswith(self.node_id)

    # ---- backend side: servers -----------------------------------------------

    def listen(self, server: ServerState, timeout: float, max_requests: int | None = None,
               lease: bool = False, ack: str = "") -> tuple[list[PendingRequest], Lease | None]:
        """Take the heads queued for `server`, or park here until one comes (at most `timeout`).

        With `lease`, what it takes is held under a batch id of this node until
        the server's next listen (on any node) acknowledges it: PARK records
        the batch in Redis and passes `ack` on to the node that holds that
        batch (InboxAck), in the same round trip.
        """
        if self.closing:
            return [], None
        self._check_joined()
        name = server.registered.name
        server.touch()
        batch_id = self.new_id() if lease else ""
        # The waiter is there before PARK: an OFFER may take the parked entry, and the dispatcher
        # hand over its head, before PARK's own answer is back here.
        waiter: gevent.event.AsyncResult = gevent.event.AsyncResult()
        self.waiters[name].append(waiter)
        try:
            parked = self.store.park(name, self.node_id, max_requests, sorted(server.features), lease=batch_id,
                                     ack=ack, version=server.version or "", host=server.host or "")
        except BaseException:
            self._drop_waiter(name, waiter)
            raise
        if parked.outcome != "parked":
            self._drop_waiter(name, waiter)
        if parked.outcome == "too many":
            raise TooManyListenersError(f"server {name!r} already has listens parked on every side")
        if parked.outcome == "unknown node":  # swept or Redis restarted: the heartbeat registers it again
            raise ClusterUnavailableError("this relay worker is rejoining the cluster; try again shortly")
        if parked.outcome == "took":
            heads = list(parked.heads)
        else:
            now = time.monotonic()
            head = self._wait(server, name, waiter, self.listen_ends.deadline(now, timeout) - now)
            heads = [head] if head is not None else []
        batch = [_taken(head, name) for head in heads]
        if not (batch and lease):
            return batch, None
        held = Lease(batch_id, server, batch)
        self.leases[batch_id] = held
        if parked.outcome == "took":
            self.recorded.add(batch_id)  # PARK recorded it in Redis, for the sweeper
        return batch, held

    def _wait(self, server: ServerState, name: str, waiter: gevent.event.AsyncResult,
              timeout: float) -> QueuedHead | None:
        """Wait for the dispatcher to hand `waiter` a head; None at the timeout or the listen's end."""
        me = gevent.getcurrent()
        server.parked.add(me)
        server.listeners += 1
        try:
            head: QueuedHead = waiter.get(timeout=timeout)
            return head
        except (gevent.Timeout, ListenEndedError):
            # No more heads for this waiter: the dispatcher offers any that still comes again
            # (`hand_over`), and a leave ending every listen does not end this one twice.
            server.parked.discard(me)
            self._drop_waiter(name, waiter, hand_on=False)
            if not waiter.ready():
                self._unpark_surely(name)
            if waiter.ready():
                handed: QueuedHead = waiter.value  # handed over in the same instant
                return handed
            return None
        finally:
            server.listeners -= 1
            server.parked.discard(me)
            self._drop_waiter(name, waiter, hand_on=False)

    def _drop_waiter(self, name: str, waiter: gevent.event.AsyncResult, hand_on: bool = True) -> None:
        """Take `waiter` off the list; with `hand_on`, a head it was handed goes to another listen."""
        waiting = self.waiters.get(name)
        if waiting is not None and waiter in waiting:
            waiting.remove(waiter)
            if not waiting:
                del self.waiters[name]
        if hand_on and waiter.ready():
            self.hand_over(InboxHead(name, waiter.value))

    def _unpark_surely(self, name: str) -> None:
        """UNPARK this node's entry, even if the listen is ended again meanwhile (its client hangs up).

        Run in a greenlet of its own, which an ending thrown into the listen
        cannot interrupt: an UNPARK cut halfway would leave the entry behind,
        and the server would look online with nobody listening.
        """
        unparking = gevent.spawn(self._unpark, name)
        while True:
            try:
                unparking.join()
                return
            except ListenEndedError:
                continue

    def _unpark(self, name: str) -> bool:
        try:
            return self.store.unpark(name, self.node_id)
        except ClusterUnavailableError:
            return True  # Redis is away; the entry is dropped with it, or by the sweeper

    def hand_over(self, message: InboxHead) -> None:
        """A head from this node's inbox: to the oldest parked listen of its server here, else back to Redis."""
        waiting = self.waiters.get(message.server, [])
        while waiting:
            waiter = waiting.pop(0)
            if not waiter.ready():
                waiter.set(message.head)
                own = self.pending.get(message.head.request_id)
                if own is not None:  # its client is here too: its head's wait counts from now
                    own.picked_up.set()
                return
        try:
            # Not to this node's listens first: none waits here for this server now.
            self.store.offer_again(message.server, message.head, front=True, here_first=False)
        except ClusterUnavailableError:
            logger.warning("request %s for server %s lost with Redis: its client gets 502 at its timeout",
                           message.head.request_id, message.server)

    def acked(self, server: str, batch_id: str) -> None:
        """A listen on some node acknowledged this node's batch (InboxAck): its requests are the server's."""
        state = self.servers.get(server)
        if state is not None:
            self.ack(state, batch_id)

    def expire_lease(self, held: Lease) -> int:
        """No acknowledgement came: the owners offer the batch's requests again, if still unanswered.

        A batch PARK took from the queue has a record in Redis, which decides
        against an acknowledgement arriving in the same instant (`end_lease`):
        exactly one of the two wins. A batch of heads that came through the
        inbox has none (one round trip less per batch): its acknowledgement
        reaches this node through the inbox whatever happens, and this node
        alone decides. If this node dies first, the sweeper cannot offer those
        heads again: their clients get 504 at their timeout.
        """
        if self.leases.pop(held.id, None) is None or held.acked.is_set():
            self.recorded.discard(held.id)
            return 0
        if held.id in self.recorded:
            self.recorded.discard(held.id)
            if not self.store.end_lease(self.node_id, held.id):
                return 0  # acknowledged after all: its InboxAck is on its way
        return self.requeue(held.batch)

    def ack(self, server: ServerState, lease_id: str) -> None:
        """As in one process (only `server`'s own batch: an acknowledgement names its server)."""
        super().ack(server, lease_id)
        if lease_id not in self.leases:
            self.recorded.discard(lease_id)

    def requeue(self, batch: list[PendingRequest], delivered: bool = True) -> int:
        """A listen's answer may be lost: each request's owner offers it again if it is still unanswered.

        Only the owner knows whether the server started to answer (a request
        being answered is never handed out twice), so this node tells the
        owners (InboxRequeue), or offers its own requests at once.
        """
        name_of = {p.request.id: cast(TakenHead, p).server_name for p in batch}
        remote = []
        for request_id, name in name_of.items():
            if self.owns(request_id):
                self.offer_again(request_id, name)
            else:
                remote.append((name, request_id))
        self.store.tell_requeue(remote)
        return len(batch)

    def leave(self, server: ServerState) -> None:
        """A process of this server is stopping: every node ends its listens parked for it (LEAVE)."""
        super().leave(server)
        self.store.leave(server.registered.name)

    def _remember_unregistered(self, name: str, api_key: str, address: str) -> None:
        """An unknown server was refused here: remember it for every node's pages (one round trip).

        Redis unreachable: the server still gets its 403, and store.py logs the outage once.
        """
        try:
            self.store.remember_unregistered(name[:64], tripcode.derive(api_key), address[:64])
        except ClusterUnavailableError:
            pass

    def end_listens(self, name: str) -> None:
        """End this node's parked listens of server `name` (204): it left, or Redis lost them."""
        state = self.servers.get(name)
        if state is not None:
            state.wake_listeners()

    def fail_offline(self, request_id: str, server: str) -> None:
        """PRESENCE took this node's request out of the queue of a server gone offline: 502 now.

        Unless it was offered again after its listen's connection was lost:
        then the server may have it after all, and it waits for its answer
        until its timeout (504), as in one process.
        """
        p = self.pending.get(request_id)
        if p is not None and not p.answered and request_id not in self.reoffered and not p.picked_up.is_set():
            self.fail(p, f"server {server!r} did not pick up the request: it went offline")

    def offer_again(self, request_id: str, server: str) -> None:
        """The listen that took this request died unacknowledged: offer it again if still unanswered."""
        p = self.pending.get(request_id)
        head = self.offered.get(request_id)
        if p is None or head is None or p.answered or p.head_ready.is_set():
            return
        self.reoffered.add(request_id)
        offered = self.store.offer_again(server, head, front=True)
        if offered.here:
            self.hand_over(InboxHead(server, head))
        outcome = offered.outcome
        if outcome == "offline":
            self.fail(p, f"server {server!r} went offline before it answered")
        elif outcome in ("full", "gone"):
            self.fail(p, f"server {server!r} lost the request with its listen, and it could not be queued again")

    def watch_presence(self, interval_secs: float = 1.0) -> None:
        """Presence is the cluster's (node.py runs PRESENCE); this greenlet settles ended requests instead."""
        self.settler.run()

    def announce(self, name: str, online: bool, host: str | None, version: str | None) -> None:
        """PRESENCE saw server `name` come or go, once for the whole cluster: audit it."""
        self.presence_log.record(name, online)
        self._on_event("server_online" if online else "server_offline", server=name, host=host, version=version)

    def describe_servers(self) -> list[dict[str, object]]:
        """Every registered server as the JSON lists show it, online as the whole cluster sees it."""
        names = sorted(self.servers)
        presence = self.store.server_presence(names)
        out = []
        for name in names:
            state = self.servers[name]
            seen = presence[name]
            out.append({
                "name": name,
                "display_name": state.registered.display_name,
                "online": seen.online,
                "last_seen": format_rfc3339(seen.last_seen) if seen.last_seen is not None else None,
                "version": seen.version or state.version,  # reported to whichever node its listens reach
                "host": seen.host or state.host,
            })
        return out

    # ---- frontend side: clients ------------------------------------------------

    def submit(self, name: str, method: str, uri: str, headers: dict[str, bytes],
               client: str = "", body: int | None = None, upgrade: str | None = None) -> PendingRequest:
        """Offer a client request to server `name` across the cluster (OFFER)."""
        server = self.servers.get(name)
        if server is None:
            raise UnknownServerError(f"no server named {name!r} is registered at this relay")
        size = head_size(method, uri, headers)
        if size > MAX_REQUEST_HEAD_BYTES:
            raise RequestHeadTooLargeError(f"request head of {size} bytes is over the relay's limit of "
                                           f"{MAX_REQUEST_HEAD_BYTES}")
        self._check_joined()
        request = RelayRequest(self.new_id(), method, uri, headers, body, upgrade)
        p = PendingRequest(request, server, head_size=size)
        deadline_ms = int((time.time() + self.config.request_timeout_secs) * 1000)
        head = QueuedHead(request.id, encode_request_item(request), deadline_ms)
        self.pending[request.id] = p
        try:
            offered = self._offer_in_turn(name, head, client, _needs(body, upgrade))
        except BaseException:
            self.forget(p)
            raise
        if offered.outcome in ("handed", "queued"):
            self.offered[request.id] = head  # held in Redis from now until settled
            if offered.here:
                self.hand_over(InboxHead(name, head))  # to a listen of this node, as the dispatcher would
            return p
        self.forget(p)
        if offered.outcome == "offline":
            raise BadGatewayError(f"server {name!r} is offline (not connected to the relay)")
        if offered.outcome == "full":
            raise QueueFullError(f"server {name!r} has too many requests waiting; try again later")
        if offered.outcome == "no feature":
            what = "request bodies" if offered.feature == FEATURE_BODIES else "WebSocket connections"
            raise HttpError(f"server {name!r} does not take {what} (it did not announce '{offered.feature}')",
                            status=501)
        raise HttpError(f"server {name!r} cannot take this request ({offered.outcome})", status=501)

    def _offer_in_turn(self, name: str, head: QueuedHead, client: str, needs: tuple[str, ...]) -> OfferResult:
        """OFFER, waiting while the client's address has its fill of requests in flight at `name`.

        The share is counted in Redis across nodes; a node waiting for a turn
        hears InboxTurn when one of that address's requests ends anywhere.
        """
        per_address = self.config.requests_per_address if client else 0
        offered = self.store.offer(name, head, client=client, per_address=per_address, needs=needs)
        if offered.outcome != "wait":
            return offered
        key = (name, client)
        turn = self._turns.get(key)
        if turn is None:
            if len(self._turns) >= MAX_TURN_KEYS:
                raise TooManyFromAddressError("too many clients are waiting for their turn; try again later")
            turn = self._turns[key] = _Turn()
        if turn.waiting >= MAX_WAITING_PER_ADDRESS:
            raise TooManyFromAddressError(f"your address already has {MAX_WAITING_PER_ADDRESS} requests waiting "
                                          f"for server {name!r}; try again later")
        deadline = time.monotonic() + TURN_WAIT_SECS
        turn.waiting += 1
        try:
            while offered.outcome == "wait":
                turn.freed.clear()
                left = deadline - time.monotonic()
                # A turn is announced once; a waiter on another node may take it. Look
                # again now and then rather than trust that every turn reaches us.
                if left <= 0:
                    raise TooManyFromAddressError(
                        f"your address already has {self.config.requests_per_address} requests in flight at "
                        f"server {name!r}; try again when they finish")
                turn.freed.wait(min(left, TURN_RECHECK_SECS))
                offered = self.store.offer(name, head, client=client, per_address=per_address, needs=needs)
        finally:
            turn.waiting -= 1
            if turn.waiting == 0 and self._turns.get(key) is turn:
                del self._turns[key]
        return offered

    def turn(self, server: str, client: str) -> None:
        """A request of `client` at `server` ended somewhere (InboxTurn): its waiting requests here offer again."""
        turn = self._turns.get((server, client))
        if turn is not None:
            turn.freed.set()

    def must_wait_turn(self, name: str, client: str) -> bool:
        """Not known without asking Redis; OFFER answers it."""
        return False

    def forget(self, p: PendingRequest) -> None:
        """As in one process; and the request's places in Redis are freed by the next SETTLE."""
        super().forget(p)
        self.reoffered.discard(p.request.id)
        if self.offered.pop(p.request.id, None) is not None:
            self.settler.add(p.request.id)

    def _picked_up(self, p: PendingRequest, timeout: float) -> float | None:
        """A listen of this node that takes the head says so (`hand_over`), and the wait for the
        head counts from then, as in one process. One on another node does not: at the timeout,
        WITHDRAW takes the head out of the queue if it is still there (never picked up: 502);
        else a server has it, and the wait for its head counts from the request's arrival, so
        that the server has `request_timeout_secs` in all, as it would have had if it picked the
        request up at once (the body's progress extends it, as in one process)."""
        started = time.monotonic()
        if gevent.wait([p.picked_up, p.head_ready], timeout, count=1):
            return time.monotonic()
        return None if self.store.withdraw(p.server.registered.name, p.request.id) else started


def _needs(body: int | None, upgrade: str | None) -> tuple[str, ...]:
    """The features a server must have announced to take a request: OFFER answers "no feature" else (501)."""
    return ((FEATURE_BODIES,) if body is not None else ()) + ((FEATURE_WEBSOCKET,) if upgrade is not None else ())
