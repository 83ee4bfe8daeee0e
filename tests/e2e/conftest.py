"""Real-process fixtures: the relay under gunicorn, ptth_server, ptth_file_server.

Every process runs on 127.0.0.1 with a port chosen by the OS (port 0) and
reported in its log, in its own process group, with its output in a log file
that a failing test shows. Teardown kills the whole group. How a process is
started, waited for and stopped is procs.py, which bench/ shares; the names
tests import from here (Proc, free_port, new_key, tripcode_of, wait_until,
REPO ...) are procs.py's.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import procs
import pytest
import relay_modes
from procs import (
    REPO,
    STARTUP_DEADLINE_SECS,
    Proc,
    free_port,
    new_key,
    refusing_port,
    refusing_socket,
    tripcode_of,
    wait_until,
)
from redis_harness import RedisServer, start_redis

__all__ = [
    "REPO",
    "STARTUP_DEADLINE_SECS",
    "Cluster",
    "Proc",
    "Relay",
    "Server",
    "Tunnel",
    "free_port",
    "make_tree",
    "new_key",
    "refusing_port",
    "refusing_socket",
    "tripcode_of",
    "wait_for_online",
    "wait_until",
]


@dataclass
class Relay:
    proc: Proc
    port: int
    config: Path
    cluster: bool = False  # started as a cluster by PTTH_TEST_RELAY (relay_modes.py)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def worker_pid(self) -> int:
        """The gunicorn worker (the child of the master), where the relay's state lives.

        A relay run as a cluster by PTTH_TEST_RELAY has many: the test, which
        looks at the one worker's memory, is skipped there.
        """
        if self.cluster:
            pytest.skip("looks at the one relay worker's memory: not in a cluster (PTTH_TEST_RELAY)")
        return procs.gunicorn_worker(self.proc)

    def logged_by_all(self, line: str, before: int) -> bool:
        """Whether every worker has logged `line` once more than the `before` times it was in the log
        (a config reload: each worker reloads its own)."""
        return self.proc.output().count(line) >= before + len(self.worker_pids())

    def worker_pids(self) -> tuple[int, ...]:
        """Every gunicorn worker of the relay, of every host."""
        masters = self.proc.procs if isinstance(self.proc, relay_modes.RelayProcs) else [self.proc]
        return tuple(sorted(pid for m in masters if "gunicorn" in m.args for pid in procs.children(m.pid)))


@dataclass
class Server:
    proc: Proc
    name: str
    key: str
    root: Path | None
    config: Path


@dataclass
class Cluster:
    """Starts relays and servers for one test and stops them all afterwards."""

    tmp: Path
    procs: list[Proc] = field(default_factory=list)
    counter: int = 0
    redis: RedisServer | None = None  # the relays' redis-server in a cluster mode (relay_modes.py)

    def _log(self, what: str) -> Path:
        self.counter += 1
        return self.tmp / f"{self.counter:02d}-{what}.log"

    def relay(self, servers: dict[str, str], port: int = 0, extra: str = "",
              env: dict[str, str] | None = None, gunicorn_args: Sequence[str] = ()) -> Relay:
        """Start the relay under gunicorn; `servers` maps names to API keys."""
        config = self.tmp / f"relay-{self.counter}.toml"
        config.write_text(procs.relay_config(servers, extra))
        return self.start_relay(config, port, env, gunicorn_args)

    def start_relay(self, config: Path, port: int = 0, env: dict[str, str] | None = None,
                    gunicorn_args: Sequence[str] = ()) -> Relay:
        """Start the relay under gunicorn with `config`; wait until it answers.

        With PTTH_TEST_RELAY=workers or hosts, as a cluster (relay_modes.py).
        """
        if relay_modes.wanted(config, env, gunicorn_args):
            return self._start_cluster_relay(config, port, env, gunicorn_args)
        proc, port = procs.start_relay(config, self._log("relay"), port, env, gunicorn_args=gunicorn_args)
        self.procs.append(proc)
        return Relay(proc, port, config)

    def _start_cluster_relay(self, config: Path, port: int, env: dict[str, str] | None,
                             gunicorn_args: Sequence[str]) -> Relay:
        """The relay as relay_modes.MODE says, on this test's redis-server (started once per test)."""
        if self.redis is None:
            folder = self.tmp / "cluster-redis"
            folder.mkdir(exist_ok=True)
            self.redis = start_redis(folder)
        env = {**(env or {}), **relay_modes.cluster_env(self.redis.url)}
        if relay_modes.MODE == "workers":
            proc, port = procs.start_relay(config, self._log("relay"), port, env,
                                           gunicorn_args=[*gunicorn_args, "-w", str(relay_modes.WORKERS)])
            self.procs.append(proc)
            relay_modes.wait_for_nodes(proc, relay_modes.WORKERS)
            return Relay(proc, port, config, cluster=True)
        relay_modes.trust_nginx(config)
        hosts = []
        for host in "ab":
            proc, host_port = procs.start_relay(config, self._log(f"relay-host-{host}"), 0, env,
                                                gunicorn_args=[*gunicorn_args, "-w", str(relay_modes.HOST_WORKERS)])
            self.procs.append(proc)
            relay_modes.wait_for_nodes(proc, relay_modes.HOST_WORKERS)
            hosts.append((proc, host_port))
        from nginx import start_nginx  # nginx.py imports this module

        front = start_nginx(self, Relay(hosts[0][0], hosts[0][1], config),
                            relay_modes.hosts_site([p for _, p in hosts]), port=port)
        group = relay_modes.RelayProcs([proc for proc, _ in hosts] + [front.proc])
        procs.wait_until(lambda: procs.http_status(f"{front.url}/frontend/relay_up_check") == 200,
                         "the relay up through nginx", group)
        return Relay(group, front.port, config, cluster=True)

    def server(self, relay: Relay, name: str, key: str, root: Path | None, wait: bool = True,
               extra_args: list[str] | None = None, extra_config: str = "") -> Server:
        """Start ptth_server and (unless wait=False) wait until the relay has it online.

        `root` None serves no folder (then `extra_config` sets web_app_url).
        """
        config = procs.write_server_config(self.tmp / f"server-{name}-{self.counter}.toml", name, key,
                                           relay.url, root, extra_config)
        proc = procs.start_server(config, self._log(f"server-{name}"), extra_args or [])
        self.procs.append(proc)
        if wait:
            try:
                wait_for_online(relay, name, proc)
            except BaseException:
                self.close()  # a fixture that fails here never reaches its teardown
                raise
        return Server(proc, name, key, root, config)

    def client(self, relay: Relay, key: str, forwards: list[str], extra_args: list[str] | None = None,
               wait: bool = True) -> tuple[Proc, list[int]]:
        """Start ptth_client; returns it and the local port of each forward, in order.

        A forward "0:SERVER:PORT" binds any free port; the port is read from the log.
        """
        key_file = self.tmp / f"client-key-{self.counter}"
        key_file.write_text(key + "\n")
        key_file.chmod(0o600)
        args = [sys.executable, "ptth_client.py", "--relay-url", relay.url, "--api-key-file", str(key_file)]
        for f in forwards:
            args += ["--forward", f]
        proc = Proc(args + (extra_args or []), self._log("client"))
        self.procs.append(proc)
        if not wait:
            return proc, []
        ports = []
        for f in forwards:
            _, server, port = f.split(":")
            m = proc.wait_for_output(rf"forwarding 127\.0\.0\.1:(\d+) to {re.escape(server)}:{re.escape(port)}\b")
            ports.append(int(m.group(1)))
        return proc, ports

    def web_app(self, port: int = 0) -> tuple[Proc, str]:
        """Start tests/e2e/web_test_app.py; returns it and its base URL."""
        proc, url = procs.start_web_app(self._log("web-app"), port)
        self.procs.append(proc)
        return proc, url

    def file_server(self, root: Path) -> tuple[Proc, str]:
        """Start ptth_file_server on `root`; returns it and its base URL."""
        proc, url = procs.start_file_server(root, self._log("file-server"))
        self.procs.append(proc)
        return proc, url

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
        if self.redis is not None:
            self.redis.kill()


