"""The relay's state: where a client's request meets a server's long-poll.

Each registered server has a bounded queue of requests waiting for a listen.
A client request becomes a `PendingRequest`; a listen takes every queued one
at once; the server's POST delivers the response head, then its body flows
through a small bounded queue to the client's response body (body_stream.py),
so a slow reader slows the server instead of filling memory.

Delivery to a server that acknowledges (ptth_server does; see PROTOCOL.md,
"Acknowledged delivery") is exactly once whatever its connections do: the
requests handed to a listen are held under a lease until the server's next
listen acknowledges them or it answers them; a lease that runs out puts the
unanswered requests back in the queue.

Every table here has a bound or an expiry: queued requests per server,
requests handed out but not answered per server, listens per server,
requests in flight per client address and server (shares.py), leases
(seconds), the unregistered names shown to operators.

Pure gevent, no Flask and no sockets. The errors raised here are
`errors.HttpError`s, each with its status; the `Relay` (relay.py) turns
them into answers.

Longer than most modules (about 600 lines) on purpose: `Rendezvous` is one
state machine whose tables (queues, requests taken, leases, requests in
flight) change together, and each of its rules reads best beside the others.
Its parts with a life of their own are elsewhere: fair shares (shares.py)
and the response body the client reads (body_stream.py).
"""

from __future__ import annotations

import base64
import hmac
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.event
import gevent.queue

from ptth_lib.config import RegisteredServer, RelayConfig
from ptth_lib.errors import (
    BadGatewayError,
    ForbiddenError,
    GatewayTimeoutError,
    HttpError,
    PtthError,
    QueueFullError,
    RequestHeadTooLargeError,
    TooManyListenersError,
    UnknownRequestError,
    UnknownServerError,
)
from ptth_lib.relay.presence_log import PresenceLog
from ptth_lib.relay.shares import FairShares, Share
from ptth_lib.wire import tripcode
from ptth_lib.wire.envelope import (
    FEATURE_BODIES,
    FEATURE_WEBSOCKET,
    MAX_LISTEN_BODY_BYTES,
    MAX_REQUEST_HEAD_BYTES,
    RelayRequest,
    ServerResponseHead,
    head_size,
)

logger = logging.getLogger(__name__)

# A server counts as online while it has a listen parked here or for this long
# after its last one ended; our server re-polls at once (a new connection
# through a slow network takes a few round trips), so a gap this long means it
# is gone: requests waiting for it then fail (502) instead of timing out.
OFFLINE_AFTER_SECS = 2.5

# After a server says it is leaving, how long its name stays online for
# another process of the same name to listen again (they re-poll at once).
LEAVE_GRACE_SECS = 1.0

# Requests handed to a server's listens and not yet answered, per server name.
# A server that takes requests and never answers is given no more past this;
# the rest queue (and get 503 once the queue is full) until clients time out.
MAX_UNANSWERED_PER_SERVER = 1024

# How long requests handed to an acknowledging server wait for its next
# listen to acknowledge them before they go back to the queue. It re-polls at
# once, so this only matters when the answer never reached it...
LEASE_SECS = 5.0
# ...and when the listen's connection ended, how long the acknowledgement may
# take to arrive on a new one: ptth_server re-polls within a round trip (a
# proxy that closes after every answer costs no more), while a connection cut
# by a NAT box or proxy lost the answer, and the sooner the requests go to a
# fresh listen the better. Kept well under the idle timeouts that cut listens
# (a second and up): a request handed on as late as that would meet the next
# listen in the instant it, too, is cut.
ACK_AFTER_CLOSE_SECS = 0.5

# Requests queued for one server before new ones get 503 (a server that stopped
# taking requests must not make the relay grow without bound).
MAX_QUEUED_PER_SERVER = 256

# Listens parked at once for one server name: enough for several processes
# sharing a name, each with a few listens in flight; more is a misbehaving peer.
MAX_LISTENERS_PER_SERVER = 32

# Request heads handed to one listen, in bytes: half what a server accepts,
# so that MsgPack's own overhead never pushes an answer over the limit.
MAX_BATCH_BYTES = MAX_LISTEN_BODY_BYTES // 2

# Body chunks held between a server's POST and its client. With the server's
# 256 KiB chunks this is 1 MiB per transfer: enough to keep both sockets busy.
BODY_QUEUE_CHUNKS = 4

