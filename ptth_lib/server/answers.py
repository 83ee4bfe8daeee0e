"""Small answers that ride on the next listen (PROTOCOL.md, "Small answers ride on the next listen").

A response POST is an HTTP exchange of its own, and for a small file it
costs the relay and the server more than the file. So when the relay says it
takes answers (FEATURE_ANSWERS in its listen answers), a listen thread that
got a batch of requests does not listen again at once: it waits, at most
CARRY_WAIT_SECS, until each request of the batch is *settled*, and its next
listen carries every answer that was complete and small. A request is
settled when its responder offered its answer here, or went its own way (a
large or unsized body, a WebSocket, an error): then its POST goes out as
before, at once, and the listen does not wait for it.

The other listen thread stays parked at the relay meanwhile, so a request
arriving then is not delayed. An answer offered after its listen has left
(a slow app) is refused here and goes in its own POST: nothing waits longer
than CARRY_WAIT_SECS for a listen.

Bounds: a carrier takes answers of at most INLINE_BODY_BYTES of body each
and MAX_ANSWERS_BYTES in all (the relay's own limits); one carrier exists
per listen thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from ptth_lib.wire.envelope import MAX_ANSWERS_BYTES, InlineAnswer, answer_size

# How long a listen waits for its batch's answers before it goes without them.
# A file server's answer is ready within a millisecond or two. Longer costs
# more than it saves: under load both listens wait while requests queue at the
# relay (20 ms gave 1,389 requests/s at concurrency 32, 5 ms 1,569;
# BENCHMARKS.md); an answer later than this goes in a POST of its own.
CARRY_WAIT_SECS = 0.005


class AnswerCarrier:
    """The answers to one batch of requests, gathered for the listen that follows it."""

    def __init__(self, request_ids: Iterable[str], node: str = "") -> None:
        """`node` is the relay cluster's node the listen reached (its X-PTTH-Node), if it named one."""
        self._node = node
        self._changed = threading.Condition()
        self._unsettled = set(request_ids)
        self._answers: list[InlineAnswer] = []
        self._bytes = 0
        self._open = True

    def offer(self, answer: InlineAnswer) -> bool:
        """Carry `answer` with the next listen; False if it has gone, or is full: POST it then.

        In a relay cluster, only an answer whose request the listen's node
        holds (its id begins with the node's): another goes in a POST to its
        owner (affinity.py), which saves the cluster a hop between nodes.
        """
        size = answer_size(answer.head, len(answer.body))
        with self._changed:
            taken = (self._open and self._bytes + size <= MAX_ANSWERS_BYTES
                     and answer.request_id.startswith(self._node))
            if taken:
                self._answers.append(answer)
                self._bytes += size
            self._settle(answer.request_id)
            return taken

    def settle(self, request_id: str) -> None:
        """`request_id` is answered another way (or has failed): the listen need not wait for it."""
        with self._changed:
            self._settle(request_id)

    def take(self, wait_secs: float = CARRY_WAIT_SECS) -> list[InlineAnswer]:
        """The answers for the next listen, once every request is settled or `wait_secs` passed.

        Later offers are refused.
        """
        deadline = time.monotonic() + wait_secs
        with self._changed:
            while self._unsettled:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            self._open = False
            return self._answers

    def _settle(self, request_id: str) -> None:
        self._unsettled.discard(request_id)
        if not self._unsettled:
            self._changed.notify_all()
