"""Hot reload of the relay config: notice a saved file, apply it, keep the old one if bad.

A greenlet looks at the file's modification time, size and inode every
couple of seconds (an editor that saves by renaming changes the inode), and
`python ptth_relay.py` also reloads on SIGHUP. Under gunicorn, SIGHUP goes to
the master, which restarts the worker and with it the relay's state: save the
file instead.

In a cluster every worker runs its own watcher on its host's file, and the
relay tells its node the config it now runs (Relay.reconfigure): the node
publishes the config's hash with its heartbeat, so a worker or host left
behind shows in /metrics and in one warning (cluster/ops.py). Each worker
audits its own reloads.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import gevent

from ptth_lib.config import RelayConfig, load_relay_config
from ptth_lib.errors import ConfigError

logger = logging.getLogger(__name__)

# How often the config file is looked at; a saved change applies within this.
CHECK_INTERVAL_SECS = 2.0
# A changed file is read once it has looked the same for SETTLE_SECS (editors
# that save in place truncate first), but not waited for more than 10 times.
SETTLE_SECS = 0.3
SETTLE_MAX_CHECKS = 10


class ConfigWatcher:
    """Reloads one relay config file and hands each valid new version to `apply`."""

    def __init__(self, path: str, apply: Callable[[RelayConfig], None],
                 on_result: Callable[[bool, str], None] | None = None) -> None:
        """`on_result(ok, detail)` hears of every reload attempt (for the audit log)."""
        self.path = path
        self._apply = apply
        self._on_result = on_result or (lambda ok, detail: None)
        self._seen = self._signature()

    def run(self, interval_secs: float = CHECK_INTERVAL_SECS) -> None:
        """Forever: reload when the file changes."""
        while True:
            gevent.sleep(interval_secs)
            if self._signature() != self._seen:
                self._wait_until_settled()
                self.reload()

    def _wait_until_settled(self) -> None:
        """Wait until the file stops changing, so a save in progress is not read half-written."""
        before = self._signature()
        for _ in range(SETTLE_MAX_CHECKS):
            gevent.sleep(SETTLE_SECS)
            now = self._signature()
            if now == before:
                return
            before = now

    def reload(self) -> bool:
        """Load the file now; apply it if valid, else log why and keep the old config."""
        self._seen = self._signature()
        try:
            config = load_relay_config(self.path)
        except ConfigError as e:
            logger.error("config reload rejected, keeping the running config: %s", e)
            self._on_result(False, str(e))
            return False
        self._apply(config)
        detail = f"{len(config.servers)} servers, {len(config.scraper_keys)} scraper keys"
        logger.info("config reloaded from %s: %s", self.path, detail)
        self._on_result(True, detail)
        return True

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino
