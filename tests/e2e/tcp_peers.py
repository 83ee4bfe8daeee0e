"""TCP end servers for the port forwarding tests (the spec's netcat, in Python).

Each listens on 127.0.0.1 with a free port and serves every connection in a
thread of its own until closed.
"""

from __future__ import annotations

import hashlib
import socket
import threading


class TcpServer:
    """Accepts connections and hands each to `handle(sock)` in a thread."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.connections: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept_forever, daemon=True).start()

    def _accept_forever(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(sock)
            threading.Thread(target=self._run, args=(sock,), daemon=True).start()

    def _run(self, sock: socket.socket) -> None:
        try:
            self.handle(sock)
        except OSError:
            pass
        finally:
            sock.close()

    def handle(self, sock: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.listener.close()
        for sock in self.connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class EchoServer(TcpServer):
    """Sends back every byte; half-closes when the client does."""

    def handle(self, sock: socket.socket) -> None:
        while data := sock.recv(65536):
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)


class DigestServer(TcpServer):
    """Reads until the client's half-close, then answers with the count and SHA-256 and closes.

    Only works if the half-close crosses the tunnel as one: the answer goes
    back on a connection whose other direction has ended.
    """

    def handle(self, sock: socket.socket) -> None:
        digest = hashlib.sha256()
        count = 0
        while data := sock.recv(65536):
            digest.update(data)
            count += len(data)
        sock.sendall(f"{count} {digest.hexdigest()}\n".encode())


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Read exactly n bytes; fail if the connection ends first."""
    parts = []
    while n:
        data = sock.recv(min(n, 1 << 20))
        assert data, f"connection ended with {n} bytes still expected"
        parts.append(data)
        n -= len(data)
    return b"".join(parts)


def recv_all(sock: socket.socket) -> bytes:
    """Read until the peer's EOF."""
    parts = []
    while data := sock.recv(65536):
        parts.append(data)
    return b"".join(parts)


# Local ports already used by this process's end clients. The proxies name a connection by
# its end client's port in their logs, and the tests find a connection's lines by it: a port
# the OS hands out again (a busy suite cycles through them) would match an older connection.
_PORTS_USED: set[int] = set()


def unused_port_socket() -> socket.socket:
    """A TCP socket bound to a loopback port no earlier end client of this process had."""
    while True:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        if port not in _PORTS_USED:
            _PORTS_USED.add(port)
            return sock
        sock.close()