# How long a body may make no progress (the server sends nothing, or the
# client's last chunks are not taken) before the transfer is cut.
BODY_STALL_SECS = 120.0

# How long a client may read nothing while the server has more for it. Each
# stalled download holds one of its server's threads (and a slot of the
# client's share), so this is shorter: a client taking one 256 KiB chunk a
# minute (4 KiB/s) still gets its file; one that stops reading is cut, and
# the server's upload stops at once.
CLIENT_STALL_SECS = 60.0

# Parked listens end on a grid of this many seconds (their timeouts rounded up
# to it), so that a fleet's re-listens come in batches that one wake-up of the
# relay serves: with 2,000 listens ending 83 times a second, 0.69 ms of relay
# CPU per re-listen instead of 1.17 ms, one by one (0.62 at 0.5 s, 0.54 at 1 s;
# BENCHMARKS.md, a fleet of idle servers). Coarser would save more, but the
# batch's work delays a visitor's request that arrives meanwhile...
LISTEN_END_GRAIN_SECS = 0.1
# ...so a batch holds about this many listens at most: where more are parked
# in a second than fill a grid's batches, the grid is halved as often as
# needed. A visitor then waits behind at most about 8 ms of re-listens (at 333
# a second on the 0.1 s grid, 10,000 spec 002 servers, the probe's p99 was
# 14.9 ms).
LISTEN_END_BATCH = 16

# How often watch_presence looks for servers coming online or going offline.
PRESENCE_CHECK_SECS = 1.0

# Names and tripcodes offered by unknown servers, kept for the operators' page.
MAX_UNREGISTERED_SHOWN = 50

# 80 random bits, base32: unguessable, URL-safe, in the spec's style of id.
_ID_BYTES = 10

# Sentinels that end a body queue (PendingRequest.body), for body_stream.py.
BODY_END = object()  # the server's body ended normally
BODY_CUT = object()  # the server's body broke off


class ListenEndedError(PtthError):
    """Thrown into a parked listen to end it at once with no requests.

    Used when the relay stops, when the server's registration changes, and
    when the listen's connection is found closed. A request handed to the
    listen in that instant is handed on to another listen, or queued.
    """


@dataclass
class ServerState:
    """What the relay knows of one registered server."""

    registered: RegisteredServer
    queue: gevent.queue.Queue = field(default_factory=lambda: gevent.queue.Queue(MAX_QUEUED_PER_SERVER))
    listeners: int = 0
    last_seen_monotonic: float | None = None
    last_seen_wall: float | None = None
    version: str | None = None  # as the server reports itself when it listens
    host: str | None = None
    parked: set[gevent.Greenlet] = field(default_factory=set)  # greenlets of its parked listens
    # Parked listens waiting for a request, oldest first (see Rendezvous._offer);
    # the queue holds what no listen waits for.
    waiting: list[gevent.event.AsyncResult] = field(default_factory=list)
    reported_online: bool = False  # last state announced by watch_presence
    # Requests handed to a listen and not yet answered, by id (MAX_UNANSWERED_PER_SERVER).
    taken: dict[str, PendingRequest] = field(default_factory=dict)
    room: gevent.event.Event = field(default_factory=gevent.event.Event)  # set when `taken` shrinks
    left_at: float | None = None  # when a process of this name last said it was leaving
    features: frozenset[str] = frozenset()  # X-PTTH-Features of its latest listen (bodies, websocket)

    def wake_listeners(self) -> None:
        """End this server's parked listens now (they answer 204)."""
        for greenlet in list(self.parked):
            gevent.kill(greenlet, ListenEndedError)

    def touch(self) -> None:
        self.last_seen_monotonic = time.monotonic()
        self.last_seen_wall = time.time()

    def is_online(self) -> bool:
        if self.listeners > 0:
            return True
        seen = self.last_seen_monotonic
        return seen is not None and time.monotonic() - seen <= OFFLINE_AFTER_SECS

    def describe(self) -> dict[str, object]:
        """The server's entry in the JSON server lists (frontend and scraper API).

        A server with a listen parked is being seen right now, so last_seen is now.
        """
        seen = time.time() if self.listeners > 0 else self.last_seen_wall
        return {
            "name": self.registered.name,
            "display_name": self.registered.display_name,
            "online": self.is_online(),
            "last_seen": format_rfc3339(seen) if seen is not None else None,
            "version": self.version,
            "host": self.host,
        }


