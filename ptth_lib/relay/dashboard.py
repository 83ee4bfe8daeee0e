"""The live dashboard's data: each server's recent traffic, sampled from the relay's own counters.

The dashboard (/frontend/dashboard, pages.py) shows per server: online or
offline and since when, requests and bytes per second now and over the last
15 minutes, open forwarded connections, and the relay's last error answers
for it. The numbers are those /metrics serves (metrics.py `ServerCounters`):
a greenlet (`Dashboard.run`) reads them every SAMPLE_SECS into a ring per
server, and rates are differences between samples (`rates`), so a page view
costs no more than reading the rings.

Memory is bounded: a ring holds RING_SAMPLES samples (the window over the
sample period, 181 for 15 min at 5 s), each a slotted object of three numbers
(about 160 bytes with them, measured with tracemalloc: 29 KB a full ring),
plus five kept errors of at most 300 characters (metrics.py), so at most about
31 KB per server; only servers in the config have one (removed ones are
dropped at the next sample), so 1000 configured servers cost about 31 MB.
Nothing is sampled while the dashboard is off.

In a cluster (`redis_url`) each worker samples its own counters: the
traffic, open connections and errors on the page are those of the worker
that answered the page, and the page says so (pages.py); online, since when
and last seen are the cluster's (describe_servers asks Redis, one round trip
per sample and per view). Summing every worker's rings would take a call to
every node per view; /metrics gives cluster totals (cluster/metrics.py).

Pure apart from `run` (gevent.sleep): the sampling and rate math take
clocks as arguments, so tests/unit/test_dashboard.py drives them directly.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import gevent

from ptth_lib.errors import ServiceUnavailableError
from ptth_lib.relay.forwarding import PortForwarding
from ptth_lib.relay.metrics import ErrorAnswer, RelayMetrics
from ptth_lib.relay.rendezvous import Rendezvous

# How often the counters are read: often enough for a rate that feels live,
# rarely enough to cost nothing (one pass over the configured servers).
SAMPLE_SECS = 5.0
# How far back the chart reaches.
WINDOW_SECS = 15 * 60.0
# Samples in a ring: the window's two ends and every sample between.
RING_SAMPLES = int(WINDOW_SECS / SAMPLE_SECS) + 1


@dataclass(frozen=True, slots=True)
class Sample:
    """A server's counters at one moment (`at`: monotonic seconds)."""

    at: float
    requests: int
    bytes: int


@dataclass(frozen=True)
class Rate:
    """Traffic between two samples: per second, over the interval that ended at `at`."""

    at: float
    requests_per_sec: float
    bytes_per_sec: float


def rates(samples: Sequence[Sample]) -> list[Rate]:
    """Each interval's rates between consecutive samples, oldest first.

    A counter that went down (the server was removed and added again, so its
    counters restarted) gives 0 for that interval rather than a negative rate.
    """
    out = []
    for before, after in itertools.pairwise(samples):
        secs = after.at - before.at
        if secs <= 0:
            continue
        out.append(Rate(after.at, max(0, after.requests - before.requests) / secs,
                        max(0, after.bytes - before.bytes) / secs))
    return out


@dataclass
class History:
    """What the dashboard remembers of one server: its samples, and since when it is in its state."""

    samples: deque[Sample] = field(default_factory=lambda: deque(maxlen=RING_SAMPLES))
    online: bool | None = None
    since_wall: float | None = None  # when it was first seen in its current state (wall clock)


@dataclass(frozen=True)
class ServerView:
    """One server's row on the dashboard."""

    name: str
    display_name: str
    online: bool
    since_wall: float | None
    last_seen: str | None  # RFC 3339, as the server list shows it
    version: str | None
    rates: list[Rate]  # oldest first, within the window
    now: Rate | None  # the latest interval's
    open_connections: int
    errors: list[ErrorAnswer]  # newest first


