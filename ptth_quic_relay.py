"""ptth_quic_relay: the QUIC relay for TCP port forwarding (spec 004).

`python ptth_quic_relay.py [--config PATH] [--bind HOST:PORT]` reads the same
relay config as ptth_relay ([[servers]], [[clients]]; default
$PTTH_RELAY_CONFIG or ./ptth_relay.toml) and listens on UDP (quic_bind,
default 0.0.0.0:30380). On first start it makes a self-signed certificate
(quic_cert_file, quic_key_file) and prints its SHA-256 fingerprint, which
proxies pin.
"""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger("ptth_quic_relay")


def main(argv: list[str] | None = None) -> int:
    from ptth_lib.cli import add_logging_flags, setup_logging
    from ptth_lib.commands import add_command_flags
    from ptth_lib.config import RELAY_CONFIG_ENV, relay_config_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=relay_config_path(),
                        help=f"relay config file (default: ${RELAY_CONFIG_ENV} or ./ptth_relay.toml)")
    parser.add_argument("--bind", help="UDP HOST:PORT to listen on (default: quic_bind, 0.0.0.0:30380)")
    add_logging_flags(parser)
    add_command_flags(parser, example="relay")
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    logging.getLogger("quic").setLevel(logging.WARNING)  # qh3's own per-connection lines

    import signal
    import socket

    import gevent
    import gevent.socket

    from ptth_lib.cli import parse_bind
    from ptth_lib.config import load_relay_config
    from ptth_lib.errors import ConfigError
    from ptth_lib.extras import require_extra

    try:
        require_extra("quic", "the QUIC relay")
    except ConfigError as e:
        print(f"ptth_quic_relay: {e}", file=sys.stderr)
        return 2

    from ptth_lib.forward.quic import cert, driver
    from ptth_lib.forward.quic.endpoint import QuicServerEndpoint
    from ptth_lib.forward.quic.relay import QuicRelay

    try:
        config = load_relay_config(args.config)
        host, port = parse_bind(args.bind or config.quic_bind)
        identity = cert.load_or_create(config.quic_cert_file, config.quic_key_file)
    except ConfigError as e:
        print(f"ptth_quic_relay: {e}", file=sys.stderr)
        return 2
    sock = gevent.socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    driver.size_buffers(sock)
    try:
        sock.bind((host, port))
    except OSError as e:
        print(f"ptth_quic_relay: cannot listen on UDP {host}:{port}: {e.strerror or e}", file=sys.stderr)
        return 1
    if identity.created:
        logger.info("made a new self-signed certificate %s (key %s)", identity.cert_path, identity.key_path)
    relay = QuicRelay(config)
    endpoint = QuicServerEndpoint(sock, driver.configure(cert.server_configuration(driver.ALPN, identity),
                                                         config.quic_max_datagram_size),
                                  relay.on_peer)
    logger.info("listening on udp://%s:%d, certificate fingerprint %s", host, sock.getsockname()[1],
                identity.fingerprint)
    server = gevent.spawn(endpoint.serve_forever)
    gevent.signal_handler(signal.SIGTERM, server.kill)
    gevent.signal_handler(signal.SIGINT, server.kill)
    server.join()
    for peer in set(endpoint.peers.values()):
        peer.close("the relay is stopping")
    gevent.sleep(0.1)  # let the closes go out
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
