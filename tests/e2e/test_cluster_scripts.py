"""The cluster's scripts beyond OFFER/PARK/UNPARK/WITHDRAW, on a real redis-server.

Each rule of rendezvous.py and forwarding.py that the cluster keeps in
Redis, driven through `Store`: fair shares and SETTLE, the unanswered bound,
deadlines, leases and acknowledgements, the node registry (epoch, secret,
heartbeat, live nodes), PRESENCE, LEAVE, SWEEP, the scraper limit, the
operators' pages, the TCP pair; and the races between them, from many
threads, each on its own connection.

Request ids start with their owner's node id, as the cluster's ids do
(CLUSTER.md section 3): `rid("NODEAAAA", 1)` is owned by NODEAAAA.
"""

from __future__ import annotations

import random
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest
import redis
from redis_harness import (
    NODES,
    S,
    empty_client,
    head,
    join,
    node_info,
    online,
    redis_now_ms,
    serve_redis,
    store_on,
)

from ptth_lib.relay.cluster import store as store_module
from ptth_lib.relay.cluster.store import (
    NODE_ID_CHARS,
    FailureResult,
    InboxAck,
    InboxConnection,
    InboxHead,
    InboxLeave,
    InboxOffline,
    InboxRequeue,
    InboxTurn,
    OfferResult,
    ParkResult,
    PresenceEvent,
    QueuedHead,
    SettleResult,
    Store,
    TcpConnectResult,
    TcpListenResult,
    new_node_id,
    websocket_held_id,
)
from ptth_lib.relay.forwarding import (
    MAX_CONNECTIONS_PER_CLIENT,
    MAX_CONNECTIONS_PER_SERVER,
    MAX_LISTENS_PER_PORT,
    MAX_OFFERS_PER_PORT,
    MAX_PORTS_PER_SERVER,
    PORT_GONE_AFTER_SECS,
)
from ptth_lib.relay.rendezvous import (
    LEAVE_GRACE_SECS,
    MAX_UNANSWERED_PER_SERVER,
    MAX_UNREGISTERED_SHOWN,
    OFFLINE_AFTER_SECS,
)

pytestmark = [pytest.mark.process,
              pytest.mark.skipif(shutil.which("redis-server") is None,
                                 reason="needs Debian's redis-server (make debian-deps installs it)")]

redis_server = pytest.fixture(scope="module")(serve_redis)
raw = pytest.fixture(empty_client)
store = pytest.fixture(store_on)

A, B, C, D = NODES[1:5]  # NODEAAAA ... NODEDDDD
CLIENT = "192.0.2.7"
T = TypeVar("T")


def rid(owner: str, n: int | str) -> str:
    """A request id owned by node `owner`."""
    return f"{owner}r{n}"


def new_ticks(raw: redis.Redis) -> None:
    """Let the next PRESENCE and SWEEP run at once: as if the tick's second were over."""
    raw.delete("ptth:presence_tick", "ptth:sweep")


def kill_node(raw: redis.Redis, node: str) -> None:
    """`node` stops renewing: its node:{N} expires (here at once)."""
    raw.delete(f"ptth:node:{node}")


def race(calls: list[Callable[[], T]]) -> list[T]:
    """Run `calls` together, each in its own thread (and so on its own Redis connection)."""
    start = threading.Barrier(len(calls))

    def run(call: Callable[[], T]) -> T:
        start.wait(10)
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def assert_invariant(raw: redis.Redis, server: str = S) -> None:
    """Never a wanted head queued while a listen is parked and the server has room."""
    if raw.scard(f"ptth:taken:{server}") < MAX_UNANSWERED_PER_SERVER and raw.llen(f"ptth:parked:{server}"):
        assert raw.llen(f"ptth:q:{server}") == 0, "a head queued beside a parked listen with room"


# ---- fair shares and SETTLE -------------------------------------------------------


def test_a_client_over_its_share_waits_and_hears_when_one_is_freed(store: Store, raw: redis.Redis) -> None:
    online(store)
    for i in range(3):
        assert store.offer(S, head(rid(A, i)), client=CLIENT, per_address=3) == OfferResult("queued")
    # The fourth waits, on two nodes; another address and a request without one go ahead.
    assert store.offer(S, head(rid(A, 3)), client=CLIENT, per_address=3) == OfferResult("wait")
    assert store.offer(S, head(rid(B, 3)), client=CLIENT, per_address=3) == OfferResult("wait")
    assert store.offer(S, head(rid(B, 4)), client="192.0.2.8", per_address=3) == OfferResult("queued")
    assert store.offer(S, head(rid(B, 5))) == OfferResult("queued")
    assert raw.hget(f"ptth:shares:{S}", CLIENT) == b"3"
    assert raw.llen(f"ptth:q:{S}") == 5, "a request that waits is not queued"
    assert store.settle(A, ended=[rid(A, 0)]) == SettleResult(1, 0)
    assert store.take_inbox(A) == [InboxTurn(S, CLIENT)]
    assert store.take_inbox(B) == [InboxTurn(S, CLIENT)]
    assert raw.hget(f"ptth:shares:{S}", CLIENT) == b"2"
    assert store.offer(S, head(rid(A, 3)), client=CLIENT, per_address=3) == OfferResult("queued")
    assert store.offer(S, head(rid(B, 3)), client=CLIENT, per_address=3) == OfferResult("wait")
    # Settling twice, or an id never held, changes nothing.
    assert store.settle(A, ended=[rid(A, 0), rid(A, 99)]) == SettleResult(0, 0)
    assert raw.hget(f"ptth:shares:{S}", CLIENT) == b"3"
    assert store.settle(A, ended=[rid(A, 1), rid(A, 2), rid(A, 3)]) == SettleResult(3, 0)
    assert store.take_inbox(B) == [InboxTurn(S, CLIENT)]
    assert raw.hexists(f"ptth:shares:{S}", CLIENT) is False  # the table holds only addresses in flight
    assert raw.hlen(f"ptth:held:{A}") == 0


