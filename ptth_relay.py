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
import signal
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from ptth_lib.config import RelayConfig
    from ptth_lib.relay.capacity import CapacityPlan

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
    from ptth_lib.cli import LOG_FORMAT_ENV, make_handler
    from ptth_lib.config import load_relay_config
    from ptth_lib.errors import ConfigError, PtthError
    from ptth_lib.relay.app import create_app, relay_of
    from ptth_lib.relay.capacity import raise_open_files_limit
    from ptth_lib.wsgi import (
        count_gunicorn_connections,
        gunicorn_worker_connections,
        gunicorn_workers,
    )

    path = os.environ.get(CONFIG_ENV, DEFAULT_CONFIG)
    try:
        config = load_relay_config(path)
    except ConfigError as e:
        print(f"ptth_relay: {e}", file=sys.stderr, flush=True)
        sys.exit(3)  # gunicorn's "worker failed to boot": the master stops instead of retrying
    workers = gunicorn_workers()
    if workers is not None and workers > 1 and config.redis_url is None:
        _refuse_many_workers(workers)
    # The relay's own lines go through gunicorn's error log, or as JSON if asked.
    gunicorn_log = logging.getLogger("gunicorn.error")
    lib_log = logging.getLogger("ptth_lib")
    if not lib_log.handlers:
        if os.environ.get(LOG_FORMAT_ENV, "").lower() == "json":
            lib_log.handlers = [make_handler("json")]
        else:
            lib_log.handlers = gunicorn_log.handlers
        lib_log.setLevel(gunicorn_log.level)
        lib_log.propagate = False
    raise_open_files_limit()  # the master raised it already (conf/gunicorn.conf.py), unless run without it
    try:
        app = create_app(config, config_path=path, pool_connections=gunicorn_worker_connections())
    except PtthError as e:  # cluster mode: a Redis URL it cannot use, a Redis it cannot reach
        print(f"ptth_relay: {e}", file=sys.stderr, flush=True)
        sys.exit(3)
    relay = relay_of(app)
    assert relay is not None
    if not count_gunicorn_connections(relay.capacity):
        lib_log.warning("ptth_relay: connections are not counted under this gunicorn worker (use its gevent "
                        "worker, as conf/gunicorn.conf.py does): past gunicorn's own limit they wait unanswered")
    _log_start(lib_log, config, path, relay.capacity.plan)
    return app


def _log_start(log: logging.Logger, config: RelayConfig, path: str, plan: CapacityPlan) -> None:
    """The start line: servers registered, and how many connections the relay holds (and why)."""
    log.info("ptth_relay: %d servers registered (config %s); holds %d connections (%s)", len(config.servers),
             path, plan.max_connections, plan.why)
    if plan.warning:
        log.warning("ptth_relay: %s: %s", plan.why, plan.warning)


def _refuse_many_workers(workers: int) -> NoReturn:
    """Stop gunicorn with one line: it was asked for `workers` > 1.

    Every worker gets here. The first to create a marker file named after
    their master says why and exits as a worker that failed to boot, which
    makes the master stop; the others exit quietly with 0 (a second failed
    boot while the master stops makes it print a traceback; until the first
    one's exit is seen, the master may start a replacement or two, which exit
    the same way). The marker stays: a 0-byte file in the temporary folder.
    """
    marker = Path(tempfile.gettempdir()) / f"ptth_relay-{os.getppid()}-refused"
    try:
        marker.touch(exist_ok=False)
    except FileExistsError:
        os._exit(0)  # a sibling says it; a clean exit makes no second "failed to boot"
    except OSError:
        pass  # no marker here: each worker says it
    print(f"ptth_relay: gunicorn was asked for {workers} workers, but without redis_url the relay keeps its "
          "state (parked listens, queued requests, bodies in flight) in one process, and a second worker "
          "would answer half of the requests wrong: run exactly one (-w 1, as conf/gunicorn.conf.py sets), "
          "or set redis_url in the relay config (or PTTH_REDIS_URL) to run a cluster (CLUSTER.md)",
          file=sys.stderr, flush=True)
    sys.exit(3)  # gunicorn's "worker failed to boot": the master stops instead of retrying


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ptth_relay.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.environ.get(CONFIG_ENV, DEFAULT_CONFIG),
                        help=f"relay config file (default: ${CONFIG_ENV} or {DEFAULT_CONFIG})")
    parser.add_argument("--bind", default=DEFAULT_BIND, help=f"HOST:PORT to listen on (default {DEFAULT_BIND})")
    parser.add_argument("--new-scraper-key", metavar="NAME",
                        help="print a new scraper API key and the [[scraper_keys]] snippet for it, and exit")
    parser.add_argument("--valid-days", type=int, default=30, metavar="N",
                        help="with --new-scraper-key: days until the key expires (default 30)")
    parser.add_argument("--hash-password", action="store_true",
                        help="ask for a user name and password and print a basic_auth entry for them, and exit")
    from ptth_lib.cli import add_logging_flags

    add_logging_flags(parser)
    args = parser.parse_args(argv)
    if args.new_scraper_key is not None:
        return _print_new_scraper_key(args.new_scraper_key, args.valid_days)
    if args.hash_password:
        return _print_password_entry()

    from gevent import monkey

    monkey.patch_all()

    import gevent

    from ptth_lib.cli import parse_bind, setup_logging
    from ptth_lib.config import load_relay_config
    from ptth_lib.errors import ConfigError
    from ptth_lib.relay.app import app_for
    from ptth_lib.relay.capacity import raise_open_files_limit
    from ptth_lib.relay.relay import Relay
    from ptth_lib.wsgi import ListenError, run

    setup_logging(args.log_level, args.log_format)
    try:
        host, port = parse_bind(args.bind)
        config = load_relay_config(args.config)
    except ConfigError as e:
        print(f"ptth_relay: {e}", file=sys.stderr)
        return 2
    raise_open_files_limit()
    relay = Relay(config, config_path=args.config)
    relay.start()
    gevent.signal_handler(signal.SIGHUP, relay.reload_config)
    try:
        run(app_for(relay), host, port, "ptth_relay", on_stop=relay.close, gate=relay.capacity,
            on_listening=lambda: _log_start(logging.getLogger("ptth_lib.relay"), config, args.config,
                                            relay.capacity.plan))
    except ListenError as e:
        print(f"ptth_relay: {e}", file=sys.stderr)
        return 1
    return 0


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
