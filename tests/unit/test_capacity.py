"""relay/capacity.py: how many connections the relay holds, and what it says while it refuses."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from test_presence_log import Clock

from ptth_lib.relay import capacity
from ptth_lib.relay.capacity import (
    LISTEN,
    MIN_REFUSAL_ROOM,
    RESERVED_FILES,
    VISITOR,
    Capacity,
    CapacityPlan,
    RefusalLog,
    plan_capacity,
    pool_size,
)

LOG = logging.getLogger("test.capacity")


@pytest.mark.parametrize("open_files", [1024, 4096, 20_000, 65_536, 1 << 20])
def test_the_default_leaves_room_for_the_relays_files_and_its_refusals(open_files: int) -> None:
    plan = plan_capacity(0, open_files)
    assert plan.warning is None and str(open_files) in plan.why
    # gunicorn's pool (the limit and the refusals' room) and the relay's own files fit the limit...
    assert pool_size(plan.max_connections) + RESERVED_FILES <= open_files
    # ...with little to spare: a 17th for the refusals, 100 for the rest.
    assert plan.max_connections >= (open_files - RESERVED_FILES) * 0.94 - MIN_REFUSAL_ROOM


def test_the_figures_of_the_readme() -> None:
    assert plan_capacity(0, 20_000).max_connections == 18_729
    assert pool_size(18_729) == 19_899
    assert plan_capacity(0, 20_000, cluster=True).max_connections == 9_364


def test_a_cluster_worker_keeps_half_of_its_files_for_peer_links() -> None:
    single, cluster = plan_capacity(0, 20_000), plan_capacity(0, 20_000, cluster=True)
    assert "peer links" in cluster.why
    assert abs(pool_size(cluster.max_connections) * 2 - pool_size(single.max_connections)) <= 2


def test_max_connections_in_the_config_is_kept_when_it_fits() -> None:
    plan = plan_capacity(300, 20_000, pool=pool_size(300))
    assert plan == CapacityPlan(300, "max_connections in the relay config")


def test_more_than_the_open_files_allow_is_cut_down_with_a_warning() -> None:
    plan = plan_capacity(50_000, 20_000)
    assert plan.max_connections == plan_capacity(0, 20_000).max_connections
    assert "50000" in plan.why and "open-files limit (20000)" in plan.why
    assert plan.warning is not None and "LimitNOFILE" in plan.warning


def test_a_cluster_may_be_given_more_than_its_default_half() -> None:
    assert plan_capacity(15_000, 20_000, cluster=True).max_connections == 15_000
    assert plan_capacity(50_000, 20_000, cluster=True).max_connections == plan_capacity(0, 20_000).max_connections


def test_gunicorns_own_limit_never_bites_first() -> None:
    """Under `gunicorn -k gevent ptth_relay:app` (worker_connections 1000), the relay holds what fits in it."""
    plan = plan_capacity(0, 20_000, pool=1000)
    assert pool_size(plan.max_connections) <= 1000 < pool_size(plan.max_connections + 1)
    assert "worker_connections (1000)" in plan.why
    assert plan.warning is not None and "conf/gunicorn.conf.py" in plan.warning


def test_conf_gunicorn_sizes_its_pool_from_the_relay_config(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text("max_connections = 500\n")
    assert capacity.gunicorn_worker_connections(str(config)) == pool_size(500) == 500 + MIN_REFUSAL_ROOM
    config.write_text("max_connections = 'many'\n")  # refused later by on_starting; meanwhile the default
    assert capacity.gunicorn_worker_connections(str(config)) == pool_size(
        plan_capacity(0, capacity.open_files_limit()).max_connections)


def test_connections_past_the_limit_are_counted_apart() -> None:
    cap = Capacity(CapacityPlan(2, "test"))
    assert [cap.opened() for _ in range(4)] == [True, True, False, False]
    assert (cap.admitted, cap.refusing, cap.open) == (2, 2, 4)
    cap.closed(True)
    cap.closed(False)
    assert (cap.admitted, cap.refusing) == (1, 1)
    assert cap.opened() is True  # room again: held


@pytest.mark.parametrize(("path", "kind"), [
    ("/7ZSFUKGV/http_listen/alpha", LISTEN),
    ("/7ZSFUKGV/tcp_listen/alpha/ssh", LISTEN),
    ("/frontend/servers/alpha/files/x", VISITOR),
    ("/frontend/relay_up_check", VISITOR),
    ("/", VISITOR),
    ("/7ZSFUKGV/http_response/ABC", None),  # finishes a request the relay took: served
    ("/7ZSFUKGV/http_request_body/ABC", None),
    ("/metrics", None),  # says why the relay refuses
])
def test_a_refused_connection_gets_503_unless_it_finishes_work_the_relay_took(
        monkeypatch: pytest.MonkeyPatch, path: str, kind: str | None) -> None:
    closed: list[bool] = []
    monkeypatch.setattr(capacity, "was_refused", lambda environ: environ.get("refused", False))
    monkeypatch.setattr(capacity, "close_after_response", lambda start_response: closed.append(True))
    cap = Capacity(CapacityPlan(10, "test"))
    assert cap.refusal({"PATH_INFO": path}, None) is None and not closed  # a held connection
    resp = cap.refusal({"PATH_INFO": path, "refused": True}, None)
    assert closed == [True]  # served or not, the connection ends with its answer
    if kind is None:
        assert resp is None and cap.refused == {LISTEN: 0, VISITOR: 0}
        return
    assert resp is not None and resp.status_code == 503 and resp.headers["Retry-After"] == "5"
    assert "max_connections" in resp.get_data(as_text=True)
    assert cap.refused == {LISTEN: kind == LISTEN, VISITOR: kind == VISITOR}


def test_refusals_are_a_line_at_once_then_counts_once_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    log = RefusalLog(LOG, lambda: (110, 100), clock=clock)
    with caplog.at_level(logging.INFO, LOG.name):
        log.record(LISTEN)
        assert [r.getMessage() for r in caplog.records] == [(
            "relay full: 110 connections open, max_connections 100: new connections get 503 (a line a minute "
            "while this lasts; README \"How many servers a relay holds\")")]
        for i in range(999):
            clock.now += 0.05
            log.record(VISITOR if i % 3 else LISTEN)
            log.tick()
        assert len(caplog.records) == 1  # still the first minute
        clock.now += 15
        log.tick()
        log.tick()
        clock.now += 30
        log.tick()  # a quiet half minute: not yet over
        clock.now += 30
        log.tick()  # a whole quiet minute
        clock.now += 300
        log.tick()  # nothing more to say
        log.record(VISITOR)  # full again: said at once
    messages = [r.getMessage() for r in caplog.records]
    assert messages[1] == ("relay full: refused 334 listens and 666 visitors' connections in the last 65 s "
                           "(110 connections open, max_connections 100)")
    assert messages[2] == ("relay no longer full: no connection refused in the last 60 s (110 connections open, "
                           "max_connections 100)")
    assert messages[3].startswith("relay full: 110 connections open") and len(messages) == 4
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.WARNING, logging.INFO, logging.WARNING]


def test_metrics_show_the_connections_and_the_refusals() -> None:
    from prometheus_client.parser import text_string_to_metric_families
    from test_relay import relay_config

    from ptth_lib.relay.relay import Relay

    relay = Relay(relay_config())
    relay.capacity.opened()
    relay.capacity.refused[LISTEN] = 3
    samples: dict[tuple[str, Any], float] = {}
    for family in text_string_to_metric_families(relay.metrics.render()[0].decode()):
        for s in family.samples:
            samples[(s.name, tuple(s.labels.items()))] = s.value
    assert samples[("ptth_connections_open", ())] == 1
    assert samples[("ptth_connections_max", ())] == relay.capacity.max_connections > 1000
    assert samples[("ptth_connections_refused_total", (("kind", "listen"),))] == 3
    assert samples[("ptth_connections_refused_total", (("kind", "visitor"),))] == 0


def test_a_reload_keeps_the_capacity_and_says_a_new_one_waits_for_a_restart(
        caplog: pytest.LogCaptureFixture) -> None:
    from test_relay import relay_config

    from ptth_lib.relay.relay import Relay

    relay = Relay(relay_config(max_connections=500))
    assert relay.capacity.max_connections == 500
    with caplog.at_level(logging.WARNING, "ptth_lib.relay.relay"):
        relay.reconfigure(relay_config(max_connections=600))
    assert relay.capacity.max_connections == 500
    assert [r.getMessage() for r in caplog.records] == [(
        "max_connections changed from 500 to 600 in the config: it takes effect when the relay restarts (it holds "
        "500 connections until then)")]