def test_offer_answers_no_feature_unless_the_server_announced_it(store: Store) -> None:
    assert store.park(S, A, 0, features=["bodies"]) == ParkResult("took")
    assert store.offer(S, head(rid(A, 1)), needs=["websocket"]) == OfferResult("no feature", feature="websocket")
    assert store.offer(S, head(rid(A, 2)), needs=["bodies", "websocket"]).feature == "websocket"
    assert store.offer(S, head(rid(A, 3)), needs=["bodies"]) == OfferResult("queued")
    assert store.park(S, A, 0, features=["bodies", "websocket"]) == ParkResult("took")
    assert store.offer(S, head(rid(A, 4)), needs=["websocket", "bodies"]) == OfferResult("queued")


def test_the_unanswered_bound_parks_listens_and_settle_hands_the_queue_on(store: Store, raw: redis.Redis) -> None:
    online(store)
    raw.sadd(f"ptth:taken:{S}", *[f"OTHER{i}" for i in range(MAX_UNANSWERED_PER_SERVER - 2)])
    first, second, third, fourth = (head(rid(A, i)) for i in range(4))
    for h in (first, second, third):
        assert store.offer(S, h) == OfferResult("queued")
    # Room for two: the listen takes two though it asked for more, the next one parks beside a head.
    assert store.park(S, B, 10) == ParkResult("took", (first, second))
    assert store.park(S, C, 10) == ParkResult("parked")
    assert store.offer(S, fourth) == OfferResult("queued"), "no room: the head queues beside the listen"
    assert raw.llen(f"ptth:q:{S}") == 2
    # The server starts answering `first`: room for one, which goes to the parked listen at once.
    assert store.settle(A, answering=[first.request_id]) == SettleResult(0, 1)
    assert store.take_inbox(C) == [InboxHead(S, third)]
    assert raw.lrange(f"ptth:parked:{S}", 0, -1) == []
    # Ending `first` frees no more room (it was answering already); ending `second` does.
    assert store.park(S, D, 10) == ParkResult("parked")
    assert store.settle(A, ended=[first.request_id]) == SettleResult(1, 0)
    assert store.settle(A, ended=[second.request_id]) == SettleResult(1, 1)
    assert store.take_inbox(D) == [InboxHead(S, fourth)]
    assert raw.scard(f"ptth:taken:{S}") == MAX_UNANSWERED_PER_SERVER - 2 + 2  # third and fourth
    assert_invariant(raw)


def test_park_drops_heads_past_their_deadline_or_given_up(store: Store, raw: redis.Redis) -> None:
    online(store)
    now = redis_now_ms(raw)
    late, gone, kept = head(rid(A, 1), deadline_ms=now - 1), head(rid(A, 2)), head(rid(A, 3), deadline_ms=now + 60_000)
    for h in (late, gone, kept):
        assert store.offer(S, h) == OfferResult("queued")
    assert store.settle(A, ended=[gone.request_id]) == SettleResult(1, 0)  # its client left
    assert store.park(S, B) == ParkResult("took", (kept,))
    assert raw.llen(f"ptth:q:{S}") == 0
    assert store.offer_again(S, gone) == OfferResult("gone")
    assert store.offer_again(S, late) == OfferResult("gone")


def test_a_head_offered_again_is_no_longer_unanswered_until_a_listen_takes_it(store: Store,
                                                                              raw: redis.Redis) -> None:
    online(store)
    h = head(rid(A, 1))
    assert store.park(S, B, 1) == ParkResult("parked")
    assert store.offer(S, h) == OfferResult("handed", B)
    assert raw.smembers(f"ptth:taken:{S}") == {h.request_id.encode()}
    # B's listen ended as the head came: B's dispatcher offers it again, ahead of the others.
    assert store.unpark(S, B) is False
    assert store.offer(S, head(rid(A, 2))) == OfferResult("queued")
    assert store.offer_again(S, h) == OfferResult("queued")
    assert raw.scard(f"ptth:taken:{S}") == 0
    assert store.park(S, C, 1) == ParkResult("took", (h,))
    assert raw.smembers(f"ptth:taken:{S}") == {h.request_id.encode()}


# ---- leases and acknowledgements ---------------------------------------------------


