"""The tunnel through nginx, configured exactly as the README says (tests/e2e/nginx.py).

Downloads, client aborts, queued requests, port forwarding and the scraper
API's limit on failed keys, each through a real nginx in front of the real
relay, as deployed: the relay believes nginx about client addresses
(`trusted_proxies`), servers and clients reach the relay through nginx.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from conftest import Cluster, Proc, Relay, new_key, tripcode_of, wait_for_online, wait_until
from nginx import (
    TRUSTED_PROXIES,
    Nginx,
    readme_site_config,
    start_nginx,
    without_upstream_keepalive,
)
from tcp_peers import EchoServer, recv_all

# direct_relay: these put nginx in front themselves (not a second one in front of the hosts' nginx)
pytestmark = [pytest.mark.process, pytest.mark.direct_relay]

BIG_BYTES = 1024 * 1024 * 1024  # sparse: costs no disk


@dataclass
class Front:
    relay: Relay
    nginx: Nginx
    server: Proc
    root: Path
    files: dict[str, bytes]
    cluster: Cluster

    def url(self, path: str) -> str:
        return f"{self.nginx.url}/frontend/servers/alpha{path}"


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    tmp = tmp_path_factory.mktemp("nginx")
    c = Cluster(tmp)
    key = new_key("alpha")
    relay = c.relay({"alpha": key}, extra=f"{TRUSTED_PROXIES}\nrequest_timeout_secs = 20")
    nginx = start_nginx(c, relay)
    root = tmp / "root"
    root.mkdir()
    files = {"small.txt": b"through nginx\n", "medium.bin": os.urandom(4 * 1024 * 1024 + 7)}
    for name, data in files.items():
        (root / name).write_bytes(data)
    with open(root / "big.bin", "wb") as f:
        f.truncate(BIG_BYTES)
    server = c.server(nginx.as_relay(relay), "alpha", key, root, wait=False)
    wait_for_online(relay, "alpha", server.proc)  # asked of the relay: nginx wants a password
    yield Front(relay, nginx, server.proc, root, files, c)
    c.close()


def test_downloads_ranges_and_listings(front: Front) -> None:
    auth = front.nginx.auth
    for name, data in front.files.items():
        r = requests.get(front.url(f"/files/{name}"), auth=auth, timeout=30)
        assert (r.status_code, r.content) == (200, data), name
        assert r.headers["Content-Length"] == str(len(data))
    r = requests.get(front.url("/files/medium.bin"), auth=auth, headers={"Range": "bytes=100-199"}, timeout=30)
    assert (r.status_code, r.content) == (206, front.files["medium.bin"][100:200])
    r = requests.head(front.url("/files/big.bin"), auth=auth, timeout=30)
    assert (r.status_code, r.headers["Content-Length"]) == (200, str(BIG_BYTES))
    listing = requests.get(front.url("/files/"), auth=auth, timeout=30)
    assert listing.status_code == 200 and 'href="medium.bin"' in listing.text
    assert requests.get(front.url("/files/small.txt"), timeout=30).status_code == 401  # nginx's password


def test_wget_mirrors_the_tree_through_nginx(front: Front, tmp_path: Path) -> None:
    user, password = front.nginx.auth
    subprocess.run(["wget", "-q", "-r", "-np", "-nH", "--cut-dirs=3", "-R", "big.bin", f"--user={user}",
                    f"--password={password}", "-P", str(tmp_path), front.url("/files/")],
                   check=True, timeout=120)
    for name, data in front.files.items():
        assert (tmp_path / "files" / name).read_bytes() == data, name


def test_a_client_leaving_mid_download_stops_the_server(front: Front) -> None:
    """nginx reads a server's whole upload after the relay's early answer; the server must stop anyway."""
    with requests.get(front.url("/files/big.bin"), auth=front.nginx.auth, stream=True, timeout=30) as r:
        assert r.status_code == 200
        got = 0
        for chunk in r.iter_content(256 * 1024):
            got += len(chunk)
            if got >= 4 * 1024 * 1024:
                break
    pattern = r"cut off after (\d+) bytes: the client left"
    wait_until(lambda: re.search(pattern, front.server.output()) is not None,
               "the server noticing the client left", front.server, 20)
    sent = int(re.findall(pattern, front.server.output())[-1])
    # nginx would take all of it: 1 GiB goes through loopback in seconds.
    assert sent < 256 * 1024 * 1024, f"the server sent {sent} bytes of a download the client left after 4 MiB"


def test_many_queued_requests_each_answered_once(front: Front) -> None:
    """More requests at once than the server has threads: all answered, each handed out once."""
    before = front.server.output().count("relay answered 404")
    data = front.files["medium.bin"]

    def fetch(_: int) -> tuple[int, str]:
        r = requests.get(front.url("/files/medium.bin"), auth=front.nginx.auth, timeout=60)
        return r.status_code, hashlib.sha256(r.content).hexdigest()

    with ThreadPoolExecutor(100) as pool:
        results = list(pool.map(fetch, range(100)))
    assert results == [(200, hashlib.sha256(data).hexdigest())] * 100
    time.sleep(1)
    assert front.server.output().count("relay answered 404") == before, "a request was handed out twice"


@pytest.mark.parametrize("variant", ["readme", "no_upstream_keepalive"])
def test_slow_answers_are_handed_out_exactly_once(cluster: Cluster, tmp_path: Path, variant: str) -> None:
    """The finding: behind nginx, a request not answered within 0.3 s was handed out a second time.

    The server is kept busy (more requests than its threads), so many answers
    come late; with the README's block and with one that opens a new
    connection to the relay for every request (the README's block before).
    """
    key = new_key("busy")
    relay = cluster.relay({"busy": key}, extra=f"{TRUSTED_PROXIES}\nrequest_timeout_secs = 30")
    site = readme_site_config()
    nginx = start_nginx(cluster, relay, site if variant == "readme" else without_upstream_keepalive(site))
    root = tmp_path / "root"
    root.mkdir()
    data = os.urandom(8 * 1024 * 1024)
    (root / "f.bin").write_bytes(data)
    server = cluster.server(nginx.as_relay(relay), "busy", key, root, wait=False)
    wait_for_online(relay, "busy", server.proc)

    def fetch(_: int) -> int:
        r = requests.get(f"{nginx.url}/frontend/servers/busy/files/f.bin", auth=nginx.auth, timeout=60)
        return r.status_code if r.content == data else -1

    with ThreadPoolExecutor(90) as pool:
        statuses = list(pool.map(fetch, range(90)))
    assert statuses == [200] * 90
    time.sleep(1)
    log = server.proc.output()
    assert "relay answered 404" not in log, f"requests handed out twice:\n{log[-2000:]}"
    assert "back in the queue" not in relay.proc.output()


def test_port_forwarding_through_nginx(front: Front, tmp_path: Path) -> None:
    key, client_key = new_key("fwd"), new_key("laptop")
    echo = EchoServer()
    c = front.cluster
    relay = c.relay({"fwd": key}, extra=f'{TRUSTED_PROXIES}\n[[clients]]\nname = "laptop"\n'
                                          f'tripcode = "{tripcode_of(client_key)}"\nallow = ["fwd:echo"]\n')
    nginx = start_nginx(c, relay)
    root = tmp_path / "root"
    root.mkdir()
    server = c.server(nginx.as_relay(relay), "fwd", key, root, wait=False,
                      extra_config=f'[forwarded_ports]\necho = "127.0.0.1:{echo.port}"\n')
    wait_for_online(relay, "fwd", server.proc)
    _, (port,) = c.client(nginx.as_relay(relay), client_key, ["0:fwd:echo"])
    try:
        for size in (1, 100_000, 3 * 1024 * 1024 + 1):
            payload = os.urandom(size)
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sender = threading.Thread(target=lambda s=sock, p=payload: (s.sendall(p), s.shutdown(socket.SHUT_WR)))
                sender.start()
                got = recv_all(sock)
                sender.join()
            assert got == payload, size
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:  # keystrokes cross at once
            for i in range(20):
                sock.sendall(bytes([i]))
                assert sock.recv(1) == bytes([i])
    finally:
        echo.close()


def test_scraper_limit_counts_the_real_client_and_a_valid_key_still_works(cluster: Cluster) -> None:
    """Behind nginx every client came from 127.0.0.1: one attacker locked everyone out."""
    import subprocess as sp

    from ptth_lib.relay.scraper_api import new_key_snippet

    key, snippet = new_key_snippet("monitor", 30)
    relay = cluster.relay({"alpha": new_key("alpha")},
                          extra=f"{TRUSTED_PROXIES}\nenable_scraper_api = true\n{snippet}")
    nginx = start_nginx(cluster, relay)

    def call(source: str, api_key: str, forged: str | None = None) -> int:
        args = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--interface", source,
                "-H", f"X-ApiKey: {api_key}", nginx.url + "/scraper/v1/test"]
        if forged:
            args[-1:-1] = ["-H", f"X-Forwarded-For: {forged}"]
        return int(sp.run(args, capture_output=True, check=True, timeout=30).stdout)

    statuses = [call("127.0.0.2", "wrong-key-" + str(i), forged=f"10.0.0.{i}") for i in range(15)]
    assert statuses[:10] == [403] * 10 and set(statuses[10:]) == {429}, statuses  # forging moves nothing
    assert call("127.0.0.2", key) == 200, "a valid key must work even from a limited address"
    assert call("127.0.0.3", "wrong-key-x") == 403, "another client is not limited by the attacker"
    assert call("127.0.0.3", key) == 200


def test_head_limits_of_the_readme_block(cluster: Cluster) -> None:
    """nginx bounds request heads where parsing is cheap, yet passes the largest response head.

    A server's response head travels in one header of up to 16 KiB; nginx's
    default (lines of 8 KiB) refused those, so large heads never got through.
    """
    from scripted_server import ScriptedServer

    from ptth_lib.wire.envelope import MAX_RESPONSE_HEAD_BYTES

    key = new_key("heads")
    relay = cluster.relay({"heads": key}, extra=TRUSTED_PROXIES)
    nginx = start_nginx(cluster, relay)
    pad = b"a" * (MAX_RESPONSE_HEAD_BYTES * 3 // 4 - 200)  # base64 makes it about 16 KiB
    server = ScriptedServer(nginx.url, "heads", key,
                            lambda uri, h: (200, {"x-filler": pad, "content-length": b"2"}, b"ok")).start()
    try:
        wait_for_online(relay, "heads")
        r = requests.get(f"{nginx.url}/frontend/servers/heads/x", auth=nginx.auth, timeout=30)
        assert (r.status_code, r.content, len(r.headers["X-Filler"])) == (200, b"ok", len(pad))
        assert server.posts and set(server.posts) == {200}  # (wait_for_online's probe is answered too)
    finally:
        server.stop()
    big = {f"X-Big-{i}": "b" * (30 * 1024) for i in range(5)}  # 150 KiB: over the block's 4 x 32 KiB
    r = requests.get(f"{nginx.url}/frontend/servers/heads/x", auth=nginx.auth, headers=big, timeout=30)
    assert r.status_code in (400, 431) and "nginx" in r.text
