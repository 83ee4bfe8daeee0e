"""How many connections the relay holds at once, and what it says when it is full.

Every connection to the relay is a file descriptor and a greenlet: a
server's parked listen (one per idle ptth_server, plus one per forwarded
port), a visitor's request or kept-alive connection, a response POST. The
relay holds `max_connections` of them (relay config; by default what its
open-files limit allows, after raising that limit to its hard limit at
start). Past it a new connection is still accepted, but only to be answered
at once: `503` with `Retry-After` to a visitor and to a listen alike (a
ptth_server backs off with jitter), never a wait. Calls that finish work the
relay already took (a response POST, a request body's GET) and `/metrics`
are served anyway; each such connection then ends with its answer.

gunicorn's gevent worker accepts into a pool of `worker_connections`
greenlets and stops accepting when it is full, so that connections wait
unanswered in the kernel: the pool must be larger than max_connections,
with room for the 503s (`pool_size`). conf/gunicorn.conf.py sizes it with
`gunicorn_worker_connections` in the master; the worker reads what gunicorn
was given and holds no more than fits (`plan_capacity`), saying so in its
start line. The connections themselves are counted where they open and
close, under the WSGI server (ptth_lib/wsgi.py `count_gunicorn_connections`,
and gevent's WSGIServer for `python ptth_relay.py`).

While it refuses, the relay logs one line at once and then one a minute
with the counts (`RefusalLog`); /metrics shows the connections open, the
limit and the refusals (metrics.py). In a cluster each worker has its own
limit and its own counts.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gevent
from werkzeug.wrappers import Response

from ptth_lib.config import RelayConfig, load_relay_config
from ptth_lib.errors import RETRY_AFTER_SECS, ConfigError, ServiceUnavailableError
from ptth_lib.relay.responses import error_response
from ptth_lib.wire.envelope import LISTEN_PATH, TCP_LISTEN_PATH
from ptth_lib.wsgi import close_after_response, was_refused

logger = logging.getLogger(__name__)

# Files a relay worker keeps open besides its connections: 10 when idle (its
# standard streams, the listening socket, gunicorn's heartbeat file, epoll, an
# eventfd and a pipe, the audit log), plus a config file while it reloads and
# room for what a later version opens. A cluster's peer links and Redis
# connections are files too: see CLUSTER_SHARE.
RESERVED_FILES = 100

# In a cluster a connection's stream may cross to the worker that owns its
# request over a peer link (CLUSTER.md), a file at each end: by default each
# worker keeps half of its files for them.
CLUSTER_SHARE = 2

# Connections gunicorn accepts beyond max_connections, only to answer them 503:
# a 16th of the limit (at least 64), room for a burst such as a fleet of
# servers reconnecting after a restart. Past it, gunicorn stops accepting until
# those answers are out (milliseconds each).
REFUSAL_ROOM_DIVISOR = 16
MIN_REFUSAL_ROOM = 64

# While refusing, one log line this often, with the counts since the last.
REFUSAL_LOG_EVERY_SECS = 60.0

# The backend API's listens: a server's long-polls, refused like a visitor's request.
_LISTEN_PREFIXES = (LISTEN_PATH.removesuffix("{name}"), TCP_LISTEN_PATH.partition("{name}")[0])
# Served even past the limit: calls that finish work the relay already took (the
# backend API's other calls: response POSTs, body GETs, forwarded connections'
# streams) and the operators' metrics, which say why the relay refuses.
_ALWAYS_SERVED_PREFIXES = (LISTEN_PATH.partition("http_listen")[0], "/metrics")

LISTEN = "listen"
VISITOR = "visitor"


class RelayFullError(ServiceUnavailableError):
    """The relay holds max_connections connections: a new one gets 503 with Retry-After."""


# ---- how many ------------------------------------------------------------------------


@dataclass(frozen=True)
class CapacityPlan:
    """How many connections the relay holds, and why that many (for its start line)."""

    max_connections: int
    why: str
    warning: str | None = None  # the config asked for more than fits


def refusal_room(max_connections: int) -> int:
    """Connections accepted beyond `max_connections` to be answered 503 at once."""
    return max(MIN_REFUSAL_ROOM, max_connections // REFUSAL_ROOM_DIVISOR)


def pool_size(max_connections: int) -> int:
    """gunicorn's worker_connections for `max_connections`: the limit and the room for refusals."""
    return max_connections + refusal_room(max_connections)


