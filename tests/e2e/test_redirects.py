"""ptth_server's port forwarding and the health check against a hostile or misplaced "relay".

A relay URL that answers with a redirect must never make a PTTH program carry
its key (`X-ApiKey`) to where the redirect points: `HostileRelay` redirects to
a `Trap` on another loopback address, which records every key that reaches it.
The redirect is an error that names its status and target, and the programs
that retry back off instead of spinning, logging each problem once, not once
per retry. (ptth_client's side is in test_client_cli.py.)
"""

from __future__ import annotations

import itertools
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, Cluster, Proc, free_port, new_key, wait_until
from redirect_peers import HostileRelay, Reply, Seen, Trap, redirect
from tcp_peers import EchoServer, TcpServer

from ptth_lib.wire.envelope import CLIENT_NAME_HEADER, CONNECTION_ID_HEADER

pytestmark = pytest.mark.process

HINT = "is relay_url the PTTH relay's base URL?"
# How long ptth_server keeps a parked HTTP listen at the hostile relay: the HTTP listen loop
# (server_loop) is not what these tests are about, so it is kept quiet and slow.
PARKED_LISTEN = Reply(204, delay=1.0)
NOT_FOLLOWED = re.escape(" (not followed: " + HINT + ")")


@pytest.fixture
def trap() -> Iterator[Trap]:
    t = Trap()
    yield t
    t.close()


def start_server(cluster: Cluster, relay_url: str, ports: dict[str, str]) -> tuple[Proc, str]:
    """ptth_server with these forwarded ports, connecting to `relay_url`; and its key."""
    key = new_key("alpha")
    root = cluster.tmp / "root"
    root.mkdir(exist_ok=True)
    config = cluster.tmp / f"server-{cluster.counter}.toml"
    table = "".join(f'{name} = "{address}"\n' for name, address in ports.items())
    config.write_text(f'name = "alpha"\napi_key = "{key}"\nrelay_url = "{relay_url}"\n'
                      f'file_server_root = "{root}"\n[forwarded_ports]\n{table}')
    config.chmod(0o600)
    cluster.counter += 1
    proc = Proc([sys.executable, "ptth_server.py", "--config", str(config)],
                cluster.tmp / f"{cluster.counter:02d}-server.log")
    cluster.procs.append(proc)
    return proc, key


def tcp_listens(relay: HostileRelay, port: str) -> list[Seen]:
    return relay.requests_to(f"/7ZSFUKGV/tcp_listen/alpha/{port}")


def wait_for_listens(relay: HostileRelay, port: str, count: int, proc: Proc) -> None:
    wait_until(lambda: len(tcp_listens(relay, port)) >= count, f"{count} tcp listens for {port}", proc)


@pytest.mark.parametrize("status", [302, 307])
def test_tcp_listen_never_follows_a_redirect(cluster: Cluster, trap: Trap, status: int) -> None:
    """Every tcp_listen is redirected: none reaches the trap; one warning names the redirect,
    however many retries; the retries back off."""

    def answer(seen: Seen) -> Reply:
        if seen.path.startswith("/7ZSFUKGV/tcp_listen/"):
            return redirect(status, f"{trap.url}/stolen")
        return PARKED_LISTEN

    relay = HostileRelay(answer)
    try:
        proc, key = start_server(cluster, relay.url, {"ssh": f"127.0.0.1:{free_port()}"})
        wait_for_listens(relay, "ssh", 4, proc)
        listens = tcp_listens(relay, "ssh")
    finally:
        relay.close()
    assert trap.seen == [], "a redirect was followed"
    gaps = [b.at - a.at for a, b in itertools.pairwise(listens)]
    assert min(gaps) >= 0.2, f"retried at once: {gaps}"  # errors.backoff_secs(0) is 0.25-0.5 s
    warnings = re.findall(r".*tcp listen for port ssh: .*", proc.output())
    phrase = {302: "Found", 307: "Temporary Redirect"}[status]
    assert len(warnings) == 1, warnings
    assert re.search(rf"relay answered {status} {phrase}, a redirect to {re.escape(trap.url)}/stolen"
                     rf"{NOT_FOLLOWED}; retrying with backoff", warnings[0]), warnings[0]
    assert key not in proc.output()


def test_accept_and_refusal_never_follow_a_redirect(cluster: Cluster, trap: Trap) -> None:
    """A connection offered on each port; the relay redirects the accept (port `open`, whose
    address answers) and the refusal (port `closed`, whose address refuses)."""
    echo = EchoServer()
    offered: set[str] = set()

    def answer(seen: Seen) -> Reply:
        m = re.match(r"/7ZSFUKGV/tcp_listen/alpha/(\w+)$", seen.path)
        if m and m.group(1) not in offered:
            offered.add(m.group(1))
            return Reply(200, {CONNECTION_ID_HEADER: f"conn-{m.group(1)}", CLIENT_NAME_HEADER: "laptop"})
        if seen.path.startswith(("/7ZSFUKGV/tcp_accept/", "/7ZSFUKGV/tcp_refuse/")):
            return redirect(307, f"{trap.url}{seen.path}")
        return PARKED_LISTEN

    relay = HostileRelay(answer)
    try:
        proc, key = start_server(cluster, relay.url, {"open": f"127.0.0.1:{echo.port}",
                                                     "closed": f"127.0.0.1:{free_port()}"})
        accept = proc.wait_for_output(r"connection onn-open .*: relay answered 307 .*")
        refusal = proc.wait_for_output(r"the relay answered 307 .* to the refusal")
    finally:
        relay.close()
        echo.close()
    assert trap.seen == [], "a redirect was followed"
    assert f"a redirect to {trap.url}/7ZSFUKGV/tcp_accept/conn-open (not followed" in accept.group(0)
    assert f"a redirect to {trap.url}/7ZSFUKGV/tcp_refuse/conn-closed (not followed" in refusal.group(0)
    assert key not in proc.output()


