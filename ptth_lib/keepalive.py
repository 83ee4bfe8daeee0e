"""TCP keepalive for connections that may sit idle for hours: forwarded TCP connections and WebSockets.

A forwarded connection or a WebSocket may carry nothing for up to
`tcp_idle_timeout_secs` (an hour by default), and so may the HTTP streams
that carry it between ptth_server, the relay and ptth_client. A NAT box or
stateful firewall on the way (the server is behind one by definition)
forgets an idle TCP connection after minutes to hours, silently: the next
byte then goes nowhere. With keepalive on, the kernel sends an empty probe
after KEEPALIVE_IDLE_SECS of silence and every KEEPALIVE_INTERVAL_SECS after,
which keeps such boxes' entries alive, and ends a connection whose peer has
vanished after KEEPALIVE_PROBES unanswered probes. The probes carry no data:
an HTTP proxy in the way (nginx) does not see them, so its own timeouts
still apply (README, "Put a web app on the internet").

Used by the server's and client's connections to the relay (requests_adapter.py)
and by every socket the relay attaches to a forwarded connection or a
WebSocket (relay/forwarding.py).
"""

from __future__ import annotations

import socket

# Under the shortest NAT timeouts in common use for established TCP (a few
# minutes on some home routers and mobile networks); one probe a minute costs nothing.
KEEPALIVE_IDLE_SECS = 60
KEEPALIVE_INTERVAL_SECS = 20
KEEPALIVE_PROBES = 3

# (level, option, value) for setsockopt; the per-connection timings where the OS has them.
KEEPALIVE_OPTIONS: tuple[tuple[int, int, int], ...] = ((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),) + tuple(
    (socket.IPPROTO_TCP, getattr(socket, name), value)
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_SECS), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_SECS),
                        ("TCP_KEEPCNT", KEEPALIVE_PROBES))
    if hasattr(socket, name))


def keep_alive(sock: socket.socket) -> None:
    """Turn keepalive on for `sock`; a socket that is gone already is left alone."""
    try:
        for level, option, value in KEEPALIVE_OPTIONS:
            sock.setsockopt(level, option, value)
    except OSError:
        pass
