"""The cluster's one boundary with Redis: its URL, timeouts, scripts and failures.

Every Redis call the cluster makes goes through a `Store`. Each step of the
rendezvous that changes shared state is one Lua script in `scripts/`, run
atomically by redis-server in one round trip (CLUSTER.md sections 1 and 2);
this module loads them by SHA and gives each a typed Python wrapper. Each
script is sent with `scripts/_lib.lua` in front of it: the helpers every
script shares (handing a head over, settling what a node held, presence),
whose header also lists every key. The few steps that need no script (a
lease record, the operators' pages) are one command or one MULTI each.

Failures: any Redis error becomes a `ClusterUnavailableError` (503, a plain
message naming Redis by its URL without the password), and the node logs one
line when Redis goes away and one when it is back, never one per request
(CLUSTER.md section 6). Scripts are never retried blindly: an OFFER whose
answer was lost may have queued its head, so the caller answers 503.

The URL's password never appears in a log line or an error: `redacted(url)`
is what every message shows.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar, cast
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.retry import Retry

from ptth_lib.errors import ConfigError, ServiceUnavailableError
from ptth_lib.relay.audit import RECENT_ENTRIES
from ptth_lib.relay.forwarding import (
    MAX_CONNECTIONS_PER_CLIENT,
    MAX_CONNECTIONS_PER_SERVER,
    MAX_LISTENS_PER_PORT,
    MAX_OFFERS_PER_PORT,
    MAX_PORTS_PER_SERVER,
    PORT_GONE_AFTER_SECS,
)
from ptth_lib.relay.rendezvous import (
    LEAVE_GRACE_SECS,
    MAX_BATCH_BYTES,
    MAX_LISTENERS_PER_SERVER,
    MAX_QUEUED_PER_SERVER,
    MAX_UNANSWERED_PER_SERVER,
    MAX_UNREGISTERED_SHOWN,
    OFFLINE_AFTER_SECS,
)
from ptth_lib.relay.shares import TURN_WAIT_SECS

logger = logging.getLogger(__name__)

# Every key the cluster writes starts with this (CLUSTER.md section 1), so one Redis
# can hold other data beside it.
KEY_PREFIX = "ptth:"

# A Redis that does not accept a connection within a second is down for this request:
# on a LAN or loopback a connect takes well under a millisecond (CLUSTER.md section 6).
REDIS_CONNECT_TIMEOUT_SECS = 1.0
# A command (a script runs in well under a millisecond) that has no answer in 2 s means a
# paused or partitioned Redis: the client gets 503 in 2 s rather than hanging. redis-py then
# drops that connection, so a late reply is never read as the answer to another command.
REDIS_COMMAND_TIMEOUT_SECS = 2.0

# The dispatcher's blocking read of its inbox (BLMPOP) waits this long for a message, so
# that it notices a stop within a second; its socket allows the command timeout beyond it.
INBOX_WAIT_SECS = 1.0

# A node id: 8 characters of base32 (40 random bits, claimed at registration), the start of
# every id the node makes, so that any node can tell an id's owner (CLUSTER.md section 3).
# _lib.lua's NODE_ID_CHARS is the same number.
NODE_ID_CHARS = 8
# A WebSocket's record in held:{N} is its id with this after it: its request, with the same id,
# has a record of its own until it ends (tcp_open_websocket).
WEBSOCKET_HELD_MARK = "/w"
# A node renews node:{N} every 2 s; three missed renewals and the sweeper takes it for dead.
NODE_TTL_SECS = 6.0
# PRESENCE and SWEEP run once a second for the whole cluster: every node tries each second,
# and the first to claim the tick (SET NX PX) runs it. A tick a little shorter than the
# second leaves it free for the next second's first node, whoever that is.
CLUSTER_TICK_SECS = 0.9

SCHEMES = ("redis", "rediss", "unix")

# Shown in place of a password.
_HIDDEN = "***"

_SCRIPTS = Path(__file__).parent / "scripts"

T = TypeVar("T")


class ClusterUnavailableError(ServiceUnavailableError):
    """The relay's Redis cannot be reached or refused a command (503); try again shortly."""


# ---- URLs ---------------------------------------------------------------------


def redacted(url: str) -> str:
    """`url` with any password hidden: in the user part and in a `password=` query parameter.

    A user part with no colon is hidden whole: redis-py reads it as a user
    name, but it is most often a password written without its colon.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return f"<a malformed Redis URL of {len(url)} characters>"
    netloc = parts.netloc
    userinfo, at, hostinfo = netloc.rpartition("@")
    if at:
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}:{_HIDDEN}@{hostinfo}" if colon else f"{_HIDDEN}@{hostinfo}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(key.lower() == "password" for key, _ in pairs):
            query = urlencode([(key, _HIDDEN if key.lower() == "password" else value) for key, value in pairs],
                              safe="*")
    # Joined by hand: urlunsplit would write unix:///path as unix:/path.
    shown = f"{parts.scheme}://{netloc}{parts.path}" if "://" in url else urlunsplit(
        (parts.scheme, netloc, parts.path, "", ""))
    return shown + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")


def _password_of(url: str) -> str | None:
    """The password in `url` as written (user part or query), to scrub it from third-party messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    userinfo, at, _ = parts.netloc.rpartition("@")
    if at:
        return userinfo.partition(":")[2] or userinfo.partition(":")[0] or None
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key.lower() == "password" and value:
            return value
    return None