class Greeter(TcpServer):
    """Says hello and closes: the forwarded connection's bytes end at once."""

    def handle(self, sock: socket.socket) -> None:
        sock.sendall(b"hello\n")


def test_downstream_redirect_is_named(cluster: Cluster, trap: Trap) -> None:
    """The server's bytes (tcp_downstream, a POST straight through urllib3) get a redirect for
    an answer: the connection closes with the redirect's status and target as the reason."""
    greeter = Greeter()
    offered = []

    def answer(seen: Seen) -> Reply:
        if seen.path.startswith("/7ZSFUKGV/tcp_listen/") and not offered:
            offered.append(seen)
            return Reply(200, {CONNECTION_ID_HEADER: "conn-greet", CLIENT_NAME_HEADER: "laptop"})
        if seen.path.startswith("/7ZSFUKGV/tcp_accept/"):
            return Reply(200, {"Content-Type": "application/octet-stream"}, chunked=True)  # the client's end
        if seen.path.startswith("/7ZSFUKGV/tcp_downstream/"):
            return redirect(307, f"{trap.url}/elsewhere")
        return PARKED_LISTEN

    relay = HostileRelay(answer)
    try:
        proc, _ = start_server(cluster, relay.url, {"greet": f"127.0.0.1:{greeter.port}"})
        closed = proc.wait_for_output(r"connection nn-greet .* closed \((.*)\): .*")
    finally:
        relay.close()
        greeter.close()
    assert trap.seen == []
    assert closed.group(1) == (f"relay answered 307 Temporary Redirect, a redirect to {trap.url}/elsewhere"
                               f" (not followed: {HINT})")


def test_tcp_listen_backs_off_on_a_204_at_once(cluster: Cluster) -> None:
    """Something answering every tcp_listen with an immediate 204 (the relay parks a listen for
    at least 1 s) must not make ptth_server ask again and again in a tight loop."""

    def answer(seen: Seen) -> Reply:
        return Reply(204) if seen.path.startswith("/7ZSFUKGV/tcp_listen/") else PARKED_LISTEN

    relay = HostileRelay(answer)
    try:
        proc, _ = start_server(cluster, relay.url, {"ssh": f"127.0.0.1:{free_port()}"})
        wait_for_listens(relay, "ssh", 1, proc)
        time.sleep(3.0)
        count = len(tcp_listens(relay, "ssh"))
    finally:
        relay.close()
    # Backing off from 0.25-0.5 s and doubling: at most 5 in 3 s (0, 0.5, 1.5, 3.5 s at the latest).
    assert 2 <= count <= 6, f"{count} listens in 3 s"


def test_tcp_listen_logs_a_wrong_relay_path_once(cluster: Cluster) -> None:
    """relay_url with a path the relay does not have: each tcp_listen gets the relay's HTML 404.
    One warning says so, in a line (not the page), however many retries."""
    relay = cluster.relay({})
    proc, _ = start_server(cluster, f"{relay.url}/wrong/", {"ssh": f"127.0.0.1:{free_port()}"})
    time.sleep(4.0)  # retries after at most 0.5, 1.5 and 3.5 s
    assert proc.popen.poll() is None, proc.output()
    warnings = re.findall(r".*tcp listen for port ssh: .*", proc.output())
    assert warnings == [warnings[0]], warnings
    assert warnings[0].endswith(f"relay answered 404 Not Found (an HTML page: {HINT}); retrying with backoff")


# ---- the health check --------------------------------------------------------


def run_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ptth_lib.healthcheck", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=30, check=False)


def test_healthcheck_never_follows_a_redirect(tmp_path: Path, trap: Trap) -> None:
    """Neither the up check nor the scraper API call (which carries the scraper key) follows."""
    key = "scraper-key-" + "x" * 30
    key_file = tmp_path / "scraper.key"
    key_file.write_text(key + "\n")

    def answer(seen: Seen) -> Reply:
        if seen.path == "/frontend/relay_up_check":
            return Reply(200, {"Content-Type": "text/plain"}, b"Relay is up\n")
        return redirect(307, f"{trap.url}/scraper")

    relay = HostileRelay(answer)
    try:
        result = run_check("--relay", relay.url, "--server", "alpha", "--scraper-key-file", str(key_file))
        up = HostileRelay(lambda seen: redirect(302, f"{trap.url}/up"))
        try:
            down = run_check("--relay", up.url)
        finally:
            up.close()
    finally:
        relay.close()
    assert trap.seen == [], "a redirect was followed"
    assert result.returncode == 1 and key not in result.stderr
    assert "answered HTTP 307" in result.stderr and f"{trap.url}/scraper" in result.stderr
    assert down.returncode == 1
    assert "answered HTTP 302" in down.stderr and f"{trap.url}/up" in down.stderr
