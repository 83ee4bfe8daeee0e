"""The relay's state: where a client's request meets a server's long-poll.

Each registered server has a bounded queue of requests waiting for a listen.
A client request becomes a `PendingRequest`; a listen takes every queued one
at once; the server's POST delivers the response head, then its body flows
through a small bounded queue to the client's response generator, so a slow
reader slows the server instead of filling memory.

Pure gevent, no Flask and no sockets: `relay.py` maps the errors raised here
to HTTP answers (each error carries its status).
"""

from __future__ import annotations

import base64
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import gevent
import gevent.event
import gevent.queue

from . import tripcode
from .config import RegisteredServer, RelayConfig
from .errors import PtthError
from .protocol import (
    MAX_LISTEN_BODY_BYTES,
    MAX_REQUEST_HEAD_BYTES,
    RelayRequest,
    ServerResponseHead,
    head_size,
)

logger = logging.getLogger(__name__)

# A server counts as online while it has a listen parked here or for this long
# after its last one ended; our server re-polls at once, so a gap this long
# means it is gone, and clients get a 502 at once instead of after a timeout.
OFFLINE_AFTER_SECS = 5.0

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

# How long a body may make no progress (server sends nothing, or the client
# reads nothing) before the transfer is cut. Long enough for a client reading
# one chunk at 16 KiB/s, short enough to free a stuck transfer.
BODY_STALL_SECS = 120.0

# How often watch_presence looks for servers coming online or going offline.
PRESENCE_CHECK_SECS = 1.0

# Names and tripcodes offered by unknown servers, kept for the admin page.
MAX_UNREGISTERED_SHOWN = 50

# 80 random bits, base32: unguessable, URL-safe, in the spec's style of id.
_ID_BYTES = 10

_END = object()   # body sentinel: the server's body ended normally
_CUT = object()   # body sentinel: the server's body broke off


class RendezvousError(PtthError):
    """An outcome that becomes an HTTP error answer with `status`."""

    status = 500


class UnknownServerError(RendezvousError):
    status = 404


class ForbiddenError(RendezvousError):
    status = 403


class UnknownRequestError(RendezvousError):
    status = 404


class BadGatewayError(RendezvousError):
    status = 502


class GatewayTimeoutError(RendezvousError):
    status = 504


class QueueFullError(RendezvousError):
    status = 503


class TooManyListenersError(RendezvousError):
    status = 429


class RequestHeadTooLargeError(RendezvousError):
    status = 431


class ListenEnded(Exception):
    """Thrown into a parked listen to end it at once with no requests.

    Used when the relay stops, when the server's registration changes, and
    when the listen's connection is found closed. A request still in the queue
    stays there: gevent leaves an item in the queue until the getter runs.
    """


class BodyCutError(PtthError):
    """The response body could not be delivered whole; the client must see a cut."""


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
    reported_online: bool = False  # last state announced by watch_presence

    def wake_listeners(self) -> None:
        """End this server's parked listens now (they answer 204)."""
        for greenlet in list(self.parked):
            gevent.kill(greenlet, ListenEnded)

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


