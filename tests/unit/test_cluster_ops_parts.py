"""The cluster's operators' parts that need no Redis: config hashes, drift warnings, merged metrics, audit lines.

The metrics call goes over a real PeerServer and PeerPool on 127.0.0.1
(threads, as in test_peering.py); tests/e2e/test_cluster_ops.py runs all of
it on a 4-worker cluster.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client import Counter as PromCounter
from prometheus_client.parser import text_string_to_metric_families

from ptth_lib.config import parse_relay_config
from ptth_lib.relay.audit import AuditLog
from ptth_lib.relay.cluster import metrics as cluster_metrics
from ptth_lib.relay.cluster.ops import ConfigDrift, config_hash
from ptth_lib.relay.cluster.peering import PeerPool, PeerServer
from ptth_lib.relay.cluster.store import NodeInfo, Presence
from ptth_lib.relay.scraper_api import MAX_FAILURES_PER_WINDOW, FailureLimiter

SECRET = b"the cluster's secret, 32 bytes.."
TRIPCODE = "A" * 43 + "="


def node(node_id: str, config: str) -> NodeInfo:
    return NodeInfo(node_id, "127.0.0.1:1", config, "host", 1)


# ---- config hashes -------------------------------------------------------------------


def _config(**extra: object) -> dict[str, object]:
    return {"servers": [{"name": "alpha", "tripcode": TRIPCODE}],
            "clients": [{"name": "c", "tripcode": TRIPCODE, "allow": [f"alpha:port{i}" for i in range(20)]}],
            **extra}


def test_a_config_hash_is_the_same_in_every_process() -> None:
    """A client's `allow` is a frozenset, whose order follows each process's hash seed: not the hash's."""
    script = ("from ptth_lib.config import parse_relay_config; from ptth_lib.relay.cluster.ops import config_hash; "
              f"print(config_hash(parse_relay_config({_config()!r}, 'test')))")
    hashes = {subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONHASHSEED": seed},
                             cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
                             check=True, timeout=60).stdout.strip() for seed in ("1", "2", "3")}
    assert len(hashes) == 1 and len(next(iter(hashes))) == 64, hashes


def test_a_config_hash_changes_with_any_value() -> None:
    base = config_hash(parse_relay_config(_config(), "test"))
    assert config_hash(parse_relay_config(_config(), "test")) == base
    assert config_hash(parse_relay_config(_config(listen_timeout_secs=29), "test")) != base
    assert config_hash(parse_relay_config(_config(dashboard={"enabled": False}), "test")) == base
    more = _config()
    more["servers"] = [*more["servers"], {"name": "beta", "tripcode": TRIPCODE}]  # type: ignore[misc]
    assert config_hash(parse_relay_config(more, "test")) != base


# ---- config drift ----------------------------------------------------------------------


def test_a_node_warns_once_when_its_config_differs_for_ten_seconds() -> None:
    drift = ConfigDrift("ME")
    same = [node("ME", "new"), node("B", "new")]
    differ = [node("ME", "new"), node("B", "old"), node("C", "new")]
    assert drift.check("new", same, 0.0) is None
    assert drift.check("new", differ, 1.0) is None  # a reload in progress on another worker
    assert drift.check("new", differ, 10.9) is None
    level, line = drift.check("new", differ, 11.0) or (0, "")
    assert level == logging.WARNING
    assert "differed for 10 s" in line and "1 of the 2 other live nodes" in line and "old" in line
    assert drift.check("new", differ, 60.0) is None  # once per difference
    level, line = drift.check("new", same, 61.0) or (0, "")
    assert level == logging.INFO and "again" in line
    assert drift.check("new", same, 62.0) is None
    assert drift.check("new", differ, 63.0) is None  # a new difference starts its own 10 s
    assert drift.check("new", differ, 73.0) is not None


def test_a_difference_that_ends_in_time_says_nothing() -> None:
    drift = ConfigDrift("ME")
    assert drift.check("a", [node("ME", "a"), node("B", "b")], 0.0) is None
    assert drift.check("b", [node("ME", "a"), node("B", "b")], 5.0) is None  # this node reloaded: not its own
    assert drift.check("b", [node("ME", "a"), node("B", "b")], 30.0) is None
    assert drift.check("b", [node("NEWID", "b"), node("B", "b")], 31.0, node="NEWID") is None


# ---- merged metrics --------------------------------------------------------------------


def registry_with(requests: int, in_flight: float) -> CollectorRegistry:
    registry = CollectorRegistry()
    PromCounter("ptth_client_requests", "Client requests by final status", ["status"],
                registry=registry).labels("200").inc(requests)
    Gauge("ptth_client_requests_in_flight", "Client requests being answered now", registry=registry).set(in_flight)
    Histogram("ptth_client_request_duration_seconds", "Time", buckets=(0.1, 1), registry=registry).observe(0.5)
    return registry


