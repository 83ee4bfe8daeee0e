"""ptth_quic_end_server: the server side of TCP port forwarding over QUIC, on its own.

`python ptth_quic_end_server.py [--config PATH]` reads ptth_server's config
(default ./ptth_server.toml: name, api_key, [forwarded_ports] and [quic])
and serves only the forwarded ports through the QUIC relay, exactly as
ptth_server.py does by itself when its config has a [quic] table (the same
code: ptth_lib.forward.quic.proxies.QuicEndServer). Kept for existing
set-ups; it exits 1 if the relay refuses it.
"""

from __future__ import annotations

import argparse
import logging
import sys

PROG = "ptth_quic_end_server"


def main(argv: list[str] | None = None) -> int:
    from ptth_lib.cli import add_logging_flags, setup_logging

    parser = argparse.ArgumentParser(prog="ptth_quic_end_server.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="./ptth_server.toml", help="config file (default ./ptth_server.toml)")
    add_logging_flags(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    logging.getLogger("quic").setLevel(logging.WARNING)  # qh3's own per-connection lines

    from ptth_lib.config import load_quic_end_server_config
    from ptth_lib.errors import ConfigError
    from ptth_lib.forward.quic.proxies import QuicEndServer

    try:
        config = load_quic_end_server_config(args.config)
    except ConfigError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    server = QuicEndServer(config)
    server.stop_on_signals()
    return server.run()


if __name__ == "__main__":
    raise SystemExit(main())
