"""The cluster's Redis boundary (ptth_lib/relay/cluster/store.py) and its scripts on a real redis-server.

Debian's redis-server runs on a free loopback port with no persistence, in
the test's temporary folder; the tests drive `Store` directly: every answer
of OFFER, PARK, UNPARK and WITHDRAW, the atomicity of a request and a
listen arriving together, Redis paused (SIGSTOP) and restarted, and a
password that never shows in a log line or an error.
"""

from __future__ import annotations

import logging
import random
import shutil
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
from procs import refusing_port
from redis_harness import (
    NODES,
    RedisServer,
    S,
    empty_client,
    head,
    join,
    node_info,
    online,
    redis_now_ms,
    serve_redis,
    start_redis,
    store_on,
)

from ptth_lib.relay.cluster import store as store_module
from ptth_lib.relay.cluster.store import (
    ClusterUnavailableError,
    InboxHead,
    OfferResult,
    ParkResult,
    QueuedHead,
    Store,
)
from ptth_lib.relay.rendezvous import (
    MAX_BATCH_BYTES,
    MAX_LISTENERS_PER_SERVER,
    MAX_QUEUED_PER_SERVER,
    OFFLINE_AFTER_SECS,
)
from ptth_lib.wire.envelope import MAX_REQUEST_HEAD_BYTES

pytestmark = [pytest.mark.process,
              pytest.mark.skipif(shutil.which("redis-server") is None,
                                 reason="needs Debian's redis-server (make debian-deps installs it)")]

PASSWORD = "s3cret-Pw-7"
# A call to a paused Redis fails after REDIS_COMMAND_TIMEOUT_SECS; this much more is slack
# for a busy 2-core machine.
FAIL_SLACK_SECS = 1.5

redis_server = pytest.fixture(scope="module")(serve_redis)
raw = pytest.fixture(empty_client)
store = pytest.fixture(store_on)


def test_a_unix_socket_url_works_like_a_tcp_one(store: Store, redis_server: RedisServer) -> None:
    over_unix = Store.from_url(f"unix://{redis_server.socket}?db=0")
    try:
        online(over_unix)
        assert store.offer(S, head("R1")) == OfferResult("queued")  # the same Redis, seen through TCP
        assert over_unix.withdraw(S, "R1") is True
    finally:
        over_unix.close()


# ---- each answer of each script ------------------------------------------------


def test_offer_to_a_server_never_seen_answers_offline(store: Store, raw: redis.Redis) -> None:
    assert store.offer(S, head("R1")) == OfferResult("offline")
    assert raw.llen(f"ptth:q:{S}") == 0


def test_offer_answers_offline_once_the_last_listen_is_old(store: Store, raw: redis.Redis) -> None:
    now = redis_now_ms(raw)
    raw.hset(f"ptth:srv:{S}", "seen", now - round(OFFLINE_AFTER_SECS * 1000) - 100)
    assert store.offer(S, head("R1")) == OfferResult("offline")
    raw.hset(f"ptth:srv:{S}", "seen", now - 1000)
    assert store.offer(S, head("R2")) == OfferResult("queued")


def test_after_a_leave_the_name_stays_online_only_for_its_grace(store: Store, raw: redis.Redis) -> None:
    now = redis_now_ms(raw)
    raw.hset(f"ptth:srv:{S}", mapping={"seen": now - 1500, "left": now - 1200})  # grace (1 s) over
    assert store.offer(S, head("R1")) == OfferResult("offline")
    raw.hset(f"ptth:srv:{S}", mapping={"seen": now - 500, "left": now - 400})
    assert store.offer(S, head("R2")) == OfferResult("queued")
    raw.hset(f"ptth:srv:{S}", mapping={"seen": now - 100, "left": now - 1500})  # a listen after the leave
    assert store.offer(S, head("R3")) == OfferResult("queued")