class Rendezvous:
    """Registered servers, their queues and every request in flight."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.servers = {name: ServerState(reg) for name, reg in config.servers.items()}
        self.pending: dict[str, PendingRequest] = {}
        self.unregistered: dict[str, tuple[str, float]] = {}
        self.closing = False
        # Called as on_event(event, **fields) for server_online and server_offline.
        self.on_event: Callable[..., None] = lambda event, **fields: None
        # Called by close(), for what else the relay must end when it stops.
        self.on_close: Callable[[], None] = lambda: None

    # ---- backend side: servers -----------------------------------------

    def authenticate(self, name: str, api_key: str | None) -> ServerState:
        """Return the server named `name` if `api_key` is its key, else raise 403."""
        state = self.servers.get(name)
        if not api_key:
            raise ForbiddenError("missing X-ApiKey header")
        if state is None:
            self._remember_unregistered(name, api_key)
            raise ForbiddenError(f"server {name[:64]!r} is not registered at this relay")
        if not tripcode.matches(api_key, state.registered.tripcode):
            raise ForbiddenError(f"wrong API key for server {name!r}")
        return state

    def listen(self, server: ServerState, timeout: float) -> list[PendingRequest]:
        """Wait up to `timeout` for requests; return every one queued (maybe none)."""
        if self.closing:
            return []
        if server.listeners >= MAX_LISTENERS_PER_SERVER:
            raise TooManyListenersError(f"server {server.registered.name!r} already has "
                                        f"{MAX_LISTENERS_PER_SERVER} listens parked")
        server.listeners += 1
        server.touch()
        me = gevent.getcurrent()
        server.parked.add(me)
        try:
            try:
                first = self._take(server.queue, timeout)
            except ListenEnded:
                return []
            finally:
                server.parked.discard(me)
            if first is None:
                return []
            batch = [first]
            size = first.head_size
            while not server.queue.empty():
                p = server.queue.peek_nowait()
                if not (p.cancelled or p.answered):
                    if size + p.head_size > MAX_BATCH_BYTES:
                        break  # the next listen takes the rest
                    size += p.head_size
                    batch.append(p)
                server.queue.get_nowait()
            for p in batch:
                p.picked_up.set()
            return batch
        finally:
            server.listeners -= 1
            server.touch()

    def claim(self, request_id: str, api_key: str | None) -> PendingRequest:
        """Find the request a server answers; 404 if unknown or answered, 403 if not its own."""
        if not api_key:
            raise ForbiddenError("missing X-ApiKey header")
        p = self.pending.get(request_id)
        if p is None or p.answered or p.cancelled:
            raise UnknownRequestError(f"no request {request_id[:64]!r} is waiting for a response")
        if not tripcode.matches(api_key, p.server.registered.tripcode):
            raise ForbiddenError(f"request {request_id!r} belongs to another server")
        p.answered = True
        p.server.touch()
        return p

    def start_response(self, p: PendingRequest, head: ServerResponseHead) -> None:
        """Hand the response head to the waiting client."""
        p.head = head
        p.head_ready.set()

    def fail(self, p: PendingRequest, reason: str) -> None:
        """The server's answer was unusable: the client gets a 502 with `reason`."""
        p.failure = reason
        p.head_ready.set()

    def put_chunk(self, p: PendingRequest, chunk: bytes) -> bool:
        """Queue one body chunk for the client; False if the client is gone.

        Blocks while the queue is full: this is the backpressure that makes a
        slow client slow the server down.
        """
        if p.client_gone or not p.body_wanted:
            return False
        try:
            p.body.put(chunk, timeout=BODY_STALL_SECS)
        except gevent.queue.Full:
            logger.warning("client stalled for %.0f s, cutting request %s", BODY_STALL_SECS, p.request.id)
            p.client_gone = True
        return not p.client_gone

    def end_body(self, p: PendingRequest, complete: bool) -> bool:
        """Mark the end of the body; wait until the client has it all (P7).

        Returns True only if the client received the whole body.
        """
        if not p.body_wanted:
            return True
        if p.client_gone:
            return False
        try:
            p.body.put(_END if complete else _CUT, timeout=BODY_STALL_SECS)
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
        self.on_close()

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
        self.config = config

    def watch_presence(self, interval_secs: float = PRESENCE_CHECK_SECS) -> None:
        """Forever: announce servers coming online and going offline via on_event."""
        while True:
            for state in list(self.servers.values()):
                online = state.is_online()
                if online != state.reported_online:
                    self._announce(state, online)
            gevent.sleep(interval_secs)

    def _announce(self, state: ServerState, online: bool) -> None:
        state.reported_online = online
        logger.info("server %s is %s", state.registered.name, "online" if online else "offline")
        self.on_event("server_online" if online else "server_offline",
                      server=state.registered.name, host=state.host, version=state.version)

    # ---- frontend side: clients ----------------------------------------

    def submit(self, name: str, method: str, uri: str, headers: dict[str, bytes]) -> PendingRequest:
        """Queue a client request for server `name`."""
        server = self.servers.get(name)
        if server is None:
            raise UnknownServerError(f"no server named {name!r} is registered at this relay")
        if not server.is_online():
            raise BadGatewayError(f"server {name!r} is offline (not connected to the relay)")
        size = head_size(method, uri, headers)
        if size > MAX_REQUEST_HEAD_BYTES:
            raise RequestHeadTooLargeError(f"request head of {size} bytes is over the relay's limit of "
                                           f"{MAX_REQUEST_HEAD_BYTES}")
        request_id = base64.b32encode(secrets.token_bytes(_ID_BYTES)).decode("ascii")
        p = PendingRequest(RelayRequest(request_id, method, uri, headers), server, head_size=size)
        try:
            server.queue.put_nowait(p)
        except gevent.queue.Full:
            raise QueueFullError(f"server {name!r} has too many requests waiting; try again later") from None
        self.pending[request_id] = p
        return p

    def wait_for_head(self, p: PendingRequest) -> ServerResponseHead:
        """Wait for the server to pick up the request, then for its response head."""
        timeout = self.config.request_timeout_secs
        if not p.picked_up.wait(timeout):
            self.forget(p)
            raise BadGatewayError(f"server {p.server.registered.name!r} did not pick up the request in {timeout:.0f} s")
        if not p.head_ready.wait(timeout):
            self.forget(p)
            raise GatewayTimeoutError(f"server {p.server.registered.name!r} did not answer in {timeout:.0f} s")
        if p.failure is not None or p.head is None:
            self.forget(p)
            raise BadGatewayError(f"server {p.server.registered.name!r} sent a bad response: {p.failure}")
        return p.head

    def skip_body(self, p: PendingRequest) -> None:
        """The client gets no body (HEAD, 204, 304): the server's POST ends at once."""
        p.body_wanted = False
        while not p.body.empty():  # unblock a server that sent a body anyway
            p.body.get_nowait()
        p.delivered.set()
        self.forget(p)

    def forget(self, p: PendingRequest) -> None:
        """Drop a request from the table of requests in flight."""
        p.cancelled = True  # a listen that finds it in a queue (requeued, say) skips it
        self.pending.pop(p.request.id, None)

    # ---- helpers -------------------------------------------------------

    def requeue(self, batch: list[PendingRequest]) -> int:
        """Give requests back to their server's queue: the listen that took them is gone.

        Only requests still waiting for a response go back; the next listen
        takes them. Returns how many went back.
        """
        returned = 0
        for p in batch:
            if p.answered or p.cancelled or p.request.id not in self.pending:
                continue
            try:
                p.server.queue.put_nowait(p)
                returned += 1
            except gevent.queue.Full:
                self.fail(p, "the server's queue was full when its listen was lost")
        return returned

    def _take(self, queue: gevent.queue.Queue, timeout: float) -> PendingRequest | None:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                p: PendingRequest = queue.get(timeout=remaining)
            except gevent.queue.Empty:
                return None
            if not (p.cancelled or p.answered):
                return p

    def _remember_unregistered(self, name: str, api_key: str) -> None:
        if len(self.unregistered) >= MAX_UNREGISTERED_SHOWN and name not in self.unregistered:
            oldest = min(self.unregistered, key=lambda n: self.unregistered[n][1])
            del self.unregistered[oldest]
        self.unregistered[name[:64]] = (tripcode.derive(api_key), time.time())


