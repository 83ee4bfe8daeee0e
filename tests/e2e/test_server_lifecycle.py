"""ptth_server starting, stopping and misbehaving relays, as an operator sees it.

A first-time user found: no "connected" line until the first long-poll
returned (30 s); nothing logged on stop; a stopped server shown online for
seconds while its requests waited 30 s for a 502. And the attack review
found that ptth_server followed redirects with its key and retried an
instant 204 in a tight loop. Real relay and server processes; a hostile
"relay" (redirect_peers.py) where the relay must misbehave.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import requests
from conftest import Cluster, Relay, new_key, wait_until
from redirect_peers import HostileRelay, Reply, Trap, redirect

pytestmark = pytest.mark.process


def is_online(relay: Relay, name: str) -> bool:
    servers = requests.get(relay.url + "/frontend/servers/", headers={"Accept": "application/json"},
                           timeout=10).json()
    return any(s["name"] == name and s["online"] for s in servers)


def at(hostile: HostileRelay) -> Relay:
    """The hostile relay where Cluster.server wants a relay (it only reads the URL)."""
    return Relay(None, int(hostile.url.rsplit(":", 1)[1]), Path("unused"))  # type: ignore[arg-type]


def root_with_file(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    (root / "hello.txt").write_bytes(b"hello\n")
    return root


def test_connected_is_logged_at_once_and_stopping_is_logged(cluster: Cluster, tmp_path: Path) -> None:
    key = new_key("alpha")
    relay = cluster.relay({"alpha": key}, extra="listen_timeout_secs = 60")
    server = cluster.server(relay, "alpha", key, root_with_file(tmp_path), wait=False)
    # Long before the first long-poll (60 s) could have returned.
    server.proc.wait_for_output(r"connected to relay .* as 'alpha'", deadline=10)
    assert server.proc.stop(signal.SIGTERM) == 0
    log = server.proc.output()
    assert "stopping:" in log and log.rstrip().endswith("stopped"), log[-1000:]


def test_a_stopping_server_is_gone_at_once(cluster: Cluster, tmp_path: Path) -> None:
    key = new_key("alpha")
    relay = cluster.relay({"alpha": key}, extra="request_timeout_secs = 30")
    server = cluster.server(relay, "alpha", key, root_with_file(tmp_path))
    assert server.proc.stop(signal.SIGTERM) == 0
    stopped = time.monotonic()
    r = requests.get(relay.url + "/frontend/servers/alpha/files/hello.txt", timeout=60)
    assert r.status_code == 502 and time.monotonic() - stopped < 5, (r.status_code, time.monotonic() - stopped)
    wait_until(lambda: not is_online(relay, "alpha"), "the server shown offline", relay.proc, 5)
    assert "server alpha says it is leaving" in relay.proc.output()


def test_requests_waiting_for_a_killed_server_fail_within_seconds(cluster: Cluster, tmp_path: Path) -> None:
    """No goodbye: the relay sees its listens' connections close, and fails what waits once it is gone."""
    key = new_key("alpha")
    relay = cluster.relay({"alpha": key}, extra="request_timeout_secs = 30")
    server = cluster.server(relay, "alpha", key, root_with_file(tmp_path))
    server.proc.kill()
    started = time.monotonic()
    r = requests.get(relay.url + "/frontend/servers/alpha/files/hello.txt", timeout=60)
    waited = time.monotonic() - started
    assert r.status_code == 502 and waited < 8, (r.status_code, r.text, waited)


def test_one_of_two_processes_stopping_leaves_the_other_serving(cluster: Cluster, tmp_path: Path) -> None:
    key = new_key("twin")
    relay = cluster.relay({"twin": key})
    root = root_with_file(tmp_path)
    first = cluster.server(relay, "twin", key, root)
    second = cluster.server(relay, "twin", key, root)
    # The name is online already (the first): wait for the second itself, or on a busy machine
    # the first leaves before the second has listened, and the name is rightly offline for a while.
    wait_until(lambda: "connected to relay" in second.proc.output(), "the second process connected", second.proc)
    assert first.proc.stop(signal.SIGTERM) == 0
    statuses = [requests.get(relay.url + "/frontend/servers/twin/files/hello.txt", timeout=30).status_code
                for _ in range(30)]
    assert statuses == [200] * 30
    assert is_online(relay, "twin")


@pytest.mark.parametrize("status", [302, 307, 308])
def test_the_server_never_follows_a_redirect_with_its_key(cluster: Cluster, tmp_path: Path, status: int) -> None:
    trap = Trap()
    hostile = HostileRelay(lambda seen: redirect(status, f"{trap.url}{seen.path}"))
    try:
        proc = cluster.server(at(hostile), "alpha", new_key("alpha"), root_with_file(tmp_path), wait=False).proc
        wait_until(lambda: len(hostile.requests_to("/7ZSFUKGV/http_listen/")) >= 4, "a few listens", proc, 20)
    finally:
        hostile.close()
        trap.close()
    assert trap.keys_seen() == [] and trap.seen == [], "a redirect was followed"
    warnings = [line for line in proc.output().splitlines() if "to the listen" in line]
    assert len(warnings) == 1, warnings
    assert f"relay answered {status}" in warnings[0] and "not followed" in warnings[0], warnings[0]


def test_an_instant_204_does_not_make_the_server_spin(cluster: Cluster, tmp_path: Path) -> None:
    """A relay (or something in between) answering every listen with an immediate 204."""
    hostile = HostileRelay(lambda seen: Reply(204))
    try:
        proc = cluster.server(at(hostile), "alpha", new_key("alpha"), root_with_file(tmp_path), wait=False).proc
        wait_until(lambda: len(hostile.requests_to("/7ZSFUKGV/http_listen/")) >= 2, "listens", proc, 20)
        time.sleep(3)
        count = len(hostile.requests_to("/7ZSFUKGV/http_listen/"))
    finally:
        hostile.close()
    # Two listen threads, each backing off from 0.25-0.5 s and doubling: a spinning loop makes hundreds.
    assert count <= 16, f"{count} listens in about 3 s"