class Dashboard:
    """Samples the relay's per-server counters into bounded rings; builds the dashboard's rows."""

    def __init__(self, rendezvous: Rendezvous, metrics: RelayMetrics, forwarding: PortForwarding) -> None:
        self._rv = rendezvous
        self._metrics = metrics
        self._fw = forwarding
        self.histories: dict[str, History] = {}

    @property
    def enabled(self) -> bool:
        return self._rv.config.dashboard.enabled

    def run(self, sleep: Callable[[float], object] = gevent.sleep) -> None:
        """Forever: sample every SAMPLE_SECS while the dashboard is on; forget everything while it is off."""
        while True:
            if self.enabled:
                self.sample(time.monotonic(), time.time())
            else:
                self.histories.clear()
            sleep(SAMPLE_SECS)

    def sample(self, now: float, wall: float) -> None:
        """Read every configured server's counters once (`now` monotonic, `wall` the clock)."""
        servers = self._rv.servers
        for name in [n for n in self.histories if n not in servers]:
            del self.histories[name]
        self._metrics.forget_removed()
        try:
            described = self._described()
        except ServiceUnavailableError:
            described = {}  # a cluster's Redis is away: online or not is unknown, the counters are here
        for name in servers:
            history = self.histories.get(name)
            if history is None:
                history = self.histories[name] = History()
            online = bool(described[name]["online"]) if name in described else history.online
            if online != history.online:
                history.online, history.since_wall = online, wall
            counters = self._metrics.for_server(name)
            if counters is not None:
                history.samples.append(Sample(now, counters.requests, counters.bytes_so_far()))

    def view(self, now: float) -> list[ServerView]:
        """Every configured server's row, sorted by name, with the rates of the last WINDOW_SECS."""
        open_by_server: dict[str, int] = {}
        for conn in list(self._fw.connections.values()):
            if conn.accepted is not None:
                open_by_server[conn.server] = open_by_server.get(conn.server, 0) + 1
        rows = []
        described = self._described()
        for name in sorted(self._rv.servers):
            state = self._rv.servers[name]
            history = self.histories.get(name) or History()
            recent = [r for r in rates(history.samples) if now - r.at <= WINDOW_SECS]
            counters = self._metrics.servers.get(name)
            entry = described.get(name) or state.describe()
            online = bool(entry["online"])
            rows.append(ServerView(
                name=name,
                display_name=state.registered.display_name,
                online=online,
                since_wall=history.since_wall if history.online == online else None,
                last_seen=entry["last_seen"],  # type: ignore[arg-type]
                version=state.version,
                rates=recent,
                now=recent[-1] if recent else None,
                open_connections=open_by_server.get(name, 0),
                errors=list(reversed(counters.errors)) if counters is not None else [],
            ))
        return rows

    def _described(self) -> dict[str, dict[str, object]]:
        """Every server as the server list shows it (in a cluster, as the whole cluster sees it), by name."""
        return {str(entry["name"]): entry for entry in self._rv.describe_servers()}


# ---- numbers for people ---------------------------------------------------------

_BYTE_UNITS = ("B", "kB", "MB", "GB", "TB")


def format_bytes_rate(bytes_per_sec: float) -> str:
    """1234567.0 -> "1.2 MB/s" (powers of 1000, as network speeds are given)."""
    value = bytes_per_sec
    for unit in _BYTE_UNITS:
        if value < 999.5 or unit == _BYTE_UNITS[-1]:
            return f"{value:.0f} {unit}/s" if unit == "B" or value >= 99.5 else f"{value:.1f} {unit}/s"
        value /= 1000
    raise AssertionError("unreachable")


def format_requests_rate(per_sec: float) -> str:
    """0.0 -> "0 req/s", 0.25 -> "0.25 req/s", 12.345 -> "12.3 req/s"."""
    if per_sec == 0:
        return "0 req/s"
    if per_sec < 1:
        return f"{per_sec:.2f} req/s"
    return f"{per_sec:.1f} req/s" if per_sec < 100 else f"{per_sec:.0f} req/s"


def format_duration(secs: float) -> str:
    """How long, roughly: "40 s", "12 min", "3 h 5 min", "2 days"."""
    secs = max(0, int(secs))
    if secs < 60:
        return f"{secs} s"
    if secs < 3600:
        return f"{secs // 60} min"
    if secs < 86400:
        hours, minutes = divmod(secs // 60, 60)
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days = secs // 86400
    return "1 day" if days == 1 else f"{days} days"
