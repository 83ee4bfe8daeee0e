"""The relay's state for TCP port forwarding (spec 003): where a client's
connect meets a server's listen, and the pipes that join their streams.

A client's connect becomes a `ForwardedConnection`, offered on its
(server, port name) until one of that server's listens takes it. The server
then accepts it (or refuses it), and four HTTP streams carry its bytes:

    client --upstream POST body-->  [up pipe]   --accept response body--> server
    client <--connect response body-- [down pipe] <--downstream POST body-- server

Each pipe is a small bounded queue, so a slow reader at one end slows the
writer at the other instead of filling memory. A stream's body ending with
its last chunk ends its pipe: that is a TCP half-close, passed on as one. Any
stream breaking off instead aborts the whole connection (`abort`): both pipes
wake whoever waits on them, and every attached HTTP connection is shut down,
so each proxy sees a cut and closes its TCP socket.

Pure gevent, no Flask: the errors raised here are `errors.HttpError`s, each
with its status, which `forward_api.py` answers with; it also registers the
sockets to shut down. Slightly over 450 lines: one connection's life, from
offer to abort, reads best in one module.
"""

from __future__ import annotations

import logging
import secrets
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import gevent
import gevent.event
import gevent.queue

from ptth_lib.config import RegisteredClient, RelayConfig
from ptth_lib.errors import (
    BadGatewayError,
    ConflictError,
    ForbiddenError,
    GatewayTimeoutError,
    HttpError,
    PtthError,
    QueueFullError,
    RefusedError,
    TooManyListenersError,
    UnknownRequestError,
)
from ptth_lib.keepalive import keep_alive
from ptth_lib.relay.rendezvous import ListenEndedError
from ptth_lib.wire import tripcode
from ptth_lib.wire.names import short_id

logger = logging.getLogger(__name__)

# Pieces queued per direction, and the largest piece read from a POST body at
# once: at most 1 MiB in the relay per direction of a busy connection (none
# for an idle one). Pieces of 256 KiB rather than 64 KiB cut the relay's CPU
# per byte by about a third, its bottleneck in bulk transfers (BENCHMARKS.md).
PIPE_PIECES = 4
PIECE_BYTES = 256 * 1024

# A connect waits this long for one of the server's listens to take it. The
# server re-polls within milliseconds, so this only covers a slow network.
OFFER_WAIT_SECS = 10.0

# After its listen took a connection, the server has this long to accept or
# refuse it (it first connects to its local TCP server, with a 5 s limit).
DECIDE_WAIT_SECS = 10.0

# After the connection is accepted, the client's upstream and the server's
# downstream POSTs must arrive within this long (both follow at once).
ATTACH_WAIT_SECS = 10.0

# A port counts as forwarded while the server has a listen parked on it, or
# for this long after its last one ended; otherwise a connect fails at once
# (502) instead of waiting OFFER_WAIT_SECS for a server that is not there.
PORT_GONE_AFTER_SECS = 5.0

# Bounds on what one peer can make the relay hold.
MAX_CONNECTIONS_PER_CLIENT = 256
MAX_CONNECTIONS_PER_SERVER = 1024
MAX_OFFERS_PER_PORT = 64
MAX_LISTENS_PER_PORT = 8
# Port names one server may listen on at once. The relay cannot know a
# server's [forwarded_ports]; this bounds what a server (or a stolen key) can
# make it remember. Names with no listen, no offer and no recent listen are
# forgotten by the sweep.
MAX_PORTS_PER_SERVER = 256

# How often the sweeper looks for idle and stuck connections.
SWEEP_SECS = 1.0

# The longest refusal reason passed from a server to its client.
MAX_REASON_CHARS = 200

# 128 random bits, URL-safe: a connection id cannot be guessed, and each use
# is checked against the key that opened it besides.
ID_BYTES = 16

_END = object()    # pipe sentinel: this direction ended cleanly (TCP half-close)
_ABORT = object()  # pipe sentinel: the connection was aborted

STREAMS = ("connect", "accept", "upstream", "downstream")

# The port of a WebSocket carried as a forwarded connection (upgrade.py): never
# a port name a server can listen on, so no TCP call reaches one.
WEBSOCKET_PORT = "(websocket)"


