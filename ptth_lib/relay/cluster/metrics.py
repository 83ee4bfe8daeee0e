"""/metrics for the whole cluster in one scrape (CLUSTER.md section 5).

Whichever node (relay worker) gets the scrape asks every live node over a
peer link for its registry (a "metrics" call: `serve`), at most
NODE_SCRAPE_SECS each and all at once, and writes every series with a `node`
label (`host/pid/id`, the node's `label`). Its own registry it reads in
place. Each family appears once with one HELP and TYPE, its samples those of
every node that answered (`merge`), so the text stays valid Prometheus
exposition and `sum without (node) (...)` gives the cluster's totals. A
node's counters stay its own series, so a node that stops takes its series
with it instead of making a sum go down (which `rate()` would read as a
counter reset).

Then, once and without the label, what only Redis knows: the live nodes,
how many answered, how many distinct configs they run, and the servers
online, listens parked and requests queued across the cluster. A node
answers with the families of its registry as msgpack (name, type, help,
unit, samples), not as text, so nothing is parsed twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import gevent
import msgpack
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from ptth_lib.relay.cluster.node import Node
from ptth_lib.relay.cluster.peering import PeerCutError, PeerLink, PeerPool
from ptth_lib.relay.cluster.store import ClusterUnavailableError, NodeInfo, Presence
from ptth_lib.relay.metrics import server_gauges

logger = logging.getLogger(__name__)

# The peer call's kind.
METRICS_CALL = "metrics"
# A node that has not answered in this long is left out of the scrape (and counted out of
# ptth_cluster_nodes_scraped): Prometheus's own scrape timeout is 10 s by default, and the
# nodes are asked at once, so the whole scrape takes at most about this long.
NODE_SCRAPE_SECS = 1.0
# A node's answer is refused past this size. A registry is a few kilobytes plus two series
# per configured server (about 200 bytes each): 16 MiB is some 80,000 servers.
MAX_NODE_METRICS_BYTES = 16 << 20
# Pieces of a node's answer on its link.
PIECE_BYTES = 256 * 1024
# The config hash's first characters, as the ptth_cluster_node_config_info label: enough
# to tell configs apart by eye, short enough to read.
CONFIG_LABEL_CHARS = 12

# One family as a node sends it: name, type, help, unit, and its samples (name, labels, value).
Family = tuple[str, str, str, str, list[tuple[str, dict[str, str], float]]]


def label_of(info: NodeInfo) -> str:
    """A node's `node` label, as Node.label writes its own: host/pid/id."""
    return f"{info.host}/{info.pid}/{info.node}"


# ---- one node's side: its registry, over a peer link -----------------------------


def families_of(registry: CollectorRegistry) -> list[Family]:
    """The families a registry collects now, without timestamps or exemplars (the relay sets none)."""
    return [(m.name, m.type, m.documentation, m.unit, [(s.name, dict(s.labels), float(s.value)) for s in m.samples])
            for m in registry.collect()]


def serve(registry: CollectorRegistry) -> Callable[[dict[str, Any], PeerLink], None]:
    """The handler of the "metrics" call: this node's registry, collected now, as msgpack pieces."""
    def handle(head: dict[str, Any], link: PeerLink) -> None:
        payload = msgpack.packb(families_of(registry))
        link.send_head({"status": 200, "bytes": len(payload)})
        for start in range(0, len(payload), PIECE_BYTES):
            link.send(payload[start:start + PIECE_BYTES])
        link.end()
    return handle


def ask(pool: PeerPool, address: str, timeout_secs: float = NODE_SCRAPE_SECS) -> list[Family] | None:
    """Another node's families, over a link to `address`; None if it did not answer in `timeout_secs`."""
    timer = gevent.Timeout(timeout_secs)
    timer.start()
    link = None
    try:
        link = pool.open(address, {"kind": METRICS_CALL})
        link.end()
        head = link.read_head()
        if head.get("status") != 200:
            raise ValueError(f"it answered {head.get('status')!r}")
        received = bytearray()
        for piece in link.pieces():
            received += piece
            if len(received) > MAX_NODE_METRICS_BYTES:
                raise ValueError(f"its answer is over {MAX_NODE_METRICS_BYTES} bytes")
        return _decode(bytes(received))
    except gevent.Timeout as e:
        if e is not timer:
            raise
        why = f"no answer within {timeout_secs:g} s"
    except (PeerCutError, ClusterUnavailableError, ValueError) as e:
        why = str(e)
    finally:
        timer.close()
        if link is not None:
            link.close()  # back to the pool if the call ended cleanly both ways, else dropped
    logger.info("relay node at %s left out of this metrics scrape: %s", address, why)
    return None