class BodyStream:
    """The WSGI body of a relayed response: chunks from the server's POST.

    A class rather than a generator so that `close()` frees the request even
    when the WSGI server never starts iterating. When the server's body breaks
    off, stalls, or does not match its Content-Length, `cut()` is called to
    drop the client's connection; if it cannot (returns False), BodyCutError is
    raised so the WSGI server drops it instead. Either way the client never
    sees a short body passed off as complete.
    """

    def __init__(self, rendezvous: Rendezvous, p: PendingRequest, cut: Callable[[str], bool]) -> None:
        self._rv = rendezvous
        self._p = p
        self._cut = cut
        self.sent = 0
        self.was_cut = False
        self._started = False
        self._complete = False
        self._closed = False
        length = p.head.headers.get("content-length") if p.head else None
        self._declared = int(length) if length is not None and length.isdigit() else None

    def __iter__(self) -> BodyStream:
        return self

    def __next__(self) -> bytes:
        if self._closed:
            raise StopIteration
        if not self._started:
            # An empty first chunk makes the WSGI server send the status and
            # headers now, before the first body bytes arrive.
            self._started = True
            return b""
        if self._p.client_gone:  # put_chunk gave up on this client: it read nothing for too long
            return self._break_off(f"client read nothing for {BODY_STALL_SECS:.0f} s")
        try:
            item = self._p.body.get(timeout=BODY_STALL_SECS)
        except gevent.queue.Empty:
            return self._break_off(f"server sent nothing for {BODY_STALL_SECS:.0f} s")
        if item is _CUT:
            return self._break_off("server's response body broke off")
        if item is _END:
            if self._declared is not None and self.sent != self._declared:
                return self._break_off(f"server sent {self.sent} bytes, not its Content-Length {self._declared}")
            self._complete = True
            self.close()
            raise StopIteration
        chunk: bytes = item
        self.sent += len(chunk)
        if self._declared is not None and self.sent > self._declared:
            return self._break_off(f"server sent more than its Content-Length {self._declared}")
        return chunk

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        p = self._p
        if not self._complete:
            p.client_gone = True
            while not p.body.empty():  # unblock a server waiting to put
                p.body.get_nowait()
        p.delivered.set()
        self._rv.forget(p)

    def _break_off(self, reason: str) -> bytes:
        logger.warning("cutting client of request %s: %s", self._p.request.id, reason)
        self.was_cut = True
        self.close()
        if self._cut(reason):
            raise StopIteration
        raise BodyCutError(reason)
