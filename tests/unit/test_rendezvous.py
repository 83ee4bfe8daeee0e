"""The rendezvous driven directly, with gevent and no sockets: leases, bounds, shares, leaving.

rendezvous.py is pure gevent, so its rules are tested here in milliseconds;
test_nginx.py and test_server_lifecycle.py check the same behaviour end to
end through the real relay, server and nginx.
"""

from __future__ import annotations

from collections.abc import Iterator

import gevent
import pytest

from ptth_lib.config import parse_relay_config
from ptth_lib.errors import BadGatewayError, ForbiddenError, TooManyFromAddressError
from ptth_lib.relay import rendezvous, shares
from ptth_lib.relay.rendezvous import Rendezvous

CODE = "Wdl81upnoMFdZSIgCWaqBNHtONdfPFWqKDQ2ahrlVw0="


@pytest.fixture
def rv() -> Iterator[Rendezvous]:
    config = parse_relay_config({"servers": [{"name": "s", "tripcode": CODE}], "request_timeout_secs": 5,
                                 "requests_per_address": 2}, "test")
    r = Rendezvous(config)
    r.servers["s"].touch()  # seen just now: online
    watcher = gevent.spawn(r.watch_presence, 0.05)
    yield r
    watcher.kill()


def submit(rv: Rendezvous, n: int, client: str = "") -> list[rendezvous.PendingRequest]:
    return [rv.submit("s", "GET", f"/{i}", {}, client=client) for i in range(n)]


def test_an_acknowledged_batch_stays_with_its_server(rv: Rendezvous) -> None:
    sent = submit(rv, 3)
    batch, lease = rv.listen(rv.servers["s"], 1, lease=True)
    assert batch == sent and lease is not None and lease.id in rv.leases
    rv.ack(rv.servers["s"], lease.id)
    assert rv.expire_lease(lease) == 0 and rv.servers["s"].queue.empty()


def test_an_unacknowledged_batch_goes_back_except_what_was_answered(rv: Rendezvous) -> None:
    sent = submit(rv, 3)
    _, lease = rv.listen(rv.servers["s"], 1, lease=True)
    assert lease is not None
    sent[0].answered = True  # as claim() marks the one its server answers
    assert rv.expire_lease(lease) == 2
    again, _ = rv.listen(rv.servers["s"], 1, lease=True)
    assert [p.request.id for p in again] == [p.request.id for p in sent[1:]]


def test_an_acknowledgement_from_another_server_counts_for_nothing(rv: Rendezvous) -> None:
    submit(rv, 1)
    _, lease = rv.listen(rv.servers["s"], 1, lease=True)
    assert lease is not None
    other = rendezvous.ServerState(rv.servers["s"].registered)
    rv.ack(other, lease.id)
    assert rv.expire_lease(lease) == 1


def test_a_listen_takes_no_more_than_it_asks_for(rv: Rendezvous) -> None:
    submit(rv, 5)
    batch, _ = rv.listen(rv.servers["s"], 1, max_requests=2)
    assert len(batch) == 2 and rv.servers["s"].queue.qsize() == 3


def test_a_listen_asking_for_none_only_says_the_server_is_there(rv: Rendezvous) -> None:
    submit(rv, 1)
    state = rv.servers["s"]
    state.last_seen_monotonic = 0.0
    batch, lease = rv.listen(state, 30, max_requests=0)
    assert (batch, lease) == ([], None) and state.is_online() and state.queue.qsize() == 1


def test_a_server_that_never_answers_is_handed_no_more(rv: Rendezvous, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rendezvous, "MAX_UNANSWERED_PER_SERVER", 3)
    sent = submit(rv, 5)
    state = rv.servers["s"]
    assert len(rv.listen(state, 1)[0]) == 3
    assert rv.listen(state, 0.2)[0] == []  # two still queued, but it has its fill unanswered
    waiting = gevent.spawn(rv.listen, state, 5)
    gevent.sleep(0.05)
    rv.forget(sent[0])  # its client gave up: room for one more
    assert [p.request.id for p in waiting.get(timeout=2)[0]] == [sent[3].request.id]


