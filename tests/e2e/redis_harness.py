"""A redis-server for the cluster's store tests, and what those tests share.

Debian's redis-server runs on a free loopback port with no persistence, in
a temporary folder, restartable on the same port. The fixtures are plain
generator functions here; each test module makes them fixtures of its own
(`redis_server = pytest.fixture(scope="module")(serve_redis)`), so the
redis-server is per module and every test starts with an empty Redis.
"""

from __future__ import annotations

import random
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from procs import STARTUP_DEADLINE_SECS, Proc, free_port

from ptth_lib.relay.cluster.store import NodeInfo, ParkResult, QueuedHead, Store

S = "alpha"
# Nodes registered in every test's store: parks need a registered node. 8 characters, as real
# node ids, so that request ids starting with them name them as their owner.
NODES = ("NODEZERO", "NODEAAAA", "NODEBBBB", "NODECCCC", "NODEDDDD", "NODEXXXX")


@dataclass
class RedisServer:
    """A redis-server on 127.0.0.1:`port`, restartable on the same port."""

    port: int
    folder: Path
    extra: tuple[str, ...] = ()
    proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def socket(self) -> Path:
        return self.folder / "redis.sock"

    def start(self) -> None:
        self.proc = Proc(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no", "--dir", str(self.folder), "--unixsocket", str(self.socket),
                          "--unixsocketperm", "700", *self.extra],
                         self.folder / "redis.log")
        try:
            self.proc.wait_for_output(r"Ready to accept connections", STARTUP_DEADLINE_SECS)
        except BaseException:
            self.proc.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process would not die of SIGTERM
            self.proc.kill()


def start_redis(folder: Path, *extra: str) -> RedisServer:
    server = RedisServer(free_port(), folder, extra)
    server.start()
    return server


def serve_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """Fixture: one redis-server for the module."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.kill()


def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """Fixture: a redis-server of the test's own, which it may kill, pause and restart."""
    folder = tmp_path / "redis"
    folder.mkdir()
    server = start_redis(folder)
    yield server
    server.kill()


def empty_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """Fixture: a plain client on the module's Redis, emptied before each test."""
    client = redis.Redis.from_url(redis_server.url, socket_timeout=5)
    client.flushall()
    yield client
    client.close()


def store_on(redis_server: RedisServer, raw: redis.Redis) -> Iterator[Store]:
    """Fixture: a Store on the emptied Redis, with NODES registered."""
    s = Store.from_url(redis_server.url)
    for node in NODES:
        join(s, node)
    yield s
    s.close()


def join(store: Store, node: str) -> str:
    """Register `node` (as a node does at its start); returns the cluster's epoch."""
    return store.register(node_info(node)).epoch


def node_info(node: str, config_hash: str = "c0ffee") -> NodeInfo:
    return NodeInfo(node, f"127.0.0.1:{41000 + sum(node.encode()) % 99}", config_hash, "testhost", 4242)


def head(request_id: str, size: int = 20, deadline_ms: int = 0) -> QueuedHead:
    """A head of `size` bytes, starting with random bytes (spaces and NULs among them)."""
    start = bytes(random.randrange(256) for _ in range(min(size, 64)))
    return QueuedHead(request_id, start + b"h" * (size - len(start)), deadline_ms)


def online(store: Store, server: str = S) -> None:
    """The server says it is still there (a listen for 0 requests): online for OFFLINE_AFTER_SECS."""
    assert store.park(server, "NODEZERO", max_requests=0) == ParkResult("took")


def redis_now_ms(raw: redis.Redis) -> int:
    seconds, micros = raw.time()
    return int(seconds) * 1000 + int(micros) // 1000