def test_a_lease_is_recorded_until_a_later_listen_acknowledges_it(store: Store, raw: redis.Redis) -> None:
    online(store)
    h1, h2 = head(rid(A, 1)), head(rid(A, 2))
    for h in (h1, h2):
        assert store.offer(S, h) == OfferResult("queued")
    batch = f"{B}batch1"
    assert store.park(S, B, lease=batch) == ParkResult("took", (h1, h2))
    assert raw.hgetall(f"ptth:leases:{B}") == {batch.encode(): f"{S} {h1.request_id} {h2.request_id}".encode()}
    # The server's next listen, on another node, acknowledges it; another server's ack of it is ignored.
    assert store.park("beta", C, 0, ack=batch) == ParkResult("took")
    assert raw.hlen(f"ptth:leases:{B}") == 1
    assert store.park(S, C, 0, ack=batch) == ParkResult("took")
    assert raw.hlen(f"ptth:leases:{B}") == 0
    assert store.take_inbox(B) == [InboxAck(S, batch)]
    assert store.end_lease(B, batch) is False, "acknowledged: not requeued"
    # A batch of heads that came through B's inbox has no record: its acknowledgement reaches B
    # all the same, and B alone decides whether it came in time.
    assert store.park(S, C, 0, ack=f"{B}batch2") == ParkResult("took")
    assert store.take_inbox(B) == [InboxAck(S, f"{B}batch2")]


# ---- the node registry ---------------------------------------------------------------


def test_nodes_register_once_share_epoch_and_secret_and_are_listed(store: Store, raw: redis.Redis) -> None:
    raw.flushall()
    ids = {new_node_id() for _ in range(50)}
    assert all(len(n) == NODE_ID_CHARS and set(n) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for n in ids)
    assert len(ids) == 50
    # The scripts tell an id's owner by the same length.
    lib = (Path(store_module.__file__).parent / "scripts" / "_lib.lua").read_text()
    assert f"local NODE_ID_CHARS = {NODE_ID_CHARS}\n" in lib
    first = store.register(node_info("NODE1111"))
    second = store.register(node_info("NODE2222", config_hash="beef"))
    assert (first.outcome, second.outcome) == ("registered", "registered")
    assert first.epoch == second.epoch and first.secret == second.secret and len(first.secret) == 64
    again = store.register(node_info("NODE1111"))
    assert again.outcome == "taken" and again.epoch == first.epoch
    assert [(n.node, n.config_hash, n.host, n.pid) for n in store.live_nodes()] == [
        ("NODE1111", "c0ffee", "testhost", 4242), ("NODE2222", "beef", "testhost", 4242)]
    assert store.live_nodes()[0] == node_info("NODE1111")
    # The heartbeat renews the node and its fields (a reloaded config shows at once).
    assert store.heartbeat(node_info("NODE1111", config_hash="f00d"), first.epoch) == "alive"
    assert store.live_nodes()[0].config_hash == "f00d"
    ttl = raw.pttl("ptth:node:NODE1111")
    assert 0 < ttl <= store_module.NODE_TTL_SECS * 1000
    # A node whose key expired is not listed; one that stops deregisters.
    kill_node(raw, "NODE2222")
    store.deregister("NODE1111")
    assert store.live_nodes() == []
    # A node late but not swept yet comes back as it was.
    assert store.heartbeat(node_info("NODE2222"), first.epoch) == "alive"
    assert [n.node for n in store.live_nodes()] == ["NODE2222"]
    # Redis restarted (here: emptied): every node learns it from its next heartbeat.
    raw.flushall()
    assert store.heartbeat(node_info("NODE2222"), first.epoch) == "restarted"
    # The first node back puts back the secret it knew: a node that has not noticed the restart yet
    # still passes the peer handshake. The epoch is new; a node new to the cluster reads the same secret.
    back = store.register(node_info("NODE2222"), first.secret)
    assert back.epoch != first.epoch and back.secret == first.secret
    assert store.register(node_info("NODE3333"), None).secret == first.secret
    raw.flushall()
    fresh = store.register(node_info("NODE3333")).secret  # nobody knew one: a new secret
    assert len(fresh) == 64 and fresh != first.secret


# ---- PRESENCE and LEAVE --------------------------------------------------------------