class PipeAbortedError(PtthError):
    """The connection this pipe belongs to was aborted."""


class Pipe:
    """One direction of a forwarded connection: a bounded queue of byte pieces."""

    def __init__(self, owner: ForwardedConnection) -> None:
        self._owner = owner
        self._queue: gevent.queue.Queue = gevent.queue.Queue(PIPE_PIECES)
        self.bytes = 0
        self.ended = False  # the reader has seen the clean end

    def put(self, piece: bytes) -> None:
        """Queue a piece, waiting while the pipe is full; PipeAbortedError if aborted."""
        self._put(piece)
        self.bytes += len(piece)

    def end(self) -> None:
        """This direction is done: the reader gets None after the last piece."""
        self._put(_END)

    def get(self) -> bytes | None:
        """The next piece, waiting for it; None at the clean end; PipeAbortedError if aborted."""
        if self._owner.aborted:
            raise PipeAbortedError(self._owner.abort_reason)
        item = self._queue.get()
        if self._owner.aborted or item is _ABORT:
            raise PipeAbortedError(self._owner.abort_reason)
        self._owner.last_active = time.monotonic()
        if item is _END:
            self.ended = True
            return None
        piece: bytes = item
        return piece

    def get_ready(self, limit: int) -> bytes:
        """Pieces already queued, joined up to about `limit` bytes, without waiting.

        Lets the reader send one larger write instead of many small ones when
        the far side is faster than this side's reader.
        """
        parts = []
        size = 0
        while size < limit and not self._owner.aborted:
            try:
                item = self._queue.peek_nowait()
            except gevent.queue.Empty:
                break
            if item is _END or item is _ABORT:
                break
            self._queue.get_nowait()
            parts.append(item)
            size += len(item)
        return b"".join(parts)

    def wake(self) -> None:
        """Drop what is queued and wake the reader and writer (after an abort)."""
        while True:
            try:
                self._queue.get_nowait()
            except gevent.queue.Empty:
                break
        try:
            self._queue.put_nowait(_ABORT)
        except gevent.queue.Full:
            pass

    def _put(self, item: object) -> None:
        if self._owner.aborted:
            raise PipeAbortedError(self._owner.abort_reason)
        self._queue.put(item)  # blocks while full: the backpressure; abort() drains it
        if self._owner.aborted:
            raise PipeAbortedError(self._owner.abort_reason)
        self._owner.last_active = time.monotonic()


