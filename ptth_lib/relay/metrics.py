"""Prometheus metrics of the relay, served at /metrics.

Counters and the duration histogram are updated by the relay (relay.py) as
requests finish; gauges of the current state (servers, parked listens, requests in
flight in the rendezvous) are read from the rendezvous at scrape time, so
they cannot drift. The registry belongs to one app: under gunicorn that is
the one gevent worker, whose memory holds the state being reported. In a
cluster each worker (node) keeps its own registry, and /metrics on any of
them shows every node's, each series labelled with its node
(cluster/metrics.py); this module does not change for it.

Per server (`ServerCounters`): client requests answered, response bytes sent
to clients (live: a response still streaming counts what it has sent so far)
and the relay's last few error answers for it. /metrics shows the first two
as `ptth_server_client_requests` and `ptth_server_relayed_bytes`; the
dashboard (dashboard.py) samples the same numbers. Only servers in the config
are counted, so their number is bounded by it.
"""

from __future__ import annotations

import gc
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import greenlet
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from ptth_lib.relay.capacity import Capacity
from ptth_lib.relay.forwarding import ForwardedConnection, PortForwarding
from ptth_lib.relay.rendezvous import Rendezvous

# The relay's own error answers kept per server for the dashboard, newest last:
# enough to see what went wrong lately, few enough to read at a glance.
MAX_ERRORS_PER_SERVER = 5

# The longest error line kept (they name the server and a reason; a few hundred characters at most).
MAX_ERROR_CHARS = 300


class _Streaming(Protocol):
    """A response body still being sent (relay.py's BodyStream): bytes sent so far."""

    sent: int


@dataclass(frozen=True)
class ErrorAnswer:
    """One error answer the relay gave a client of a server: when (wall clock), status, its line."""

    wall: float
    status: int
    message: str


@dataclass
class ServerCounters:
    """What one server's clients got: requests answered, bytes sent, the last errors."""

    requests: int = 0
    bytes_sent: int = 0  # by responses that have ended
    streaming: set[_Streaming] = field(default_factory=set)  # responses still being sent
    errors: deque[ErrorAnswer] = field(default_factory=lambda: deque(maxlen=MAX_ERRORS_PER_SERVER))

    def bytes_so_far(self) -> int:
        """Bytes sent to clients, counting what responses still streaming have sent."""
        return self.bytes_sent + sum(s.sent for s in self.streaming)


# Client request durations span a cached 304 (milliseconds) to a large download (hours).
DURATION_BUCKETS_SECS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 7200)


class RelayMetrics:
    """The relay's metrics, in a registry of their own."""

    def __init__(self, rendezvous: Rendezvous, forwarding: PortForwarding, capacity: Capacity | None = None) -> None:
        self.registry = CollectorRegistry()
        self.client_requests_in_flight = Gauge(
            "ptth_client_requests_in_flight", "Client requests being answered now", registry=self.registry)
        self.client_requests = Counter(
            "ptth_client_requests", "Client requests by final status", ["status"], registry=self.registry)
        self.client_responses_cut = Counter(
            "ptth_client_responses_cut", "Client responses cut off mid-body (server broke off or stalled)",
            registry=self.registry)
        self.relayed_bytes = Counter(
            "ptth_relayed_bytes", "Bytes relayed: response bodies to clients, request envelopes to servers",
            ["direction"], registry=self.registry)
        self.client_request_duration = Histogram(
            "ptth_client_request_duration_seconds", "Time from a client's request to the end of its response",
            buckets=DURATION_BUCKETS_SECS, registry=self.registry)
        self.backend_auth_rejected = Counter(
            "ptth_backend_auth_rejected", "Backend API calls refused for a missing, wrong or unknown key",
            registry=self.registry)
        self.scraper_auth_rejected = Counter(
            "ptth_scraper_auth_rejected", "Scraper API calls refused, by reason", ["reason"],
            registry=self.registry)
        self.tcp_connections = Counter(
            "ptth_tcp_connections", "Forwarded TCP connections asked for, by outcome "
            "(accepted, refused, failed, timed_out, forbidden, rejected)", ["outcome"], registry=self.registry)
        self.tcp_auth_rejected = Counter(
            "ptth_tcp_auth_rejected", "Port forwarding calls refused for a missing or unknown client key",
            registry=self.registry)
        self.tcp_bytes = Counter(
            "ptth_tcp_bytes", "Bytes carried by forwarded TCP connections that have closed",
            ["direction"], registry=self.registry)
        self.response_posts = Counter(
            "ptth_response_posts", "A relay cluster's response POSTs, by whether they reached the worker that "
            "holds the client or were carried to it over a peer link (not counted in one process)",
            ["reached"], registry=self.registry)
        self.answers = Counter(
            "ptth_server_answers", "Servers' answers taken, by the way they came: a response POST of their "
            "own, or riding on a listen (small complete answers, PROTOCOL.md)", ["way"], registry=self.registry)
        self.answers_posted = self.answers.labels("post")
        self.answers_carried = self.answers.labels("listen")
        self._posts_at_owner = self.response_posts.labels("owner")
        self._posts_carried = self.response_posts.labels("carried")
        self.servers: dict[str, ServerCounters] = {}
        self._rv = rendezvous
        self.registry.register(_RendezvousCollector(rendezvous, forwarding))
        self.registry.register(_ServerCollector(self))
        if capacity is not None:
            self.registry.register(_CapacityCollector(capacity))

    def for_server(self, name: str) -> ServerCounters | None:
        """Server `name`'s counters; None for a name not in the config (not counted)."""
        counters = self.servers.get(name)
        if counters is None and name in self._rv.servers:
            counters = self.servers[name] = ServerCounters()
        return counters

    def forget_removed(self) -> None:
        """Drop the counters of servers no longer in the config."""
        for name in [n for n in self.servers if n not in self._rv.servers]:
            del self.servers[name]

    def response_started(self, server: str, body: object) -> None:
        """A response to a client of `server` starts; if it streams, its bytes count as they go."""
        counters = self.for_server(server)
        if counters is not None and hasattr(body, "sent"):
            counters.streaming.add(body)

    def response_ended(self, server: str, status: int, body: object, error_line: str | None) -> None:
        """A response to a client of `server` ended: count it; keep `error_line` if the relay refused."""
        counters = self.for_server(server)
        if counters is None:
            return
        counters.requests += 1
        if hasattr(body, "sent") and body in counters.streaming:
            counters.streaming.discard(body)
            counters.bytes_sent += int(getattr(body, "sent", 0))
        if error_line is not None:
            counters.errors.append(ErrorAnswer(time.time(), status, error_line[:MAX_ERROR_CHARS]))

    def count_closed(self, conn: ForwardedConnection) -> None:
        """Count the bytes a forwarded connection carried, once it is forgotten."""
        self.tcp_bytes.labels("to_server").inc(conn.up.bytes)
        self.tcp_bytes.labels("to_client").inc(conn.down.bytes)

    def response_post(self, at_owner: bool) -> None:
        """Count a cluster's response POST: at the worker that holds its client, or carried there."""
        (self._posts_at_owner if at_owner else self._posts_carried).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def server_gauges(registered: int, online: int, queued: int) -> list[GaugeMetricFamily]:
    """The gauges of the relay as a whole: servers in the config, connected, requests queued."""
    return [
        GaugeMetricFamily("ptth_servers_registered", "Servers in the relay config", registered),
        GaugeMetricFamily("ptth_servers_online", "Servers connected now", online),
        GaugeMetricFamily("ptth_requests_queued", "Requests waiting for a listen, all servers", queued),
    ]