def test_presence_reports_each_change_once_and_fails_the_queue_of_a_server_gone(store: Store,
                                                                                 raw: redis.Redis) -> None:
    assert store.park(S, A, 0, version="2.1", host="box") == ParkResult("took")
    assert store.park("beta", A, 1) == ParkResult("parked")
    queued = [head(rid(B, i)) for i in range(3)]
    for h in queued:
        assert store.offer(S, h) == OfferResult("queued")
    assert store.settle(B, ended=[queued[1].request_id]) == SettleResult(1, 0)  # given up: nobody to tell
    result = store.presence(C)
    assert result.ran and result.failed == 0
    assert sorted(result.events, key=lambda e: e.server) == [
        PresenceEvent(S, True, "box", "2.1"), PresenceEvent("beta", True, None, None)]
    assert store.presence(D).ran is False, "one node per tick"
    new_ticks(raw)
    assert store.presence(D).events == (), "nothing changed"
    # alpha's last listen is older than OFFLINE_AFTER_SECS: offline, its queue goes back to its owners.
    raw.hset(f"ptth:srv:{S}", "seen", redis_now_ms(raw) - round(OFFLINE_AFTER_SECS * 1000) - 1)
    new_ticks(raw)
    result = store.presence(D)
    assert result.events == (PresenceEvent(S, False, "box", "2.1"),) and result.failed == 2
    assert store.take_inbox(B) == [InboxOffline(S, queued[0].request_id), InboxOffline(S, queued[2].request_id)]
    assert raw.llen(f"ptth:q:{S}") == 0
    assert raw.smembers("ptth:servers") == {b"beta"}, "an offline server is no longer looked at"
    new_ticks(raw)
    assert store.presence(D) == store_module.PresenceResult(True)
    # Back online with its next listen.
    assert store.park(S, A, 0) == ParkResult("took")
    new_ticks(raw)
    assert store.presence(A).events == (PresenceEvent(S, True, "box", "2.1"),)


def test_leave_ends_the_listens_on_every_node_and_offline_follows_its_grace(store: Store,
                                                                            raw: redis.Redis) -> None:
    for node in (A, B, A, C):
        assert store.park(S, node, 1) == ParkResult("parked")
    assert store.leave(S) == 3
    assert [store.take_inbox(n) for n in (A, B, C)] == [[InboxLeave(S)]] * 3
    for node in (A, B, A, C):
        assert store.unpark(S, node, seen=False) is True
    assert store.offer(S, head(rid(D, 1))) == OfferResult("queued"), "within the leave's grace"
    left = redis_now_ms(raw) - round(LEAVE_GRACE_SECS * 1000) - 1  # the grace is over
    raw.hset(f"ptth:srv:{S}", mapping={"left": left, "seen": left - 10})
    assert store.offer(S, head(rid(D, 2))) == OfferResult("offline")
    result = store.presence(D)
    assert [(e.server, e.online) for e in result.events] == [] and result.failed == 1, result
    assert store.park(S, B, 0) == ParkResult("took")
    assert store.offer(S, head(rid(D, 3))) == OfferResult("queued"), "a listen after the leave"


# ---- SWEEP -----------------------------------------------------------------------------


def test_sweep_cleans_up_after_a_dead_node(store: Store, raw: redis.Redis) -> None:
    online(store)
    # A (about to die) has listens parked for alpha and beta, one head in its inbox, a leased batch
    # of B's requests, and requests of its own: queued, and holding a client's share.
    assert store.park("beta", A, 1) == ParkResult("parked")
    mine = head(rid(A, 1))
    assert store.offer(S, mine, client=CLIENT, per_address=1) == OfferResult("queued")
    assert store.offer(S, head(rid(B, 9)), client=CLIENT, per_address=1) == OfferResult("wait")
    leased = head(rid(B, 1))
    assert store.offer(S, leased) == OfferResult("queued")
    assert store.park(S, A, 2, lease=f"{A}batch") == ParkResult("took", (mine, leased))
    assert store.park(S, A, 1) == ParkResult("parked")
    assert store.park(S, C, 1) == ParkResult("parked")
    on_its_way = head(rid(B, 2))
    assert store.offer(S, on_its_way) == OfferResult("handed", A)
    kill_node(raw, A)
    new_ticks(raw)
    assert store.sweep(D) == store_module.SweepResult(True, (A,))
    assert store.sweep(D).ran is False, "one node per tick"
    # Its listens are gone; the head on its way went to the other parked listen; B requeues the lease.
    assert raw.llen("ptth:parked:beta") == 0
    assert raw.lrange(f"ptth:parked:{S}", 0, -1) == []
    assert store.take_inbox(C) == [InboxHead(S, on_its_way)]
    assert store.take_inbox(B) == [InboxTurn(S, CLIENT), InboxRequeue(S, leased.request_id)]
    # What it owned is settled: the share, the unanswered count; nothing of it is left.
    assert raw.hlen(f"ptth:shares:{S}") == 0
    assert raw.smembers(f"ptth:taken:{S}") == {leased.request_id.encode(), on_its_way.request_id.encode()}
    assert [k for k in raw.keys(f"ptth:*{A}*")] == []
    assert raw.sismember("ptth:nodes", A) == 0
    # Its late heartbeat says so, its late listen is refused, and nothing is pushed to it any more.
    assert store.heartbeat(node_info(A), join(store, C)) == "swept"
    assert store.park(S, A, 1) == ParkResult("unknown node")
    assert raw.exists(f"ptth:inbox:{A}") == 0
    new_ticks(raw)
    assert store.sweep(D) == store_module.SweepResult(True, ())


