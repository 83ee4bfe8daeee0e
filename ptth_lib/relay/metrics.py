"""Prometheus metrics of the relay, served at /metrics.

Counters and the duration histogram are updated by the relay (relay.py) as
requests finish; gauges of the current state (servers, parked listens, requests in
flight in the rendezvous) are read from the rendezvous at scrape time, so
they cannot drift. The registry belongs to one app: under gunicorn that is
the one gevent worker, whose memory holds the state being reported.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import greenlet
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from ptth_lib.relay.forwarding import ForwardedConnection, PortForwarding
from ptth_lib.relay.rendezvous import Rendezvous

# Client request durations span a cached 304 (milliseconds) to a large download (hours).
DURATION_BUCKETS_SECS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 7200)


class RelayMetrics:
    """The relay's metrics, in a registry of their own."""

    def __init__(self, rendezvous: Rendezvous, forwarding: PortForwarding) -> None:
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
        self.registry.register(_RendezvousCollector(rendezvous, forwarding))

    def count_closed(self, conn: ForwardedConnection) -> None:
        """Count the bytes a forwarded connection carried, once it is forgotten."""
        self.tcp_bytes.labels("to_server").inc(conn.up.bytes)
        self.tcp_bytes.labels("to_client").inc(conn.down.bytes)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _RendezvousCollector(Collector):
    """Gauges read from the rendezvous at each scrape."""

    def __init__(self, rendezvous: Rendezvous, forwarding: PortForwarding) -> None:
        self._rv = rendezvous
        self._fw = forwarding

    def collect(self) -> Iterator[GaugeMetricFamily]:
        servers = list(self._rv.servers.values())
        yield GaugeMetricFamily("ptth_servers_registered", "Servers in the relay config", len(servers))
        yield GaugeMetricFamily("ptth_servers_online", "Servers connected now",
                                sum(1 for s in servers if s.is_online()))
        yield GaugeMetricFamily("ptth_listeners_waiting", "Server listens parked at the relay",
                                sum(s.listeners for s in servers))
        yield GaugeMetricFamily("ptth_requests_pending", "Requests in the rendezvous: queued, waiting "
                                "for a response, or streaming", len(self._rv.pending))
        yield GaugeMetricFamily("ptth_requests_queued", "Requests waiting for a listen, all servers",
                                sum(s.queue.qsize() for s in servers))
        yield GaugeMetricFamily("ptth_tcp_connections_open", "Forwarded TCP connections open now",
                                self._fw.count_open())
        # Walks the heap: fine at scrape intervals, and the way to see leaked greenlets.
        # type(), not isinstance(): the heap holds weak proxies, and isinstance() on a dead
        # one raises ReferenceError.
        yield GaugeMetricFamily("ptth_greenlets", "Greenlets alive in the relay worker",
                                sum(1 for o in gc.get_objects() if issubclass(type(o), greenlet.greenlet)))
