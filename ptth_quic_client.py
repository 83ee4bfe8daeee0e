"""ptth_quic_client: forward local TCP ports through a PTTH QUIC relay.

`python ptth_quic_client.py --relay HOST:PORT (--relay-fingerprint FP |
--ca-file PEM) --name NAME --api-key-file FILE --forward
LOCALPORT:SERVER:PORTNAME [--forward ...] [--bind 127.0.0.1]`. NAME and the
key are the client's [[clients]] entry at the relay (the same as for
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
    parser.add_argument("--relay", required=True, help="the QUIC relay's HOST:PORT, e.g. relay.example.com:30380")
    parser.add_argument("--relay-fingerprint", help="the SHA-256 fingerprint ptth_quic_relay.py printed")
    parser.add_argument("--ca-file", help="CA certificates (PEM) to check the relay with, instead of a fingerprint")
    parser.add_argument("--name", required=True, help="this client's name in the relay's [[clients]]")
    parser.add_argument("--api-key-file", help="file holding this client's API key (or set $PTTH_CLIENT_API_KEY)")
    parser.add_argument("--forward", action="append", required=True, metavar="LOCALPORT:SERVER:PORTNAME",
                        help="forward a local port to a server's forwarded port; repeat for more")
    parser.add_argument("--bind", default="127.0.0.1", help="local address to listen on (default 127.0.0.1)")
    add_logging_flags(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    logging.getLogger("quic").setLevel(logging.WARNING)  # aioquic's own per-connection lines

    import signal
    import socket

    import gevent
    import gevent.socket

    from ptth_lib.config import parse_address, parse_forward, read_client_key
    from ptth_lib.errors import ConfigError
    from ptth_lib.quic_cert import parse_fingerprint
    from ptth_lib.quic_forward import QuicForwardClient, RelayTarget

    try:
        relay = parse_address(args.relay)
        if relay is None:
            raise ConfigError(f"--relay {args.relay!r}: expected HOST:PORT, e.g. relay.example.com:30380")
        if not args.relay_fingerprint and not args.ca_file:
            raise ConfigError("give --relay-fingerprint (as ptth_quic_relay.py printed it) or --ca-file")
        fingerprint = parse_fingerprint(args.relay_fingerprint) if args.relay_fingerprint else None
        forwards = []
        for spec in args.forward:
            f = parse_forward(spec)
            if f is None:
                raise ConfigError(f"--forward {spec!r}: expected LOCALPORT:SERVER:PORTNAME, e.g. 30381:myserver:ssh")
            forwards.append(f)
        key = read_client_key(args.api_key_file, "command line")
    except ConfigError as e:
        print(f"ptth_quic_client: {e}", file=sys.stderr)
        return 2
    client = QuicForwardClient(args.name, key, RelayTarget(relay[0], relay[1], fingerprint, args.ca_file))
    listeners = []
    for f in forwards:
        try:
            listener = gevent.socket.socket(socket.AF_INET6 if ":" in args.bind else socket.AF_INET)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((args.bind, f.local_port))
            listener.listen(128)
        except OSError as e:
            print(f"ptth_quic_client: cannot listen on {args.bind}:{f.local_port}: {e.strerror or e}",
                  file=sys.stderr)
            return 1
        listeners.append((listener, f))
    link = gevent.spawn(client.link.run_forever)
    client.link.connected.wait()
    if client.link.fatal:
        print(f"ptth_quic_client: {client.link.fatal}", file=sys.stderr)
        return 1
    for listener, f in listeners:
        logger.info("forwarding %s:%d to %s:%s over QUIC", args.bind, listener.getsockname()[1], f.server, f.port)
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
