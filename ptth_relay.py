"""ptth_relay: the public relay that clients and servers both connect to.

Production: `ptth-relay [--config PATH] [--bind HOST:PORT] [--workers N]`, the
installed command, runs it under gunicorn with the gevent worker and the
settings of ptth_lib/relay/gunicorn_settings.py; from a checkout,
`gunicorn -c conf/gunicorn.conf.py ptth_relay:app` does the same (or plainly
`gunicorn -k gevent ptth_relay:app`), with the config file from the
environment variable PTTH_RELAY_CONFIG, else ./ptth_relay.toml.
Development: `python ptth_relay.py [--config PATH] [--bind HOST:PORT]` runs the
same app on gevent's own WSGI server.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any

DEFAULT_BIND = "127.0.0.1:4000"

_app: Any = None


def __getattr__(name: str) -> Any:
    """Build `app` on first use, so importing this module has no side effects."""
    global _app
    if name != "app":
        raise AttributeError(name)
    if _app is None:
        from ptth_lib.config import relay_config_path
        from ptth_lib.relay.gunicorn_app import load_app
        from ptth_lib.wsgi import gunicorn_sizes

        _app = load_app(relay_config_path(), *gunicorn_sizes())
    return _app


def _parser(under_gunicorn: bool) -> argparse.ArgumentParser:
    from ptth_lib.cli import add_logging_flags
    from ptth_lib.commands import add_command_flags
    from ptth_lib.config import RELAY_CONFIG_ENV, relay_config_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=relay_config_path(),
                        help=f"relay config file (default: ${RELAY_CONFIG_ENV} or ./ptth_relay.toml)")
    if under_gunicorn:
        parser.add_argument("--bind", help=f"HOST:PORT to listen on, port 0 for any (default "
                            f"$PTTH_RELAY_BIND, else {DEFAULT_BIND})")
        parser.add_argument("--workers", type=int, metavar="N",
                            help="gunicorn workers (default 1; more only with redis_url: a cluster)")
    else:
        parser.add_argument("--bind", default=DEFAULT_BIND,
                            help=f"HOST:PORT to listen on, port 0 for any (default {DEFAULT_BIND})")
    parser.add_argument("--new-scraper-key", metavar="NAME",
                        help="print a new scraper API key and the [[scraper_keys]] snippet for it, and exit")
    parser.add_argument("--valid-days", type=int, default=30, metavar="N",
                        help="with --new-scraper-key: days until the key expires (default 30)")
    parser.add_argument("--hash-password", action="store_true",
                        help="ask for a user name and password and print a basic_auth entry for them, and exit")
    add_logging_flags(parser)
    add_command_flags(parser, example="relay", unit=under_gunicorn)
    return parser


def _parse(argv: list[str] | None, under_gunicorn: bool) -> argparse.Namespace:
    """The flags; a one-shot action (--new-scraper-key, --hash-password) runs here, and exits."""
    args = _parser(under_gunicorn).parse_args(argv)
    if args.new_scraper_key is not None:
        sys.exit(_print_new_scraper_key(args.new_scraper_key, args.valid_days))
    if args.hash_password:
        sys.exit(_print_password_entry())
    return args


def main(argv: list[str] | None = None) -> int:
    """`python ptth_relay.py`: the relay on gevent's own WSGI server."""
    args = _parse(argv, under_gunicorn=False)

    from gevent import monkey

    monkey.patch_all()

    import gevent

    from ptth_lib.cli import parse_bind, setup_logging
    from ptth_lib.config import load_relay_config
    from ptth_lib.errors import ConfigError
    from ptth_lib.relay.app import app_for
    from ptth_lib.relay.capacity import log_start, raise_open_files_limit
    from ptth_lib.relay.relay import Relay
    from ptth_lib.wsgi import ListenError, run

    setup_logging(args.log_level, args.log_format)
    raise_open_files_limit()  # before the relay plans its capacity from it
    try:
        host, port = parse_bind(args.bind)
        config = load_relay_config(args.config)
        relay = Relay(config, config_path=args.config)
    except ConfigError as e:
        print(f"ptth_relay: {e}", file=sys.stderr)
        return 2
    relay.start()
    gevent.signal_handler(signal.SIGHUP, relay.reload_config)
    try:
        run(app_for(relay), host, port, "ptth_relay", on_stop=relay.close, gate=relay.capacity,
            on_listening=lambda: log_start(logging.getLogger("ptth_lib.relay"), config, args.config,
                                           relay.capacity.plan))
    except ListenError as e:
        print(f"ptth_relay: {e}", file=sys.stderr)
        return 1
    return 0