# ---- results ------------------------------------------------------------------

OfferOutcome = Literal["handed", "queued", "full", "offline", "no feature", "wait", "gone"]
ParkOutcome = Literal["took", "parked", "too many", "unknown node"]
HeartbeatOutcome = Literal["alive", "swept", "restarted"]
TcpConnectOutcome = Literal["handed", "queued", "port gone", "client limit", "server limit", "full", "opened",
                            "dropped"]
TcpListenOutcome = Literal["took", "parked", "too many", "too many ports", "unknown node"]


@dataclass(frozen=True)
class QueuedHead:
    """A request head as it waits in a server's queue: its id, its deadline and its encoded head."""

    request_id: str
    head: bytes
    # When its owner stops waiting (submit time + request_timeout_secs), in ms since the epoch
    # by the owner's clock; PARK drops it after that. 0: no deadline.
    deadline_ms: int = 0

    def encode(self) -> bytes:
        """The queue entry: the id, the deadline and the head, a space between each.

        Ids are A-Z a-z 0-9 _ -: never a space.
        """
        if not self.request_id.isascii() or " " in self.request_id or not self.request_id:
            raise ValueError(f"request id {self.request_id[:64]!r} cannot name a queue entry")
        if self.deadline_ms < 0:
            raise ValueError(f"deadline {self.deadline_ms} is before the epoch")
        return b"%s %d %s" % (self.request_id.encode("ascii"), self.deadline_ms, self.head)

    @classmethod
    def decode(cls, entry: bytes) -> QueuedHead:
        request_id, _, rest = entry.partition(b" ")
        deadline, _, head = rest.partition(b" ")
        return cls(request_id.decode("ascii"), head, int(deadline))


class Presence(NamedTuple):
    """A server as the whole cluster sees it (Store.server_presence)."""

    last_seen: float | None  # seconds since the epoch
    online: bool
    version: str | None  # as its latest listen reported them, on whichever node
    host: str | None


def websocket_held_id(connection_id: str) -> str:
    """The id under which a WebSocket is held (held:{N}) and settled: its request's id, marked."""
    return connection_id + WEBSOCKET_HELD_MARK


@dataclass(frozen=True)
class OfferResult:
    """What OFFER did with a request: handed to `node`'s parked listen, queued, or neither."""

    outcome: OfferOutcome
    node: str | None = None  # the node whose listen got the head, for "handed"
    here: bool = False  # "handed" to a listen of the owner's own node: not through its inbox, the owner hands it
    feature: str | None = None  # the feature the server did not announce, for "no feature" (501)


@dataclass(frozen=True)
class ParkResult:
    """What PARK did with a listen: took queued heads, parked it, or refused it."""

    outcome: ParkOutcome
    heads: tuple[QueuedHead, ...] = ()  # for "took", oldest first (maybe none for max_requests=0)


@dataclass(frozen=True)
class SettleResult:
    """What SETTLE did: how many of the ended ids the node held, how many heads it handed on."""

    settled: int
    handed: int


# ---- inbox messages (each node's list of messages: CLUSTER.md sections 1 and 2) ----


@dataclass(frozen=True)
class InboxHead:
    """A head OFFER (or SETTLE, SWEEP) handed to one of this node's parked listens for `server`."""

    server: str
    head: QueuedHead


@dataclass(frozen=True)
class InboxAck:
    """A listen of `server` (on any node) acknowledged this node's batch `batch_id`."""

    server: str
    batch_id: str


@dataclass(frozen=True)
class InboxRequeue:
    """The listen node holding this node's request died with it unacknowledged: offer it again
    if it is still unanswered (Store.offer_again)."""

    server: str
    request_id: str


@dataclass(frozen=True)
class InboxOffline:
    """PRESENCE found `server` offline and took this node's request out of its queue (502)."""

    server: str
    request_id: str


@dataclass(frozen=True)
class InboxTurn:
    """A share of client address `client` at `server` was freed: its waiting requests may offer again."""

    server: str
    client: str


@dataclass(frozen=True)
class InboxLeave:
    """A process of `server` is leaving: end this node's parked listens for it (204)."""

    server: str


@dataclass(frozen=True)
class InboxConnection:
    """A forwarded connection TCP_CONNECT handed to this node's parked listen on `server`'s `port`."""

    server: str
    port: str
    connection_id: str
    client: str


InboxMessage = InboxHead | InboxAck | InboxRequeue | InboxOffline | InboxTurn | InboxLeave | InboxConnection


# ---- the node registry, presence, the sweeper --------------------------------


