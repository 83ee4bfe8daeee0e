"""The cluster's one boundary with Redis: its URL, timeouts, scripts and failures.

Every Redis call the cluster makes goes through a `Store`. Each step of the
rendezvous that changes shared state is one Lua script in `scripts/`, run
atomically by redis-server in one round trip (CLUSTER.md sections 1 and 2);
this module loads them by SHA and gives each a typed Python wrapper.

Failures: any Redis error becomes a `ClusterUnavailableError` (503, a plain
message naming Redis by its URL without the password), and the node logs one
line when Redis goes away and one when it is back, never one per request
(CLUSTER.md section 6). Scripts are never retried blindly: an OFFER whose
answer was lost may have queued its head, so the caller answers 503.

The URL's password never appears in a log line or an error: `redacted(url)`
is what every message shows.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, cast
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.retry import Retry

from ptth_lib.errors import ConfigError, ServiceUnavailableError
from ptth_lib.relay.rendezvous import (
    LEAVE_GRACE_SECS,
    MAX_BATCH_BYTES,
    MAX_LISTENERS_PER_SERVER,
    MAX_QUEUED_PER_SERVER,
    OFFLINE_AFTER_SECS,
)

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
# A node's dispatcher waits this long for its inbox in one call (BLMPOP), well inside the
# command timeout: idle, a node makes one Redis call a second for it.
INBOX_WAIT_SECS = 1.0

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

OfferOutcome = Literal["handed", "queued", "full", "offline"]
ParkOutcome = Literal["took", "parked", "too many"]


@dataclass(frozen=True)
class QueuedHead:
    """A request head as it waits in a server's queue: its id and its encoded head."""

    request_id: str
    head: bytes

    def encode(self) -> bytes:
        """The queue entry: the id, a space, the head (ids are A-Z a-z 0-9 _ -: never a space)."""
        if not self.request_id.isascii() or " " in self.request_id or not self.request_id:
            raise ValueError(f"request id {self.request_id[:64]!r} cannot name a queue entry")
        return self.request_id.encode("ascii") + b" " + self.head

    @classmethod
    def decode(cls, entry: bytes) -> QueuedHead:
        request_id, _, head = entry.partition(b" ")
        return cls(request_id.decode("ascii"), head)


@dataclass(frozen=True)
class OfferResult:
    """What OFFER did with a request: handed to `node`'s parked listen, queued, or neither."""

    outcome: OfferOutcome
    node: str | None = None  # the node whose listen got the head, for "handed"


@dataclass(frozen=True)
class ParkResult:
    """What PARK did with a listen: took queued heads, parked it, or refused it."""

    outcome: ParkOutcome
    heads: tuple[QueuedHead, ...] = ()  # for "took", oldest first (maybe none for max_requests=0)


@dataclass(frozen=True)
class InboxHead:
    """A head OFFER handed to one of this node's parked listens for `server`."""

    server: str
    head: QueuedHead


# ---- the store ----------------------------------------------------------------


@dataclass(frozen=True)
class _Script:
    name: str
    source: bytes
    sha: str

    @classmethod
    def load(cls, name: str) -> _Script:
        source = (_SCRIPTS / f"{name}.lua").read_bytes()
        return cls(name, source, hashlib.sha1(source).hexdigest())  # Redis names a script by this


_OFFER, _PARK, _UNPARK, _WITHDRAW = (_Script.load(n) for n in ("offer", "park", "unpark", "withdraw"))