def test_merged_families_keep_one_help_and_type_and_label_every_sample() -> None:
    answers = [("h/1/AAAAAAAA", cluster_metrics.families_of(registry_with(3, 1))),
               ("h/2/BBBBBBBB", cluster_metrics.families_of(registry_with(5, 0)))]
    text = cluster_metrics.render(cluster_metrics.merge(answers)).decode()
    for kind in ("HELP", "TYPE"):
        lines = Counter(line.split()[2] for line in text.splitlines() if line.startswith(f"# {kind} "))
        assert max(lines.values()) == 1, lines
    assert "# TYPE ptth_client_requests_total counter" in text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = {s.labels["node"]: s.value for s in families["ptth_client_requests"].samples
                if s.name == "ptth_client_requests_total"}
    assert requests == {"h/1/AAAAAAAA": 3, "h/2/BBBBBBBB": 5}
    buckets = [s for s in families["ptth_client_request_duration_seconds"].samples
               if s.name.endswith("_bucket")]
    assert len(buckets) == 6 and all(set(s.labels) == {"node", "le"} for s in buckets)


def test_a_family_of_another_type_from_one_node_is_left_out() -> None:
    first = ("n1", [("ptth_x", "gauge", "x", "", [("ptth_x", {}, 1.0)])])
    other = ("n2", [("ptth_x", "counter", "x", "", [("ptth_x_total", {}, 2.0)])])
    [family] = cluster_metrics.merge([first, other])
    assert family.type == "gauge" and [s.labels for s in family.samples] == [{"node": "n1"}]


def test_a_node_answers_its_registry_over_a_peer_link() -> None:
    server = PeerServer("127.0.0.1:0", SECRET, {cluster_metrics.METRICS_CALL: cluster_metrics.serve(
        registry_with(7, 2))})
    server.start()
    pool = PeerPool(SECRET)
    try:
        families = cluster_metrics.ask(pool, server.address)
        assert families is not None
        [requests] = [f for f in families if f[0] == "ptth_client_requests"]
        assert ("ptth_client_requests_total", {"status": "200"}, 7.0) in requests[4]
        assert cluster_metrics.ask(pool, server.address) is not None
        assert pool.links_made == 1  # the call ended cleanly both ways: the link was reused
    finally:
        pool.close()
        server.close()


def test_a_node_that_cannot_be_reached_is_left_out(caplog: pytest.LogCaptureFixture) -> None:
    pool = PeerPool(SECRET, connect_timeout=1.0)
    with caplog.at_level(logging.INFO):
        assert cluster_metrics.ask(pool, "127.0.0.1:1") is None
    assert "left out of this metrics scrape" in caplog.text


def test_cluster_gauges_count_nodes_and_configs() -> None:
    live = [node("A", "x" * 64), node("B", "x" * 64), node("C", "y" * 64)]
    presence = {"s": Presence(None, True, None, None), "t": Presence(None, False, None, None)}
    families = {f.name: f for f in cluster_metrics.cluster_gauges(live, 2, presence,
                                                                  {"s": (2, 0), "t": (0, 3)})}
    value = {name: f.samples[0].value for name, f in families.items() if len(f.samples) == 1}
    assert value == {"ptth_cluster_nodes": 3, "ptth_cluster_nodes_scraped": 2, "ptth_cluster_config_versions": 2,
                     "ptth_cluster_listeners_waiting": 2, "ptth_servers_registered": 2, "ptth_servers_online": 1,
                     "ptth_requests_queued": 3}
    assert {s.labels["config"] for s in families["ptth_cluster_node_config_info"].samples} == {"x" * 12, "y" * 12}


# ---- the audit file and the scraper limit ------------------------------------------------


def test_audit_lines_are_appended_whole_and_name_their_node(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text('{"event": "before"}\n')
    shared: list[dict[str, object]] = []
    one, two = AuditLog(str(path)), AuditLog(str(path))  # two workers' logs on one file
    one.join_cluster(lambda: "h/1/AAAAAAAA", shared.append)
    two.join_cluster(lambda: "h/2/BBBBBBBB", shared.append)
    for i in range(50):
        one.record("config_reloaded", detail="x" * (i * 300))
        two.record("config_rejected", detail="y" * (i * 300))
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(entries) == 101 and entries[0] == {"event": "before"}
    assert Counter(e["node"] for e in entries[1:]) == {"h/1/AAAAAAAA": 50, "h/2/BBBBBBBB": 50}
    assert len(shared) == 100 and shared[0]["node"] == "h/1/AAAAAAAA"


def test_a_single_process_audit_entry_has_no_node(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(str(path))
    audit.record("server_online", server="alpha")
    [entry] = [json.loads(line) for line in path.read_text().splitlines()]
    assert set(entry) == {"time", "event", "server"}


def test_the_limiter_counts_ten_failures_then_says_wait() -> None:
    limiter = FailureLimiter()
    assert [limiter.failed("a", 0.0) for _ in range(MAX_FAILURES_PER_WINDOW)] == [0.0] * MAX_FAILURES_PER_WINDOW
    assert limiter.failed("a", 10.0) == 50.0
    assert limiter.failed("b", 10.0) == 0.0
    assert limiter.failed("a", 60.0) == 0.0  # a new window