class _RendezvousCollector(Collector):
    """Gauges read from the rendezvous at each scrape."""

    def __init__(self, rendezvous: Rendezvous, forwarding: PortForwarding) -> None:
        self._rv = rendezvous
        self._fw = forwarding

    def collect(self) -> Iterator[GaugeMetricFamily]:
        servers = list(self._rv.servers.values())
        if not self._rv.shared:  # a cluster's come from Redis, once for all its nodes (cluster/metrics.py)
            yield from server_gauges(len(servers), sum(1 for s in servers if s.is_online()),
                                     sum(s.queue.qsize() for s in servers))
        yield GaugeMetricFamily("ptth_listeners_waiting", "Server listens parked at the relay",
                                sum(s.listeners for s in servers))
        yield GaugeMetricFamily("ptth_requests_pending", "Requests in the rendezvous: queued, waiting "
                                "for a response, or streaming", len(self._rv.pending))
        yield GaugeMetricFamily("ptth_tcp_connections_open", "Forwarded TCP connections open now",
                                self._fw.count_open())
        # Walks the heap: fine at scrape intervals, and the way to see leaked greenlets.
        # type(), not isinstance(): the heap holds weak proxies, and isinstance() on a dead
        # one raises ReferenceError.
        yield GaugeMetricFamily("ptth_greenlets", "Greenlets alive in the relay worker",
                                sum(1 for o in gc.get_objects() if issubclass(type(o), greenlet.greenlet)))


class _CapacityCollector(Collector):
    """The connections the relay holds and refuses (capacity.py), read at each scrape."""

    def __init__(self, capacity: Capacity) -> None:
        self._capacity = capacity

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        capacity = self._capacity
        yield GaugeMetricFamily("ptth_connections_open", "Connections open at the relay now: parked listens, "
                                "visitors, responses in flight, and those being refused", capacity.open)
        yield GaugeMetricFamily("ptth_connections_max", "Connections the relay holds at once (max_connections); "
                                "past it new ones get 503", capacity.max_connections)
        refused = CounterMetricFamily("ptth_connections_refused", "Connections answered 503 because the relay "
                                      "held max_connections, by what they asked for", labels=["kind"])
        for kind, count in sorted(capacity.refused.items()):
            refused.add_metric([kind], count)
        yield refused


class _ServerCollector(Collector):
    """Per-server counters (ServerCounters), read at each scrape."""

    def __init__(self, metrics: RelayMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[CounterMetricFamily]:
        servers = sorted(self._metrics.servers.items())
        requests = CounterMetricFamily("ptth_server_client_requests", "Client requests answered, by server",
                                       labels=["server"])
        sent = CounterMetricFamily("ptth_server_relayed_bytes", "Response bytes sent to clients, by server "
                                   "(responses still streaming included)", labels=["server"])
        for name, counters in servers:
            requests.add_metric([name], counters.requests)
            sent.add_metric([name], counters.bytes_so_far())
        return [requests, sent]
