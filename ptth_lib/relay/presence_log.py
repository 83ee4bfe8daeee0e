"""Servers coming online and going offline, as the relay's log says it: readable with a fleet.

With a few servers each change is a line ("server NAME is online", and
"server NAME says it is leaving" when one stops). A fleet (a device in every
shop) restarting its relay, or all stopping for an update, makes thousands
of such lines in a minute, which hide everything else. So past
FEW_PER_MINUTE of them in a minute, the names go to DEBUG and the minute
ends with one line of counts. The audit log still gets every change
(rendezvous.py `_on_event`).

Pure: the clock is given, and `tick` is called by the loops that watch
presence (rendezvous.py, cluster/node.py) once a second.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

# Changes logged by name in a minute; past them, counts once a minute.
FEW_PER_MINUTE = 24
WINDOW_SECS = 60.0


class PresenceLog:
    """Logs presence changes by name while they are few, in counts while they are many."""

    def __init__(self, log: logging.Logger, few: int = FEW_PER_MINUTE, window_secs: float = WINDOW_SECS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = log
        self._few = few
        self._window_secs = window_secs
        self._clock = clock
        self._started = clock()
        self._seen = 0  # changes in this window
        self._held = {True: 0, False: 0}  # of those, not logged by name: came online, went offline
        self._leaving = 0  # servers that said they were leaving, not logged by name

    def record(self, name: str, online: bool) -> None:
        """Server `name` came online (True) or went offline."""
        self.tick()
        self._seen += 1
        state = "online" if online else "offline"
        if self._seen <= self._few:
            self._log.info("server %s is %s", name, state)
            return
        self._held[online] += 1
        self._log.debug("server %s is %s", name, state)

    def record_leaving(self, name: str) -> None:
        """Server `name` said it is leaving (it goes offline a moment later, unless another process listens)."""
        self.tick()
        self._seen += 1
        if self._seen <= self._few:
            self._log.info("server %s says it is leaving", name)
            return
        self._leaving += 1
        self._log.debug("server %s says it is leaving", name)

    def tick(self) -> None:
        """End the window if it is over: one line for the changes it did not log by name."""
        now = self._clock()
        if now - self._started < self._window_secs:
            return
        came, went = self._held[True], self._held[False]
        if came or went or self._leaving:
            leaving = f" ({self._leaving} said they were leaving)" if self._leaving else ""
            self._log.info("%d more servers came online and %d went offline%s in the last %.0f s "
                           "(more than %d changes a minute: names at DEBUG)",
                           came, went, leaving, now - self._started, self._few)
        self._started, self._seen, self._leaving = now, 0, 0
        self._held = {True: 0, False: 0}
