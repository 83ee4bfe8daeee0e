"""Standalone file server: serves one directory over plain HTTP, for testing.

    python ptth_file_server.py [--root DIR] [--bind HOST:PORT]

The same `ptth_lib.file_server` answers requests through the tunnel in
ptth_server; this entry point only parses arguments and runs gevent's WSGI
server. On start it prints one line with the bound address (port 0 picks a
free port), so scripts and tests can find it.
"""

from __future__ import annotations

# First thing: gevent must patch the standard library before anything imports it.
from gevent import monkey

monkey.patch_all()

import argparse
import os
import signal
import sys
from typing import Any, NoReturn

import gevent
from gevent.pywsgi import WSGIHandler, WSGIServer

from ptth_lib.file_server import make_wsgi_app

PROG = "ptth_file_server"
DEFAULT_BIND = "127.0.0.1:4001"


class _RawUriHandler(WSGIHandler):  # type: ignore[misc]
    """Pass the request target as sent: PATH_INFO alone cannot tell `%2F` from `/`."""

    def get_environ(self) -> dict[str, Any]:
        environ: dict[str, Any] = super().get_environ()
        environ["RAW_URI"] = self.path
        return environ


def _fail(message: str, code: int) -> NoReturn:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _parse_bind(text: str) -> tuple[str, int] | None:
    """Split HOST:PORT (IPv6 as [::1]:PORT); None when malformed."""
    host, colon, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        return None
    return host, int(port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description="Serve one directory over plain HTTP.")
    parser.add_argument("--root", default=".", help="directory to serve (default: the current one)")
    parser.add_argument(
        "--bind",
        default=DEFAULT_BIND,
        help=f"HOST:PORT to listen on, port 0 for any (default: {DEFAULT_BIND})",
    )
    args = parser.parse_args(argv)

    if not os.path.isdir(args.root):
        _fail(f"root {args.root!r} is not a directory; pass --root with an existing directory", 2)
    address = _parse_bind(args.bind)
    if address is None:
        _fail(f"bad --bind {args.bind!r}; expected HOST:PORT, e.g. {DEFAULT_BIND}", 2)
    host, port = address

    # error_log stays on stderr (application tracebacks); no per-request access log.
    try:
        server = WSGIServer(
            address, make_wsgi_app(args.root), handler_class=_RawUriHandler, log=None
        )
        server.start()
    except OSError as e:
        # gevent appends the address to strerror; name lookup errors have negative errnos.
        reason = os.strerror(e.errno) if e.errno and e.errno > 0 else e.strerror or str(e)
        _fail(
            f"cannot listen on {host}:{port}: {reason}; pick another --bind or stop what uses it", 1
        )
    bound_port = server.address[1]
    shown_host = f"[{host}]" if ":" in host else host
    print(f"{PROG}: listening on http://{shown_host}:{bound_port}/", file=sys.stderr, flush=True)

    for signum in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(signum, server.stop)
    server.serve_forever()


if __name__ == "__main__":
    main()
