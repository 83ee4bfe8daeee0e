"""ptth_file_server: serve one folder over plain HTTP, without a relay.

    python ptth_file_server.py [--root DIR] [--bind HOST:PORT] [--name NAME]

The same `ptth_lib.file_server` answers requests through the tunnel in
ptth_server; this serves it directly, for testing and comparison. On start it
prints one line with the bound address (port 0 picks a free port).
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_BIND = "127.0.0.1:4001"


def main(argv: list[str] | None = None) -> int:
    from ptth_lib.commands import add_command_flags

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".", help="folder to serve (default: the current one)")
    parser.add_argument("--bind", default=DEFAULT_BIND,
                        help=f"HOST:PORT to listen on, port 0 for any (default {DEFAULT_BIND})")
    parser.add_argument("--name", help="the name the pages show first (default: the folder's name)")
    add_command_flags(parser)
    args = parser.parse_args(argv)

    from gevent import monkey

    monkey.patch_all()

    from ptth_lib.cli import parse_bind
    from ptth_lib.errors import ConfigError
    from ptth_lib.server.file_pages import Site
    from ptth_lib.server.file_server import make_wsgi_app
    from ptth_lib.wsgi import ListenError, run

    if not os.path.isdir(args.root):
        print(f"ptth_file_server: root {args.root!r} is not a folder; pass --root with an existing folder",
              file=sys.stderr)
        return 2
    try:
        host, port = parse_bind(args.bind)
    except ConfigError as e:
        print(f"ptth_file_server: {e}", file=sys.stderr)
        return 2
    try:
        name = args.name or os.path.basename(os.path.abspath(args.root)) or "PTTH file server"
        run(make_wsgi_app(args.root, Site(name)), host, port, "ptth_file_server")
    except ListenError as e:
        print(f"ptth_file_server: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
