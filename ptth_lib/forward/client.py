"""The client program (ptth_client, its QUIC alias, and the desktop app): local ports, one transport.

The config names the relay one of two ways, and that picks the transport:
`relay_url` (an http:// or https:// URL) forwards over HTTP through
ptth_relay (`http_client.HttpClientProxy`, a thread per connection);
`quic_relay` (HOST:PORT, with its certificate's fingerprint or a CA file,
and the client's name) forwards over QUIC through ptth_quic_relay
(`quic.proxies.QuicClientProxy`, a greenlet per connection).

Everything else is the same, in `ForwardingClient`: one listening socket per
forward, an accept loop on each, and a `ForwardTally` per forward that the
transport keeps up to date (connections open, bytes each way, the last
refusal). `run_client` is the command line: bind every local port, check the
relay and the key (one line on stderr and exit 1 if either fails), then
accept connections until SIGTERM or SIGINT (exit 0). The desktop app
(ptth_lib/gui/) drives the same object from its window: it opens and closes
forwards one at a time and reads the tallies and `relay_state()`.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Protocol, TypeVar

from ptth_lib.config import ClientConfig, Forward
from ptth_lib.errors import ConfigError, PtthError
from ptth_lib.extras import require_extra
from ptth_lib.forward.limits import ACCEPT_BACKLOG
from ptth_lib.forward.splice import Splice

logger = logging.getLogger(__name__)

# How long an accept loop waits after a failed accept (e.g. out of file descriptors): no spinning.
ACCEPT_RETRY_SECS = 0.1

T = TypeVar("T")


class ClientError(PtthError):
    """A start-up problem worth one line and exit code 1: a refused key, a busy port."""


@dataclass(frozen=True)
class RelayState:
    """What a client knows of its relay: `connected` is None until the first check has answered."""

    connected: bool | None
    problem: str = ""  # why not connected, as the command line's one-line error says it
    client_name: str = ""  # who the relay says we are
    allowed: frozenset[str] | None = None  # the "SERVER:PORTNAME" it allows us (None: it did not say)


def is_allowed(allowed: frozenset[str] | None, forward: Forward) -> bool:
    """Whether the relay's allow list lets `forward` through (True when it did not say)."""
    return allowed is None or f"{forward.server}:{forward.port}" in allowed or f"{forward.server}:*" in allowed


