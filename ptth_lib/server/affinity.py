"""Kept-alive connections for response POSTs, each remembered with the relay node it reaches.

A relay cluster runs many workers behind one address, and a connection
stays with the worker that accepted it. The worker that holds a request's
client owns the request, and its id begins with that worker's node id; the
relay names the answering node in X-PTTH-Node (PROTOCOL.md, "Relay
clusters"). A POST that lands on another node is carried to the owner over
a link between nodes, which costs both of them CPU. So `SessionPool` keeps
its idle Sessions (one connection each) by the node their last answer named,
and gives a response the one that reaches its owner when it has one.

A single-process relay names no node: every Session is alike and this is a
plain pool. Nothing depends on the guess: a POST on any connection is
answered the same.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import requests

# Longer node names than this are not a relay's: such an answer counts as naming none.
MAX_NODE_CHARS = 16


class SessionPool:
    """Idle Sessions for response POSTs, at most `most_idle` kept; each taken by one thread at a time."""

    def __init__(self, new_session: Callable[[], requests.Session], most_idle: int) -> None:
        self._new_session = new_session
        self._most_idle = most_idle
        self._lock = threading.Lock()
        # Per node their last answers named ("" for none), the idle Sessions, the longest idle first.
        self._idle: dict[str, list[requests.Session]] = {}
        self._count = 0
        self.reached_owner = 0  # taken for a request whose owner it reached last time (for the logs and tests)

    def take(self, request_id: str) -> requests.Session:
        """An idle Session that reached `request_id`'s owner node last, else another one, else a new one.

        Of the others, the most recently used of the node that has the most
        idle ones goes: the nodes with few keep theirs for their own requests.
        """
        with self._lock:
            owner = next((node for node in self._idle if node and request_id.startswith(node)), None)
            if owner is not None:
                self.reached_owner += 1
                return self._pop(owner, -1)
            if self._idle:
                return self._pop(self._fullest(), -1)
        return self._new_session()

    def new(self) -> requests.Session:
        """A Session on a new connection (to try again after a kept-alive one ended unanswered)."""
        return self._new_session()

    def give_back(self, session: requests.Session, node: str | None) -> None:
        """`session`'s POST ended cleanly; `node` is what its answer named (None or "" for no node)."""
        node = node if node and len(node) <= MAX_NODE_CHARS else ""
        with self._lock:
            self._idle.setdefault(node, []).append(session)
            self._count += 1
            if self._count <= self._most_idle:
                return
            oldest = self._pop(self._fullest(), 0)
        oldest.close()

    def close(self) -> None:
        """Close every idle Session."""
        with self._lock:
            idle, self._idle, self._count = self._idle, {}, 0
        for sessions in idle.values():
            for session in sessions:
                session.close()

    def _fullest(self) -> str:
        """The node with the most idle Sessions (there is one); the lock is held."""
        return max(self._idle, key=lambda node: len(self._idle[node]))

    def _pop(self, node: str, index: int) -> requests.Session:
        """Take node's idle Session at `index` (0 the longest idle, -1 the latest); the lock is held."""
        sessions = self._idle[node]
        session = sessions.pop(index)
        if not sessions:
            del self._idle[node]
        self._count -= 1
        return session