def test_sweep_queues_a_dead_nodes_inbox_heads_ahead_or_sends_them_home(store: Store, raw: redis.Redis) -> None:
    online(store)
    waiting = head(rid(B, 0))
    assert store.offer(S, waiting) == OfferResult("queued")
    assert store.park(S, A, 1) == ParkResult("took", (waiting,))
    heads = [head(rid(B, i)) for i in (1, 2)]
    for h in heads:
        assert store.park(S, A, 1) == ParkResult("parked")
        assert store.offer(S, h) == OfferResult("handed", A)
    assert store.offer(S, head(rid(B, 3))) == OfferResult("queued")
    kill_node(raw, A)
    assert store.sweep(D).swept == (A,)
    queue = [QueuedHead.decode(e).request_id for e in raw.lrange(f"ptth:q:{S}", 0, -1)]
    assert queue == [rid(B, 2), rid(B, 1), rid(B, 3)], "ahead of the queue"
    assert raw.smembers(f"ptth:taken:{S}") == {waiting.request_id.encode()}, "no lease: the server has it"


# ---- the scraper API's limit and the operators' pages ------------------------------


def test_the_scraper_failure_window_limits_an_address_for_the_whole_cluster(store: Store,
                                                                           raw: redis.Redis) -> None:
    for i in range(1, 11):
        assert store.scraper_failed(CLIENT, 10, 60.0) == FailureResult(False, failures=i)
    limited = store.scraper_failed(CLIENT, 10, 60.0)
    assert limited.limited and 59.0 < limited.retry_after_secs <= 60.0
    assert raw.get(f"ptth:scraper_fail:{CLIENT}") == b"10", "a limited attempt is not counted"
    assert store.scraper_failed("192.0.2.99", 10, 60.0) == FailureResult(False, failures=1)
    # The window is fixed from the first failure: later ones do not extend it.
    raw.pexpire(f"ptth:scraper_fail:{CLIENT}", 1500)
    assert store.scraper_failed(CLIENT, 10, 60.0).retry_after_secs <= 1.5
    raw.set(f"ptth:scraper_fail:{CLIENT}", 3, px=1500)
    assert store.scraper_failed(CLIENT, 10, 60.0) == FailureResult(False, failures=4)
    assert raw.pttl(f"ptth:scraper_fail:{CLIENT}") <= 1500


def test_unregistered_names_keep_the_latest_fifty(store: Store) -> None:
    for i in range(MAX_UNREGISTERED_SHOWN + 10):
        store.remember_unregistered(f"name{i}", f"code{i}", "192.0.2.1")
        time.sleep(0.001)  # distinct times, so that the order is the order of arrival
    store.remember_unregistered("name3", "code3", "192.0.2.1")  # gone already: back as the latest
    store.remember_unregistered("name20", "code20", "192.0.2.1")  # there: moves to the front
    shown = store.unregistered()
    assert len(shown) == MAX_UNREGISTERED_SHOWN
    assert [s.name for s in shown[:3]] == ["name20", "name3", f"name{MAX_UNREGISTERED_SHOWN + 9}"]
    assert shown[0].tripcode == "code20" and shown[0].address == "192.0.2.1"
    assert abs(shown[0].last_seen - time.time()) < 60
    assert "name10" not in {s.name for s in shown} and "name11" in {s.name for s in shown}


def test_the_audit_page_keeps_the_clusters_last_hundred(store: Store) -> None:
    for i in range(120):
        store.record_audit({"event": "server_online", "server": f"s{i}", "node": "h/1/NODE"})
    recent = store.recent_audit()
    assert [e["server"] for e in recent] == [f"s{i}" for i in range(20, 120)]


# ---- TCP forwarding --------------------------------------------------------------------


def test_tcp_connects_meet_listens_per_port_within_their_bounds(store: Store, raw: redis.Redis) -> None:
    port = "ssh"
    assert store.tcp_connect(S, port, rid(A, 0), "laptop") == TcpConnectResult("port gone")
    assert store.tcp_listen(S, port, B) == TcpListenResult("parked")
    # A listen parked long ago is as good as one parked now: taking it stamps the port seen, so
    # the connects right behind it wait for the server's next listen instead of "port gone".
    raw.hset(f"ptth:tcp_ports:{S}", port, redis_now_ms(raw) - round(PORT_GONE_AFTER_SECS * 1000) - 1)
    assert store.tcp_connect(S, port, rid(A, 1), "laptop") == TcpConnectResult("handed", B)
    assert store.take_inbox(B) == [InboxConnection(S, port, rid(A, 1), "laptop")]
    # No listen parked now, but one lately: connects wait for the next, up to the bound.
    for i in range(MAX_OFFERS_PER_PORT):
        assert store.tcp_connect(S, port, rid(A, 100 + i), "laptop") == TcpConnectResult("queued")
    assert store.tcp_connect(S, port, rid(A, 99), "laptop") == TcpConnectResult("full")
    # A connection whose client gave up is skipped by the listen.
    assert store.settle(A, ended=[rid(A, 100)]) == SettleResult(1, 0)
    assert store.tcp_listen(S, port, C) == TcpListenResult("took", rid(A, 101), "laptop")
    assert raw.hget("ptth:tcp_clients", "laptop") == str(1 + MAX_OFFERS_PER_PORT - 1).encode()
    # Listens per port.
    raw.delete(f"ptth:tcp_q:{S}:{port}")
    for i in range(MAX_LISTENS_PER_PORT):
        assert store.tcp_listen(S, port, NODES[i % 5]) == TcpListenResult("parked")
    assert store.tcp_listen(S, port, A) == TcpListenResult("too many")
    assert store.tcp_listen(S, "other", A) == TcpListenResult("parked")
    # Port gone PORT_GONE_AFTER_SECS after its last listen ended.
    assert store.tcp_unpark(S, "other", A) is True
    assert store.tcp_unpark(S, "other", A) is False
    assert store.tcp_connect(S, "other", rid(A, 2), "laptop").outcome == "queued"
    raw.hset(f"ptth:tcp_ports:{S}", "other", redis_now_ms(raw) - round(PORT_GONE_AFTER_SECS * 1000))
    assert store.tcp_connect(S, "other", rid(A, 3), "laptop") == TcpConnectResult("port gone")


