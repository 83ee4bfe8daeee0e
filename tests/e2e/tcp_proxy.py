"""A loopback TCP proxy that cuts idle connections, like a NAT box or a firewall.

`IdleCuttingProxy(target_port, idle_secs)` listens on 127.0.0.1 (a free port),
forwards every accepted connection to 127.0.0.1:target_port, and closes both
sides of a connection that carried no byte in either direction for
`idle_secs`. With `reset=True` the cut is a TCP reset (SO_LINGER 0) instead of
an orderly close. One thread accepts; one thread per connection copies bytes
both ways with a selector. `connections` records, for each connection, when it
was accepted (time.monotonic()), the first line the client sent, when it last
carried data, when it closed and whether it was cut for being idle.

As a program: `python tests/e2e/tcp_proxy.py TARGET_PORT [--idle-secs N] [--reset]`
prints `listening on 127.0.0.1:PORT` and runs until Ctrl+C.
"""

from __future__ import annotations

import argparse
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Self

_BUFFER_BYTES = 256 * 1024
# How often the accept loop and the connection loops look at the stop flag.
_POLL_SECS = 0.2


@dataclass
class Connection:
    accepted_at: float
    first_line: str = ""
    last_activity: float = 0.0
    closed_at: float | None = None
    idle_cut: bool = False


class IdleCuttingProxy:
    """Forwards 127.0.0.1:port to 127.0.0.1:target_port; cuts connections idle for idle_secs."""

    def __init__(self, target_port: int, idle_secs: float, reset: bool = False) -> None:
        self.target = ("127.0.0.1", target_port)
        self.idle_secs = idle_secs
        self.reset = reset
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(_POLL_SECS)
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.accepted = 0      # connections accepted
        self.idle_cuts = 0     # connections closed for being idle
        self.bytes_forwarded = 0
        self.connections: list[Connection] = []
        self._acceptor = threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> int:
        self._acceptor.start()
        return self.port

    def close(self) -> None:
        """Stop accepting, close every connection, and join the threads (bounded)."""
        self._stop.set()
        self._acceptor.join(5)
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(5)
        self._listener.close()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            record = Connection(time.monotonic())
            t = threading.Thread(target=self._serve, args=(client, record), name="proxy-conn", daemon=True)
            with self._lock:
                self.connections.append(record)
                self.accepted += 1
                self._threads = [x for x in self._threads if x.is_alive()]
                self._threads.append(t)
            t.start()

    def _serve(self, client: socket.socket, record: Connection) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        peer = {client: upstream, upstream: client}
        sel = selectors.DefaultSelector()
        sel.register(client, selectors.EVENT_READ)
        sel.register(upstream, selectors.EVENT_READ)
        last_activity = time.monotonic()
        idle_cut = False
        try:
            while not self._stop.is_set():
                remaining = self.idle_secs - (time.monotonic() - last_activity)
                if remaining <= 0:
                    idle_cut = True
                    break
                events = sel.select(min(remaining, _POLL_SECS))
                done = False
                for key, _ in events:
                    src: socket.socket = key.fileobj  # type: ignore[assignment]
                    try:
                        data = src.recv(_BUFFER_BYTES)
                    except OSError:
                        data = b""
                    if not data:
                        done = True
                        break
                    if src is client and not record.first_line:
                        record.first_line = data.split(b"\r\n", 1)[0][:200].decode("latin-1")
                    try:
                        peer[src].sendall(data)
                    except OSError:
                        done = True
                        break
                    last_activity = record.last_activity = time.monotonic()
                    with self._lock:
                        self.bytes_forwarded += len(data)
                if done:
                    break
        finally:
            sel.close()
            record.closed_at = time.monotonic()
            record.idle_cut = idle_cut
            if idle_cut:
                with self._lock:
                    self.idle_cuts += 1
            for s in (client, upstream):
                if self.reset and idle_cut:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target_port", type=int, help="port on 127.0.0.1 to forward to")
    parser.add_argument("--idle-secs", type=float, default=2.0, help="cut connections idle this long")
    parser.add_argument("--reset", action="store_true", help="cut with a TCP reset, not a close")
    args = parser.parse_args()
    proxy = IdleCuttingProxy(args.target_port, args.idle_secs, args.reset)
    proxy.start()
    print(f"listening on 127.0.0.1:{proxy.port}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        proxy.close()


if __name__ == "__main__":
    main()