def format_rfc3339(wall: float) -> str:
    """Seconds since the epoch as RFC 3339 UTC, e.g. 2026-11-22T00:57:35Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))


@dataclass
class PendingRequest:
    """One client request from submission until its response is delivered."""

    request: RelayRequest
    server: ServerState
    head_size: int = 0  # protocol.head_size of the request, for batching listens
    share: Share | None = None  # its client's share of the server, released when forgotten
    picked_up: gevent.event.Event = field(default_factory=gevent.event.Event)
    head_ready: gevent.event.Event = field(default_factory=gevent.event.Event)
    delivered: gevent.event.Event = field(default_factory=gevent.event.Event)
    body: gevent.queue.Queue = field(default_factory=lambda: gevent.queue.Queue(BODY_QUEUE_CHUNKS))
    head: ServerResponseHead | None = None
    failure: str | None = None
    cancelled: bool = False
    answered: bool = False
    client_gone: bool = False
    body_wanted: bool = True
    failure_status: int = 502  # the client's answer when `failure` is set
    # The client's request body, for the server to fetch (request_body.py); None: no body.
    upload: Any = None
    # A WebSocket once the app switched protocols (upgrade.py): its ForwardedConnection.
    tunnel: Any = None


@dataclass(eq=False)
class Lease:
    """Requests handed to an acknowledging server's listen, until it acknowledges them."""

    id: str
    server: ServerState
    batch: list[PendingRequest]
    acked: gevent.event.Event = field(default_factory=gevent.event.Event)
    holder: gevent.Greenlet | None = None  # waits for the acknowledgement; ended by it