@dataclass(eq=False)
class ForwardedConnection:
    """One TCP connection forwarded from a client to a server's port."""

    id: str
    client: str
    server: str
    port: str
    created: float = field(default_factory=time.monotonic)
    # Set to True when the server accepts; to an exception when it refuses.
    decision: gevent.event.AsyncResult = field(default_factory=gevent.event.AsyncResult)
    taken: float | None = None      # when a listen took it
    accepted: float | None = None   # when the server accepted it
    last_active: float = field(default_factory=time.monotonic)
    attached: set[str] = field(default_factory=set)
    finished: set[str] = field(default_factory=set)
    aborted: bool = False
    abort_reason: str = ""
    # How to cut each stream while it runs, by stream: shut its socket down, or abort
    # the peer link that carries it from another relay node (cluster/streams.py).
    _cuts: dict[str, Callable[[], None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.up = Pipe(self)    # client -> server
        self.down = Pipe(self)  # server -> client

    def describe(self) -> str:
        return f"{short_id(self.id)} {self.client} -> {self.server}:{self.port}"


class PortForwarding:
    """Every forwarded TCP connection in flight, and the listens waiting for them."""

    def __init__(self, config: RelayConfig,
                 on_closed: Callable[[ForwardedConnection], None] = lambda conn: None) -> None:
        """`on_closed(conn)` hears of every connection forgotten, cleanly or not (for metrics)."""
        self.config = config
        self.connections: dict[str, ForwardedConnection] = {}
        self._offers: dict[tuple[str, str], gevent.queue.Queue] = {}
        self._listens: dict[tuple[str, str], int] = {}
        self._last_listen: dict[tuple[str, str], float] = {}
        self.closing = False
        self._parked: set[gevent.Greenlet] = set()
        self._on_closed = on_closed

    # ---- clients ---------------------------------------------------------

    def authenticate_client(self, api_key: str | None) -> RegisteredClient:
        """The registered client whose key this is, or ForbiddenError.

        Every client's tripcode is compared (in constant time), so the time
        taken does not tell which entry, if any, came close.
        """
        if not api_key:
            raise ForbiddenError("missing X-ApiKey header")
        code = tripcode.derive(api_key)
        found = None
        for client in self.config.clients.values():
            if secrets.compare_digest(code.encode(), client.tripcode.encode()):
                found = client
        if found is None:
            raise ForbiddenError("unknown client key: register its tripcode in a [[clients]] table")
        return found

    def connect(self, client: RegisteredClient, server: str, port: str) -> ForwardedConnection:
        """Offer a new connection on `server`'s `port`; wait until it is accepted.

        Raises ForbiddenError (not allowed), BadGatewayError (port not
        forwarded, or the server refused), GatewayTimeoutError (no answer).
        """
        if not client.may_reach(server, port):
            raise ForbiddenError(f"client {client.name!r} may not reach {server}:{port} "
                                 "(see allow in its [[clients]] table)")
        if self.closing:
            raise BadGatewayError("the relay is stopping")
        conn = self._offer_new(client.name, server, port)
        try:
            self._wait_for_decision(conn)
        except HttpError:
            self._forget(conn)
            raise
        except BaseException:  # the client hung up while waiting (GreenletExit)
            self.abort(conn, "client left before the server accepted")
            raise
        conn.attached.add("connect")
        return conn

    def _offer_new(self, client: str, server: str, port: str) -> ForwardedConnection:
        """A new connection of `client`, offered on `server`'s `port` and in the table of connections.

        Raises BadGatewayError (port not forwarded) or QueueFullError (a limit).
        """
        if not self._port_is_listened(server, port):
            raise BadGatewayError(f"server {server!r} is offline or does not forward port {port!r}")
        if self._count(lambda c: c.client == client) >= MAX_CONNECTIONS_PER_CLIENT:
            raise QueueFullError(f"client {client!r} has {MAX_CONNECTIONS_PER_CLIENT} connections open")
        if self._count(lambda c: c.server == server) >= MAX_CONNECTIONS_PER_SERVER:
            raise QueueFullError(f"server {server!r} has {MAX_CONNECTIONS_PER_SERVER} connections open")
        offers = self._offers.setdefault((server, port), gevent.queue.Queue(MAX_OFFERS_PER_PORT))
        conn = ForwardedConnection(secrets.token_urlsafe(ID_BYTES), client, server, port)
        try:
            offers.put_nowait(conn)
        except gevent.queue.Full:
            raise QueueFullError(f"{MAX_OFFERS_PER_PORT} connections already wait for {server}:{port}") from None
        self.connections[conn.id] = conn
        return conn

    def _wait_for_decision(self, conn: ForwardedConnection) -> None:
        """Wait OFFER_WAIT_SECS for a listen to take `conn`, then DECIDE_WAIT_SECS from then on."""
        while True:
            if conn.taken is None:
                deadline, reason = conn.created + OFFER_WAIT_SECS, "the server took no listen for it"
            else:
                deadline, reason = conn.taken + DECIDE_WAIT_SECS, "the server neither accepted nor refused it"
            left = deadline - time.monotonic()
            if left <= 0:
                self.abort(conn, f"not accepted in time: {reason}")
                raise GatewayTimeoutError(f"server {conn.server!r} did not accept the connection in time "
                                          f"({reason})")
            try:
                conn.decision.get(timeout=left)
                return
            except gevent.Timeout:
                continue  # look again: a listen may have taken it meanwhile, moving the deadline

    def attach_upstream(self, conn_id: str, client: str) -> ForwardedConnection:
        """The connection the upstream POST of client `client` (its name) feeds; 404 unknown, 403 not
        its own, 409 twice."""
        conn = self._find(conn_id)
        if conn.client != client:
            raise ForbiddenError(f"connection {short_id(conn_id)} is not client {client!r}'s")
        return self._attach(conn, "upstream", after="connect")

    def open_websocket(self, conn_id: str, client: str, server: str) -> ForwardedConnection:
        """A WebSocket the app accepted, carried as a connection that is open at once (upgrade.py).

        Its four streams: the client's connection written ("connect") and read
        ("upstream"), the server's response POST ("downstream") and body GET
        ("accept"). Counts toward the server's connections (503 past them).
        """
        if self.closing:
            raise BadGatewayError("the relay is stopping")
        if self._count(lambda c: c.server == server) >= MAX_CONNECTIONS_PER_SERVER:
            raise QueueFullError(f"server {server!r} has {MAX_CONNECTIONS_PER_SERVER} connections open")
        conn = ForwardedConnection(conn_id, client, server, WEBSOCKET_PORT)
        conn.taken = conn.accepted = time.monotonic()
        self.connections[conn.id] = conn
        logger.info("websocket %s open", conn.describe())
        return conn

    # ---- servers ---------------------------------------------------------

    def listen(self, server: str, port: str, timeout: float) -> ForwardedConnection | None:
        """Wait up to `timeout` for a client to connect to `port`; None if none did."""
        key = (server, port)
        if self.closing:
            return None
        if self._listens.get(key, 0) >= MAX_LISTENS_PER_PORT:
            raise TooManyListenersError(f"server {server!r} already has {MAX_LISTENS_PER_PORT} "
                                        f"listens parked on port {port!r}")
        if key not in self._offers and sum(1 for s, _ in self._offers if s == server) >= MAX_PORTS_PER_SERVER:
            raise TooManyListenersError(f"server {server!r} already listens on {MAX_PORTS_PER_SERVER} "
                                        "port names")
        offers = self._offers.setdefault(key, gevent.queue.Queue(MAX_OFFERS_PER_PORT))
        self._listens[key] = self._listens.get(key, 0) + 1
        me = gevent.getcurrent()
        self._parked.add(me)
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                try:
                    conn: ForwardedConnection = offers.get(timeout=left)
                except (gevent.queue.Empty, ListenEndedError):
                    return None
                if not conn.aborted:  # its client may have given up meanwhile
                    conn.taken = time.monotonic()
                    return conn
        finally:
            self._parked.discard(me)
            self._listens[key] -= 1
            if not self._listens[key]:
                del self._listens[key]
            self._last_listen[key] = time.monotonic()

    def find_for_server(self, conn_id: str, server_is: Callable[[str], None]) -> ForwardedConnection:
        """Look a connection up for its server: `server_is(name)` raises if the caller is not it."""
        conn = self._find(conn_id)
        server_is(conn.server)
        return conn

    def accept(self, conn: ForwardedConnection) -> None:
        """The server accepts: its connect answers 200; 409 if decided already."""
        if conn.decision.ready() or conn.taken is None:
            raise ConflictError(f"connection {short_id(conn.id)} was already accepted or refused, or never offered")
        self._attach(conn, "accept")
        conn.accepted = time.monotonic()
        conn.decision.set(True)

    def refuse(self, conn: ForwardedConnection, reason: str) -> None:
        """The server refuses: its client's connect answers 502 with the reason."""
        if conn.decision.ready() or conn.taken is None:
            raise ConflictError(f"connection {short_id(conn.id)} was already accepted or refused, or never offered")
        reason = "".join(ch for ch in reason[:MAX_REASON_CHARS] if ch.isprintable()) or "no reason given"
        logger.info("connection %s refused by the server: %s", conn.describe(), reason)
        conn.decision.set_exception(RefusedError(f"server {conn.server!r} refused: {reason}"))

    def attach_downstream(self, conn: ForwardedConnection) -> ForwardedConnection:
        """The connection a server's downstream POST feeds; 409 if attached twice."""
        return self._attach(conn, "downstream", after="accept")

    # ---- both --------------------------------------------------------------

    def add_socket(self, conn: ForwardedConnection, stream: str, sock: socket.socket | None) -> None:
        """Shut `sock` down if the connection is aborted while `stream` runs on it; keep it alive while idle."""
        if sock is not None:
            keep_alive(sock)
            self.add_cut(conn, stream, lambda: _shut(sock))

    def add_cut(self, conn: ForwardedConnection, stream: str, cut: Callable[[], None]) -> None:
        """Call `cut` if the connection is aborted while `stream` runs (at once if it is already)."""
        conn._cuts[stream] = cut
        if conn.aborted:
            cut()

    def finish(self, conn: ForwardedConnection, stream: str) -> None:
        """`stream` ended cleanly; forget the connection once all four have."""
        conn._cuts.pop(stream, None)  # its connection may carry other requests now
        conn.finished.add(stream)
        if conn.finished.issuperset(STREAMS):
            self._forget(conn)

    def abort(self, conn: ForwardedConnection, reason: str) -> None:
        """Close all four streams: every party sees a cut, not a clean end."""
        if conn.aborted:
            return
        conn.aborted = True
        conn.abort_reason = reason
        logger.info("connection %s aborted: %s", conn.describe(), reason)
        conn.up.wake()
        conn.down.wake()
        for cut in list(conn._cuts.values()):
            cut()
        self._forget(conn)

    def sweep(self, interval_secs: float = SWEEP_SECS) -> None:
        """Forever: abort idle connections and ones whose streams never came."""
        while True:
            gevent.sleep(interval_secs)
            now = time.monotonic()
            idle_limit = self.config.tcp_idle_timeout_secs
            self._forget_idle_ports(now)
            for conn in list(self.connections.values()):
                if conn.accepted is None:
                    continue  # connect() times the offer out itself
                missing = set(STREAMS) - conn.attached
                if missing and now - conn.accepted > ATTACH_WAIT_SECS:
                    self.abort(conn, f"{' and '.join(sorted(missing))} never came")
                elif idle_limit and now - conn.last_active > idle_limit:
                    self.abort(conn, f"idle for {idle_limit:.0f} s (tcp_idle_timeout_secs)")

    def close(self) -> None:
        """The relay is stopping: end parked listens now (204) and abort open connections.

        A graceful stop would otherwise wait for every forwarded connection
        (an SSH session may last days) and then cut it anyway.
        """
        self.closing = True
        for greenlet in list(self._parked):
            gevent.kill(greenlet, ListenEndedError)
        for conn in list(self.connections.values()):
            self.abort(conn, "the relay is stopping")

    def reconfigure(self, config: RelayConfig) -> None:
        """New config: new connections are checked against it; open ones stay."""
        self.config = config

    def count_open(self) -> int:
        return sum(1 for c in self.connections.values() if c.accepted is not None)

    def _forget_idle_ports(self, now: float) -> None:
        """Drop the tables of port names with no listen, no offer and no listen for a while."""
        for key, last in list(self._last_listen.items()):
            offers = self._offers.get(key)
            if key in self._listens or (offers is not None and not offers.empty()):
                continue
            if now - last >= PORT_GONE_AFTER_SECS:
                del self._last_listen[key]
                self._offers.pop(key, None)

    def _port_is_listened(self, server: str, port: str) -> bool:
        key = (server, port)
        if self._listens.get(key, 0) > 0:
            return True
        return time.monotonic() - self._last_listen.get(key, float("-inf")) < PORT_GONE_AFTER_SECS

    def _count(self, which: Callable[[ForwardedConnection], bool]) -> int:
        return sum(1 for c in self.connections.values() if which(c))

    def _find(self, conn_id: str) -> ForwardedConnection:
        conn = self.connections.get(conn_id)
        if conn is None or conn.aborted or conn.port == WEBSOCKET_PORT:  # a WebSocket is upgrade.py's
            raise UnknownRequestError(f"no connection {conn_id[:64]!r} (closed, timed out, or never made)")
        return conn

    def _attach(self, conn: ForwardedConnection, stream: str, after: str | None = None) -> ForwardedConnection:
        if stream in conn.attached:
            raise ConflictError(f"connection {short_id(conn.id)} already has its {stream} stream")
        if after is not None and after not in conn.attached:
            raise ConflictError(f"connection {short_id(conn.id)} is not open yet: {after} comes first")
        conn.attached.add(stream)
        return conn

    def _forget(self, conn: ForwardedConnection) -> None:
        if self.connections.pop(conn.id, None) is not None:
            self._on_closed(conn)


def _shut(sock: socket.socket) -> None:
    """Shut a stream's connection down; when the WSGI server closes it, it is reset.

    The reset matters when the proxy has stopped reading: a FIN would wait
    behind the bytes it has not read, a reset does not.
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
