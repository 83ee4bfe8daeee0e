"""ptth_relay: the public relay that clients and servers both connect to.

Production: `gunicorn -c conf/gunicorn.conf.py ptth_relay:app` (or plainly
`gunicorn -k gevent ptth_relay:app`); the config file comes from the
environment variable PTTH_RELAY_CONFIG, else ./ptth_relay.toml.
Development: `python ptth_relay.py [--config PATH] [--bind HOST:PORT]` runs the
same app on gevent's own WSGI server.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

CONFIG_ENV = "PTTH_RELAY_CONFIG"
DEFAULT_CONFIG = "./ptth_relay.toml"
DEFAULT_BIND = "127.0.0.1:4000"

_app: Any = None


def __getattr__(name: str) -> Any:
    """Build `app` on first use, so importing this module has no side effects."""
    global _app
    if name != "app":
        raise AttributeError(name)
    if _app is None:
        _app = _load_app_for_gunicorn()
    return _app


def _load_app_for_gunicorn() -> Any:
    from ptth_lib.config import load_relay_config
    from ptth_lib.errors import ConfigError
    from ptth_lib.relay import create_app

    path = os.environ.get(CONFIG_ENV, DEFAULT_CONFIG)
    try:
        config = load_relay_config(path)
    except ConfigError as e:
        print(f"ptth_relay: {e}", file=sys.stderr, flush=True)
        sys.exit(3)  # gunicorn's "worker failed to boot": the master stops instead of retrying
    gunicorn_log = logging.getLogger("gunicorn.error")
    lib_log = logging.getLogger("ptth_lib")
    if gunicorn_log.handlers and not lib_log.handlers:
        lib_log.handlers = gunicorn_log.handlers
        lib_log.setLevel(gunicorn_log.level)
        lib_log.propagate = False
    gunicorn_log.info("ptth_relay: %d servers registered (config %s)", len(config.servers), path)
    return create_app(config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ptth_relay.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.environ.get(CONFIG_ENV, DEFAULT_CONFIG),
                        help=f"relay config file (default: ${CONFIG_ENV} or {DEFAULT_CONFIG})")
    parser.add_argument("--bind", default=DEFAULT_BIND, help=f"HOST:PORT to listen on (default {DEFAULT_BIND})")
    args = parser.parse_args(argv)

    from gevent import monkey

    monkey.patch_all()

    from ptth_lib.cli import parse_bind, setup_logging
    from ptth_lib.config import load_relay_config
    from ptth_lib.errors import ConfigError
    from ptth_lib.relay import create_app
    from ptth_lib.wsgi_server import ListenError, run

    setup_logging()
    try:
        host, port = parse_bind(args.bind)
        config = load_relay_config(args.config)
    except ConfigError as e:
        print(f"ptth_relay: {e}", file=sys.stderr)
        return 2
    app = create_app(config)
    try:
        run(app, host, port, "ptth_relay", on_stop=app.extensions["ptth_rendezvous"].close)
    except ListenError as e:
        print(f"ptth_relay: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