class Rendezvous:
    """Registered servers, their queues and every request in flight."""

    # Whether presence and queues are shared by many processes (a cluster's, in Redis): then
    # /metrics shows the servers online and the requests queued once, for them all.
    shared = False

    def __init__(self, config: RelayConfig,
                 on_event: Callable[..., None] = lambda event, **fields: None) -> None:
        """`on_event(event, **fields)` hears of server_online and server_offline (for the audit log)."""
        self.config = config
        self.servers = {name: ServerState(reg) for name, reg in config.servers.items()}
        self.pending: dict[str, PendingRequest] = {}
        self.leases: dict[str, Lease] = {}
        # (name, tripcode, address) -> last time, oldest first; bounded by MAX_UNREGISTERED_SHOWN.
        self.unregistered: dict[tuple[str, str, str], float] = {}
        self.shares = FairShares(lambda: self.config.requests_per_address)
        self.closing = False
        self._on_event = on_event
        self.presence_log = PresenceLog(logger)  # online/offline lines, summed up for a fleet
        self.listen_ends = ListenEnds()  # parked listens end in batches

    # ---- backend side: servers -----------------------------------------

    def authenticate(self, name: str, api_key: str | None, address: str = "unknown") -> ServerState:
        """Return the server named `name` if `api_key` is its key, else raise 403."""
        state = self.servers.get(name)
        if not api_key:
            raise ForbiddenError("missing X-ApiKey header")
        if state is None:
            self._remember_unregistered(name, api_key, address)
            raise ForbiddenError(f"server {name[:64]!r} is not registered at this relay")
        if not tripcode.matches(api_key, state.registered.tripcode):
            raise ForbiddenError(f"wrong API key for server {name!r}")
        return state

    def listen(self, server: ServerState, timeout: float, max_requests: int | None = None,
               lease: bool = False, ack: str = "") -> tuple[list[PendingRequest], Lease | None]:
        """Wait up to `timeout` for requests; return those handed over (maybe none).

        At most `max_requests` are handed over (all queued, within the batch
        size, if None); 0 is a server at capacity saying it is still there,
        answered at once. With `lease`, they are held under a lease until the
        server acknowledges them (`ack`) or `expire_lease` takes them back.
        `ack` is the batch this listen acknowledges (before parking: a cut
        while parked must not lose it).
        """
        if ack:
            self.ack(server, ack)
        if self.closing:
            return [], None
        if max_requests == 0:
            server.touch()
            return [], None
        if server.listeners >= MAX_LISTENERS_PER_SERVER:
            raise TooManyListenersError(f"server {server.registered.name!r} already has "
                                        f"{MAX_LISTENERS_PER_SERVER} listens parked")
        started = time.monotonic()
        server.listeners += 1
        server.touch()
        me = gevent.getcurrent()
        server.parked.add(me)
        try:
            deadline = self.listen_ends.deadline(started, timeout)
            try:
                room = self._wait_for_room(server, deadline)
                first = self._take(server, deadline) if room else None
            except ListenEndedError:
                return [], None
            finally:
                server.parked.discard(me)
            if first is None:
                return [], None
            limit = min(room, max_requests or room)
            batch = [first]
            size = first.head_size
            while len(batch) < limit and not server.queue.empty():
                p = server.queue.peek_nowait()
                if not (p.cancelled or p.answered):
                    if size + p.head_size > MAX_BATCH_BYTES:
                        break  # the next listen takes the rest
                    size += p.head_size
                    batch.append(p)
                server.queue.get_nowait()
            for p in batch:
                p.picked_up.set()
                server.taken[p.request.id] = p
            held = None
            if lease:
                held = Lease(_new_id(), server, batch)
                self.leases[held.id] = held
            return batch, held
        finally:
            server.listeners -= 1
            if server.left_at is None or started > server.left_at:
                server.touch()  # a listen ended by its server leaving does not count as seen

    def ack(self, server: ServerState, lease_id: str) -> None:
        """The server's next listen acknowledges a batch: its requests are its own now."""
        held = self.leases.get(lease_id)
        if held is not None and held.server is server:
            del self.leases[lease_id]
            held.acked.set()
            if held.holder is not None:
                held.holder.kill(block=False)  # its wait is over

    def expire_lease(self, held: Lease) -> int:
        """No acknowledgement came: put the batch's unanswered requests back in the queue.

        The server never got them, so they count as not picked up: if it goes
        offline before another listen takes them, they fail at once.
        """
        if self.leases.pop(held.id, None) is None or held.acked.is_set():
            return 0
        return self.requeue(held.batch, delivered=False)

    def leave(self, server: ServerState) -> None:
        """A process of this server is stopping: end its parked listens, count it gone soon.

        Other processes sharing the name see their listens end too; they
        listen again at once and keep the name online.
        """
        now = time.monotonic()
        server.left_at = now
        server.last_seen_monotonic = now - OFFLINE_AFTER_SECS + LEAVE_GRACE_SECS
        server.wake_listeners()

    def claim(self, request_id: str, api_key: str | None) -> PendingRequest:
        """Find the request a server answers; 404 if unknown or answered, 403 if not its own."""
        if not api_key:
            raise ForbiddenError("missing X-ApiKey header")
        return self._claim(request_id, lambda code: tripcode.matches(api_key, code))

    def claim_by_tripcode(self, request_id: str, code: str) -> PendingRequest:
        """`claim` for an answer whose key another relay node checked: it passes the key's tripcode."""
        return self._claim(request_id, lambda registered: hmac.compare_digest(code, registered))

    def _claim(self, request_id: str, matches: Callable[[str], bool]) -> PendingRequest:
        p = self.pending.get(request_id)
        if p is None or p.answered or p.cancelled:
            raise UnknownRequestError(f"no request {request_id[:64]!r} is waiting for a response")
        if not matches(p.server.registered.tripcode):
            raise ForbiddenError(f"request {request_id!r} belongs to another server")
        p.answered = True
        self._untake(p)
        p.server.touch()
        return p

    def find_own(self, request_id: str, api_key: str | None) -> PendingRequest:
        """A request in flight, for the server that took it (its body GET); 404 unknown, 403 not its own."""
        if not api_key:
            raise ForbiddenError("missing X-ApiKey header")
        p = self.pending.get(request_id)
        if p is None or p.cancelled:
            raise UnknownRequestError(f"no request {request_id[:64]!r} is in flight")
        if not tripcode.matches(api_key, p.server.registered.tripcode):
            raise ForbiddenError(f"request {request_id!r} belongs to another server")
        return p

    def start_response(self, p: PendingRequest, head: ServerResponseHead) -> None:
        """Hand the response head to the waiting client."""
        p.head = head
        p.head_ready.set()

    def fail(self, p: PendingRequest, reason: str, status: int = 502) -> None:
        """The server's answer was unusable, or will not come: the client gets `status` (502) with `reason`."""
        p.failure = reason
        p.failure_status = status
        p.picked_up.set()
        p.head_ready.set()

    def put_chunk(self, p: PendingRequest, chunk: bytes) -> bool:
        """Queue one body chunk for the client; False if the client is gone.

        Blocks while the queue is full: this is the backpressure that makes a
        slow client slow the server down.
        """
        if p.client_gone or not p.body_wanted:
            return False
        try:
            p.body.put(chunk, timeout=CLIENT_STALL_SECS)
        except gevent.queue.Full:
            logger.warning("client read nothing for %.0f s, cutting request %s", CLIENT_STALL_SECS,
                           p.request.id)
            p.client_gone = True
        return not p.client_gone

    def put_whole_body(self, p: PendingRequest, body: bytes) -> None:
        """Queue a whole (small) body and its end for the client, without waiting for it to read them.

        The queue is new and empty (nothing else writes to it), so both fit.
        """
        if p.client_gone or not p.body_wanted:
            return
        if body:
            p.body.put_nowait(body)
        p.body.put_nowait(BODY_END)

    def end_body(self, p: PendingRequest, complete: bool) -> bool:
        """Mark the end of the body; wait until the client has it all (P7).

        Returns True only if the client received the whole body.
        """
        if not p.body_wanted:
            return True
        if p.client_gone:
            return False
        try:
            p.body.put(BODY_END if complete else BODY_CUT, timeout=BODY_STALL_SECS)
        except gevent.queue.Full:
            p.client_gone = True
            return False
        if not complete:
            return False
        return p.delivered.wait(BODY_STALL_SECS) and not p.client_gone

    def describe_servers(self) -> list[dict[str, object]]:
        """Every registered server, sorted by name, as the JSON server lists show them."""
        return [self.servers[name].describe() for name in sorted(self.servers)]

    def close(self) -> None:
        """The relay is stopping: answer every parked listen now (204).

        Without this a graceful stop waits for every listen's timeout.
        """
        self.closing = True
        for server in self.servers.values():
            server.wake_listeners()

    def reconfigure(self, config: RelayConfig) -> None:
        """Apply a new config without dropping servers that stay registered.

        A removed server, or one whose tripcode changed, has its parked
        listens ended at once: its next listen is then checked against the
        new config (and refused with 403 if it no longer matches).
        """
        old = self.servers
        self.servers = {}
        for name, registered in config.servers.items():
            state = old.pop(name, None)
            if state is None:
                state = ServerState(registered)
            elif state.registered.tripcode != registered.tripcode:
                state.wake_listeners()
            state.registered = registered
            self.servers[name] = state
        for state in old.values():
            state.wake_listeners()
            if state.reported_online:  # watch_presence no longer sees it
                self._announce(state, online=False)
            self._fail_waiting(state, f"server {state.registered.name!r} did not pick up the request: it was "
                                      "removed from the relay config")
        self.config = config

    def watch_presence(self, interval_secs: float = PRESENCE_CHECK_SECS) -> None:
        """Forever: announce servers coming online and going offline (to `on_event`).

        When a server goes offline, requests waiting for it fail at once (502)
        rather than each waiting out its request timeout.
        """
        while True:
            for state in list(self.servers.values()):
                online = state.is_online()
                if online != state.reported_online:
                    self._announce(state, online)
                if not online and state.queue.qsize() and not self.closing:
                    self._fail_waiting(state, f"server {state.registered.name!r} did not pick up the request: "
                                              "it went offline")
            self.presence_log.tick()
            gevent.sleep(interval_secs)

    def _fail_waiting(self, state: ServerState, reason: str) -> None:
        """Fail every request queued for `state`, not yet picked up.

        Requests that may have reached it (put back by the guess for servers
        that do not acknowledge) are left to time out (504): it may still
        answer them.
        """
        failed = 0
        kept = []
        while not state.queue.empty():
            p = state.queue.get_nowait()
            if p.cancelled or p.answered:
                continue
            if p.picked_up.is_set():
                kept.append(p)
            else:
                self.fail(p, reason)
                failed += 1
        for p in kept:
            state.queue.put_nowait(p)  # (no listen waits: the server is offline)
        if failed:
            logger.info("%s: %d waiting requests failed", reason, failed)

    def _announce(self, state: ServerState, online: bool) -> None:
        state.reported_online = online
        self.presence_log.record(state.registered.name, online)
        self._on_event("server_online" if online else "server_offline",
                      server=state.registered.name, host=state.host, version=state.version)

    # ---- frontend side: clients ----------------------------------------

    def submit(self, name: str, method: str, uri: str, headers: dict[str, bytes],
               client: str = "", body: int | None = None, upgrade: str | None = None) -> PendingRequest:
        """Queue a client request for server `name`.

        `client` names the client's share (trust.fairness_key of its address):
        while it has `requests_per_address` requests in flight at this server,
        this one waits its turn (shares.py: up to TURN_WAIT_SECS, then 503).
        `body` (its length, or -1) and `upgrade` ("websocket") need a server
        that announced it takes them; else 501.
        """
        server = self.servers.get(name)
        if server is None:
            raise UnknownServerError(f"no server named {name!r} is registered at this relay")
        if not server.is_online():
            raise BadGatewayError(f"server {name!r} is offline (not connected to the relay)")
        if body is not None and FEATURE_BODIES not in server.features:
            raise HttpError(f"server {name!r} does not take request bodies (it did not announce "
                            f"'{FEATURE_BODIES}')", status=501)
        if upgrade is not None and FEATURE_WEBSOCKET not in server.features:
            raise HttpError(f"server {name!r} does not take WebSocket connections (it did not announce "
                            f"'{FEATURE_WEBSOCKET}')", status=501)
        size = head_size(method, uri, headers)
        if size > MAX_REQUEST_HEAD_BYTES:
            raise RequestHeadTooLargeError(f"request head of {size} bytes is over the relay's limit of "
                                           f"{MAX_REQUEST_HEAD_BYTES}")
        share = self.shares.take((name, client)) if client else None
        p = PendingRequest(RelayRequest(_new_id(), method, uri, headers, body, upgrade), server, head_size=size,
                           share=share)
        try:
            self._offer(server, p)
        except gevent.queue.Full:
            self._release_share(p)
            raise QueueFullError(f"server {name!r} has too many requests waiting; try again later") from None
        self.pending[p.request.id] = p
        return p

    def must_wait_turn(self, name: str, client: str) -> bool:
        """Tell whether a request from `client` to `name` would wait for its turn now."""
        return self.shares.must_wait((name, client))

    def _release_share(self, p: PendingRequest) -> None:
        share, p.share = p.share, None
        if share is not None:
            self.shares.release(share)

    def wait_for_head(self, p: PendingRequest, last_active: Callable[[], float] | None = None,
                      ) -> ServerResponseHead:
        """Wait for the server to pick up the request, then for its response head.

        `last_active()` says when the server last made progress otherwise
        (fetching the request's body): the head's timeout counts from then.
        """
        timeout = self.config.request_timeout_secs
        name = p.server.registered.name
        try:
            picked_up = self._picked_up(p, timeout)
            if picked_up is None:
                raise BadGatewayError(f"server {name!r} did not pick up the request in {timeout:.0f} s")
            since = picked_up
            while not p.head_ready.wait(max(0.0, since + timeout - time.monotonic())):
                active = last_active() if last_active is not None else since
                if active <= since:
                    raise GatewayTimeoutError(f"server {name!r} did not answer in {timeout:.0f} s")
                since = active
            if p.failure is not None or p.head is None:
                reason = p.failure or f"server {name!r} sent no response"
                raise BadGatewayError(reason) if p.failure_status == 502 else HttpError(reason, p.failure_status)
        except BaseException:
            self.forget(p)
            raise
        return p.head

    def _picked_up(self, p: PendingRequest, timeout: float) -> float | None:
        """Wait up to `timeout` for a server to pick `p` up; None if none did, else when it did
        (time.monotonic()): the wait for its head counts from then."""
        return time.monotonic() if p.picked_up.wait(timeout) else None

    def skip_body(self, p: PendingRequest) -> None:
        """The client gets no body (HEAD, 204, 304): the server's POST ends at once."""
        p.body_wanted = False
        while not p.body.empty():  # unblock a server that sent a body anyway
            p.body.get_nowait()
        p.delivered.set()
        self.forget(p)

    def forget(self, p: PendingRequest) -> None:
        """Drop a request from the table of requests in flight, and its client's share."""
        p.cancelled = True  # a listen that finds it in a queue (requeued, say) skips it
        self.pending.pop(p.request.id, None)
        self._untake(p)
        self._release_share(p)

    # ---- helpers -------------------------------------------------------

    def requeue(self, batch: list[PendingRequest], delivered: bool = True) -> int:
        """Give requests back to their server's queue: the listen that took them is gone.

        Only requests still waiting for a response go back; the next listen
        takes them. `delivered=False` says the server surely never got them
        (no acknowledgement): they count as not picked up again. Returns how
        many went back.
        """
        returned = 0
        for p in batch:
            if p.answered or p.cancelled or p.request.id not in self.pending:
                continue
            self._untake(p)
            if not delivered:
                p.picked_up.clear()
            try:
                self._offer(p.server, p)
                returned += 1
            except gevent.queue.Full:
                self.fail(p, "the server's queue was full when its listen was lost")
        return returned

    def _offer(self, server: ServerState, p: PendingRequest) -> None:
        """Hand `p` to the server's oldest parked listen, or queue it (gevent.queue.Full if full).

        Oldest first spreads requests over the processes that share a name
        (the one that answered last re-polls last). A listen being ended in
        that instant hands the request on (`_take`) rather than drop it.
        """
        while server.waiting:
            waiter = server.waiting.pop(0)
            if not waiter.ready():
                waiter.set(p)
                return
        server.queue.put_nowait(p)

    def _untake(self, p: PendingRequest) -> None:
        if p.server.taken.pop(p.request.id, None) is not None:
            p.server.room.set()

    def _wait_for_room(self, server: ServerState, deadline: float) -> int:
        """How many more requests `server` may be handed; waits while it has its fill unanswered."""
        while (room := MAX_UNANSWERED_PER_SERVER - len(server.taken)) <= 0:
            server.room.clear()
            left = deadline - time.monotonic()
            if left <= 0 or not server.room.wait(left):
                return 0
        return room

    def _take(self, server: ServerState, deadline: float) -> PendingRequest | None:
        """The first request queued for `server`, or the first handed to this listen before `deadline`."""
        while True:
            while not server.queue.empty():
                queued: PendingRequest = server.queue.get_nowait()
                if not (queued.cancelled or queued.answered):
                    return queued
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            waiter: gevent.event.AsyncResult = gevent.event.AsyncResult()
            server.waiting.append(waiter)
            try:
                p: PendingRequest = waiter.get(timeout=remaining)
            except gevent.Timeout:
                if not waiter.ready():
                    return None
                p = waiter.value  # handed over in the same instant
            except BaseException:  # ended (ListenEndedError) with a request in hand: hand it on
                if waiter.ready():
                    self._offer_or_fail(server, waiter.value)
                raise
            finally:
                if waiter in server.waiting:
                    server.waiting.remove(waiter)
            if not (p.cancelled or p.answered):
                return p

    def _offer_or_fail(self, server: ServerState, p: PendingRequest) -> None:
        try:
            self._offer(server, p)
        except gevent.queue.Full:
            self.fail(p, "the server's queue was full when its listen ended")

    def _remember_unregistered(self, name: str, api_key: str, address: str) -> None:
        """Keep every name and tripcode offered, with where and when: anyone can offer any."""
        entry = (name[:64], tripcode.derive(api_key), address[:64])
        self.unregistered.pop(entry, None)  # re-insert: the dict stays oldest first
        if len(self.unregistered) >= MAX_UNREGISTERED_SHOWN:
            del self.unregistered[next(iter(self.unregistered))]
        self.unregistered[entry] = time.time()


class ListenEnds:
    """When parked listens end: on a grid (LISTEN_END_GRAIN_SECS), finer where listens come fast (LISTEN_END_BATCH)."""

    def __init__(self) -> None:
        self._second = 0  # the whole second (monotonic) being counted
        self._counted = 0  # listens parked in it so far
        self._before = 0  # in the second before it

    def deadline(self, started: float, timeout: float) -> float:
        """When a listen parked at `started` (monotonic seconds) for `timeout` s ends; at once for 0."""
        if timeout <= 0:
            return started
        second = int(started)
        if second != self._second:
            self._before = self._counted if second == self._second + 1 else 0
            self._second, self._counted = second, 0
        self._counted += 1
        per_second = max(self._before, self._counted)
        grain = LISTEN_END_GRAIN_SECS
        while per_second * grain > LISTEN_END_BATCH and grain > LISTEN_END_GRAIN_SECS / 64:
            grain /= 2
        return math.ceil((started + timeout) / grain) * grain


def _new_id() -> str:
    return base64.b32encode(secrets.token_bytes(_ID_BYTES)).decode("ascii")