def test_tcp_connection_counters_go_up_at_connect_and_down_when_forgotten(store: Store, raw: redis.Redis) -> None:
    assert store.tcp_listen(S, "web", B) == TcpListenResult("parked")
    raw.hset("ptth:tcp_clients", "laptop", MAX_CONNECTIONS_PER_CLIENT - 1)
    assert store.tcp_connect(S, "web", rid(A, 1), "laptop").outcome == "handed"
    assert store.tcp_connect(S, "web", rid(A, 2), "laptop") == TcpConnectResult("client limit")
    assert store.tcp_connect(S, "web", rid(A, 3), "phone").outcome == "queued"
    raw.hset("ptth:tcp_servers", S, MAX_CONNECTIONS_PER_SERVER - 1)
    assert store.tcp_open_websocket(S, rid(A, 4)) == TcpConnectResult("opened")
    assert store.tcp_open_websocket(S, rid(A, 5)) == TcpConnectResult("server limit")
    assert store.tcp_connect(S, "web", rid(A, 6), "tablet") == TcpConnectResult("server limit")
    assert store.settle(A, ended=[rid(A, 1), websocket_held_id(rid(A, 4)), rid(A, 1)]) == SettleResult(2, 0)
    assert raw.hget("ptth:tcp_clients", "laptop") == str(MAX_CONNECTIONS_PER_CLIENT - 1).encode()
    assert raw.hget("ptth:tcp_servers", S) == str(MAX_CONNECTIONS_PER_SERVER - 2).encode()
    assert store.settle(A, ended=[rid(A, 3)]) == SettleResult(1, 0)
    assert raw.hexists("ptth:tcp_clients", "phone") is False
    # Offered again after its listen ended as it came: only while its owner holds it.
    assert store.tcp_offer_again(S, "web", rid(A, 3), "phone") == TcpConnectResult("dropped")


def test_a_request_that_becomes_a_websocket_frees_its_share_and_the_websocket_counts_until_it_ends(
        store: Store, raw: redis.Redis) -> None:
    """The WebSocket keeps its request's id: the two are held apart, each settled by its owner."""
    online(store)
    assert store.offer(S, head(rid(A, 1)), client=CLIENT, per_address=1) == OfferResult("queued")
    assert store.offer(S, head(rid(A, 2)), client=CLIENT, per_address=1) == OfferResult("wait")  # share full
    assert store.tcp_open_websocket(S, rid(A, 1)) == TcpConnectResult("opened")  # the app said 101
    assert store.settle(A, ended=[rid(A, 1)]) == SettleResult(1, 0)  # the request is over: share freed
    assert raw.hget("ptth:tcp_servers", S) == b"1"  # the WebSocket is still open
    assert store.offer(S, head(rid(A, 2)), client=CLIENT, per_address=1) == OfferResult("queued")
    assert store.settle(A, ended=[websocket_held_id(rid(A, 1))]) == SettleResult(1, 0)
    assert raw.hexists("ptth:tcp_servers", S) is False


def test_a_server_listens_on_a_bounded_number_of_port_names(store: Store, raw: redis.Redis) -> None:
    old = redis_now_ms(raw) - round(PORT_GONE_AFTER_SECS * 1000) - 1
    raw.hset(f"ptth:tcp_ports:{S}", mapping={f"p{i}": old for i in range(MAX_PORTS_PER_SERVER - 1)})
    raw.hset(f"ptth:tcp_ports:{S}", "busy", old)
    raw.rpush(f"ptth:tcp_parked:{S}:busy", B)
    assert store.tcp_listen(S, "new", A) == TcpListenResult("parked")  # the 256th
    assert store.tcp_listen(S, "newer", A) == TcpListenResult("parked"), "idle names were forgotten"
    assert raw.hlen(f"ptth:tcp_ports:{S}") == 3
    raw.hset(f"ptth:tcp_ports:{S}", mapping={f"q{i}": redis_now_ms(raw) for i in range(MAX_PORTS_PER_SERVER)})
    assert store.tcp_listen(S, "newest", A) == TcpListenResult("too many ports")


