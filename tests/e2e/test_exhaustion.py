"""Resource exhaustion over HTTP: what one peer can make the relay and a server hold.

The attack review found: about 70 downloads that are never read took every
one of a server's 64 threads, so honest requests waited or got 504; and each
tcp_listen on a new port name left entries in the relay forever. Real relay,
real ptth_server; the attacker and the honest client on different loopback
addresses, so the relay tells them apart as it would on the internet.
RELIABILITY.md ("Exhaustion") has the figures these print.
"""

from __future__ import annotations

import http.client
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from conftest import Cluster, new_key

pytestmark = pytest.mark.process

STALLED = 70  # the finding: "about 70 unread downloads"
HONEST_REQUESTS = 20


def stalled_download(port: int, path: str, source: str) -> socket.socket:
    """A GET whose answer is never read: the socket's buffers fill, then the relay's, then the server's."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n".encode())
    return sock


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def honest_latencies(port: int, path: str, source: str, count: int) -> list[float]:
    out = []
    for _ in range(count):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60, source_address=(source, 0))
        started = time.monotonic()
        conn.request("GET", path)
        r = conn.getresponse()
        body = r.read()
        out.append(time.monotonic() - started)
        conn.close()
        assert (r.status, body) == (200, b"hello\n")
    return out


@pytest.mark.alone
def test_stalled_downloads_from_one_address_leave_honest_clients_their_latency(cluster: Cluster,
                                                                                 tmp_path: Path) -> None:
    key = new_key("alpha")
    relay = cluster.relay({"alpha": key}, extra="request_timeout_secs = 10")
    root = tmp_path / "root"
    root.mkdir()
    (root / "hello.txt").write_bytes(b"hello\n")
    with open(root / "big.bin", "wb") as f:
        f.truncate(1024 * 1024 * 1024)
    server = cluster.server(relay, "alpha", key, root)
    base = "/frontend/servers/alpha/files/"
    before = honest_latencies(relay.port, base + "hello.txt", "127.0.0.3", HONEST_REQUESTS)
    rss_before = rss_mib(relay.worker_pid())

    attackers = [stalled_download(relay.port, base + "big.bin", "127.0.0.2") for _ in range(STALLED)]
    try:
        time.sleep(3)  # every buffer on the way fills; the server's threads block on what they can send
        during = honest_latencies(relay.port, base + "hello.txt", "127.0.0.3", HONEST_REQUESTS)
        rss_during = rss_mib(relay.worker_pid())
        threads = len(list(Path(f"/proc/{server.proc.pid}/task").iterdir()))
    finally:
        for sock in attackers:
            sock.close()
    print(f"honest latency before the attack: median {statistics.median(before) * 1000:.1f} ms, "
          f"max {max(before) * 1000:.1f} ms; with {STALLED} stalled downloads from another address: "
          f"median {statistics.median(during) * 1000:.1f} ms, max {max(during) * 1000:.1f} ms; "
          f"relay RSS {rss_before:.0f} -> {rss_during:.0f} MiB; server threads {threads}")
    # Without a fair share every server thread is taken: honest requests wait for a
    # request_timeout_secs (10 s) and get 504. With one, they do not wait at all.
    assert max(during) < 2.0, during


@pytest.mark.slow  # a soak of thousands of port names; the bound itself is unit-tested
def test_a_server_listening_on_ever_new_port_names_is_bounded(cluster: Cluster) -> None:
    """Each tcp_listen on a new name used to leave entries behind for good (+70 MiB per 20,000)."""
    from ptth_lib.relay.forwarding import MAX_PORTS_PER_SERVER, PORT_GONE_AFTER_SECS

    key = new_key("alpha")
    relay = cluster.relay({"alpha": key}, extra="listen_timeout_secs = 2")

    def listen(name: str) -> int:
        return requests.post(f"{relay.url}/7ZSFUKGV/tcp_listen/alpha/{name}", headers={"X-ApiKey": key},
                             timeout=30).status_code

    extra = 40
    with ThreadPoolExecutor(MAX_PORTS_PER_SERVER + extra) as pool:
        statuses = list(pool.map(listen, [f"p{i}" for i in range(MAX_PORTS_PER_SERVER + extra)]))
    assert statuses.count(204) == MAX_PORTS_PER_SERVER and statuses.count(429) == extra, sorted(set(statuses))
    # Names nobody listens on are forgotten: later, new names are welcome again.
    time.sleep(PORT_GONE_AFTER_SECS + 2)
    with ThreadPoolExecutor(extra) as pool:
        assert set(pool.map(listen, [f"q{i}" for i in range(extra)])) == {204}
