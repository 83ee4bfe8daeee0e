"""SessionPool (ptth_lib/server/affinity.py): a response POST goes on a connection that reaches its owner."""

from __future__ import annotations

import requests

from ptth_lib.server.affinity import MAX_NODE_CHARS, SessionPool


class _Made:
    """Counts the Sessions a pool had to make (real ones: they open nothing until used)."""

    def __init__(self) -> None:
        self.sessions: list[requests.Session] = []

    def __call__(self) -> requests.Session:
        self.sessions.append(requests.Session())
        return self.sessions[-1]


def test_a_session_that_reached_the_owner_is_taken_for_its_requests() -> None:
    made = _Made()
    pool = SessionPool(made, most_idle=8)
    a, b = pool.take("AAAAAAAAx1"), pool.take("AAAAAAAAx2")
    assert len(made.sessions) == 2  # nothing idle yet: new ones
    pool.give_back(a, "AAAAAAAA")
    pool.give_back(b, "BBBBBBBB")
    assert pool.take("BBBBBBBBr1") is b
    assert pool.take("AAAAAAAAr2") is a
    assert pool.reached_owner == 2


def test_without_one_for_the_owner_the_node_with_most_idle_gives_one_up() -> None:
    pool = SessionPool(_Made(), most_idle=8)
    sessions = [pool.take(f"r{i}") for i in range(4)]
    for session, node in zip(sessions, ["AAAAAAAA", "BBBBBBBB", "BBBBBBBB", "CCCCCCCC"], strict=True):
        pool.give_back(session, node)
    spare = pool.take("DDDDDDDDr1")
    assert spare in sessions[1:3]  # B has two idle; A and C keep their only one
    assert pool.reached_owner == 0


def test_a_relay_that_names_no_node_gets_a_plain_pool() -> None:
    made = _Made()
    pool = SessionPool(made, most_idle=2)
    first = pool.take("anyid")
    pool.give_back(first, None)
    assert pool.take("anyid") is first  # reused, never matched to an owner
    pool.give_back(first, "x" * (MAX_NODE_CHARS + 1))  # not a node name a relay sends: counts as none
    assert pool.take("x" * (MAX_NODE_CHARS + 5)) is first
    assert pool.reached_owner == 0


def test_idle_sessions_are_bounded_and_the_longest_idle_closed() -> None:
    made = _Made()
    pool = SessionPool(made, most_idle=2)
    sessions = [pool.take(f"r{i}") for i in range(3)]
    closed: list[requests.Session] = []
    for s in sessions:
        s.close = lambda s=s: closed.append(s)  # type: ignore[method-assign]
        pool.give_back(s, "AAAAAAAA")
    assert closed == [sessions[0]]
    assert pool.take("AAAAAAAAr") is sessions[2]  # the most recently used of the owner's
    pool.close()
    assert closed == [sessions[0], sessions[1]]
