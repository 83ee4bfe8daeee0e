"""The client program (ptth_client, and ptth_quic_client as an alias): local ports, one transport.

The config names the relay one of two ways, and that picks the transport:
`relay_url` (an http:// or https:// URL) forwards over HTTP through
ptth_relay (`http_client.HttpClientProxy`, a thread per connection);
`quic_relay` (HOST:PORT, with its certificate's fingerprint or a CA file,
and the client's name) forwards over QUIC through ptth_quic_relay
(`quic.proxies.QuicClientProxy`, a greenlet per connection). Everything
else is the same: `run_client` binds every local port, checks the relay and
the key (one line on stderr and exit 1 if either fails), then accepts any
number of connections on each until SIGTERM or SIGINT (exit 0).
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from collections.abc import Callable
from functools import partial
from typing import Protocol

from ptth_lib.config import ClientConfig, Forward
from ptth_lib.errors import PtthError
from ptth_lib.forward.limits import ACCEPT_BACKLOG

logger = logging.getLogger(__name__)

# How long an accept loop waits after a failed accept (e.g. out of file descriptors): no spinning.
ACCEPT_RETRY_SECS = 0.1


class ClientError(PtthError):
    """A start-up problem worth one line and exit code 1: a refused key, a busy port."""


class ClientProxy(Protocol):
    """What the client program needs of a transport (HttpClientProxy, QuicClientProxy)."""

    socket_class: type[socket.socket]  # socket.socket, or gevent's for greenlets

    @property
    def stopping(self) -> bool: ...

    def check(self) -> str:
        """Reach the relay and have it accept our key (ClientError if not); who we are."""
        ...

    def spawn(self, target: Callable[[], None], name: str) -> None: ...

    def pause(self, secs: float) -> None: ...

    def serve(self, sock: socket.socket, peer: tuple[str, int], forward: Forward) -> None:
        """One accepted TCP connection, from its connect through the relay to its close."""
        ...

    def run_until_stopped(self, close_ports: Callable[[], None]) -> int:
        """Wait for a signal (or a fatal refusal), then stop; the exit code."""
        ...


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
    proxy: ClientProxy
    if config.quic is not None:
        from ptth_lib.forward.quic.proxies import QuicClientProxy

        proxy = QuicClientProxy(config)
    else:
        from ptth_lib.forward.http_client import HttpClientProxy

        proxy = HttpClientProxy(config)
    listeners: list[tuple[socket.socket, Forward]] = []
    try:
        for f in config.forwards:  # first: a busy port is found without a word to the relay
            listeners.append((_listen(proxy.socket_class, config.bind, f.local_port), f))
        proxy.check()
    except ClientError as e:
        for sock, _ in listeners:
            sock.close()
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    over = " over QUIC" if config.quic is not None else ""
    for sock, f in listeners:
        logger.info("forwarding %s:%d to %s:%s%s", config.bind, sock.getsockname()[1], f.server, f.port, over)
        proxy.spawn(partial(_accept_forever, proxy, sock, f), f"ptth-client-{f.local_port}")

    def close_ports() -> None:
        for sock, _ in listeners:
            sock.close()

    return proxy.run_until_stopped(close_ports)


def _listen(socket_class: type[socket.socket], bind: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    sock = socket_class(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((bind, port))
        sock.listen(ACCEPT_BACKLOG)
    except OSError as e:
        sock.close()
        raise ClientError(f"cannot listen on {bind}:{port}: {e.strerror or e}") from None
    return sock


def _accept_forever(proxy: ClientProxy, listener: socket.socket, forward: Forward) -> None:
    while not proxy.stopping:
        try:
            sock, peer = listener.accept()
        except OSError as e:
            if proxy.stopping:
                return
            logger.warning("accept on port %d failed: %s", forward.local_port, e.strerror or e)
            proxy.pause(ACCEPT_RETRY_SECS)
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        proxy.spawn(partial(proxy.serve, sock, peer[:2], forward), f"ptth-client-{forward.local_port}-{peer[1]}")