class ForwardTally:
    """One forward's live figures, written by its connections' threads or greenlets, read by anyone."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: set[Splice] = set()
        self._closed_up = 0  # bytes of connections that have ended
        self._closed_down = 0
        self.connections = 0  # opened since the forward started
        self.problem = ""  # the last refusal or failure; "" again once a connection opens

    @contextmanager
    def running(self, splice: Splice) -> Iterator[Splice]:
        """Count `splice` (TCP client as its end a) as open for the duration of the block."""
        with self._lock:
            self._open.add(splice)
            self.connections += 1
            self.problem = ""
        try:
            yield splice
        finally:
            with self._lock:
                self._open.discard(splice)
                self._closed_up += splice.a_to_b
                self._closed_down += splice.b_to_a

    def refused(self, reason: str) -> None:
        self.problem = reason

    def figures(self) -> tuple[int, int, int]:
        """(connections open, bytes up, bytes down so far, open connections' included)."""
        with self._lock:
            return (len(self._open), self._closed_up + sum(s.a_to_b for s in self._open),
                    self._closed_down + sum(s.b_to_a for s in self._open))

    def abort_all(self, reason: str) -> None:
        with self._lock:
            splices = list(self._open)
        for splice in splices:
            splice.abort(reason)


class ClientProxy(Protocol):
    """What the client program needs of a transport (HttpClientProxy, QuicClientProxy)."""

    socket_class: type[socket.socket]  # socket.socket, or gevent's for greenlets

    @property
    def stopping(self) -> bool: ...

    def connect(self) -> None:
        """Start reaching the relay (in the background; `check` waits for the answer)."""
        ...

    def check(self) -> str:
        """Reach the relay and have it accept our key (ClientError if not); who we are."""
        ...

    def relay_state(self) -> RelayState: ...

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` where the transport's sockets live (the QUIC hub's thread), from any thread."""
        ...

    def spawn(self, target: Callable[[], None], name: str) -> None: ...

    def pause(self, secs: float) -> None: ...

    def serve(self, sock: socket.socket, peer: tuple[str, int], forward: Forward, tally: ForwardTally) -> None:
        """One accepted TCP connection, from its connect through the relay to its close."""
        ...

    def wait_for_signal(self) -> None:
        """Block until SIGTERM or SIGINT (the command line), or until the relay refuses us for good."""
        ...

    def stop(self) -> None:
        """Let go of the relay; `stopping` is True from now on."""
        ...

    @property
    def fatal(self) -> str:
        """A refusal that retrying cannot fix, once there is one (exit code 1)."""
        ...


def new_proxy(config: ClientConfig, background: bool = False) -> ClientProxy:
    """The transport the config names. `background`: it runs beside a window (the desktop app):
    the QUIC hub has a thread of its own, and the relay is checked again and again, refusals
    included, instead of once at start."""
    if config.quic is not None:
        require_extra("quic", "forwarding over QUIC (quic_relay)")
        from ptth_lib.forward.quic.proxies import QuicClientProxy

        return QuicClientProxy(config, background)
    from ptth_lib.forward.http_client import HttpClientProxy

    return HttpClientProxy(config, background)


@dataclass(frozen=True)
class ForwardState:
    """One forward as the desktop app shows it."""

    forward: Forward
    listening: bool
    problem: str  # why it is not listening (port busy), or the last refusal
    open: int
    bytes_up: int
    bytes_down: int


class ForwardingClient:
    """The forwards of one client config over its transport, opened and closed one at a time."""

    def __init__(self, config: ClientConfig, background: bool = False) -> None:
        self.config = config
        self.proxy = new_proxy(config, background)
        self._lock = threading.Lock()
        self._ports: dict[int, tuple[Forward, socket.socket, ForwardTally]] = {}  # by the port bound
        self._busy: dict[int, tuple[Forward, str]] = {}  # forwards that could not listen, and why
        self._served: set[int] = set()  # ports whose "forwarding" line was logged

    def open(self, forward: Forward) -> int:
        """Listen on the forward's local port and serve it; the port (ClientError: the port is busy)."""
        port = self.listen(forward)
        self.serve(port)
        return port

    def listen(self, forward: Forward) -> int:
        """Bind the forward's local port, not serving it yet; the port bound (ClientError: it is busy)."""
        try:
            sock = self.proxy.call(partial(_listen, self.proxy.socket_class, self.config.bind, forward.local_port))
        except ClientError as e:
            with self._lock:
                self._busy[forward.local_port] = (forward, str(e))
            raise
        port: int = sock.getsockname()[1]  # local_port, unless that is 0 (any free port)
        with self._lock:
            self._busy.pop(forward.local_port, None)
            self._ports[port] = (forward, sock, ForwardTally())
        return port

    def serve(self, port: int) -> None:
        """Accept connections on a port `listen` bound, for as long as it stays open."""
        with self._lock:
            forward, sock, tally = self._ports[port]
            self._served.add(port)
        over = " over QUIC" if self.config.quic is not None else ""
        logger.info("forwarding %s:%d to %s:%s%s", self.config.bind, port, forward.server, forward.port, over)
        self.proxy.call(partial(self.proxy.spawn, partial(self._accept_forever, port, sock, forward, tally),
                                f"ptth-client-{port}"))

    def close(self, port: int) -> None:
        """Stop listening on `port` and cut its open connections (nothing if it is not open)."""
        with self._lock:
            entry = self._ports.pop(port, None)
            self._busy.pop(port, None)
            served = port in self._served
            self._served.discard(port)
        if entry is not None:
            _, sock, tally = entry
            self.proxy.call(partial(_unlisten, sock))
            tally.abort_all("the forward was stopped")
            if served:
                logger.info("stopped forwarding port %d", port)

    def states(self) -> dict[int, ForwardState]:
        """Every forward opened (or tried), by local port."""
        with self._lock:
            ports = list(self._ports.values())
            busy = list(self._busy.values())
        states = {}
        for forward, sock, tally in ports:
            open_, up, down = tally.figures()
            states[forward.local_port or sock.getsockname()[1]] = ForwardState(forward, True, tally.problem, open_,
                                                                               up, down)
        for forward, problem in busy:
            states[forward.local_port] = ForwardState(forward, False, problem, 0, 0, 0)
        return states

    def stop(self) -> None:
        """Close every port, cut every connection, let go of the relay."""
        with self._lock:
            ports = list(self._ports)
        for port in ports:
            self.close(port)
        self.proxy.stop()

    def _is_open(self, port: int, listener: socket.socket) -> bool:
        with self._lock:
            entry = self._ports.get(port)
        return entry is not None and entry[1] is listener

    def _accept_forever(self, port: int, listener: socket.socket, forward: Forward, tally: ForwardTally) -> None:
        proxy = self.proxy
        while not proxy.stopping:
            try:
                sock, peer = listener.accept()
            except OSError as e:
                if proxy.stopping or not self._is_open(port, listener):
                    return  # stopped, or this forward was closed
                logger.warning("accept on port %d failed: %s", forward.local_port, e.strerror or e)
                proxy.pause(ACCEPT_RETRY_SECS)
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            proxy.spawn(partial(proxy.serve, sock, peer[:2], forward, tally),
                        f"ptth-client-{forward.local_port}-{peer[1]}")


def add_client_flags(parser: argparse.ArgumentParser, quic_note: str = "") -> None:
    """The flags ptth_client and its QUIC alias share; `quic_note` prefixes the QUIC-only ones' help."""
    parser.add_argument("--relay-fingerprint", help=f"{quic_note}the SHA-256 fingerprint ptth_quic_relay.py printed")
    parser.add_argument("--ca-file", help=f"{quic_note}CA certificates (PEM) to check the relay with, instead of "
                        "a fingerprint")
    parser.add_argument("--name", help=f"{quic_note}this client's name in the relay's [[clients]]")
    parser.add_argument("--api-key-file", help="file holding this client's API key (or set $PTTH_CLIENT_API_KEY)")
    parser.add_argument("--forward", action="append", metavar="LOCALPORT:SERVER:PORTNAME",
                        help="forward a local port to a server's forwarded port; repeat for more")
    parser.add_argument("--bind", help="local address to listen on (default 127.0.0.1)")


def run_client(config: ClientConfig, prog: str) -> int:
    """Forward config's local ports until stopped; the exit code (start-up errors printed as one line)."""
    try:
        client = ForwardingClient(config)
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    try:
        # First: a busy port is found without a word to the relay.
        ports = [client.listen(f) for f in config.forwards]
        client.proxy.connect()
        client.proxy.check()
    except ClientError as e:
        client.stop()
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    for port in ports:
        client.serve(port)
    client.proxy.wait_for_signal()
    client.stop()
    return 1 if client.proxy.fatal else 0


def _unlisten(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept(), which close() alone does not
    except OSError:
        pass
    sock.close()


def listening_socket(socket_class: type[socket.socket], bind: str, port: int) -> socket.socket:
    """A socket listening on bind:port, as every forward's is (OSError if the port cannot be had)."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    sock = socket_class(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((bind, port))
        sock.listen(ACCEPT_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def _listen(socket_class: type[socket.socket], bind: str, port: int) -> socket.socket:
    try:
        return listening_socket(socket_class, bind, port)
    except OSError as e:
        raise ClientError(f"cannot listen on {bind}:{port}: {e.strerror or e}") from None
