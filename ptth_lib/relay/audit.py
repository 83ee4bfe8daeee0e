"""The relay's audit log: security-relevant events as JSON lines.

Events: a server came online or went offline, a backend key was rejected,
a scraper key was used or rejected, the config was reloaded or rejected.
Each is one JSON object per line, appended to the file named by the relay
config's `audit_log` (off by default); the last entries are also kept in
memory for `/frontend/audit_log`. API keys are never recorded, only
tripcodes and names.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from typing import Any, TextIO

from ptth_lib.relay.rendezvous import format_rfc3339

logger = logging.getLogger(__name__)

# Entries shown on /frontend/audit_log.
RECENT_ENTRIES = 100


class AuditLog:
    """Appends events to a file (if one is set) and remembers the recent ones."""

    def __init__(self, path: str | None) -> None:
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT_ENTRIES)
        self._path: str | None = None
        self._file: TextIO | None = None
        self.set_path(path)

    @property
    def enabled(self) -> bool:
        return self._path is not None

    def set_path(self, path: str | None) -> None:
        """Start writing to `path` (None: stop); used at start and on config reload."""
        if path == self._path:
            return
        if self._file is not None:
            self._file.close()
            self._file = None
        self._path = path
        if path is not None:
            try:
                self._file = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - kept open
            except OSError as e:
                logger.error("cannot open audit log %s: %s; audit events are kept in memory only",
                             path, e.strerror)

    def record(self, event: str, **fields: Any) -> None:
        """Record one event; `fields` must be JSON-serialisable and hold no secrets."""
        entry = {"time": format_rfc3339(time.time()), "event": event, **fields}
        self.recent.append(entry)
        if self._file is not None:
            try:
                self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")
            except OSError as e:
                logger.error("cannot write audit log %s: %s", self._path, e.strerror)