def _decode(payload: bytes) -> list[Family]:
    """A node's answer, checked for shape: a peer is a node of ours, but maybe of another version."""
    try:
        raw = msgpack.unpackb(payload, raw=False)
        return [(str(name), str(typ), str(doc), str(unit),
                 [(str(sname), {str(k): str(v) for k, v in labels.items()}, float(value))
                  for sname, labels, value in samples])
                for name, typ, doc, unit, samples in raw]
    except (ValueError, TypeError, AttributeError, msgpack.UnpackException) as e:
        raise ValueError(f"its answer is not a list of metric families: {type(e).__name__}") from None


# ---- the node that got the scrape -------------------------------------------------


def merge(answers: Iterable[tuple[str, list[Family]]]) -> list[Metric]:
    """Every node's families as one family each, every sample labelled with its node.

    Families come in the order first seen; a family whose type differs from
    the first node's (a node of another version, mid-upgrade) is left out for
    that node, so that each family keeps one TYPE.
    """
    merged: dict[str, Metric] = {}
    for node, families in answers:
        for name, typ, doc, unit, samples in families:
            metric = merged.get(name)
            if metric is None:
                metric = merged[name] = Metric(name, doc, typ, unit)
            elif metric.type != typ:
                continue
            for sample_name, labels, value in samples:
                metric.add_sample(sample_name, {"node": node, **labels}, value)
    return list(merged.values())


class _Fixed(Collector):
    """A collector of families already made, for generate_latest."""

    def __init__(self, families: Sequence[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def render(families: Sequence[Metric]) -> bytes:
    """Families as Prometheus text exposition, as the single-process relay writes it."""
    registry = CollectorRegistry()
    registry.register(_Fixed(families))
    return generate_latest(registry)


def cluster_gauges(live: Sequence[NodeInfo], scraped: int, presence: dict[str, Presence],
                   waiting: dict[str, tuple[int, int]]) -> list[Metric]:
    """The gauges only Redis knows, once for the cluster (no `node` label), and each node's config."""
    configs = GaugeMetricFamily("ptth_cluster_node_config_info", "The config each live node runs: the start "
                                "of its SHA-256", labels=["node", "config"])
    for info in live:
        configs.add_metric([label_of(info), info.config_hash[:CONFIG_LABEL_CHARS]], 1)
    return [
        GaugeMetricFamily("ptth_cluster_nodes", "Relay nodes (workers) registered in Redis and alive", len(live)),
        GaugeMetricFamily("ptth_cluster_nodes_scraped", "Relay nodes whose metrics are in this scrape", scraped),
        GaugeMetricFamily("ptth_cluster_config_versions", "Distinct configs the live nodes run (1 when all agree)",
                          len({info.config_hash for info in live})),
        configs,
        GaugeMetricFamily("ptth_cluster_listeners_waiting", "Server listens parked, all nodes",
                          sum(parked for parked, _ in waiting.values())),
        # The single process's own names: the same dashboards work for both.
        *server_gauges(len(presence), sum(1 for p in presence.values() if p.online),
                       sum(queued for _, queued in waiting.values())),
    ]


def scrape(node: Node, own: CollectorRegistry, servers: Sequence[str]) -> bytes:
    """The whole cluster's /metrics: every live node's series labelled, then the cluster's gauges.

    Raises ClusterUnavailableError when Redis cannot say which nodes are
    alive (503: a scrape of one node's figures would look like the others stopped).
    """
    live = node.store.live_nodes()
    presence = node.store.server_presence(servers)
    waiting = node.store.waiting_counts(servers)
    others = [info for info in live if info.node != node.id and info.peer]
    pool = node.pool
    asked = [(label_of(info), gevent.spawn(ask, pool, info.peer)) for info in others] if pool is not None else []
    answers = [(node.label, families_of(own))]
    gevent.joinall([job for _, job in asked])
    answers += [(label, job.value) for label, job in asked if job.value is not None]
    return render(merge(answers) + cluster_gauges(live, len(answers), presence, waiting))
