"""The relay as a cluster (CLUSTER.md): gunicorn with 4 workers sharing a real redis-server.

The proof that requests crossed between workers is in their ids: a cluster
request id starts with the id of the worker (node) that holds its client.
The server's one listen connection stays with one worker (keep-alive), so
requests owned by other workers reached it through Redis; its response
POSTs, on a few keep-alive connections, each pinned to one worker, reached
the owners of many ids over peer links.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import REPO, Cluster, new_key, refusing_port
from redis_harness import RedisServer, start_redis

from ptth_lib.relay.cluster.store import NODE_ID_CHARS

pytestmark = [pytest.mark.process,
              pytest.mark.skipif(shutil.which("redis-server") is None,
                                 reason="needs Debian's redis-server (make debian-deps installs it)")]

WORKERS = 4
REQUESTS = 120


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    folder = tmp_path / "redis"
    folder.mkdir()
    server = start_redis(folder)
    yield server
    server.kill()


def cluster_config(redis: RedisServer) -> str:
    # Each worker takes the first free port of the range: 40 ports leave room for other tests.
    return f'redis_url = "{redis.url}"\npeer_bind = "127.0.0.1:42000-42039"\n'


def test_four_workers_serve_the_file_tunnel(redis_server: RedisServer, cluster: Cluster, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    files = {f"f{i}.txt": f"file {i} through the cluster\n".encode() * (i + 1) for i in range(8)}
    for name, data in files.items():
        (root / name).write_bytes(data)
    big = bytes(range(256)) * 4096 * 3  # 3 MiB: several body pieces over a peer link
    (root / "big.bin").write_bytes(big)
    key = new_key("alpha")
    relay = cluster.relay({"alpha": key}, extra=cluster_config(redis_server), gunicorn_args=["-w", str(WORKERS)])
    relay.proc.wait_for_output(r"(?s)(relay node \S+ up.*){" + str(WORKERS) + "}")
    server = cluster.server(relay, "alpha", key, root)

    for i in range(REQUESTS):
        name = f"f{i % len(files)}.txt"
        r = requests.get(f"{relay.url}/frontend/servers/alpha/files/{name}", timeout=20)  # a new connection each
        assert r.status_code == 200, r.text
        assert r.content == files[name]
    r = requests.get(f"{relay.url}/frontend/servers/alpha/files/big.bin", timeout=60)
    assert r.status_code == 200 and r.content == big

    ids = re.findall(r"request (\S+) from \S+: GET /files/", server.proc.output())
    assert len(ids) == REQUESTS + 1
    owners = Counter(i[:NODE_ID_CHARS] for i in ids)
    assert len(owners) >= 3, owners  # clients landed on most of the 4 workers
    assert "Traceback" not in relay.proc.output()


def test_unreachable_redis_stops_the_start_with_one_line(tmp_path: Path) -> None:
    """At start, a Redis that cannot be reached is one line and gunicorn's "failed to boot" (3)."""
    with refusing_port() as port:
        config = tmp_path / "relay.toml"
        config.write_text(f'redis_url = "redis://:hunter2@127.0.0.1:{port}/0"\n')
        result = subprocess.run([sys.executable, "-m", "gunicorn", "-k", "gevent", "--no-control-socket",
                                 "--bind", "127.0.0.1:0", "-w", "2", "ptth_relay:app"], check=False, cwd=REPO,
                                env={**os.environ, "PTTH_RELAY_CONFIG": str(config)},
                                capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 3, output
    assert "ptth_relay: the relay's shared state (Redis) cannot be reached" in output, output
    assert "hunter2" not in output and "Traceback" not in output, output
