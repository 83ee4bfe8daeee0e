"""ptth_client: forward local TCP ports through a PTTH relay to ports of a server, over HTTP or QUIC.

`python ptth_client.py --relay-url URL --api-key-file FILE --forward
LOCALPORT:SERVER:PORTNAME [--forward ...] [--bind 127.0.0.1]` forwards over
HTTP through ptth_relay. `--quic-relay HOST:PORT (--relay-fingerprint FP |
--ca-file PEM) --name NAME` instead of --relay-url forwards over QUIC through
ptth_quic_relay (NAME is the client's [[clients]] name there). The same
settings may come from `--config ptth_client.toml`; flags override the file.
The key comes from the file or from $PTTH_CLIENT_API_KEY, never from the
command line. `--new-key FILE` makes a key file; `--print-tripcode` prints the
key's tripcode for the relay's [[clients]] table.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ptth_lib.cli import add_logging_flags, setup_logging
from ptth_lib.commands import add_command_flags, command_argv, print_unit
from ptth_lib.config import load_client_config, read_client_key, read_toml, write_new_key_file
from ptth_lib.config.client_file import default_config_path
from ptth_lib.errors import ConfigError
from ptth_lib.forward.client import add_client_flags, run_client
from ptth_lib.systemd import client_unit
from ptth_lib.wire import tripcode

PROG = "ptth_client"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="config file (TOML) with relay_url or quic_relay, api_key_file, bind, "
                        "forward")
    parser.add_argument("--relay-url", help="relay base URL, e.g. https://relay.example.com: forward over HTTP")
    parser.add_argument("--quic-relay", metavar="HOST:PORT",
                        help="or the QUIC relay's HOST:PORT, e.g. relay.example.com:30380: forward over QUIC")
    add_client_flags(parser, quic_note="QUIC: ")
    parser.add_argument("--new-key", metavar="FILE", help="write a new API key to FILE (mode 0600), "
                        "print its tripcode and exit")
    parser.add_argument("--print-tripcode", action="store_true",
                        help="print the tripcode of the API key (for the relay's [[clients]]) and exit")
    add_logging_flags(parser)
    add_command_flags(parser, example="client", unit=True, user_unit=True)
    args = parser.parse_args(argv)
    if args.systemd_unit:
        if not args.user:
            print(f"{PROG}: --systemd-unit needs --user: the client runs as a user service (systemctl --user)",
                  file=sys.stderr)
            return 2
        # Without --config, the desktop app's file: a unit then forwards what the app set up.
        config = os.path.abspath(args.config) if args.config else str(default_config_path())
        return print_unit(client_unit(command_argv(), config, os.getcwd()), PROG)
    setup_logging(args.log_level, args.log_format)
    logging.getLogger("quic").setLevel(logging.WARNING)  # qh3's own per-connection lines

    try:
        if args.new_key:
            key = write_new_key_file(args.new_key)
            print(f"{PROG}: wrote a new API key to {args.new_key}. Register this client at the relay with:"
                  f"\n\n[[clients]]\nname = \"CHOOSE_A_NAME\"\ntripcode = \"{tripcode.derive(key)}\"\n"
                  f"allow = [\"SERVER:PORTNAME\"]\n", file=sys.stderr)
            return 0
        if args.print_tripcode:
            key_file = args.api_key_file or (read_toml(args.config).get("api_key_file") if args.config else None)
            if key_file is not None and not isinstance(key_file, str):
                raise ConfigError(f"{args.config}: 'api_key_file' must be a string, the key file's path")
            print(tripcode.derive(read_client_key(key_file, args.config or "command line")))
            return 0
        overrides = {"relay_url": args.relay_url, "quic_relay": args.quic_relay,
                     "relay_fingerprint": args.relay_fingerprint, "ca_file": args.ca_file, "name": args.name,
                     "api_key_file": args.api_key_file, "bind": args.bind, "forward": args.forward}
        config = load_client_config(args.config, overrides)
    except ConfigError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    return run_client(config, PROG)


if __name__ == "__main__":
    raise SystemExit(main())
