"""The relay under gunicorn: the app a worker loads, and `ptth-relay`, which runs gunicorn itself.

`load_app` builds the relay in a gunicorn worker, for `gunicorn ptth_relay:app`
(with or without `-c conf/gunicorn.conf.py`) and for `ptth-relay` alike: a
config that will not load, or more workers than one without `redis_url`, stops
gunicorn with one line. `run` is `ptth-relay`: gunicorn with the gevent worker
and the settings of gunicorn_settings.py, started through gunicorn's
documented `BaseApplication`, so that no gunicorn config file is needed.
Importing this module imports gunicorn but not the relay.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

from gunicorn.app.base import BaseApplication  # type: ignore[import-untyped]

from ptth_lib.cli import LOG_FORMAT_ENV, make_handler
from ptth_lib.config import RelayConfig, load_relay_config, relay_config_path
from ptth_lib.errors import ConfigError
from ptth_lib.relay import gunicorn_settings

# gunicorn's exit code for "worker failed to boot": the master stops instead of retrying.
_WORKER_BOOT_ERROR = 3


def check_config(path: str) -> RelayConfig:
    """The relay config at `path`; if it will not load, exit 2 with one line (as every PTTH program does)."""
    try:
        return load_relay_config(path)
    except ConfigError as e:
        print(f"ptth_relay: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def many_workers_refusal(asked: str, one: str) -> str:
    """The one line that refuses more than one worker without redis_url.

    `asked` says who asked for how many ("gunicorn was asked for 4 workers");
    `one` how to run exactly one.
    """
    return (f"ptth_relay: {asked}, but without redis_url the relay keeps its state (parked listens, "
            "queued requests, bodies in flight) in one process, and a second worker would answer half "
            f"of the requests wrong: run exactly one ({one}), or set redis_url in the relay config "
            "(or PTTH_REDIS_URL) to run a cluster (CLUSTER.md)")


def load_app(path: str, workers: int | None, pool_connections: int | None) -> Any:
    """Build the relay's WSGI app from the config at `path`, in a gunicorn worker.

    `workers` is how many workers gunicorn was asked for, `pool_connections`
    its worker_connections (None if unknown). Any problem exits the worker
    with one line on stderr, which stops gunicorn.
    """
    from ptth_lib.errors import PtthError
    from ptth_lib.relay.app import create_app, relay_of
    from ptth_lib.relay.capacity import log_start, raise_open_files_limit
    from ptth_lib.wsgi import count_gunicorn_connections

    try:
        config = load_relay_config(path)
    except ConfigError as e:
        print(f"ptth_relay: {e}", file=sys.stderr, flush=True)
        sys.exit(_WORKER_BOOT_ERROR)
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
    raise_open_files_limit()  # the master raised it already (gunicorn_settings.py), unless run without it
    try:
        app = create_app(config, config_path=path, pool_connections=pool_connections)
    except PtthError as e:  # cluster mode: a Redis URL it cannot use, a Redis it cannot reach
        print(f"ptth_relay: {e}", file=sys.stderr, flush=True)
        sys.exit(_WORKER_BOOT_ERROR)
    relay = relay_of(app)
    assert relay is not None
    if not count_gunicorn_connections(relay.capacity):
        lib_log.warning("ptth_relay: connections are not counted under this gunicorn worker (use its gevent "
                        "worker, as conf/gunicorn.conf.py does): past gunicorn's own limit they wait unanswered")
    log_start(lib_log, config, path, relay.capacity.plan)
    return app



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
    print(many_workers_refusal(f"gunicorn was asked for {workers} workers", "-w 1, as conf/gunicorn.conf.py sets"),
          file=sys.stderr, flush=True)
    sys.exit(_WORKER_BOOT_ERROR)


class _RelayApplication(BaseApplication):  # type: ignore[misc]
    """gunicorn, configured by gunicorn_settings.py, $GUNICORN_CMD_ARGS and `overrides`, serving the relay."""

    def __init__(self, overrides: dict[str, Any]) -> None:
        self._overrides = overrides
        super().__init__(prog="ptth-relay")

    def load_config(self) -> None:
        # As gunicorn reads a config module: every name that is a setting, the rest ignored.
        settings = {k: v for k, v in vars(gunicorn_settings).items() if k in self.cfg.settings}
        # Then $GUNICORN_CMD_ARGS, as gunicorn reads it (e.g. --max-requests), then our own flags.
        from_env = vars(self.cfg.parser().parse_args(self.cfg.get_cmd_args_from_env()))
        settings |= {k: v for k, v in from_env.items() if v is not None and k != "args"}
        for name, value in {**settings, **self._overrides}.items():
            self.cfg.set(name, value)

    def load(self) -> Any:
        return load_app(relay_config_path(), self.cfg.workers, self.cfg.worker_connections)


def run(bind: str, workers: int, log_level: str, log_format: str) -> NoReturn:
    """Run the relay under gunicorn until it stops, then exit with gunicorn's exit code.

    The config is $PTTH_RELAY_CONFIG's (else ./ptth_relay.toml), checked
    already. `log_format` reaches the workers as $PTTH_LOG_FORMAT, as under a
    plain `gunicorn -c conf/gunicorn.conf.py`.
    """
    os.environ[LOG_FORMAT_ENV] = log_format
    _RelayApplication({"bind": [bind], "workers": workers, "loglevel": log_level.lower()}).run()
    sys.exit(0)  # gunicorn's arbiter exits by itself; this is for mypy