def test_offer_hands_the_head_to_the_oldest_parked_listen(store: Store, raw: redis.Redis) -> None:
    assert store.park(S, "NODEAAAA", 10) == ParkResult("parked")
    assert store.park(S, "NODEBBBB", 10) == ParkResult("parked")
    first, second = head("R1", 300), head("R2")
    assert store.offer(S, first) == OfferResult("handed", "NODEAAAA")
    assert store.offer(S, second) == OfferResult("handed", "NODEBBBB")
    assert store.take_inbox("NODEAAAA") == [InboxHead(S, first)]
    assert store.take_inbox("NODEBBBB") == [InboxHead(S, second)]
    assert store.take_inbox("NODEBBBB") == []
    # No listen is parked now, but one was a moment ago: the server is online, the head queues.
    assert store.offer(S, head("R3")) == OfferResult("queued")
    assert raw.llen(f"ptth:parked:{S}") == 0


def test_offer_queues_up_to_the_bound_then_answers_full(store: Store, raw: redis.Redis) -> None:
    online(store)
    for i in range(MAX_QUEUED_PER_SERVER):
        assert store.offer(S, head(f"R{i}")) == OfferResult("queued")
    assert store.offer(S, head("ONEMORE")) == OfferResult("full")
    assert store.offer_again(S, head("R0")) == OfferResult("full")  # handed back, but no room
    assert raw.llen(f"ptth:q:{S}") == MAX_QUEUED_PER_SERVER


def test_park_takes_queued_heads_oldest_first_up_to_max_requests(store: Store, raw: redis.Redis) -> None:
    online(store)
    heads = [head(f"R{i}") for i in range(5)]
    for h in heads:
        assert store.offer(S, h) == OfferResult("queued")
    assert store.park(S, "NODEAAAA", 1) == ParkResult("took", (heads[0],))
    assert store.offer_again(S, heads[0]) == OfferResult("queued")  # handed back: first in line
    assert store.park(S, "NODEAAAA", 3) == ParkResult("took", tuple(heads[:3]))
    assert store.park(S, "NODEAAAA") == ParkResult("took", tuple(heads[3:]))
    assert store.park(S, "NODEAAAA") == ParkResult("parked")
    assert raw.lrange(f"ptth:parked:{S}", 0, -1) == [b"NODEAAAA"]


def test_park_takes_no_more_heads_than_fit_in_one_answer(store: Store) -> None:
    online(store)
    per_answer = MAX_BATCH_BYTES // MAX_REQUEST_HEAD_BYTES
    big = [head(f"BIG{i}", MAX_REQUEST_HEAD_BYTES - 10) for i in range(per_answer + 1)]
    for h in big:
        assert store.offer(S, h) == OfferResult("queued")
    assert store.park(S, "NODEAAAA") == ParkResult("took", tuple(big[:per_answer]))
    assert store.park(S, "NODEAAAA") == ParkResult("took", (big[-1],))


def test_park_for_no_requests_only_says_the_server_is_there(store: Store, raw: redis.Redis) -> None:
    assert store.offer(S, head("R0")) == OfferResult("offline")
    online(store)
    assert store.offer(S, head("R1")) == OfferResult("queued")
    assert store.park(S, "NODEAAAA", max_requests=0) == ParkResult("took")
    assert raw.llen(f"ptth:q:{S}") == 1
    assert raw.llen(f"ptth:parked:{S}") == 0


def test_park_refuses_past_the_bound_of_listens(store: Store, raw: redis.Redis) -> None:
    for i in range(MAX_LISTENERS_PER_SERVER):
        assert store.park(S, NODES[1 + i % 3], 1, features=["bodies"]) == ParkResult("parked")
    assert store.park(S, "NODEXXXX", 1) == ParkResult("too many")
    assert raw.llen(f"ptth:parked:{S}") == MAX_LISTENERS_PER_SERVER
    assert raw.hget(f"ptth:srv:{S}", "features") == b"bodies"


