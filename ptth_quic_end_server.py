"""ptth_quic_end_server: the server side of TCP port forwarding over QUIC, on its own.

`python ptth_quic_end_server.py [--config PATH]` reads ptth_server's config
(default ./ptth_server.toml: name, api_key, [forwarded_ports] and [quic])
and serves only the forwarded ports through the QUIC relay. ptth_server.py
does the same by itself when its config has a [quic] table.
"""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger("ptth_quic_end_server")


def main(argv: list[str] | None = None) -> int:
    from ptth_lib.cli import add_logging_flags, setup_logging

    parser = argparse.ArgumentParser(prog="ptth_quic_end_server.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="./ptth_server.toml", help="config file (default ./ptth_server.toml)")
    add_logging_flags(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    logging.getLogger("quic").setLevel(logging.WARNING)  # aioquic's own per-connection lines

    import signal

    import gevent

    from ptth_lib.config import load_server_config
    from ptth_lib.errors import ConfigError
    from ptth_lib.forward.quic.proxies import QuicEndServer, RelayTarget

    try:
        config, _ = load_server_config(args.config, {}, serves_files=False)  # no file_server_root
        if config.quic is None:
            raise ConfigError(f"{args.config}: no [quic] table: add relay and relay_fingerprint (or ca_file)")
        if not config.forwarded_ports:
            raise ConfigError(f"{args.config}: no [forwarded_ports]: nothing to serve")
    except ConfigError as e:
        print(f"ptth_quic_end_server: {e}", file=sys.stderr)
        return 2
    assert config.api_key is not None
    q = config.quic
    server = QuicEndServer(config.name, config.api_key, RelayTarget(q.relay_host, q.relay_port,
                                                                    q.relay_fingerprint, q.ca_file),
                           dict(config.forwarded_ports))
    run = gevent.spawn(server.run_forever)

    def stop() -> None:
        server.link.stop()
        run.kill()

    gevent.signal_handler(signal.SIGTERM, lambda: gevent.spawn(stop))
    gevent.signal_handler(signal.SIGINT, lambda: gevent.spawn(stop))
    run.join()
    return 1 if server.link.fatal else 0


if __name__ == "__main__":
    raise SystemExit(main())
