"""Settling in batches: what a node owned is over, and Redis's counts must know.

A request or forwarded connection that ends frees its places in Redis (its
client's share, the server's unanswered count, the connection counters) with
a SETTLE (store.py). Under load many end between two round trips, so one
greenlet per node settles whatever has ended since its last call in one
SETTLE: one round trip for many ids, and none on the path of the request
that ended.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import gevent
import gevent.event

from ptth_lib.relay.cluster.store import ClusterUnavailableError, Store

logger = logging.getLogger(__name__)

# Ids settled in one SETTLE.
SETTLE_BATCH = 256
# Ids waiting for their SETTLE while Redis is away: past this, the oldest are dropped
# (their places in Redis's counts then wait for the sweep after this node stops).
MAX_UNSETTLED = 100_000
# After a Redis error, the next try.
RETRY_SECS = 1.0


class Settler:
    """The ids one node owned that have ended, settled in batches by `run`."""

    def __init__(self, store: Store, node_id: Callable[[], str]) -> None:
        """`node_id()` is the node's id now (it may change when the node registers again)."""
        self._store = store
        self._node_id = node_id
        self._ended: list[str] = []
        self._ready = gevent.event.Event()

    def add(self, owned_id: str) -> None:
        """`owned_id` (a request or connection of this node) is over: settle it soon."""
        if len(self._ended) >= MAX_UNSETTLED:
            logger.warning("%d ended requests and connections not settled in Redis; dropping the oldest",
                           len(self._ended))
            del self._ended[: MAX_UNSETTLED // 2]
        self._ended.append(owned_id)
        self._ready.set()

    def run(self) -> None:
        """Forever: settle what has ended, many ids in one round trip when many end together."""
        while True:
            self._ready.wait()
            self._ready.clear()
            while self._ended:
                batch, self._ended = self._ended[:SETTLE_BATCH], self._ended[SETTLE_BATCH:]
                try:
                    self._store.settle(self._node_id(), ended=batch)
                except ClusterUnavailableError:
                    self._ended[:0] = batch  # tried again when Redis is back
                    gevent.sleep(RETRY_SECS)