def new_node_id() -> str:
    """A random node id: NODE_ID_CHARS characters of base32 (A-Z 2-7), 40 bits."""
    return base64.b32encode(secrets.token_bytes(NODE_ID_CHARS * 5 // 8)).decode("ascii")


@dataclass(frozen=True)
class NodeInfo:
    """A node as the others see it in node:{N}."""

    node: str
    peer: str  # host:port of its peer listener (peer_bind)
    config_hash: str  # SHA-256 of the config it runs
    host: str
    pid: int

    def fields(self) -> list[str]:
        return ["peer", self.peer, "config", self.config_hash, "host", self.host, "pid", str(self.pid)]


@dataclass(frozen=True)
class RegisterResult:
    """REGISTER's answer: the id taken or not, and the cluster's epoch and peer secret."""

    outcome: Literal["registered", "taken"]  # taken: another node has that id; draw again
    epoch: str  # changes only when Redis restarted (lost everything)
    secret: str  # the peer links' shared secret (hex); never log it


@dataclass(frozen=True)
class PresenceEvent:
    """A server came online or went offline, reported once for the whole cluster."""

    server: str
    online: bool
    host: str | None
    version: str | None


@dataclass(frozen=True)
class PresenceResult:
    """PRESENCE's answer: whether this node ran it this second, the events, the heads failed."""

    ran: bool
    events: tuple[PresenceEvent, ...] = ()
    failed: int = 0  # queued heads of servers gone offline, sent back to their owners


@dataclass(frozen=True)
class SweepResult:
    """SWEEP's answer: whether this node ran it this second, and the dead nodes it cleaned up after."""

    ran: bool
    swept: tuple[str, ...] = ()


# ---- the operators' pages and the scraper API's limit --------------------------


@dataclass(frozen=True)
class FailureResult:
    """FAILED's answer: a limited address (429 with Retry-After), or this failure counted."""

    limited: bool
    retry_after_secs: float = 0.0  # for limited: until the window ends
    failures: int = 0  # for not limited: failures in the window, this one included


@dataclass(frozen=True)
class UnregisteredServer:
    """A name and tripcode an unknown server offered, from where, and when last (wall seconds)."""

    name: str
    tripcode: str
    address: str
    last_seen: float


# ---- TCP forwarding (CLUSTER.md section 4) ------------------------------------


@dataclass(frozen=True)
class TcpConnectResult:
    """What TCP_CONNECT did with a connection: handed to `node`'s parked listen, queued, or neither."""

    outcome: TcpConnectOutcome
    node: str | None = None  # for "handed"


@dataclass(frozen=True)
class TcpListenResult:
    """What TCP_LISTEN did with a listen: took a connection, parked it, or refused it."""

    outcome: TcpListenOutcome
    connection_id: str | None = None  # for "took"
    client: str | None = None  # for "took": the client's name


# ---- the store ----------------------------------------------------------------


@dataclass(frozen=True)
class _Script:
    name: str
    source: bytes
    sha: str

    @classmethod
    def load(cls, name: str) -> _Script:
        """A script as Redis runs it: _lib.lua's helpers, then the script (both read as code)."""
        source = (_SCRIPTS / "_lib.lua").read_bytes() + (_SCRIPTS / f"{name}.lua").read_bytes()
        return cls(name, source, hashlib.sha1(source).hexdigest())  # Redis names a script by this


(_OFFER, _PARK, _UNPARK, _WITHDRAW, _SETTLE, _REGISTER, _HEARTBEAT, _NODES, _PRESENCE, _LEAVE, _SWEEP, _FAILED,
 _TCP_CONNECT, _TCP_LISTEN, _TCP_UNPARK) = (_Script.load(n) for n in (
    "offer", "park", "unpark", "withdraw", "settle", "register", "heartbeat", "nodes", "presence", "leave", "sweep",
    "failed", "tcp_connect", "tcp_listen", "tcp_unpark"))


def _ms(secs: float) -> int:
    return round(secs * 1000)


class Store:
    """One node's Redis client, with the cluster's scripts and its up/down state."""

    def __init__(self, client: redis.Redis, url: str, prefix: str = KEY_PREFIX,
                 blocking: redis.Redis | None = None) -> None:
        """Prefer `from_url`; `url` is only for messages (shown redacted).

        `blocking` is a client for `wait_inbox`, whose socket waits longer than a command's.
        """
        self._client = client
        self._blocking = blocking or client
        self.url = redacted(url)
        self._password = _password_of(url)
        self._prefix = prefix
        self._down = False
        self._state_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, prefix: str = KEY_PREFIX) -> Store:
        """A store for the Redis at `url` (redis://, rediss:// or unix://); connects on first use.

        Raises ConfigError for a URL redis-py cannot use.
        """
        try:
            parts = urlsplit(url)
        except ValueError:  # an unbalanced [ in the host
            parts = urlsplit("")
        scheme = parts.scheme if "://" in url else ""
        if scheme not in SCHEMES or (scheme != "unix" and not parts.hostname):
            raise ConfigError(f"redis_url {redacted(url)!r}: expected a redis://, rediss:// or unix:// URL, "
                              "e.g. redis://127.0.0.1:6379/0")
        if scheme != "unix" and not (parts.path in ("", "/") or (parts.path[1:].isdigit()
                                                                 and parts.path[1:].isascii())):
            # redis-py would quietly use database 0 for a path such as /cache.
            raise ConfigError(f"redis_url {redacted(url)!r}: the path must be a database number, "
                              "e.g. redis://127.0.0.1:6379/0")
        try:
            client, blocking = (redis.Redis.from_url(
                url, socket_connect_timeout=REDIS_CONNECT_TIMEOUT_SECS, socket_timeout=timeout,
                # No retries: a script whose answer was lost may have run (OFFER queued its head).
                retry=Retry(NoBackoff(), 0))
                for timeout in (REDIS_COMMAND_TIMEOUT_SECS, INBOX_WAIT_SECS + REDIS_COMMAND_TIMEOUT_SECS))
        except ValueError as e:
            # Not chained: redis-py's message is quoted (scrubbed); its exception might quote the URL.
            raise ConfigError(f"redis_url {redacted(url)!r}: {_scrub(str(e), _password_of(url))}") from None
        return cls(client, url, prefix, blocking)

    def close(self) -> None:
        """Close the connections to Redis."""
        self._client.close()
        if self._blocking is not self._client:
            self._blocking.close()

    @property
    def is_down(self) -> bool:
        """Tell whether the last call to Redis failed."""
        return self._down

    def ping(self) -> None:
        """Check that Redis answers (ClusterUnavailableError if not)."""
        self._call(lambda: self._client.ping())

    # ---- the rendezvous scripts (CLUSTER.md section 2) ----

    def offer(self, server: str, head: QueuedHead, client: str = "", per_address: int = 0,
              needs: Sequence[str] = ()) -> OfferResult:
        """A new request: hand its head to the oldest parked listen of `server`, or queue it.

        `client` is its client's fairness key ("" for none): with `per_address`
        (the config's requests_per_address) of that key's requests in flight
        at `server`, the answer is "wait" and this node hears InboxTurn when
        one ends. `needs` are the features the request needs ("bodies",
        "websocket"). From "handed" or "queued" on, the node holds the
        request until it `settle`s it.
        """
        return self._offer(server, head, "new", client, per_address, needs, here_first=True)

    def offer_again(self, server: str, head: QueuedHead, front: bool = True, here_first: bool = True) -> OfferResult:
        """A request this node holds goes back to `server`'s listens: its listen ended as the head
        arrived (front of the queue), or its lease ran out or its listen node died (InboxRequeue).

        "gone" if its deadline passed or it was settled: nobody waits for it.
        `here_first` False: not to a listen of this node first (it has just
        found none waiting here).
        """
        return self._offer(server, head, "front" if front else "back", "", 0, (), here_first)

    def _offer(self, server: str, head: QueuedHead, mode: str, client: str, per_address: int,
               needs: Sequence[str], here_first: bool) -> OfferResult:
        """OFFER; with `here_first`, a listen parked on the head's owner node takes it first
        (the answer says `here`: the head is not in any inbox, and the owner hands it over)."""
        keys = [*self._server_keys(server), self._key(f"shares:{server}")]
        answer = self._list(_OFFER, keys, [
            head.encode(), self._prefix, server, MAX_QUEUED_PER_SERVER, _ms(OFFLINE_AFTER_SECS),
            _ms(LEAVE_GRACE_SECS), mode, client, per_address, " ".join(needs), MAX_UNANSWERED_PER_SERVER,
            _ms(TURN_WAIT_SECS), "1" if here_first else ""])
        outcome = _text(answer[0])
        if outcome == "handed":
            return OfferResult("handed", _text(answer[1]), here=len(answer) > 2)
        if outcome == "no feature":
            return OfferResult("no feature", feature=_text(answer[1]))
        if outcome in ("queued", "full", "offline", "wait", "gone"):
            return OfferResult(outcome)  # type: ignore[arg-type]  # checked just above
        raise self._unexpected("OFFER", outcome)

    def park(self, server: str, node: str, max_requests: int | None = None, features: Sequence[str] = (),
             lease: str = "", ack: str = "", version: str = "", host: str = "") -> ParkResult:
        """A listen of `node` for `server`: take the queued heads, or park it.

        At most `max_requests` heads (None: as many as fit in one answer, 0:
        none, the server only says it is still there), and no more than leave
        the server MAX_UNANSWERED_PER_SERVER unanswered. It stamps the server
        as seen, with `features`, `version` and `host`. `lease`: the batch id
        (made by `node`) to hold what it takes under, for a server that
        acknowledges. `ack`: the batch id this listen acknowledges; its
        node hears InboxAck. "unknown node": `node` was swept; register again.
        """
        limit = MAX_QUEUED_PER_SERVER if max_requests is None else max(0, max_requests)
        answer = self._list(_PARK, self._server_keys(server), [
            node, limit, MAX_LISTENERS_PER_SERVER, MAX_BATCH_BYTES, " ".join(features), self._prefix, server,
            MAX_UNANSWERED_PER_SERVER, lease, ack, version, host])
        outcome = _text(answer[0])
        if outcome == "took":
            return ParkResult("took", tuple(QueuedHead.decode(entry) for entry in answer[1:]))
        if outcome in ("parked", "too many", "unknown node"):
            return ParkResult(outcome)  # type: ignore[arg-type]  # checked just above
        raise self._unexpected("PARK", outcome)

    def unpark(self, server: str, node: str, seen: bool = True) -> bool:
        """A parked listen of `node` ends with no head: remove one of its entries.

        False if none was left: a head is on its way to the node's inbox.
        `seen=False` for a listen ended by its server leaving, which is no sign of life.
        """
        keys = [self._key(f"parked:{server}"), self._key(f"srv:{server}")]
        return bool(self._script(_UNPARK, keys, [node, "seen" if seen else "unseen"]))

    def withdraw(self, server: str, request_id: str) -> bool:
        """Remove a request's head from `server`'s queue; True if it was still there (never picked up)."""
        return bool(self._script(_WITHDRAW, [self._key(f"q:{server}")], [request_id + " "]))

    def settle(self, node: str, ended: Sequence[str] = (), answering: Sequence[str] = ()) -> SettleResult:
        """Requests (and forwarded connections) `node` holds are over, or being answered: one round trip.

        `ended`: forgotten (Rendezvous.forget, PortForwarding._forget): shares,
        unanswered counts and connection counters go down; nodes waiting for
        a freed share hear InboxTurn. `answering`: the server started to
        answer (Rendezvous.claim): no longer unanswered, the share stays.
        Either may free room, which hands queued heads to parked listens.
        Settling an id twice is harmless.
        """
        if not ended and not answering:
            return SettleResult(0, 0)
        answer = self._script(_SETTLE, [], [self._prefix, node, MAX_UNANSWERED_PER_SERVER, len(answering),
                                            *answering, *ended])
        if not (isinstance(answer, list) and len(answer) == 2 and all(isinstance(n, int) for n in answer)):
            raise self._unexpected("SETTLE", repr(answer))
        return SettleResult(answer[0], answer[1])

    def end_lease(self, node: str, batch_id: str) -> bool:
        """No acknowledgement came in time: drop the batch's record. True if it was still there.

        False means the acknowledgement arrived in the same instant (its
        InboxAck is on its way): do not requeue. Exactly one of the two wins.
        """
        return bool(self._call(lambda: self._client.hdel(self._key(f"leases:{node}"), batch_id)))

    def leave(self, server: str) -> int:
        """A process of `server` is leaving: stamp it, and tell every node with a listen parked for it.

        Answers how many nodes were told (InboxLeave).
        """
        keys = [self._key(f"parked:{server}"), self._key(f"srv:{server}")]
        return cast(int, self._script(_LEAVE, keys, [self._prefix, server]))

    def presence(self, node: str) -> PresenceResult:
        """Once a second from every node: the first to claim the second announces servers coming and going.

        `ran` is False when another node has this second. Each owner of a head
        failed for a server gone offline hears InboxOffline.
        """
        answer = self._script(_PRESENCE, [], [self._prefix, node, _ms(OFFLINE_AFTER_SECS), _ms(LEAVE_GRACE_SECS),
                                              _ms(CLUSTER_TICK_SECS)])
        if not isinstance(answer, list) or not answer:
            raise self._unexpected("PRESENCE", repr(answer))
        if answer[0] == b"busy":
            return PresenceResult(False)
        if answer[0] != b"ran" or len(answer) != 3:
            raise self._unexpected("PRESENCE", repr(answer)[:64])
        events = tuple(PresenceEvent(_text(s), _text(state) == "online", _text(host) or None, _text(version) or None)
                       for s, state, host, version in answer[1])
        return PresenceResult(True, events, int(answer[2]))

    def sweep(self, node: str) -> SweepResult:
        """Once a second from every node: the first to claim the second cleans up after dead nodes."""
        answer = self._list(_SWEEP, [], [self._prefix, node, MAX_UNANSWERED_PER_SERVER, MAX_QUEUED_PER_SERVER,
                                         MAX_OFFERS_PER_PORT, _ms(CLUSTER_TICK_SECS)])
        outcome = _text(answer[0])
        if outcome == "busy":
            return SweepResult(False)
        if outcome != "ran":
            raise self._unexpected("SWEEP", outcome)
        return SweepResult(True, tuple(_text(n) for n in answer[1:]))

    def server_presence(self, servers: Sequence[str]) -> dict[str, Presence]:
        """Per server: when it was last seen, whether it is online now, its version and host.

        Online as OFFER judges it: a listen parked, or one ended within
        OFFLINE_AFTER_SECS (less after a leave). One round trip, for the server lists.
        """
        def run() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            pipe.time()
            for server in servers:
                pipe.hmget(self._key(f"srv:{server}"), "seen", "left", "version", "host")
                pipe.llen(self._key(f"parked:{server}"))
            answers: list[Any] = pipe.execute()
            return answers
        answers = self._call(run)
        seconds, micros = answers[0]
        now = seconds * 1000 + micros // 1000
        out: dict[str, Presence] = {}
        for i, server in enumerate(servers):
            (seen_raw, left_raw, version, host), parked = answers[1 + 2 * i], answers[2 + 2 * i]
            reported = (_text(version) or None if version else None, _text(host) or None if host else None)
            if parked:
                out[server] = Presence(now / 1000, True, *reported)
                continue
            seen = int(seen_raw) if seen_raw is not None else None
            online_from = seen
            if seen is not None and left_raw is not None and int(left_raw) >= seen:
                online_from = min(seen, int(left_raw) - _ms(OFFLINE_AFTER_SECS) + _ms(LEAVE_GRACE_SECS))
            online = online_from is not None and now - online_from <= _ms(OFFLINE_AFTER_SECS)
            out[server] = Presence(seen / 1000 if seen is not None else None, online, *reported)
        return out

    def tell_requeue(self, requests: Sequence[tuple[str, str]]) -> None:
        """Tell the owners of these (server, request id) to offer them again (InboxRequeue), in one round trip.

        For a lease that ran out on this node, or a listen lost with its
        answer: only the owner knows whether the server started to answer.
        """
        def run() -> None:
            pipe = self._client.pipeline(transaction=False)
            for server, request_id in requests:
                pipe.rpush(self._key(f"inbox:{request_id[:NODE_ID_CHARS]}"), f"requeue {server} {request_id}")
            pipe.execute()
        if requests:
            self._call(run)

    # ---- the inbox ----

    def take_inbox(self, node: str, count: int = 128) -> list[InboxMessage]:
        """Up to `count` messages waiting in `node`'s inbox, oldest first, without waiting."""
        entries = cast("list[bytes] | None", self._call(lambda: self._client.lpop(self._key(f"inbox:{node}"), count)))
        return [self._decode_message(m) for m in entries or []]

    def wait_inbox(self, node: str, count: int = 128, timeout_secs: float = INBOX_WAIT_SECS) -> list[InboxMessage]:
        """Up to `count` messages from `node`'s inbox, oldest first, waiting up to `timeout_secs` for the first.

        The dispatcher's one blocking read (BLMPOP), on its own connection.
        """
        answer = self._call(lambda: self._blocking.blmpop(timeout_secs, 1, self._key(f"inbox:{node}"),
                                                          direction="LEFT", count=count))
        if answer is None:
            return []
        _, messages = cast("list[Any]", answer)
        return [self._decode_message(m) for m in messages]

    def _decode_message(self, message: bytes) -> InboxMessage:
        kind, _, rest = message.partition(b" ")
        server_bytes, _, arg = rest.partition(b" ")
        server = server_bytes.decode("utf-8")
        if kind == b"head":
            return InboxHead(server, QueuedHead.decode(arg))
        if kind == b"conn":
            port, _, entry = arg.partition(b" ")
            connection_id, _, client = entry.partition(b" ")
            return InboxConnection(server, port.decode("ascii"), connection_id.decode("ascii"), _text(client))
        kinds: dict[bytes, Callable[[str, str], InboxMessage]] = {
            b"ack": InboxAck, b"requeue": InboxRequeue, b"offline": InboxOffline, b"turn": InboxTurn}
        if kind in kinds:
            return kinds[kind](server, _text(arg))
        if kind == b"leave":
            return InboxLeave(server)
        raise self._unexpected("the inbox", kind.decode("ascii", "replace"))

    # ---- the node registry (CLUSTER.md sections 3 and 6) ----

    def register(self, info: NodeInfo, secret: str | None = None) -> RegisterResult:
        """Register `info.node` (drawn with new_node_id), with the epoch and peer secret, set once.

        `secret` is the peer secret this node already knows (hex), if any: the
        first node to register after Redis restarted puts it back, so links
        between nodes that have not all noticed the restart yet still pass
        their handshake. A new secret is drawn only when no live node knew one.
        """
        answer = self._list(_REGISTER, [], [self._prefix, info.node, secrets.token_hex(16),
                                            secret or secrets.token_hex(32), _ms(NODE_TTL_SECS), *info.fields()])
        outcome = _text(answer[0])
        if outcome not in ("registered", "taken") or len(answer) != 3:
            raise self._unexpected("REGISTER", outcome)
        return RegisterResult(outcome, _text(answer[1]), _text(answer[2]))  # type: ignore[arg-type]  # checked

    def heartbeat(self, info: NodeInfo, epoch: str) -> HeartbeatOutcome:
        """Renew `info.node` (every 2 s): "alive", or "swept" / "restarted" (register again)."""
        answer = self._list(_HEARTBEAT, [], [self._prefix, info.node, epoch, _ms(NODE_TTL_SECS), *info.fields()])
        outcome = _text(answer[0])
        if outcome not in ("alive", "swept", "restarted"):
            raise self._unexpected("HEARTBEAT", outcome)
        return outcome  # type: ignore[return-value]  # checked just above

    def live_nodes(self) -> list[NodeInfo]:
        """Every live node, for the table of peers (one round trip)."""
        answer = self._script(_NODES, [], [self._prefix])
        nodes = []
        for item in cast("list[list[bytes]]", answer):
            fields = {_text(k): _text(v) for k, v in zip(item[1::2], item[2::2], strict=True)}
            nodes.append(NodeInfo(_text(item[0]), fields.get("peer", ""), fields.get("config", ""),
                                  fields.get("host", ""), int(fields.get("pid") or 0)))
        return sorted(nodes, key=lambda n: n.node)

    def deregister(self, node: str) -> None:
        """`node` is stopping for good: the sweeper cleans up after it at its next run."""
        self._call(lambda: self._client.delete(self._key(f"node:{node}")))

    # ---- the scraper API's limit and the operators' pages (CLUSTER.md section 5) ----

    def scraper_failed(self, address: str, max_failures: int, window_secs: float) -> FailureResult:
        """A wrong scraper key from `address`: limited already (429), or counted in its window.

        `max_failures` and `window_secs` are scraper_api.py's MAX_FAILURES_PER_WINDOW
        and FAILURE_WINDOW_SECS.
        """
        answer = self._script(_FAILED, [self._key(f"scraper_fail:{address}")], [max_failures, _ms(window_secs)])
        limited, value = cast("list[int]", answer)
        if limited:
            return FailureResult(True, retry_after_secs=value / 1000)
        return FailureResult(False, failures=value)

    def remember_unregistered(self, name: str, tripcode: str, address: str) -> None:
        """An unknown server offered `name`: keep the last MAX_UNREGISTERED_SHOWN (one round trip)."""
        key = self._key("unregistered")
        member = json.dumps([name, tripcode, address])

        def run() -> None:
            pipe = self._client.pipeline(transaction=True)
            pipe.zadd(key, {member: time.time()})
            pipe.zremrangebyrank(key, 0, -MAX_UNREGISTERED_SHOWN - 1)
            pipe.execute()
        self._call(run)

    def unregistered(self) -> list[UnregisteredServer]:
        """The unknown servers remembered, the latest first."""
        entries = cast("list[tuple[bytes, float]]", self._call(
            lambda: self._client.zrange(self._key("unregistered"), 0, -1, desc=True, withscores=True)))
        return [UnregisteredServer(name, tripcode, address, score)
                for (name, tripcode, address), score in ((json.loads(member), score) for member, score in entries)]

    def record_audit(self, entry: dict[str, Any]) -> None:
        """Keep an audit entry among the cluster's last RECENT_ENTRIES (one round trip)."""
        key = self._key("audit")
        line = json.dumps(entry, ensure_ascii=False)

        def run() -> None:
            pipe = self._client.pipeline(transaction=True)
            pipe.lpush(key, line)
            pipe.ltrim(key, 0, RECENT_ENTRIES - 1)
            pipe.execute()
        self._call(run)

    def recent_audit(self) -> list[dict[str, Any]]:
        """The cluster's last RECENT_ENTRIES audit entries, oldest first (as AuditLog.recent)."""
        lines = cast("list[bytes]", self._call(lambda: self._client.lrange(self._key("audit"), 0,
                                                                             RECENT_ENTRIES - 1)))
        return [json.loads(line) for line in reversed(lines)]

    def waiting_counts(self, servers: Sequence[str]) -> dict[str, tuple[int, int]]:
        """Per server: listens parked and request heads queued, cluster-wide (one round trip, for /metrics)."""
        def run() -> list[int]:
            pipe = self._client.pipeline(transaction=False)
            for server in servers:
                pipe.llen(self._key(f"parked:{server}"))
                pipe.llen(self._key(f"q:{server}"))
            answers: list[int] = pipe.execute()
            return answers
        counts = self._call(run) if servers else []
        return {server: (int(counts[2 * i]), int(counts[2 * i + 1])) for i, server in enumerate(servers)}

    # ---- TCP forwarding (CLUSTER.md section 4) ----

    def tcp_connect(self, server: str, port: str, connection_id: str, client: str) -> TcpConnectResult:
        """A client's new connection to `server`'s `port`: hand it to a parked TCP listen, or queue it.

        Counts it toward the client's and the server's open connections
        until `settle(node, ended=[connection_id])`.
        """
        return self._tcp_connect(server, port, connection_id, client, "new")

    def tcp_offer_again(self, server: str, port: str, connection_id: str, client: str) -> TcpConnectResult:
        """A connection whose listen ended as it arrived goes back, ahead of the others."""
        return self._tcp_connect(server, port, connection_id, client, "front")

    def tcp_open_websocket(self, server: str, connection_id: str) -> TcpConnectResult:
        """Count a WebSocket toward `server`'s open connections ("opened" or "server limit").

        Its record in held:{N} is `websocket_held_id(connection_id)`, which its SETTLE names:
        the WebSocket's id is its request's, and the request's own record (its client's
        share, its unanswered place) is settled apart when the request ends as it switches.
        """
        return self._tcp_connect(server, "-", websocket_held_id(connection_id), "", "open")

    def _tcp_connect(self, server: str, port: str, connection_id: str, client: str, mode: str) -> TcpConnectResult:
        answer = self._list(_TCP_CONNECT, self._port_keys(server, port), [
            self._prefix, server, port, f"{connection_id} {client}", mode, _ms(PORT_GONE_AFTER_SECS),
            MAX_OFFERS_PER_PORT, MAX_CONNECTIONS_PER_CLIENT, MAX_CONNECTIONS_PER_SERVER])
        outcome = _text(answer[0])
        if outcome == "handed":
            return TcpConnectResult("handed", _text(answer[1]))
        if outcome in ("queued", "port gone", "client limit", "server limit", "full", "opened", "dropped"):
            return TcpConnectResult(outcome)  # type: ignore[arg-type]  # checked just above
        raise self._unexpected("TCP_CONNECT", outcome)

    def tcp_listen(self, server: str, port: str, node: str) -> TcpListenResult:
        """A TCP listen of `node` on `server`'s `port`: take a waiting connection, or park."""
        answer = self._list(_TCP_LISTEN, self._port_keys(server, port), [
            self._prefix, server, port, node, MAX_LISTENS_PER_PORT, MAX_PORTS_PER_SERVER,
            _ms(PORT_GONE_AFTER_SECS)])
        outcome = _text(answer[0])
        if outcome == "took":
            connection_id, _, client = answer[1].partition(b" ")
            return TcpListenResult("took", _text(connection_id), _text(client))
        if outcome in ("parked", "too many", "too many ports", "unknown node"):
            return TcpListenResult(outcome)  # type: ignore[arg-type]  # checked just above
        raise self._unexpected("TCP_LISTEN", outcome)

    def tcp_unpark(self, server: str, port: str, node: str) -> bool:
        """A parked TCP listen of `node` ends with no connection; False if one is on its way to the inbox."""
        keys = [self._key(f"tcp_parked:{server}:{port}"), self._key(f"tcp_ports:{server}")]
        return bool(self._script(_TCP_UNPARK, keys, [node, port]))

    # ---- the boundary ----

    def _key(self, name: str) -> str:
        return self._prefix + name

    def _server_keys(self, server: str) -> list[str]:
        return [self._key(f"q:{server}"), self._key(f"parked:{server}"), self._key(f"srv:{server}")]

    def _port_keys(self, server: str, port: str) -> list[str]:
        return [self._key(f"tcp_q:{server}:{port}"), self._key(f"tcp_parked:{server}:{port}"),
                self._key(f"tcp_ports:{server}")]

    def _script(self, script: _Script, keys: list[str], args: list[str | bytes | int]) -> object:
        """Run `script` by its SHA; after a Redis restart (NOSCRIPT), load it and run it once more.

        NOSCRIPT means the script did not run, so running it again is safe.
        """
        def run() -> object:
            try:
                return self._client.evalsha(script.sha, len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:
                logger.info("loading the cluster's script %s into redis at %s", script.name, self.url)
                self._client.script_load(script.source)
                return self._client.evalsha(script.sha, len(keys), *keys, *args)
        return self._call(run)

    def _list(self, script: _Script, keys: list[str], args: list[str | bytes | int]) -> list[bytes]:
        """Run a script that answers a list of strings: an outcome first, then its details."""
        answer = self._script(script, keys, args)
        if not (isinstance(answer, list) and answer and all(isinstance(item, bytes) for item in answer)):
            raise self._unexpected(script.name, repr(answer))
        return answer

    def _call(self, call: Callable[[], T]) -> T:
        """Run one Redis call; any Redis error becomes ClusterUnavailableError and marks Redis down."""
        try:
            result = call()
        except redis.exceptions.RedisError as e:
            reachable = not isinstance(e, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError))
            self._went_down(e)
            what = "refused a command" if reachable else "cannot be reached"
            # The client's line names no internal address; the log line (_went_down) does.
            raise ClusterUnavailableError(f"the relay's shared state (Redis) {what}; try again shortly") from e
        if self._down:
            self._came_back()
        return result

    def _went_down(self, error: Exception) -> None:
        with self._state_lock:
            if self._down:
                return
            self._down = True
        logger.warning("redis down at %s: %s: %s (answering 503 until it is back)", self.url,
                       type(error).__name__, _scrub(str(error), self._password))

    def _came_back(self) -> None:
        with self._state_lock:
            if not self._down:
                return
            self._down = False
        logger.info("redis back at %s", self.url)

    def _unexpected(self, what: str, answer: str) -> ClusterUnavailableError:
        """An answer no script gives: our bug (a script out of step with this module)."""
        logger.error("unexpected answer %r from %s at redis %s", answer[:64], what, self.url)
        return ClusterUnavailableError("the relay's shared state (Redis) gave an unexpected answer; "
                                       "try again shortly")


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _scrub(message: str, password: str | None) -> str:
    """`message` without `password`, as written or percent-decoded (third-party messages may quote it)."""
    for form in (password, unquote(password or "")):
        if form:
            message = message.replace(form, _HIDDEN)
    return message