def serve(argv: list[str] | None = None) -> int:
    """`ptth-relay`: the relay under gunicorn with the gevent worker, as deployed."""
    args = _parse(argv, under_gunicorn=True)
    import os

    from ptth_lib.config import RELAY_CONFIG_ENV

    # Where gunicorn's hooks and workers read the config's path, and so may gunicorn_settings.py.
    os.environ[RELAY_CONFIG_ENV] = args.config

    from ptth_lib.cli import parse_bind
    from ptth_lib.config import load_relay_config
    from ptth_lib.errors import ConfigError
    from ptth_lib.extras import require_extra
    from ptth_lib.relay import gunicorn_app, gunicorn_settings

    workers = 1 if args.workers is None else args.workers
    try:
        if args.bind is not None:
            parse_bind(args.bind)
        if workers < 1:
            raise ConfigError(f"--workers {workers}: expected 1 or more")
        if args.systemd_unit:
            return _print_unit(args)
        config = load_relay_config(args.config)
        if config.redis_url is not None:
            require_extra("cluster", "redis_url (a cluster)")
    except ConfigError as e:
        print(f"ptth_relay: {e}", file=sys.stderr)
        return 2
    if workers > 1 and config.redis_url is None:
        print(gunicorn_app.many_workers_refusal(f"--workers asked for {workers} workers", "leave out --workers"),
              file=sys.stderr)
        return 2
    gunicorn_app.run(args.bind or gunicorn_settings.bind, workers, args.log_level, args.log_format)


def _print_unit(args: argparse.Namespace) -> int:
    """ptth-relay --systemd-unit: a unit running this command with --config and the other flags given."""
    import os

    from ptth_lib.commands import command_argv, print_unit
    from ptth_lib.systemd import relay_unit

    path, command = os.path.abspath(args.config), command_argv()
    given = [*(["--bind", args.bind] if args.bind else []),
             *(["--workers", str(args.workers)] if args.workers else []),
             *(["--log-level", args.log_level] if args.log_level != "INFO" else []),
             *(["--log-format", args.log_format] if args.log_format != "text" else [])]
    return print_unit(relay_unit(command, path, given), "ptth_relay", [command[-1], path])


def _print_new_scraper_key(name: str, days: int) -> int:
    from ptth_lib.relay.scraper_api import new_key_snippet

    if not 0 < len(name) <= 64 or not name.isprintable() or '"' in name or "\\" in name:
        print("ptth_relay: --new-scraper-key NAME: use 1-64 printable characters, no quotes", file=sys.stderr)
        return 2
    if not 1 <= days <= 3650:
        print("ptth_relay: --valid-days must be from 1 to 3650", file=sys.stderr)
        return 2
    key, snippet = new_key_snippet(name, days)
    print(f"New scraper API key (shown only now; the relay keeps only its hash):\n\n    {key}\n\n"
          f"Add this to the relay config; the relay picks it up within seconds:\n\n{snippet}")
    return 0


def _print_password_entry() -> int:
    from ptth_lib.errors import ConfigError
    from ptth_lib.relay.basic_auth import prompt_entry

    try:
        entry = prompt_entry()
    except ConfigError as e:
        print(f"ptth_relay: {e}", file=sys.stderr)
        return 2
    except (EOFError, KeyboardInterrupt):
        print("\nptth_relay: --hash-password: no password given; nothing was made", file=sys.stderr)
        return 2
    print("Add this entry to the server's basic_auth list in its [[servers]] table:", file=sys.stderr)
    print(f'"{entry}"')
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
