"""ptth_quic_client: an alias of `ptth_client.py --quic-relay`, kept for existing set-ups.

`python ptth_quic_client.py --relay HOST:PORT (--relay-fingerprint FP |
--ca-file PEM) --name NAME --api-key-file FILE --forward
LOCALPORT:SERVER:PORTNAME [--forward ...] [--bind 127.0.0.1]`, or the same
settings from `--config ptth_quic_client.toml` (where the relay is `relay`,
not ptth_client's `quic_relay`); flags override the file. NAME and the key
are the client's [[clients]] entry at the relay (the same as for
ptth_client.py); $PTTH_CLIENT_API_KEY may hold the key instead of a file.
It runs ptth_client's code; new set-ups should use ptth_client.py.
"""

from __future__ import annotations

import argparse
import logging
import sys

PROG = "ptth_quic_client"


def main(argv: list[str] | None = None) -> int:
    from ptth_lib.cli import add_logging_flags, setup_logging
    from ptth_lib.forward.client import add_client_flags, run_client

    parser = argparse.ArgumentParser(prog="ptth_quic_client.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="config file (TOML) with relay, relay_fingerprint or ca_file, name, "
                        "api_key_file, bind, forward")
    parser.add_argument("--relay", help="the QUIC relay's HOST:PORT, e.g. relay.example.com:30380")
    add_client_flags(parser)
    add_logging_flags(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    logging.getLogger("quic").setLevel(logging.WARNING)  # qh3's own per-connection lines

    from ptth_lib.config import load_quic_client_config
    from ptth_lib.errors import ConfigError

    overrides = {"relay": args.relay, "relay_fingerprint": args.relay_fingerprint, "ca_file": args.ca_file,
                 "name": args.name, "api_key_file": args.api_key_file, "bind": args.bind, "forward": args.forward}
    try:
        config = load_quic_client_config(args.config, overrides)
    except ConfigError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    return run_client(config, PROG)


if __name__ == "__main__":
    raise SystemExit(main())