def wait_for_online(relay: Relay, name: str, proc: Proc | None = None) -> None:
    """Wait until `relay` has server `name` online."""
    procs.wait_for_server(relay.url, name, proc)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    c.close()


def make_tree(root: Path) -> dict[str, bytes]:
    """A small tree of test files; returns relative path -> content."""
    files = {
        "hello.txt": b"hello, tunnel\n",
        "empty.bin": b"",
        "random-3m.bin": os.urandom(3 * 1024 * 1024 + 17),
        "sub dir/nested #1?.txt": "caf\u00e9 \u2603\n".encode(),
        "sub dir/100% sure.txt": b"percent\n",
        "\u00fcn\u00efc\u00f6d\u00e9/\u65e5\u672c.txt": b"nihon\n",
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


@dataclass
class Tunnel:
    relay: Relay
    server: Server
    files: dict[str, bytes]
    cluster: Cluster

    @property
    def base(self) -> str:
        return f"{self.relay.url}/frontend/servers/{self.server.name}"


@pytest.fixture(scope="module")
def tunnel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tunnel]:
    """One relay and one server sharing a tree of test files, for a whole module."""
    tmp = tmp_path_factory.mktemp("tunnel")
    root = tmp / "root"
    root.mkdir()
    files = make_tree(root)
    c = Cluster(tmp)
    key = new_key("alpha")
    relay = c.relay({"alpha": key}, extra="request_timeout_secs = 10")
    server = c.server(relay, "alpha", key, root)
    yield Tunnel(relay, server, files, c)
    c.close()


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Under PTTH_TEST_RELAY=hosts nginx is in front: a test of the relay's own HTTP edge skips."""
    if relay_modes.MODE == "hosts" and item.get_closest_marker("direct_relay") is not None:
        pytest.skip("checks the relay's own HTTP edge, which nginx in front answers or changes")

