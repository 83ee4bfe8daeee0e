"""The relay's audit log: security-relevant events as JSON lines.

Events: a server came online or went offline, a backend key was rejected,
a scraper key was used or rejected, the config was reloaded or rejected.
Each is one JSON object per line, appended to the file named by the relay
config's `audit_log` (off by default); the last entries are also kept in
memory for `/frontend/audit_log`. API keys are never recorded, only
tripcodes and names.

In a cluster every worker (node) appends to its host's file: the file is
opened with O_APPEND and each line goes out in one write(), so the lines of
several processes interleave whole, never mixed. Each entry then also names
its `node`, and is handed to the cluster (`join_cluster`), which keeps the
cluster's last entries in Redis for the page (cluster/ops.py).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from ptth_lib.relay.rendezvous import format_rfc3339

logger = logging.getLogger(__name__)

# Entries shown on /frontend/audit_log.
RECENT_ENTRIES = 100

# The file's mode when the relay creates it, before the umask (as open() would).
FILE_MODE = 0o666


class AuditLog:
    """Appends events to a file (if one is set) and remembers the recent ones."""

    def __init__(self, path: str | None) -> None:
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT_ENTRIES)
        self._path: str | None = None
        self._fd: int | None = None
        self._node: Callable[[], str] | None = None
        self._share: Callable[[dict[str, Any]], None] | None = None
        self.set_path(path)

    @property
    def enabled(self) -> bool:
        return self._path is not None

    def join_cluster(self, node: Callable[[], str], share: Callable[[dict[str, Any]], None]) -> None:
        """From now on each entry names `node()` (this worker's label) and goes to `share` too."""
        self._node = node
        self._share = share

    def set_path(self, path: str | None) -> None:
        """Start writing to `path` (None: stop); used at start and on config reload."""
        if path == self._path:
            return
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._path = path
        if path is not None:
            try:
                self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
            except OSError as e:
                logger.error("cannot open audit log %s: %s; audit events are kept in memory only",
                             path, e.strerror)

    def record(self, event: str, **fields: Any) -> None:
        """Record one event; `fields` must be JSON-serialisable and hold no secrets."""
        entry = {"time": format_rfc3339(time.time()), "event": event, **fields}
        if self._node is not None:
            entry["node"] = self._node()
        self.recent.append(entry)
        if self._fd is not None:
            self._append(self._fd, (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8"))
        if self._share is not None and self._path is not None:
            self._share(entry)

    def _append(self, fd: int, line: bytes) -> None:
        """One write() of the whole line: with O_APPEND it lands whole at the end, whoever else appends."""
        try:
            written = os.write(fd, line)
            if written < len(line):  # a full disk; the rest follows, maybe after another process's line
                os.write(fd, line[written:])
        except OSError as e:
            logger.error("cannot write audit log %s: %s", self._path, e.strerror)
