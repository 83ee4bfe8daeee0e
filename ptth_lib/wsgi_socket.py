"""The client's socket behind a WSGI request: find it, cut it, notice a hang-up.

The relay needs the raw connection in three cases the WSGI interface does not
cover: to cut a response visibly (a shut-down socket, never a clean end), to
stop reading a body it has refused, and to notice a peer hanging up while a
long-poll is parked (nothing is read or written meanwhile).
"""

from __future__ import annotations

import socket
from typing import Any

import gevent
import gevent.socket

from .rendezvous import ListenEnded

# Environ keys under which the WSGI server exposes the client's socket:
# gunicorn's own, and ours for gevent's WSGIServer (see `wsgi_server.py`).
SOCKET_KEYS = ("gunicorn.socket", "ptth.socket")


def connection_socket(environ: dict[str, Any]) -> socket.socket | None:
    """The request's connection, or None under a WSGI server that hides it."""
    for key in SOCKET_KEYS:
        if environ.get(key) is not None:
            sock: socket.socket = environ[key]
            return sock
    return None


def cut_connection(environ: dict[str, Any]) -> bool:
    """Shut the connection down so the peer sees a cut, not a clean end."""
    sock = connection_socket(environ)
    if sock is None:
        return False
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    return True


def end_on_hangup(sock: socket.socket, listen: gevent.Greenlet) -> None:
    """End a parked listen (throw ListenEnded into it) as soon as its peer hangs up.

    A listen parked on a dead connection would take requests and lose them
    until request_timeout_secs; NAT boxes and proxies cut idle connections.
    """
    if wait_for_hangup(sock):
        gevent.kill(listen, ListenEnded)


def wait_for_hangup(sock: socket.socket) -> bool:
    """Wait until a peer that should be sending nothing hangs up; True if it did.

    While a listen is parked, or a response streams to a client that sent its
    whole request, the peer sends nothing, so a readable socket means end of
    file (or a reset): the peer has gone. False means we cannot tell (TLS
    sockets cannot peek) or the peer sent bytes after all.
    """
    try:
        gevent.socket.wait_read(sock.fileno())
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True
    except ValueError:
        return False