def test_unpark_removes_one_entry_and_says_whether_it_was_there(store: Store, raw: redis.Redis) -> None:
    assert store.park(S, "NODEAAAA", 1) == ParkResult("parked")
    assert store.park(S, "NODEAAAA", 1) == ParkResult("parked")
    assert store.unpark(S, "NODEAAAA") is True
    assert raw.lrange(f"ptth:parked:{S}", 0, -1) == [b"NODEAAAA"]
    assert store.unpark(S, "NODEBBBB") is False
    # A listen ending in the instant a head is handed to it: the head is on its way to the inbox.
    h = head("R1")
    assert store.offer(S, h) == OfferResult("handed", "NODEAAAA")
    assert store.unpark(S, "NODEAAAA") is False
    assert store.take_inbox("NODEAAAA") == [InboxHead(S, h)]


def test_unpark_stamps_seen_unless_the_server_left(store: Store, raw: redis.Redis) -> None:
    raw.hset(f"ptth:srv:{S}", "seen", 1)
    assert store.unpark(S, "NODEAAAA", seen=False) is False
    assert raw.hget(f"ptth:srv:{S}", "seen") == b"1"
    assert store.unpark(S, "NODEAAAA") is False
    assert int(raw.hget(f"ptth:srv:{S}", "seen") or 0) >= redis_now_ms(raw) - 1000


def test_withdraw_says_whether_the_head_was_still_queued(store: Store, raw: redis.Redis) -> None:
    online(store)
    for rid in ("R1", "R10", "R2"):
        assert store.offer(S, head(rid)) == OfferResult("queued")
    assert store.withdraw(S, "R1") is True  # not R10, which starts the same
    assert [QueuedHead.decode(e).request_id for e in raw.lrange(f"ptth:q:{S}", 0, -1)] == ["R10", "R2"]
    assert store.withdraw(S, "R1") is False
    assert store.park(S, "NODEAAAA", 1).outcome == "took"  # R10 picked up
    assert store.withdraw(S, "R10") is False
    assert store.withdraw(S, "R2") is True
    assert store.withdraw("nobody", "R2") is False


# ---- atomicity ---------------------------------------------------------------------


def test_requests_and_listens_arriving_together_never_miss_each_other(store: Store, raw: redis.Redis) -> None:
    """Offers, parks and unparks race from many threads (each its own connection); after every
    round: never a head queued while a listen is parked, every head exactly once in a queue, a
    listen's answer or an inbox, and every listen parked either still there, handed a head, or
    ended by an unpark that found it.
    """
    rng = random.Random(14)
    seen_outcomes: Counter[str] = Counter()
    for round_ in range(25):
        server = f"race{round_}"
        online(store, server)
        offers = [head(f"R{round_}x{i}") for i in range(rng.randrange(10, 60))]
        parks = [(NODES[1 + i % 4], rng.randrange(1, 4)) for i in range(rng.randrange(5, 30))]
        unparks = [NODES[1 + rng.randrange(4)] for _ in range(rng.randrange(0, 10))]
        calls = [("offer", h) for h in offers] + [("park", p) for p in parks] + [("unpark", n) for n in unparks]
        rng.shuffle(calls)
        start = threading.Barrier(len(calls))

        def run(call: tuple[str, object], server: str = server,
                start: threading.Barrier = start) -> OfferResult | ParkResult | bool:
            kind, arg = call
            start.wait(10)
            if kind == "unpark":
                assert isinstance(arg, str)
                return store.unpark(server, arg)
            if kind == "offer":
                assert isinstance(arg, QueuedHead)
                return store.offer(server, arg)
            node, limit = arg  # type: ignore[misc]
            return store.park(server, node, limit)

        with ThreadPoolExecutor(len(calls)) as pool:
            results = list(pool.map(run, calls))

        queued = [QueuedHead.decode(e) for e in raw.lrange(f"ptth:q:{server}", 0, -1)]
        parked = raw.lrange(f"ptth:parked:{server}", 0, -1)
        assert not (queued and parked), f"round {round_}: {len(queued)} heads queued beside {len(parked)} listens"
        took = [h for r in results if isinstance(r, ParkResult) for h in r.heads]
        inboxes = [i.head for node in {n for n, _ in parks} for i in store.take_inbox(node, 1000)
                   if i.server == server]
        everywhere = Counter(h.request_id for h in queued + took + inboxes)
        assert set(everywhere) == {h.request_id for h in offers}, f"round {round_}: a head was lost"
        assert max(everywhere.values()) == 1, f"round {round_}: a head was handed out twice"
        # Each listen either took heads, or parked and then was either handed one head or is still parked.
        outcomes = Counter(r.outcome for r in results if not isinstance(r, bool))
        handed = [r for r in results if isinstance(r, OfferResult) and r.outcome == "handed"]
        for node in {n for n, _ in parks}:
            parked_here = sum(r == ParkResult("parked") for (kind, arg), r in zip(calls, results, strict=True)
                              if kind == "park" and arg[0] == node)  # type: ignore[index]
            ended = sum(r is True for (kind, arg), r in zip(calls, results, strict=True)
                        if kind == "unpark" and arg == node)
            assert parked_here == sum(r.node == node for r in handed) + ended + parked.count(node.encode())
        assert outcomes["parked"] == len(handed) + len(parked) + sum(r is True for r in results)
        assert len(inboxes) == len(handed)
        assert outcomes["offline"] == outcomes["full"] == outcomes["too many"] == 0
        seen_outcomes.update(outcomes)
        raw.delete(*[f"ptth:inbox:{node}" for node in NODES])
    # Both orders happened: listens that found heads queued, and heads that found listens parked.
    assert min(seen_outcomes[o] for o in ("handed", "queued", "took", "parked")) > 20, seen_outcomes