def _fitting(pool: int) -> int:
    """The largest max_connections whose pool_size is at most `pool` (at least 1)."""
    best = max(1, pool * REFUSAL_ROOM_DIVISOR // (REFUSAL_ROOM_DIVISOR + 1))
    while best > 1 and pool_size(best) > pool:
        best -= 1
    return best


def plan_capacity(configured: int, open_files: int, pool: int | None = None,
                  cluster: bool = False) -> CapacityPlan:
    """How many connections to hold: `configured` (max_connections; 0 derives it) within what fits.

    `open_files` is the process's open-files limit, `pool` gunicorn's
    worker_connections (None when not under gunicorn). A cluster's worker
    keeps half of its files for peer links.
    """
    files_left = max(1, open_files - RESERVED_FILES)
    by_files = _fitting(files_left // CLUSTER_SHARE if cluster else files_left)
    if configured:
        plan = CapacityPlan(configured, "max_connections in the relay config")
        if configured > _fitting(files_left):
            plan = CapacityPlan(_fitting(files_left), f"max_connections {configured} in the relay config is more than "
                                f"the open-files limit ({open_files}) allows",
                                warning="raise the open-files limit (LimitNOFILE= in a systemd unit, ulimit -n)")
    else:
        share = ", half of it: a cluster's peer links need the rest" if cluster else ""
        plan = CapacityPlan(by_files, f"derived from the open-files limit {open_files}{share}")
    if pool is not None and pool_size(plan.max_connections) > pool:
        plan = CapacityPlan(_fitting(pool), f"gunicorn's worker_connections ({pool}) leaves no room for more",
                            warning="run gunicorn with -c conf/gunicorn.conf.py, which sizes worker_connections "
                                    "from max_connections")
    return plan


def open_files_limit() -> int:
    """The process's open-files limit (its soft RLIMIT_NOFILE), as a number."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def raise_open_files_limit() -> int:
    """Raise the open-files limit to its hard limit (the most an unprivileged process may); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as e:  # an infinite hard limit some kernels refuse as a soft one
            logger.info("could not raise the open-files limit from %d to %d: %s", soft, hard, e)
    return open_files_limit()


def gunicorn_worker_connections(config_path: str | None = None) -> int:
    """worker_connections for conf/gunicorn.conf.py: pool_size of the relay's max_connections.

    Run in gunicorn's master, which its worker inherits the raised
    open-files limit from. Reads the relay config ($PTTH_RELAY_CONFIG, else
    ./ptth_relay.toml) for max_connections and cluster mode; a config that
    does not load counts as the defaults (the master's on_starting then
    refuses it with one line).
    """
    open_files = raise_open_files_limit()
    path = config_path or os.environ.get("PTTH_RELAY_CONFIG", "./ptth_relay.toml")
    try:
        config = load_relay_config(path)
        configured, cluster = config.max_connections, config.redis_url is not None
    except ConfigError:
        configured, cluster = 0, False
    return pool_size(plan_capacity(configured, open_files, cluster=cluster).max_connections)


def log_start(log: logging.Logger, config: RelayConfig, path: str, plan: CapacityPlan) -> None:
    """The start line: servers registered, and how many connections the relay holds (and why)."""
    log.info("ptth_relay: %d servers registered (config %s); holds %d connections (%s)", len(config.servers),
             path, plan.max_connections, plan.why)
    if plan.warning:
        log.warning("ptth_relay: %s: %s", plan.why, plan.warning)


# ---- counting, refusing ----------------------------------------------------------------


class RefusalLog:
    """Refusals as the log tells them: one warning when they start, then counts once a minute.

    Pure: the clock is given, and `tick` is called once a second (Capacity.run).
    """

    def __init__(self, log: logging.Logger, state: Callable[[], tuple[int, int]],
                 every_secs: float = REFUSAL_LOG_EVERY_SECS, clock: Callable[[], float] = time.monotonic) -> None:
        """`state()` is (connections open, max_connections) now."""
        self._log = log
        self._state = state
        self._every_secs = every_secs
        self._clock = clock
        self._refusing = False
        self._last_line = 0.0
        self._counts = {LISTEN: 0, VISITOR: 0}

    def record(self, kind: str) -> None:
        """A connection was refused: `kind` is LISTEN or VISITOR."""
        self._counts[kind] += 1
        if not self._refusing:
            self._refusing, self._last_line = True, self._clock()
            open_now, limit = self._state()
            self._log.warning("relay full: %d connections open, max_connections %d: new connections get 503 "
                              "(a line a minute while this lasts; README \"How many servers a relay holds\")",
                              open_now, limit)

    def tick(self) -> None:
        """Once a minute while refusing: the counts; after a minute without refusals, that it has stopped."""
        now = self._clock()
        if not self._refusing or now - self._last_line < self._every_secs:
            return
        listens, visitors = self._counts[LISTEN], self._counts[VISITOR]
        open_now, limit = self._state()
        if listens or visitors:
            self._log.warning("relay full: refused %d listens and %d visitors' connections in the last %.0f s "
                              "(%d connections open, max_connections %d)",
                              listens, visitors, now - self._last_line, open_now, limit)
        else:
            self._log.info("relay no longer full: no connection refused in the last %.0f s (%d connections "
                           "open, max_connections %d)", now - self._last_line, open_now, limit)
            self._refusing = False
        self._counts = {LISTEN: 0, VISITOR: 0}
        self._last_line = now


class Capacity:
    """The connections the relay holds: counted as they open and close; those past the limit refused.

    The WSGI server calls `opened` and `closed` for each connection (the gate
    of ptth_lib/wsgi.py); the app calls `refusal` first for each request.
    """

    def __init__(self, plan: CapacityPlan, clock: Callable[[], float] = time.monotonic) -> None:
        self.plan = plan
        self.max_connections = plan.max_connections
        self.admitted = 0  # connections open within the limit
        self.refusing = 0  # connections open past it, being answered 503
        self.refused = {LISTEN: 0, VISITOR: 0}  # since start, for /metrics
        self.log = RefusalLog(logger, lambda: (self.open, self.max_connections), clock=clock)

    @property
    def open(self) -> int:
        """Connections open now."""
        return self.admitted + self.refusing

    def opened(self) -> bool:
        """A connection opened: True if the relay holds it, False if it is to be answered 503."""
        if self.admitted < self.max_connections:
            self.admitted += 1
            return True
        self.refusing += 1
        return False

    def closed(self, admitted: bool) -> None:
        """A connection closed; `admitted` is what `opened` said of it."""
        if admitted:
            self.admitted -= 1
        else:
            self.refusing -= 1

    def refusal(self, environ: dict[str, Any], start_response: Any) -> Response | None:
        """The 503 for a request on a connection past the limit; None for any other request.

        A call that is served anyway still ends its connection with its answer.
        """
        if not was_refused(environ):
            return None
        close_after_response(start_response)
        path: str = environ.get("PATH_INFO", "")
        kind = LISTEN if path.startswith(_LISTEN_PREFIXES) else VISITOR
        if kind == VISITOR and path.startswith(_ALWAYS_SERVED_PREFIXES):
            return None
        self.refused[kind] += 1
        self.log.record(kind)
        resp = error_response(RelayFullError(
            f"the relay is full ({self.max_connections} connections, its max_connections): "
            f"try again in {RETRY_AFTER_SECS} s"))
        resp.headers["Connection"] = "close"  # (gunicorn writes its own, having been told above)
        return resp

    def run(self, interval_secs: float = 1.0) -> None:
        """Forever: let the refusal log say its minute's counts."""
        while True:
            self.log.tick()
            gevent.sleep(interval_secs)