def test_requests_go_to_the_parked_listens_in_turn(rv: Rendezvous) -> None:
    """Oldest first: processes sharing a name each get their part (the one that answered re-polls last)."""
    state = rv.servers["s"]
    first = gevent.spawn(rv.listen, state, 5)
    gevent.sleep(0.01)
    second = gevent.spawn(rv.listen, state, 5)
    gevent.sleep(0.01)
    one = submit(rv, 1)
    assert first.get(timeout=2)[0] == one and not second.ready()
    again = gevent.spawn(rv.listen, state, 5)  # the first process re-polls
    gevent.sleep(0.01)
    two = submit(rv, 1)
    assert second.get(timeout=2)[0] == two and not again.ready()
    again.kill()


def test_a_request_in_the_hand_of_an_ending_listen_is_handed_on(rv: Rendezvous) -> None:
    state = rv.servers["s"]
    first = gevent.spawn(rv.listen, state, 5)
    gevent.sleep(0.01)
    second = gevent.spawn(rv.listen, state, 5)
    gevent.sleep(0.01)
    first.kill(rendezvous.ListenEndedError, block=False)  # ended, but not run yet...
    sent = submit(rv, 1)  # ...when the request is handed to it, the oldest
    assert first.get(timeout=2) == ([], None)
    assert second.get(timeout=2)[0] == sent


def test_one_address_waits_its_turn_beyond_its_share(rv: Rendezvous) -> None:
    first = submit(rv, 2, client="203.0.113.7")
    assert rv.must_wait_turn("s", "203.0.113.7") and not rv.must_wait_turn("s", "198.51.100.1")
    third = gevent.spawn(rv.submit, "s", "GET", "/third", {}, client="203.0.113.7")
    other = rv.submit("s", "GET", "/other", {}, client="198.51.100.1")  # another address is not held up
    gevent.sleep(0.1)
    assert not third.ready() and other.request.uri == "/other"
    rv.forget(first[0])
    assert third.get(timeout=2).request.uri == "/third"
    for p in (first[1], third.value, other):
        rv.forget(p)
    assert len(rv.shares) == 0  # nothing left behind


def test_a_turn_waited_for_too_long_is_a_503(rv: Rendezvous, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shares, "TURN_WAIT_SECS", 0.2)
    submit(rv, 2, client="203.0.113.7")
    with pytest.raises(TooManyFromAddressError) as e:
        rv.submit("s", "GET", "/late", {}, client="203.0.113.7")
    assert e.value.status == 503


def test_requests_for_a_server_that_left_fail_at_once(rv: Rendezvous, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rendezvous, "LEAVE_GRACE_SECS", 0.1)
    state = rv.servers["s"]
    unacknowledged = submit(rv, 1)
    _, lease = rv.listen(state, 1, lease=True)
    assert lease is not None and rv.expire_lease(lease) == 1  # never reached the server: back in the queue
    queued = submit(rv, 1)
    rv.leave(state)
    for p in (*queued, *unacknowledged):
        with pytest.raises(BadGatewayError, match="did not pick up the request: it went offline"):
            gevent.with_timeout(3, rv.wait_for_head, p)
    assert not state.is_online()


def test_a_request_that_may_have_reached_a_server_is_left_to_time_out(rv: Rendezvous,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that does not acknowledge: after its listen's connection was lost, it may still answer."""
    monkeypatch.setattr(rendezvous, "LEAVE_GRACE_SECS", 0.1)
    state = rv.servers["s"]
    sent = submit(rv, 1)
    batch, _ = rv.listen(state, 1)
    assert batch == sent and rv.requeue(batch) == 1
    rv.leave(state)
    gevent.sleep(0.5)
    assert list(state.queue.queue) == sent and not sent[0].head_ready.is_set()


def test_a_listen_ended_by_leaving_does_not_count_as_seen(rv: Rendezvous,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rendezvous, "LEAVE_GRACE_SECS", 0.1)
    state = rv.servers["s"]
    parked = gevent.spawn(rv.listen, state, 30)
    gevent.sleep(0.05)
    rv.leave(state)
    assert parked.get(timeout=2) == ([], None)
    gevent.sleep(0.2)
    assert not state.is_online()


def test_unregistered_offers_are_all_kept_and_bounded(rv: Rendezvous) -> None:
    for i in range(rendezvous.MAX_UNREGISTERED_SHOWN + 10):
        with pytest.raises(ForbiddenError):
            rv.authenticate("ghost", f"a-key-long-enough-to-pass-{i}", f"192.0.2.{i % 7}")
    assert len(rv.unregistered) == rendezvous.MAX_UNREGISTERED_SHOWN
    assert len({code for _, code, _ in rv.unregistered}) == rendezvous.MAX_UNREGISTERED_SHOWN