# ---- Redis failing ------------------------------------------------------------------


def _wait_until_working(store: Store, deadline_secs: float) -> float:
    """Seconds until a call succeeds again; fails after `deadline_secs`."""
    started = time.monotonic()
    while True:
        try:
            store.ping()
            return time.monotonic() - started
        except ClusterUnavailableError:
            if time.monotonic() - started > deadline_secs:
                raise
            time.sleep(0.1)


def test_a_paused_redis_fails_calls_quickly_and_recovers(store: Store, redis_server: RedisServer,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    online(store)
    assert store.offer(S, head("BEFORE")) == OfferResult("queued")
    assert redis_server.proc is not None
    caplog.set_level(logging.INFO, logger=store_module.__name__)
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        for call in (lambda: store.offer(S, head("GHOST")), lambda: store.park(S, "NODEAAAA"),
                     lambda: store.withdraw(S, "BEFORE")):
            started = time.monotonic()
            with pytest.raises(ClusterUnavailableError) as failed:
                call()
            took = time.monotonic() - started
            assert took < store_module.REDIS_COMMAND_TIMEOUT_SECS + FAIL_SLACK_SECS, took
            assert failed.value.status == 503
            assert "cannot be reached" in str(failed.value) and "Traceback" not in str(failed.value)
            assert "127.0.0.1" not in str(failed.value), "a client's 503 names no internal address"
            assert store.is_down
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    assert _wait_until_working(store, 5) < 5
    assert not store.is_down
    # Replies that arrived late were never read as the answers to later calls.
    assert store.withdraw(S, "NOSUCH") is False
    assert store.withdraw(S, "BEFORE") is True
    assert store.park(S, "NODEAAAA", 0) == ParkResult("took")
    messages = [r.getMessage() for r in caplog.records if r.name == store_module.__name__]
    assert sum(m.startswith("redis down") for m in messages) == 1, messages
    assert sum(m.startswith("redis back") for m in messages) == 1, messages
    assert all(r.levelno < logging.ERROR for r in caplog.records), messages


def test_a_restarted_redis_gets_the_scripts_again(store: Store, redis_server: RedisServer,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    epoch = join(store, "NODEZERO")  # already registered: the epoch only
    online(store)
    assert store.offer(S, head("BEFORE")) == OfferResult("queued")  # the scripts are loaded
    caplog.set_level(logging.INFO, logger=store_module.__name__)
    redis_server.kill()
    started = time.monotonic()
    with pytest.raises(ClusterUnavailableError):
        store.offer(S, head("DURING"))
    assert time.monotonic() - started < store_module.REDIS_CONNECT_TIMEOUT_SECS + FAIL_SLACK_SECS
    with pytest.raises(ClusterUnavailableError):
        store.park(S, "NODEAAAA")
    redis_server.start()
    _wait_until_working(store, 5)
    # Everything was lost with the restart: the server has not been seen, the scripts are not loaded,
    # the nodes are not registered; a node learns it from its heartbeat and registers again.
    assert store.offer(S, head("AFTER")) == OfferResult("offline")
    assert store.park(S, "NODEZERO", 0) == ParkResult("unknown node")
    assert store.heartbeat(node_info("NODEZERO"), epoch) == "restarted"
    assert join(store, "NODEZERO") != epoch
    assert store.heartbeat(node_info("NODEZERO"), epoch) == "restarted"
    online(store)
    assert store.offer(S, head("AFTER")) == OfferResult("queued")
    assert store.withdraw(S, "AFTER") is True
    assert store.unpark(S, "NODEAAAA") is False
    messages = [r.getMessage() for r in caplog.records if r.name == store_module.__name__]
    assert sum(m.startswith("redis down") for m in messages) == 1, messages
    assert sum(m.startswith("redis back") for m in messages) == 1, messages
    assert sum(m.startswith("loading the cluster's script") for m in messages) >= 3, messages


def test_the_password_never_shows_in_a_log_line_or_an_error(tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server = start_redis(tmp_path, "--requirepass", PASSWORD)
    errors: list[BaseException] = []
    try:
        good = Store.from_url(f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0")
        assert good.url == f"redis://:***@127.0.0.1:{server.port}/0"
        assert good.offer(S, head("R1")) == OfferResult("offline")
        join(good, "NODEZERO")
        online(good)
        assert good.offer(S, head("R1")) == OfferResult("queued")
        with refusing_port() as nobody:
            for url in (f"redis://:{PASSWORD}x@127.0.0.1:{server.port}/0",  # a wrong password
                        f"redis://default:{PASSWORD}x@127.0.0.1:{server.port}/0",
                        f"redis://127.0.0.1:{server.port}/0?password={PASSWORD}x",
                        f"redis://:{PASSWORD}@127.0.0.1:{nobody}/0"):  # nobody there
                wrong = Store.from_url(url)
                with pytest.raises(ClusterUnavailableError) as failed:
                    wrong.offer(S, head("R2"))
                wrong.close()
                errors.append(failed.value)
        for url in (f"redis://:{PASSWORD}@127.0.0.1:{server.port}/notadb", f"http://:{PASSWORD}@127.0.0.1/",
                    f"redis://:{PASSWORD}@127.0.0.1:notaport/0", f"redis://:{PASSWORD}@127.0.0.1/0?socket_timeout=x"):
            with pytest.raises(ValueError) as refused:
                Store.from_url(url)
            errors.append(refused.value)
        server.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
        with pytest.raises(ClusterUnavailableError) as paused:
            good.park(S, "NODEAAAA")
        errors.append(paused.value)
    finally:
        server.kill()
    with pytest.raises(ClusterUnavailableError) as gone:
        good.ping()
    good.close()
    errors.append(gone.value)
    seen = [r.getMessage() for r in caplog.records] + [str(e) for e in errors]
    seen += [str(e.__cause__) for e in errors if e.__cause__ is not None]
    assert sum("redis down" in m for m in seen) >= 4
    leaks = [m for m in seen if PASSWORD in m]
    assert not leaks, leaks
