"""Fair shares: how many requests one client address has in flight at one server.

A client address (trust.fairness_key: an IPv4 address or an IPv6 /64) may
have `requests_per_address` requests in flight at one server; more wait
their turn here, so that a few clients cannot hold every thread of a server
(README, "Security"). The rendezvous takes a share for each request it
queues and gives it back when it forgets the request.

Pure gevent, no Flask and no sockets. A share that nobody holds or waits
for is dropped, so the table holds only addresses with requests in flight.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import gevent.event

from ptth_lib.errors import TooManyFromAddressError

# How long a client's request may wait for its turn while its address has
# `requests_per_address` requests in flight at the server (a client that hangs
# up meanwhile stops waiting at once), and how many may wait so per address.
TURN_WAIT_SECS = 300.0
MAX_WAITING_PER_ADDRESS = 256


@dataclass(eq=False)
class Share:
    """What one client address has in flight at one server, and who waits for a turn."""

    key: tuple[str, str]  # (server name, fairness key)
    held: int = 0
    waiting: int = 0
    freed: gevent.event.Event | None = None  # made when someone first waits: most never do


class FairShares:
    """Every (server, client address) with requests in flight."""

    def __init__(self, per_address: Callable[[], int]) -> None:
        """`per_address()` is the config's requests_per_address in force (it may be reloaded)."""
        self._per_address = per_address
        self._shares: dict[tuple[str, str], Share] = {}

    def __len__(self) -> int:
        return len(self._shares)

    def must_wait(self, key: tuple[str, str]) -> bool:
        """Tell whether one more request under `key` would wait for its turn now."""
        share = self._shares.get(key)
        return share is not None and share.held >= self._per_address()

    def take(self, key: tuple[str, str]) -> Share:
        """Count one more request under `key`, waiting for a turn while it has its fill in flight.

        Raises TooManyFromAddressError (503) when too many already wait, or
        when no turn came within TURN_WAIT_SECS.
        """
        share = self._shares.get(key)
        if share is None:
            share = self._shares[key] = Share(key)
        if share.held >= self._per_address() and share.waiting >= MAX_WAITING_PER_ADDRESS:
            raise TooManyFromAddressError(f"your address already has {MAX_WAITING_PER_ADDRESS} requests waiting "
                                          f"for server {key[0]!r}; try again later")
        deadline = time.monotonic() + TURN_WAIT_SECS
        while share.held >= self._per_address():
            left = deadline - time.monotonic()
            share.waiting += 1
            if share.freed is None:
                share.freed = gevent.event.Event()
            share.freed.clear()
            try:
                freed = left > 0 and share.freed.wait(left)
            finally:
                share.waiting -= 1
            if not freed:
                self._drop_if_idle(share)
                raise TooManyFromAddressError(
                    f"your address already has {self._per_address()} requests in flight at "
                    f"server {key[0]!r}; try again when they finish")
        share.held += 1
        return share

    def release(self, share: Share) -> None:
        """One request under this share is over: the next waiting one may go."""
        share.held -= 1
        if share.freed is not None:
            share.freed.set()
        self._drop_if_idle(share)

    def _drop_if_idle(self, share: Share) -> None:
        if share.held <= 0 and share.waiting == 0 and self._shares.get(share.key) is share:
            del self._shares[share.key]