def test_sweep_offers_a_dead_nodes_connections_again(store: Store, raw: redis.Redis) -> None:
    assert store.tcp_listen(S, "ssh", A) == TcpListenResult("parked")
    assert store.tcp_connect(S, "ssh", rid(B, 1), "laptop") == TcpConnectResult("handed", A)
    assert store.tcp_listen(S, "ssh", A) == TcpListenResult("parked")
    assert store.tcp_connect(S, "ssh", rid(A, 2), "laptop") == TcpConnectResult("handed", A)  # A's own
    assert store.tcp_listen(S, "ssh", C) == TcpListenResult("parked")
    kill_node(raw, A)
    assert store.sweep(D).swept == (A,)
    assert store.take_inbox(C) == [InboxConnection(S, "ssh", rid(B, 1), "laptop")]
    assert raw.hget("ptth:tcp_clients", "laptop") == b"1", "A's own connection was forgotten with A"


# ---- the inbox ---------------------------------------------------------------------


def test_the_dispatcher_waits_for_its_inbox_and_reads_every_kind_of_message(store: Store) -> None:
    assert store.wait_inbox(A, timeout_secs=0.1) == []
    assert store.park(S, A, 1) == ParkResult("parked")
    h = head(rid(B, 1), 300)
    late = threading.Timer(0.2, lambda: store.offer(S, h))
    late.start()
    assert store.wait_inbox(A, timeout_secs=5) == [InboxHead(S, h)]
    late.join()
    assert store.park("beta", A, 1) == ParkResult("parked")
    assert store.leave("beta") == 1
    assert store.tcp_listen(S, "ssh", A) == TcpListenResult("parked")
    assert store.tcp_connect(S, "ssh", rid(B, 2), "my laptop") == TcpConnectResult("handed", A)
    assert store.wait_inbox(A, count=1) == [InboxLeave("beta")]
    assert store.wait_inbox(A) == [InboxConnection(S, "ssh", rid(B, 2), "my laptop")]


# ---- races -------------------------------------------------------------------------


def test_a_listen_on_the_owners_node_takes_the_head_first_without_the_inbox(store: Store,
                                                                            raw: redis.Redis) -> None:
    online(store)
    for node in (A, B, B):
        assert store.park(S, node, 1) == ParkResult("parked")
    mine = head(rid(B, 1))
    assert store.offer(S, mine) == OfferResult("handed", B, here=True)  # B's own listen, not A's older one
    assert raw.lrange(f"ptth:parked:{S}", 0, -1) == [A.encode(), B.encode()]  # B's oldest entry went
    assert raw.sismember(f"ptth:taken:{S}", mine.request_id)  # unanswered, as any head handed out
    assert store.take_inbox(B, 10) == []  # B hands it to its listen itself
    # Offered again by a dispatcher that found no listen here waiting for it: the oldest listen
    # takes it, through its inbox.
    assert store.offer_again(S, mine, here_first=False) == OfferResult("handed", A)
    assert [m.head.request_id for m in store.take_inbox(A, 10) if isinstance(m, InboxHead)] == [rid(B, 1)]
    # A head of a node with no listen parked goes to the oldest one, as before.
    assert store.offer(S, head(rid(C, 1))) == OfferResult("handed", B)


def test_listens_ending_as_heads_arrive_lose_none_and_deliver_none_twice(store: Store, raw: redis.Redis) -> None:
    """Parked listens end (UNPARK) while offers hand heads to them. An UNPARK that finds no entry
    of its node means a head is on its way to that node's inbox with no listen left for it: the
    dispatcher offers it again, at the front. In the end every head is exactly once with a
    listen, in the queue or in an inbox for a listen still parked, and the invariant holds."""
    rng = random.Random(7)
    missed_total = 0
    for round_ in range(20):
        server = f"race{round_}"
        online(store, server)
        listens = [NODES[1 + i % 4] for i in range(rng.randrange(5, 20))]
        for node in listens:
            assert store.park(server, node, 1) == ParkResult("parked")
        ending = rng.sample(listens, rng.randrange(1, len(listens)))  # each ends at most once
        offers = [head(rid(D, f"{round_}x{i}")) for i in range(rng.randrange(3, 25))]
        calls: list[Callable[[], object]] = [lambda h=h, s=server: (h, store.offer(s, h)) for h in offers]
        calls += [lambda n=n, s=server: (n, store.unpark(s, n)) for n in ending]
        rng.shuffle(calls)
        results = race(calls)
        # Handed to a listen of the owner's own node: the owner hands it over itself, as from its inbox.
        here = [r[0] for r in results if isinstance(r, tuple) and isinstance(r[1], OfferResult) and r[1].here]
        assert all(r[1] == OfferResult("handed", D, here=True) for r in results
                   if isinstance(r, tuple) and isinstance(r[1], OfferResult) and r[1].here)
        with_listen = []
        for node in {*listens}:
            inbox = [m.head for m in store.take_inbox(node, 1000) if isinstance(m, InboxHead)]
            inbox += here if node == D else []
            ended = [found for r in results if isinstance(r, tuple) and r[0] == node for found in r[1:]]
            alive = listens.count(node) - len(ended)
            still_parked = raw.lrange(f"ptth:parked:{server}", 0, -1).count(node.encode())
            # UNPARK's answer is exact: the heads with no listen left are those it found no entry for.
            assert len(inbox) == alive - still_parked + sum(found is False for found in ended), node
            with_listen += inbox[:alive]
            for h in inbox[alive:]:  # the dispatcher hands them back
                assert store.offer_again(server, h, here_first=False).outcome in ("queued", "handed")
                missed_total += 1
        queued = [QueuedHead.decode(e).request_id for e in raw.lrange(f"ptth:q:{server}", 0, -1)]
        again = [m.head.request_id for n in {*listens} for m in store.take_inbox(n, 1000) if isinstance(m, InboxHead)]
        everywhere = Counter([h.request_id for h in with_listen] + queued + again)
        assert set(everywhere) == {h.request_id for h in offers}, f"round {round_}: a head was lost"
        assert max(everywhere.values()) == 1, f"round {round_}: a head was handed out twice"
        assert_invariant(raw, server)
    assert missed_total > 0, "no listen ended as a head came: the race was not run"


