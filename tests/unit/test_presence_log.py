"""PresenceLog (relay/presence_log.py): a line per server while few change, counts for a fleet."""

from __future__ import annotations

import logging

import pytest

from ptth_lib.relay.presence_log import PresenceLog

LOG = logging.getLogger("test.presence")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def infos(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]


def test_a_few_changes_are_each_a_line(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    log = PresenceLog(LOG, few=3, clock=clock)
    with caplog.at_level(logging.INFO, LOG.name):
        log.record("alpha", True)
        log.record("beta", False)
        clock.now += 61
        log.tick()
    assert infos(caplog) == ["server alpha is online", "server beta is offline"]  # nothing held: no summary


def test_a_fleet_is_summed_up_once_a_minute_with_names_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    log = PresenceLog(LOG, few=3, clock=clock)
    with caplog.at_level(logging.DEBUG, LOG.name):
        for i in range(1000):
            log.record(f"shop-{i}", i % 4 != 0)
            clock.now += 0.01
        log.tick()  # the minute is not over
        assert len(infos(caplog)) == 3
        clock.now += 60
        log.tick()
        log.tick()  # a second tick in the new window says nothing
    lines = infos(caplog)
    assert lines[:3] == ["server shop-0 is offline", "server shop-1 is online", "server shop-2 is online"]
    assert len(lines) == 4 and lines[3].startswith("748 more servers came online and 249 went offline in the last")
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert debug[0] == "server shop-3 is online" and len(debug) == 997


def test_a_quiet_minute_starts_over(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    log = PresenceLog(LOG, few=2, clock=clock)
    with caplog.at_level(logging.INFO, LOG.name):
        for name in ("a", "b", "c"):
            log.record(name, True)
        clock.now += 60
        log.record("d", True)  # a new window: by name again
    summary = ("1 more servers came online and 0 went offline in the last 60 s (more than 2 changes a minute: "
               "names at DEBUG)")
    assert infos(caplog) == ["server a is online", "server b is online", summary, "server d is online"]


def test_a_fleet_leaving_is_summed_up_too(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    log = PresenceLog(LOG, few=2, clock=clock)
    with caplog.at_level(logging.INFO, LOG.name):
        for i in range(500):
            log.record_leaving(f"shop-{i}")
        for i in range(500):
            log.record(f"shop-{i}", False)
        clock.now += 60
        log.tick()
    assert infos(caplog) == ["server shop-0 says it is leaving", "server shop-1 says it is leaving",
                             ("0 more servers came online and 500 went offline (498 said they were leaving) in the "
                              "last 60 s (more than 2 changes a minute: names at DEBUG)")]
