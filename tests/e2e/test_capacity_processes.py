"""A full relay: past max_connections it answers at once, never hangs, and recovers by itself.

The real relay under gunicorn with a small max_connections; idle servers'
listens parked by hand on raw sockets (one connection each), a real
ptth_server as the probe and another started while the relay is full.
Issue 20: at 5,000 idle servers gunicorn's own limit (worker_connections
4096) was reached, visitors' connections hung unanswered and servers'
listens failed by the thousand, with nothing in the log.
"""

from __future__ import annotations

import select
import socket
import time
from pathlib import Path

import pytest
import requests
from conftest import Cluster, new_key, wait_for_online, wait_until
from procs import relay_samples

pytestmark = [pytest.mark.process, pytest.mark.direct_relay]  # behind nginx, nginx is the edge

LIMIT = 100  # max_connections (per worker, in a cluster)
PAST = 40  # listens beyond what the relay holds
AT_ONCE_SECS = 3.0  # "at once", on a busy 2-core machine


def listen(port: int, name: str, key: str) -> socket.socket:
    """A listen as ptth_server sends it (PTTH's features: parked for listen_timeout_secs), on a new connection."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(f"GET /7ZSFUKGV/http_listen/{name} HTTP/1.1\r\nHost: relay\r\nX-ApiKey: {key}\r\n"
                 f"X-PTTH-Features: ack\r\n\r\n".encode())
    return sock


def answers_within(socks: list[socket.socket], secs: float) -> tuple[dict[socket.socket, bytes], float]:
    """What each socket received within `secs` (a parked listen receives nothing), and when the last came."""
    got: dict[socket.socket, bytes] = {}
    started = last = time.monotonic()
    waiting = list(socks)
    while waiting and (left := started + secs - time.monotonic()) > 0:
        readable, _, _ = select.select(waiting, [], [], left)
        for sock in readable:
            data = sock.recv(65536)
            got[sock] = got.get(sock, b"") + data
            if not data or b"\r\n\r\n" in got[sock]:
                waiting.remove(sock)
                last = time.monotonic()
    return got, last - started


def sample(relay_url: str, name: str, **labels: str) -> float:
    return relay_samples(relay_url).get((name, tuple(sorted(labels.items()))), 0.0)


def test_past_max_connections_listens_and_visitors_get_503_at_once_and_service_recovers(
        cluster: Cluster, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "hello.txt").write_bytes(b"hello\n")
    probe_key, late_key = new_key("probe"), new_key("late")
    idle_keys = {f"idle-{i:03d}": new_key(f"idle-{i}") for i in range(4 * LIMIT + PAST)}
    relay = cluster.relay({"probe": probe_key, "late": late_key, **idle_keys},
                          extra=f"max_connections = {LIMIT}\nlisten_timeout_secs = 120\nrequest_timeout_secs = 10")
    cluster.server(relay, "probe", probe_key, root)
    workers = len(relay.worker_pids())
    holds = workers * LIMIT
    wait_until(lambda: sample(relay.url, "ptth_connections_max") == holds, "every worker's max_connections")

    # More listens than the relay holds: those past the limit are answered 503 at once.
    socks = [listen(relay.port, name, key) for name, key in list(idle_keys.items())[:holds + PAST]]
    got, last = answers_within(socks, AT_ONCE_SECS)
    refused = [sock for sock, data in got.items() if data.startswith(b"HTTP/1.1 503")]
    assert len(got) == len(refused), {data[:60] for data in got.values()}  # the rest are parked: no answer
    assert PAST <= len(refused) < PAST + workers * 10, f"{len(refused)} of {len(socks)} refused"
    assert all(b"Retry-After: 5" in got[sock] and b"Connection: close" in got[sock] for sock in refused)
    print(f"\n{len(socks)} listens: {len(refused)} got 503, the last {last:.2f} s after they were all sent")
    parked = [sock for sock in socks if sock not in got]

    # A visitor on a new connection is answered at once: 503 (in a cluster, a worker with room may serve it).
    started = time.monotonic()
    r = requests.get(f"{relay.url}/frontend/servers/probe/files/hello.txt", timeout=AT_ONCE_SECS)
    assert time.monotonic() - started < AT_ONCE_SECS
    if workers == 1:
        assert r.status_code == 503 and r.headers["Retry-After"] == "5", (r.status_code, r.text)
        assert "max_connections" in r.text
    else:
        assert r.status_code in (200, 503)

    # A server that starts while the relay is full is refused, says so once, and backs off.
    late = cluster.server(relay, "late", late_key, root, wait=False)
    if workers == 1:  # (in a cluster its listens may land on a worker with room)
        late.proc.wait_for_output(r"relay answered 503 the relay is full .*; retrying with backoff", 10)
    assert sample(relay.url, "ptth_connections_refused_total", kind="listen") >= PAST
    assert sample(relay.url, "ptth_connections_open") >= len(parked)  # (a cluster's workers each count theirs)
    assert "relay full: " in relay.proc.output()  # once at once; then once a minute while it lasts

    # The load goes away: within seconds the late server is online and visitors are served.
    for sock in parked + refused:
        sock.close()
    recovered = time.monotonic()
    wait_for_online(relay, "late", late.proc)
    r = requests.get(f"{relay.url}/frontend/servers/late/files/hello.txt", timeout=5)
    assert r.status_code == 200 and r.content == b"hello\n"
    print(f"the late server was online {time.monotonic() - recovered:.1f} s after the load went away")
    assert time.monotonic() - recovered < 15


def test_the_development_server_keeps_its_capacity_too(tmp_path: Path) -> None:
    """`python ptth_relay.py` (gevent's WSGIServer) counts connections and refuses past max_connections alike."""
    import sys

    from procs import Proc

    config = tmp_path / "relay.toml"
    config.write_text("max_connections = 16\n")
    proc = Proc([sys.executable, "ptth_relay.py", "--config", str(config), "--bind", "127.0.0.1:0"],
                tmp_path / "relay.log")
    held = []
    try:
        port = int(proc.wait_for_output(r"listening on http://127\.0\.0\.1:(\d+)/").group(1))
        proc.wait_for_output(r"holds 16 connections \(max_connections in the relay config\)")
        held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(16)]
        wait_until(lambda: "ptth_connections_open 1" in requests.get(f"http://127.0.0.1:{port}/metrics",
                                                                     timeout=5).text, "16 connections open")
        r = requests.get(f"http://127.0.0.1:{port}/frontend/relay_up_check", timeout=AT_ONCE_SECS)
        assert r.status_code == 503 and r.headers["Retry-After"] == "5" and r.headers["Connection"] == "close"
        for sock in held:
            sock.close()
        wait_until(lambda: requests.get(f"http://127.0.0.1:{port}/frontend/relay_up_check", timeout=5).status_code
                   == 200, "room again")
    finally:
        for sock in held:
            sock.close()
        proc.kill()