def test_two_offers_for_the_last_parked_listen(store: Store, raw: redis.Redis) -> None:
    for round_ in range(40):
        server = f"last{round_}"
        assert store.park(server, A, 1) == ParkResult("parked")
        first, second = head(rid(B, f"{round_}a")), head(rid(C, f"{round_}b"))
        results = race([lambda s=server, h=h: store.offer(s, h) for h in (first, second)])
        assert sorted(r.outcome for r in results) == ["handed", "queued"], results
        [message] = store.take_inbox(A)
        assert isinstance(message, InboxHead)
        queued = [QueuedHead.decode(e) for e in raw.lrange(f"ptth:q:{server}", 0, -1)]
        assert {message.head, *queued} == {first, second}
        assert raw.smembers(f"ptth:taken:{server}") == {message.head.request_id.encode()}


def test_settles_racing_parks_keep_the_invariant_and_the_count(store: Store, raw: redis.Redis) -> None:
    """At the unanswered bound, answers end (SETTLE) while listens arrive (PARK): every head is
    handed exactly once, the unanswered count is exact, and no head is left queued beside a
    parked listen with room."""
    rng = random.Random(11)
    for round_ in range(15):
        server = f"bound{round_}"
        online(store, server)
        taken = [head(rid(A, f"{round_}t{i}")) for i in range(MAX_UNANSWERED_PER_SERVER)]
        pipe = raw.pipeline()
        for h in taken:
            pipe.hset(f"ptth:held:{A}", h.request_id, f"r {server} ")
        pipe.sadd(f"ptth:taken:{server}", *[h.request_id for h in taken])
        pipe.execute()
        waiting = [head(rid(B, f"{round_}w{i}")) for i in range(rng.randrange(5, 30))]
        for h in waiting:
            assert store.offer(server, h) == OfferResult("queued")
        settling = [h.request_id for h in rng.sample(taken, rng.randrange(5, 30))]
        calls: list[Callable[[], object]] = [lambda i=i: store.settle(A, ended=[i]) for i in settling]
        calls += [lambda n=NODES[1 + i % 4], s=server: store.park(s, n, rng.randrange(1, 4))
                  for i in range(rng.randrange(5, 30))]
        results = race(calls)
        took = [h.request_id for r in results if isinstance(r, ParkResult) for h in r.heads]
        inboxes = [m.head.request_id for n in NODES[1:5] for m in store.take_inbox(n, 1000)
                   if isinstance(m, InboxHead)]
        queued = [QueuedHead.decode(e).request_id for e in raw.lrange(f"ptth:q:{server}", 0, -1)]
        everywhere = Counter(took + inboxes + queued)
        assert set(everywhere) == {h.request_id for h in waiting} and max(everywhere.values()) == 1
        assert raw.scard(f"ptth:taken:{server}") == MAX_UNANSWERED_PER_SERVER - len(settling) + len(took + inboxes)
        assert raw.scard(f"ptth:taken:{server}") <= MAX_UNANSWERED_PER_SERVER
        assert_invariant(raw, server)
        raw.delete(f"ptth:held:{A}", f"ptth:parked:{server}")


def test_a_sweep_racing_a_late_heartbeat_has_one_winner(store: Store, raw: redis.Redis) -> None:
    epoch = join(store, A)
    outcomes: Counter[str] = Counter()
    for round_ in range(40):
        node = f"LATE{round_:04d}"
        join(store, node)
        assert store.park(S, node, 1) == ParkResult("parked")
        kill_node(raw, node)
        new_ticks(raw)
        beat, swept = race([lambda n=node: store.heartbeat(node_info(n), epoch), lambda: store.sweep(B)])
        assert swept.ran
        if node in swept.swept:
            assert beat == "swept", "swept first: the heartbeat must say so"
            assert raw.lrange(f"ptth:parked:{S}", 0, -1) == []
            assert store.park(S, node, 1) == ParkResult("unknown node")
        else:
            assert beat == "alive", "the heartbeat first: the node is alive and nothing was cleaned up"
            assert raw.lrange(f"ptth:parked:{S}", 0, -1) == [node.encode()]
            assert store.unpark(S, node) is True
        outcomes["swept" if node in swept.swept else "alive"] += 1
    assert outcomes["swept"] > 0, outcomes  # the sweep path was run (which wins a round is chance)
