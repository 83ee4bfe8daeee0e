"""The server's spare listens: parked at the relay while it has work, resting while it is idle.

ptth_server keeps LISTENS_IN_FLIGHT listens parked (loop.py), so that a
request arriving while one listen is on its way back finds another waiting.
That matters under load; for an idle server it only doubles what it costs
the relay, which a fleet multiplies by thousands: each parked listen is a
connection, a file descriptor and about 20 KiB there, and a re-listen every
listen timeout (BENCHMARKS.md, idle servers). So once a server has had no
request for IDLE_AFTER_SECS, every listen but the first rests after its
next empty answer (204), and the first listen's next batch wakes them. A
request arriving while only one listen is parked is taken as quickly; only a
second one arriving in the same instant waits for a round trip.
"""

from __future__ import annotations

import threading
import time

# A server with no request for this long counts as idle: its spare listens rest.
# Much longer than the gaps between a person's clicks, much shorter than the
# hours a device in a fleet may go without a visitor.
IDLE_AFTER_SECS = 60.0


class SpareListens:
    """Tells the listen threads beyond the first when to rest and wakes them when work comes."""

    def __init__(self, stop: threading.Event, idle_after_secs: float = IDLE_AFTER_SECS) -> None:
        self._stop = stop
        self._idle_after_secs = idle_after_secs
        self._busy = threading.Condition()
        self._last_work = time.monotonic()

    def work_came(self) -> None:
        """A listen brought requests: the server is busy, every listen is wanted."""
        with self._busy:
            self._last_work = time.monotonic()
            self._busy.notify_all()

    def rest_if_idle(self, index: int) -> None:
        """Called by listen thread `index` after an empty answer: the spares rest while the server is idle."""
        if index == 0:
            return
        with self._busy:
            if time.monotonic() - self._last_work < self._idle_after_secs:
                return
            rested_since = self._last_work
            while self._last_work == rested_since and not self._stop.is_set():
                self._busy.wait(1.0)  # (a stop sets no condition: look at it now and then)
