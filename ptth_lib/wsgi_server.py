"""gevent's own WSGI server, for `python ptth_relay.py` and `ptth_file_server.py`.

Production runs the relay under gunicorn; this runs the same apps without it.
The handler adds what gunicorn gives and pywsgi does not: the raw request
target (`RAW_URI`, so `%2F` stays distinct from `/`) and the client socket
(`ptth.socket`, so the relay can cut a connection on purpose).
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

import gevent
from gevent.pywsgi import WSGIHandler, WSGIServer

from .errors import PtthError

# How long a stopping server lets responses in flight finish.
GRACEFUL_STOP_SECS = 10.0


class ListenError(PtthError):
    """The address cannot be bound; the message says why and what to do."""


class _Handler(WSGIHandler):  # type: ignore[misc]
    def handle(self) -> None:
        # pywsgi writes the headers and the body in separate sends; with Nagle's
        # algorithm on, the body then waits for the client's delayed ACK (40 ms).
        try:
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not TCP (a Unix socket): nothing to do
        super().handle()

    def get_environ(self) -> dict[str, Any]:
        environ: dict[str, Any] = super().get_environ()
        environ["RAW_URI"] = self.path
        environ["ptth.socket"] = self.socket
        return environ


def run(app: Any, host: str, port: int, name: str, on_stop: Callable[[], None] | None = None) -> None:
    """Serve `app` until SIGINT or SIGTERM; the caller must have monkey-patched with gevent.

    Prints `NAME: listening on http://HOST:PORT/` to stderr once bound (port 0
    picks a free port), and raises ListenError if the address is unusable.
    """
    server = WSGIServer((host, port), app, handler_class=_Handler, log=None)
    try:
        server.init_socket()
    except OSError as e:
        # gevent appends the address to strerror; name lookup errors have negative errnos.
        reason = os.strerror(e.errno) if e.errno and e.errno > 0 else e.strerror or str(e)
        hint = "; pick another --bind or stop what uses it" if e.errno == errno.EADDRINUSE else ""
        raise ListenError(f"cannot listen on {host}:{port}: {reason}{hint}") from None
    shown_host = f"[{host}]" if ":" in host else host
    print(f"{name}: listening on http://{shown_host}:{server.address[1]}/", file=sys.stderr, flush=True)

    def stop() -> None:
        if on_stop:
            on_stop()
        server.stop(timeout=GRACEFUL_STOP_SECS)

    for sig in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(sig, stop)
    server.serve_forever()
