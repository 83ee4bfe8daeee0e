"""Faults with real processes: clients leaving, relays restarting, big files, shutdown."""

from __future__ import annotations

import hashlib
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import requests
from conftest import Cluster, new_key, wait_for_online, wait_until

pytestmark = pytest.mark.process

GIB = 1 << 30


def peak_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]


def reset_peak_rss(pid: int) -> None:
    """Writing 5 to clear_refs resets VmHWM to the current RSS (Linux 4.0+)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def test_one_gib_streams_with_bounded_memory(cluster: Cluster, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    big = root / "big.bin"
    with open(big, "wb") as f:  # sparse, except a marked head and tail
        f.write(b"head" * 1024)
        f.seek(GIB - 4096)
        f.write(b"tail" * 1024)
    key = new_key("big")
    relay = cluster.relay({"big": key})
    server = cluster.server(relay, "big", key, root)
    worker = relay.worker_pid()
    # Warm up both processes (imports, first connections), then measure.
    requests.get(f"{relay.url}/frontend/servers/big/files/", timeout=10).raise_for_status()
    for pid in (worker, server.proc.pid):
        reset_peak_rss(pid)
    before = {pid: peak_rss_kib(pid) for pid in (worker, server.proc.pid)}

    digest = hashlib.sha256()
    size = 0
    with requests.get(f"{relay.url}/frontend/servers/big/files/big.bin", stream=True, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["Content-Length"] == str(GIB)
        for chunk in r.iter_content(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    assert size == GIB
    expected = hashlib.sha256()
    with open(big, "rb") as f:
        while block := f.read(1 << 20):
            expected.update(block)
    assert digest.hexdigest() == expected.hexdigest()

    for pid, name in ((worker, "relay worker"), (server.proc.pid, "server")):
        growth_mib = (peak_rss_kib(pid) - before[pid]) / 1024
        assert growth_mib < 16, f"{name} peak RSS grew {growth_mib:.1f} MiB while streaming 1 GiB"


def test_client_leaving_mid_download_stops_the_server(cluster: Cluster, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    size = 512 * 1024 * 1024
    with open(root / "big.bin", "wb") as f:
        f.truncate(size)
    key = new_key("leave")
    relay = cluster.relay({"leave": key})
    server = cluster.server(relay, "leave", key, root)
    url = f"{relay.url}/frontend/servers/leave/files/big.bin"
    for _ in range(3):
        with requests.get(url, stream=True, timeout=30) as r:
            assert r.status_code == 200
            next(r.iter_content(1 << 20))
        # The response's connection is closed here: the client is gone.
    pattern = r"response \S+ (?:cut off|: the client left) after (\d+) bytes"
    wait_until(lambda: len(re.findall(pattern, server.proc.output())) == 3,
               "the server noticing three departed clients", deadline=15)
    for sent in re.findall(pattern, server.proc.output()):
        assert int(sent) < size // 4, "the server kept reading long after the client left"
    # The tunnel still works afterwards.
    assert requests.get(f"{relay.url}/frontend/servers/leave/files/", timeout=10).status_code == 200


def test_server_reconnects_after_relay_restart(cluster: Cluster, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.txt").write_text("still here\n")
    key = new_key("phoenix")
    relay = cluster.relay({"phoenix": key})
    server = cluster.server(relay, "phoenix", key, root)
    url = f"{relay.url}/frontend/servers/phoenix/files/a.txt"
    assert requests.get(url, timeout=10).text == "still here\n"

    for sig in (signal.SIGKILL, signal.SIGTERM):
        relay.proc.stop(sig)
        time.sleep(1)  # the server sees refused connections and backs off
        relay = cluster.start_relay(relay.config, port=relay.port)
        wait_for_online(relay, "phoenix", server.proc)
        assert requests.get(url, timeout=10).text == "still here\n"
    assert server.proc.popen.poll() is None
    assert "Traceback" not in server.proc.output()
    assert "cannot reach the relay" in server.proc.output()


def test_sigterm_lets_a_running_download_finish(cluster: Cluster, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    data = bytes(range(256)) * 4096 * 8  # 8 MiB
    (root / "f.bin").write_bytes(data)
    key = new_key("graceful")
    relay = cluster.relay({"graceful": key})
    server = cluster.server(relay, "graceful", key, root)
    with requests.get(f"{relay.url}/frontend/servers/graceful/files/f.bin", stream=True, timeout=30) as r:
        body = [next(r.iter_content(65536))]
        done = threading.Event()
        threading.Thread(target=lambda: (server.proc.stop(signal.SIGTERM), done.set()), daemon=True).start()
        time.sleep(0.5)  # the server is stopping, with this response in flight
        body.extend(r.iter_content(65536))
    assert b"".join(body) == data
    assert done.wait(20)
    assert server.proc.popen.returncode == 0
    assert "Traceback" not in server.proc.output()
