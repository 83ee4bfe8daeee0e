"""ptth_server: serve a folder or a local web app through a PTTH relay, from behind a firewall.

`python ptth_server.py [--config PATH] [--print-tripcode] [--name N]
[--relay-url URL] [--file-server-root DIR] [--web-app-url URL]`; flags
override the config file (default ./ptth_server.toml), and the API key may
come from $PTTH_API_KEY.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from ptth_lib.cli import add_logging_flags, setup_logging
from ptth_lib.commands import add_command_flags, command_argv, print_unit
from ptth_lib.config import is_private, load_server_config
from ptth_lib.errors import ConfigError
from ptth_lib.extras import require_extra
from ptth_lib.systemd import server_unit
from ptth_lib.wire import tripcode

DEFAULT_CONFIG = "./ptth_server.toml"

logger = logging.getLogger("ptth_server")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")
    parser.add_argument("--print-tripcode", action="store_true",
                        help="print the tripcode of the API key (for the relay config) and exit")
    parser.add_argument("--name", help="name to register under (overrides the config)")
    parser.add_argument("--relay-url", help="relay base URL, e.g. http://127.0.0.1:4000")
    parser.add_argument("--file-server-root", help="folder to serve under /files/")
    parser.add_argument("--web-app-url", help="local web app to serve (every path but /files/ when a "
                        "folder is served too), e.g. http://127.0.0.1:8080")
    add_logging_flags(parser)
    add_command_flags(parser, example="server", unit=True, user_unit=True)
    args = parser.parse_args(argv)
    if args.systemd_unit:
        command = command_argv()
        text = server_unit(command, os.path.abspath(args.config), args.user, os.getcwd())
        return print_unit(text, "ptth_server", [] if args.user else [command[-1]])
    setup_logging(args.log_level, args.log_format)
    logging.getLogger("quic").setLevel(logging.WARNING)  # qh3's own lines, when [quic] is set

    overrides = {"name": args.name, "relay_url": args.relay_url, "file_server_root": args.file_server_root,
                 "web_app_url": args.web_app_url}
    try:
        config, key_source = load_server_config(args.config, overrides)
        if config.quic is not None:
            require_extra("quic", f"{args.config}: [quic]")
    except ConfigError as e:
        print(f"ptth_server: {e}", file=sys.stderr)
        return 2
    assert config.api_key is not None
    code = tripcode.derive(config.api_key)
    if key_source == "generated":
        print(f"ptth_server: {args.config} had no api_key, so a new one was generated and saved there "
              f"(file mode 0600). Register this server at the relay with:\n\n"
              f"[[servers]]\nname = \"{config.name}\"\ntripcode = \"{code}\"\n", file=sys.stderr)
    elif key_source == "file" and not is_private(args.config):
        logger.warning("%s holds the API key but others can read it: chmod 600 %s", args.config, args.config)
    if args.print_tripcode:
        print(code)
        return 0

    from ptth_lib.server.loop import ServerLoop

    loop = ServerLoop(config)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: loop.stop())
    serving = " and ".join(([f"web app {config.web_app_url}"] if config.web_app_url else [])
                           + ([f"folder {config.file_server_root} under /files/"] if config.file_server_root
                              else []))
    logger.info("serving %s as %r through %s (tripcode %s)", serving, config.name, config.relay_url, code)
    return loop.run()


if __name__ == "__main__":
    raise SystemExit(main())
