"""Fixtures of the in-process relay tests (test_relay.py, test_web_relay.py): a Relay per test, bounded."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gevent
import pytest
from test_relay import Tunnel, relay_config

from ptth_lib.relay.app import app_for
from ptth_lib.relay.relay import Relay


@pytest.fixture
def bounded() -> Iterator[None]:
    """No test waits longer than this: a deadlock fails in seconds, not at pytest-timeout's 120 s."""
    timeout = gevent.Timeout(20)
    timeout.start()
    yield
    timeout.close()


@pytest.fixture
def make_tunnel() -> Iterator[Any]:
    made: list[Relay] = []

    def make(servers: list[dict[str, Any]] | None = None, **extra: Any) -> Tunnel:
        if servers is not None:
            extra["servers"] = servers
        relay = Relay(relay_config(**extra))
        made.append(relay)
        return Tunnel(relay, app_for(relay).test_client(use_cookies=False))

    yield make
    for relay in made:
        relay.close()


@pytest.fixture
def tunnel(make_tunnel: Any) -> Tunnel:
    t: Tunnel = make_tunnel()
    return t
