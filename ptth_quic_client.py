"""ptth_quic_client: forward local TCP ports through a PTTH QUIC relay.

`python ptth_quic_client.py --relay HOST:PORT (--relay-fingerprint FP |
--ca-file PEM) --name NAME --api-key-file FILE --forward
LOCALPORT:SERVER:PORTNAME [--forward ...] [--bind 127.0.0.1]`, or the same
settings from `--config ptth_quic_client.toml`; flags override the file. NAME
and the key are the client's [[clients]] entry at the relay (the same as for
ptth_client.py); $PTTH_CLIENT_API_KEY may hold the key instead of a file.
"""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger("ptth_quic_client")


def main(argv: list[str] | None = None) -> int:
    from ptth_lib.cli import add_logging_flags, setup_logging

    parser = argparse.ArgumentParser(prog="ptth_quic_client.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="config file (TOML) with relay, relay_fingerprint or ca_file, name, "
                        "api_key_file, bind, forward")
    parser.add_argument("--relay", help="the QUIC relay's HOST:PORT, e.g. relay.example.com:30380")
    parser.add_argument("--relay-fingerprint", help="the SHA-256 fingerprint ptth_quic_relay.py printed")
    parser.add_argument("--ca-file", help="CA certificates (PEM) to check the relay with, instead of a fingerprint")
    parser.add_argument("--name", help="this client's name in the relay's [[clients]]")
    parser.add_argument("--api-key-file", help="file holding this client's API key (or set $PTTH_CLIENT_API_KEY)")
    parser.add_argument("--forward", action="append", metavar="LOCALPORT:SERVER:PORTNAME",
                        help="forward a local port to a server's forwarded port; repeat for more")
    parser.add_argument("--bind", help="local address to listen on (default 127.0.0.1)")
    add_logging_flags(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    logging.getLogger("quic").setLevel(logging.WARNING)  # aioquic's own per-connection lines

    import signal
    import socket

    import gevent
    import gevent.socket

    from ptth_lib.config import load_quic_client_config
    from ptth_lib.errors import ConfigError
    from ptth_lib.forward.quic.proxies import QuicForwardClient, RelayTarget

    overrides = {"relay": args.relay, "relay_fingerprint": args.relay_fingerprint, "ca_file": args.ca_file,
                 "name": args.name, "api_key_file": args.api_key_file, "bind": args.bind, "forward": args.forward}
    try:
        config = load_quic_client_config(args.config, overrides)
    except ConfigError as e:
        print(f"ptth_quic_client: {e}", file=sys.stderr)
        return 2
    forwards = config.forwards
    client = QuicForwardClient(config.name, config.api_key, RelayTarget(
        config.relay_host, config.relay_port, config.relay_fingerprint, config.ca_file))
    listeners = []
    for f in forwards:
        try:
            listener = gevent.socket.socket(socket.AF_INET6 if ":" in config.bind else socket.AF_INET)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((config.bind, f.local_port))
            listener.listen(128)
        except OSError as e:
            print(f"ptth_quic_client: cannot listen on {config.bind}:{f.local_port}: {e.strerror or e}",
                  file=sys.stderr)
            return 1
        listeners.append((listener, f))
    link = gevent.spawn(client.link.run_forever)
    client.link.connected.wait()
    if client.link.fatal:
        print(f"ptth_quic_client: {client.link.fatal}", file=sys.stderr)
        return 1
    for listener, f in listeners:
        logger.info("forwarding %s:%d to %s:%s over QUIC", config.bind, listener.getsockname()[1], f.server, f.port)
        gevent.spawn(client.serve, listener, f.server, f.port)

    def stop() -> None:
        client.link.stop()
        link.kill()

    gevent.signal_handler(signal.SIGTERM, lambda: gevent.spawn(stop))
    gevent.signal_handler(signal.SIGINT, lambda: gevent.spawn(stop))
    link.join()
    if client.link.fatal:
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
