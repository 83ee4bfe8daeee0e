"""The operators' side of a cluster node (CLUSTER.md section 5): audit, metrics, config versions.

`ClusterOps` joins a node's audit log, metrics and config to the cluster:

- **Audit log.** Each node still appends its own events to its host's file
  (audit.py), each entry with `node`; it also pushes every entry to Redis,
  where `/frontend/audit_log` reads the cluster's last 100. The push is done
  by one greenlet from a bounded queue, never on a request's path: a valid
  scraper key answers without waiting for Redis, and an outage loses only
  the page's copy (the files keep every entry).
- **Metrics.** The node serves its registry to the others ("metrics" call,
  cluster/metrics.py); `metrics()` gathers the whole cluster's for /metrics.
- **Config versions.** The node publishes the SHA-256 of the config it runs
  (`config_hash`) with its heartbeat, renewed at each reload. A node whose
  config has differed from another live node's for CONFIG_DRIFT_SECS logs
  one warning (`ConfigDrift`), and one line when they agree again.
- **Unregistered servers** are kept in Redis by the rendezvous
  (cluster/rendezvous.py); `unregistered()` reads them for the pages.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import fields, is_dataclass
from typing import Any

import gevent
import gevent.event

from ptth_lib.config import RelayConfig
from ptth_lib.relay.audit import AuditLog
from ptth_lib.relay.cluster import metrics as cluster_metrics
from ptth_lib.relay.cluster.node import HEARTBEAT_SECS, Node
from ptth_lib.relay.cluster.store import ClusterUnavailableError, NodeInfo, UnregisteredServer
from ptth_lib.relay.metrics import RelayMetrics

logger = logging.getLogger(__name__)

# Audit entries waiting for their push to Redis, at most: a burst of refused keys (an attack)
# beyond this drops the oldest from the page's copy only (the file has them all).
MAX_AUDIT_QUEUED = 1000

# A node whose config differs from another's this long logs a warning. Workers of one host
# reload within CHECK_INTERVAL_SECS (2 s) of each other and publish within a heartbeat
# (2 s), so a difference that lasts 10 s is a host left behind or a reload that failed.
CONFIG_DRIFT_SECS = 10.0


def config_hash(config: RelayConfig) -> str:
    """The SHA-256 of a config's values, the same in every process that loaded the same values.

    Not of repr(config): a frozenset's order (a client's `allow`) changes
    with each process's hash seed. Sets are written sorted, mappings by key.
    """
    return hashlib.sha256(_canonical(config).encode()).hexdigest()


def _canonical(value: object) -> str:
    if is_dataclass(value) and not isinstance(value, type):
        inner = ", ".join(f"{f.name}={_canonical(getattr(value, f.name))}" for f in fields(value))
        return f"{type(value).__name__}({inner})"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_canonical(k)}: {_canonical(v)}" for k, v in
                               sorted(value.items(), key=lambda kv: repr(kv[0]))) + "}"
    if isinstance(value, (set, frozenset)):
        return "{" + ", ".join(sorted(_canonical(v) for v in value)) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_canonical(v) for v in value) + "]"
    return repr(value)


class ConfigDrift:
    """Tells when a node's config has differed from the others' long enough to warn, once.

    Pure: `check` takes the live nodes and the time, and answers the line to
    log, if any.
    """

    def __init__(self, node: str, after_secs: float = CONFIG_DRIFT_SECS) -> None:
        self._node = node
        self._after = after_secs
        self._since: float | None = None  # when the configs were first seen to differ
        self._warned = False

    def check(self, mine: str, live: Sequence[NodeInfo], now: float,
              node: str | None = None) -> tuple[int, str] | None:
        """The line to log now, with its level: a warning once per difference, an INFO when the configs
        agree again; else None.

        `node` is this node's id now (it may change when it registers again).
        """
        me = node or self._node
        self._node = me
        others = [info for info in live if info.node != me]
        differ = [info for info in others if info.config_hash != mine]
        if not differ:
            was_warned = self._warned
            self._since, self._warned = None, False
            return (logging.INFO, "this node's config is the same as every other live node's again") \
                if was_warned else None
        if self._since is None:
            self._since = now
        if self._warned or now - self._since < self._after:
            return None
        self._warned = True
        return logging.WARNING, (f"this node's config (sha256 {mine[:12]}) has differed for {now - self._since:.0f} s from that "
                f"of {len(differ)} of the {len(others)} other live nodes (sha256 "
                f"{', '.join(sorted({i.config_hash[:12] for i in differ}))}): save the same ptth_relay.toml on "
                "every host, and look for a rejected reload in the logs (ptth_cluster_config_versions in /metrics)")


class ClusterOps:
    """A node's audit log, metrics and config version, joined to the cluster."""

    def __init__(self, node: Node, metrics: RelayMetrics, audit: AuditLog) -> None:
        """Wire them up; call before the node starts (it serves the "metrics" call from then on)."""
        self.node = node
        self._metrics = metrics
        node.calls[cluster_metrics.METRICS_CALL] = cluster_metrics.serve(metrics.registry)
        self._audit_queue: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_AUDIT_QUEUED)
        self._audit_ready = gevent.event.Event()
        audit.join_cluster(lambda: node.label, self._queue_audit)
        self._drift = ConfigDrift(node.id)

    def start(self) -> list[gevent.Greenlet]:
        """The audit pusher and the config watch; they run for the relay's life."""
        return [gevent.spawn(self._push_audit), gevent.spawn(self._watch_configs)]

    def reconfigured(self, config: RelayConfig) -> None:
        """The node runs `config` now: its next heartbeat (within 2 s) publishes the new hash."""
        self.node.config_hash = config_hash(config)

    # ---- the pages ----

    def unregistered(self) -> list[UnregisteredServer]:
        """The servers refused by any node, the latest first (ClusterUnavailableError: 503)."""
        return self.node.store.unregistered()

    def recent_audit(self) -> list[dict[str, Any]]:
        """The cluster's last audit entries, oldest first (ClusterUnavailableError: 503)."""
        return self.node.store.recent_audit()

    def metrics(self, servers: Sequence[str]) -> bytes:
        """The whole cluster's /metrics text (ClusterUnavailableError: 503)."""
        return cluster_metrics.scrape(self.node, self._metrics.registry, servers)

    # ---- the greenlets ----

    def _queue_audit(self, entry: dict[str, Any]) -> None:
        self._audit_queue.append(entry)
        self._audit_ready.set()

    def _push_audit(self) -> None:
        """Forever: push queued audit entries to Redis, one round trip each, in order."""
        while True:
            self._audit_ready.wait()
            self._audit_ready.clear()
            while self._audit_queue:
                entry = self._audit_queue.popleft()
                try:
                    self.node.store.record_audit(entry)
                except ClusterUnavailableError:
                    pass  # store.py logged the outage once; the file has the entry

    def _watch_configs(self) -> None:
        """Forever: compare this node's config with the others' as the heartbeat last read them."""
        while True:
            gevent.sleep(HEARTBEAT_SECS)
            node = self.node
            if not node.joined.is_set():
                continue
            said = self._drift.check(node.config_hash, node.live, time.monotonic(), node.id)
            if said is not None:
                level, line = said
                logger.log(level, "relay node %s: %s", node.label, line)