class Store:
    """One node's Redis client, with the cluster's scripts and its up/down state."""

    def __init__(self, client: redis.Redis, url: str, prefix: str = KEY_PREFIX) -> None:
        """Prefer `from_url`; `url` is only for messages (shown redacted)."""
        self._client = client
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
            client = redis.Redis.from_url(
                url, socket_connect_timeout=REDIS_CONNECT_TIMEOUT_SECS, socket_timeout=REDIS_COMMAND_TIMEOUT_SECS,
                # No retries: a script whose answer was lost may have run (OFFER queued its head).
                retry=Retry(NoBackoff(), 0))
        except ValueError as e:
            # Not chained: redis-py's message is quoted (scrubbed); its exception might quote the URL.
            raise ConfigError(f"redis_url {redacted(url)!r}: {_scrub(str(e), _password_of(url))}") from None
        return cls(client, url, prefix)

    def close(self) -> None:
        """Close the connections to Redis."""
        self._client.close()

    @property
    def is_down(self) -> bool:
        """Tell whether the last call to Redis failed."""
        return self._down

    def ping(self) -> None:
        """Check that Redis answers (ClusterUnavailableError if not)."""
        self._call(lambda: self._client.ping())

    # ---- the rendezvous scripts (CLUSTER.md section 2) ----

    def offer(self, server: str, head: QueuedHead, front: bool = False) -> OfferResult:
        """Hand a request head to the oldest parked listen of `server`, or queue it.

        `front` queues it ahead of the others (a head handed back to the queue).
        """
        answer = self._list(_OFFER, self._server_keys(server), [
            head.encode(), self._key("inbox:"), server, MAX_QUEUED_PER_SERVER,
            round(OFFLINE_AFTER_SECS * 1000), round(LEAVE_GRACE_SECS * 1000), "front" if front else "back"])
        outcome = _text(answer[0])
        if outcome == "handed":
            return OfferResult("handed", _text(answer[1]))
        if outcome in ("queued", "full", "offline"):
            return OfferResult(outcome)  # type: ignore[arg-type]  # checked just above
        raise self._unexpected("OFFER", outcome)

    def park(self, server: str, node: str, max_requests: int | None = None,
             features: Sequence[str] = ()) -> ParkResult:
        """A listen of `node` for `server`: take the queued heads, or park it.

        At most `max_requests` heads (None: as many as fit in one answer, 0:
        none, the server only says it is still there). It stamps the server
        as seen, with `features`.
        """
        limit = MAX_QUEUED_PER_SERVER if max_requests is None else max(0, max_requests)
        answer = self._list(_PARK, self._server_keys(server), [
            node, limit, MAX_LISTENERS_PER_SERVER, MAX_BATCH_BYTES, " ".join(features)])
        outcome = _text(answer[0])
        if outcome == "took":
            return ParkResult("took", tuple(QueuedHead.decode(entry) for entry in answer[1:]))
        if outcome in ("parked", "too many"):
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

    def take_inbox(self, node: str, count: int = 128) -> list[InboxHead]:
        """Up to `count` heads waiting in `node`'s inbox, oldest first, without waiting."""
        entries = cast("list[bytes] | None", self._call(lambda: self._client.lpop(self._key(f"inbox:{node}"), count)))
        return self._read_inbox(entries or [])

    def _read_inbox(self, entries: list[bytes]) -> list[InboxHead]:
        taken = []
        for message in entries:
            kind, _, rest = message.partition(b" ")
            if kind != b"head":
                raise self._unexpected("the inbox", kind.decode("ascii", "replace"))
            server, _, entry = rest.partition(b" ")
            taken.append(InboxHead(server.decode("utf-8"), QueuedHead.decode(entry)))
        return taken

    def wait_inbox(self, node: str, timeout_secs: float = INBOX_WAIT_SECS, count: int = 128) -> list[InboxHead]:
        """Like take_inbox, but waits up to `timeout_secs` for a first message (BLMPOP)."""
        key = self._key(f"inbox:{node}")
        answer = self._call(lambda: self._client.blmpop(timeout_secs, 1, key, direction="LEFT", count=count))
        return self._read_inbox(cast("list[Any]", answer)[1] if answer else [])

    # ---- nodes (node.py) ----

    def register_node(self, node: str, address: str, ttl_secs: float, new: bool = False) -> bool:
        """Record `node` as alive at peer `address` for `ttl_secs`.

        `new`: claim the id (False if another node has it); else renew it
        (False if it had expired: the node was taken for dead and must take a new id).
        """
        key = self._key(f"node:{node}")
        ttl = round(ttl_secs * 1000)

        def run() -> bool:
            pipe = self._client.pipeline(transaction=True)
            pipe.set(key, address, px=ttl, nx=new, xx=not new)
            pipe.sadd(self._key("nodes"), node)
            done = pipe.execute()[0]
            return bool(done)
        return self._call(run)

    def live_nodes(self) -> dict[str, str]:
        """Every live node's peer address, by node id; forgets the ids that expired."""
        ids = sorted(_text(n) for n in cast("set[bytes]", self._call(
            lambda: self._client.smembers(self._key("nodes")))))
        if not ids:
            return {}
        addresses = cast("list[bytes | None]", self._call(
            lambda: self._client.mget([self._key(f"node:{n}") for n in ids])))
        gone = [n for n, a in zip(ids, addresses, strict=True) if a is None]
        if gone:
            self._call(lambda: self._client.srem(self._key("nodes"), *gone))
        return {n: _text(a) for n, a in zip(ids, addresses, strict=True) if a is not None}

    def drop_node(self, node: str) -> None:
        """`node` is stopping: it is no longer alive."""
        self._call(lambda: self._client.delete(self._key(f"node:{node}")))

    def cluster_secret(self) -> bytes:
        """The secret that peer links prove they know; the first node to ask makes it."""
        key = self._key("peer_secret")
        fresh = secrets.token_bytes(32)

        def run() -> bytes:
            self._client.set(key, fresh, nx=True)
            return cast("bytes", self._client.get(key))
        return self._call(run)

    def presence(self, servers: Sequence[str]) -> dict[str, tuple[float | None, bool]]:
        """Per server: when it was last seen (seconds since the epoch) and whether it is online now."""
        def run() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            pipe.time()
            for server in servers:
                pipe.hget(self._key(f"srv:{server}"), "seen")
                pipe.llen(self._key(f"parked:{server}"))
            answers: list[Any] = pipe.execute()
            return answers
        answers = self._call(run)
        seconds, micros = answers[0]
        now_ms = seconds * 1000 + micros // 1000
        out: dict[str, tuple[float | None, bool]] = {}
        for i, server in enumerate(servers):
            seen, parked = answers[1 + 2 * i], answers[2 + 2 * i]
            seen_ms = int(seen) if seen is not None else None
            online = parked > 0 or (seen_ms is not None and now_ms - seen_ms <= OFFLINE_AFTER_SECS * 1000)
            out[server] = (now_ms / 1000 if parked > 0 else seen_ms / 1000 if seen_ms is not None else None, online)
        return out

    # ---- the boundary ----

    def _key(self, name: str) -> str:
        return self._prefix + name

    def _server_keys(self, server: str) -> list[str]:
        return [self._key(f"q:{server}"), self._key(f"parked:{server}"), self._key(f"srv:{server}")]

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
