"""The relay driven in-process: a `Relay` built from a config, its app through Flask's test client.

No gunicorn and no processes: each test builds a Relay, plays servers and
clients in greenlets against `app_for(relay)` (the hot paths and the Flask
routes, as deployed) or calls the Relay's methods, and looks at its parts
(rendezvous, metrics, audit log). These are the relay's edge cases;
tests/e2e checks each user-visible behaviour once through real processes.
"""

from __future__ import annotations

import base64
import logging
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
import msgpack
import pytest
from flask.testing import FlaskClient
from werkzeug.test import EnvironBuilder, TestResponse
from werkzeug.wrappers import Request

from ptth_lib.config import RelayConfig, load_relay_config, parse_relay_config
from ptth_lib.relay import relay as relay_module
from ptth_lib.relay import rendezvous
from ptth_lib.relay.app import create_app, relay_of
from ptth_lib.relay.body_stream import BodyCutError
from ptth_lib.relay.relay import Relay
from ptth_lib.wire import tripcode

KEYS = {"alpha": "unit-test-key-for-alpha-0123456789", "beta": "unit-test-key-for-beta-0123456789"}
LISTEN = "/7ZSFUKGV/http_listen/"
RESPOND = "/7ZSFUKGV/http_response/"
LEAVE = "/7ZSFUKGV/http_leave/"
HEAD_HEADER = "X-PTTH-2LJYXWC4"
# Every wait in a test is bounded by this.
WAIT_SECS = 5.0


def relay_config(**extra: Any) -> RelayConfig:
    raw: dict[str, Any] = {
        "servers": [{"name": name, "tripcode": tripcode.derive(key)} for name, key in KEYS.items()],
        "listen_timeout_secs": 5, "request_timeout_secs": 2, **extra,
    }
    return parse_relay_config(raw, "test")


def packed_head(status: int, headers: dict[str, bytes] | None = None) -> str:
    """A response head as a server sends it, built by hand: base64 of MsgPack."""
    return base64.b64encode(msgpack.packb({"status_code": status, "headers": headers or {}})).decode()


@dataclass
class Tunnel:
    """A Relay and its app; plays servers and clients."""

    relay: Relay
    client: FlaskClient

    def listen(self, name: str = "alpha", key: str | None = None, **headers: str) -> TestResponse:
        sent = {} if key == "" else {"X-ApiKey": key or KEYS[name]}
        return self.client.get(LISTEN + name, headers={**sent, **headers})

    def get(self, path: str, method: str = "GET", **kwargs: Any) -> gevent.Greenlet:
        """A client's request, running in a greenlet that reads the whole answer."""
        call = gevent.spawn(self.client.open, path, method=method, buffered=True, **kwargs)
        gevent.sleep(0)
        return call

    def take(self, path: str, name: str = "alpha", **kwargs: Any) -> tuple[gevent.Greenlet, dict[str, Any]]:
        """A client's request for `path` at server `name`, picked up by a listen: the call and the item."""
        listener = gevent.spawn(self.listen, name)
        gevent.sleep(0)  # parked: the server is online
        call = self.get(f"/frontend/servers/{name}{path}", **kwargs)
        answer = listener.get(timeout=WAIT_SECS)
        assert answer.status_code == 200, answer.data
        (item,) = msgpack.unpackb(answer.data, raw=False)
        return call, item

    def respond(self, rid: str, status: int = 200, headers: dict[str, bytes] | None = None, body: bytes = b"",
                key: str | None = None, head: str | None = None) -> TestResponse:
        return self.client.post(RESPOND + rid, data=body, headers={
            "X-ApiKey": key or KEYS["alpha"], HEAD_HEADER: head if head is not None else packed_head(status, headers)})

    def be_online(self, name: str = "alpha") -> None:
        assert self.listen(name, **{"X-PTTH-Wait-Secs": "0"}).status_code == 204


# The fixtures (bounded, make_tunnel, tunnel) are in conftest.py, shared with test_web_relay.py.
pytestmark = pytest.mark.usefixtures("bounded")


def samples(t: Tunnel) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the relay's metrics, by name and labels."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in t.relay.metrics.registry.collect() for s in family.samples}


# ---- the round trip ------------------------------------------------------------------------------


def test_a_request_crosses_and_its_response_comes_back(tunnel: Tunnel) -> None:
    call, item = tunnel.take("/files/x?q=1", headers={"Cookie": "relay=1", "Range": "bytes=0-1"})
    assert item["req"]["method"] == "GET" and "cookie" not in item["req"]["headers"]
    assert item["req"]["headers"]["range"] == b"bytes=0-1"
    answer = tunnel.respond(item["id"], 200, {"content-type": b"text/plain", "content-length": b"5",
                                              "x-server": b"yes", "set-cookie": b"a=1", "keep-alive": b"x"},
                            b"hello")
    assert (answer.status_code, answer.text) == (200, "delivered\n")
    resp = call.get(timeout=WAIT_SECS)
    assert (resp.status_code, resp.data) == (200, b"hello")
    assert resp.headers["X-Server"] == "yes" and "Set-Cookie" not in resp.headers
    assert "Keep-Alive" not in resp.headers
    assert resp.headers["Content-Security-Policy"].startswith("sandbox")
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert "X-Frame-Options" not in resp.headers  # relayed content keeps its own, not the relay pages'
    now = samples(tunnel)
    assert now[("ptth_client_requests_total", (("status", "200"),))] == 1
    assert now[("ptth_relayed_bytes_total", (("direction", "to_client"),))] == 5
    assert now[("ptth_requests_pending", ())] == 0


def test_a_dropped_header_is_logged_once_per_server(tunnel: Tunnel, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "ptth_lib.relay.relay")
    for _ in range(2):
        call, item = tunnel.take("/x")
        tunnel.respond(item["id"], 200, {"x-accel-redirect": b"/internal", "content-length": b"0"})
        assert "X-Accel-Redirect" not in call.get(timeout=WAIT_SECS).headers
    assert [r.message for r in caplog.records].count(
        "dropped header 'x-accel-redirect' from server alpha's responses: it would act on the relay's edge "
        "or origin (logged once an hour)") == 1


def test_a_head_request_gets_no_body_and_the_server_is_answered_at_once(tunnel: Tunnel) -> None:
    listener = gevent.spawn(tunnel.listen)
    gevent.sleep(0)
    call = tunnel.get("/frontend/servers/alpha/x", method="HEAD")
    (item,) = msgpack.unpackb(listener.get(timeout=WAIT_SECS).data, raw=False)
    assert item["req"]["method"] == "HEAD"
    answer = tunnel.respond(item["id"], 200, {"content-length": b"1000"}, b"ignored")
    assert answer.status_code == 200
    resp = call.get(timeout=WAIT_SECS)
    assert resp.status_code == 200 and resp.headers["Content-Length"] == "1000" and resp.data == b""


def test_every_queued_request_comes_in_one_listen(tunnel: Tunnel) -> None:
    tunnel.be_online()
    calls = [tunnel.get(f"/frontend/servers/alpha/{i}") for i in range(3)]
    items = msgpack.unpackb(tunnel.listen().data, raw=False)
    assert sorted(i["req"]["uri"] for i in items) == ["/0", "/1", "/2"]
    for item in items:
        tunnel.respond(item["id"], 200, {}, item["req"]["uri"].encode())
    assert [c.get(timeout=WAIT_SECS).data for c in calls] == [b"/0", b"/1", b"/2"]


# ---- a body that is not whole is cut ---------------------------------------------------------------


@pytest.mark.parametrize(("declared", "sent"), [(10, b"short"), (2, b"too long")])
def test_a_body_unlike_its_content_length_is_cut_both_ways(tunnel: Tunnel, declared: int, sent: bytes) -> None:
    call, item = tunnel.take("/lying")
    answer = tunnel.respond(item["id"], 200, {"content-length": str(declared).encode()}, sent)
    assert answer.status_code in (400, 410), answer.text
    with pytest.raises(BodyCutError):  # without a socket to shut, the WSGI server must drop the client
        call.get(timeout=WAIT_SECS)
    assert samples(tunnel)[("ptth_client_responses_cut_total", ())] == 1


def test_a_malformed_head_is_400_to_the_server_and_502_to_the_client(tunnel: Tunnel) -> None:
    call, item = tunnel.take("/x")
    answer = tunnel.respond(item["id"], head=base64.b64encode(msgpack.packb({"status_code": "200"})).decode())
    assert answer.status_code == 400 and answer.text.startswith("bad response head")
    resp = call.get(timeout=WAIT_SECS)
    assert resp.status_code == 502 and "sent a bad response" in resp.text
    assert tunnel.respond(item["id"], 200).status_code == 404  # used up


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _packed(obj: object) -> str:
    """A hand-built X-PTTH-2LJYXWC4 value of any shape: base64 of MsgPack."""
    return b64(msgpack.packb(obj))


def _raw_map(entries: int, entry: bytes) -> bytes:
    """A MsgPack map header for `entries` pairs, then the same raw pair repeated."""
    return b"\xde" + entries.to_bytes(2, "big") + entry * entries


def _head_with_raw_headers(raw_headers: bytes) -> str:
    return b64(b"\x82" + msgpack.packb("status_code") + msgpack.packb(200) + msgpack.packb("headers")
               + raw_headers)


_VALID = msgpack.packb({"status_code": 200, "headers": {"x-a": b"1"}})

# Every malformed head a server might send (value of X-PTTH-2LJYXWC4, None for none), built by hand.
# tests/e2e/test_hostile.py sends a few of them through gunicorn.
BAD_HEADS: list[tuple[str, str | None]] = [
    ("missing", None),
    ("empty", ""),
    ("base64-punctuation", "not base64!"),
    ("base64-padding-inside", "AAAA=AAA"),
    ("base64-truncated", b64(_VALID)[:-2]),
    ("base64-urlsafe-alphabet", base64.urlsafe_b64encode(
        msgpack.packb({"status_code": 200, "headers": {"x-a": b"\xfb\xef\xbe"}})).decode()),
    ("latin-1-text", "\u00e9t\u00e9\u00e9t\u00e9"),
    ("msgpack-reserved-byte", b64(b"\xc1")),
    ("msgpack-truncated", b64(_VALID[:-3])),
    ("msgpack-extra-data", b64(_VALID + b"\xc0")),
    ("msgpack-deeply-nested", b64(b"\x91" * 10_000 + b"\x90")),
    ("msgpack-huge-declared-array", b64(b"\xdd\xff\xff\xff\xff")),
    ("msgpack-huge-declared-bin", b64(b"\xc6\xff\xff\xff\xff" + b"x" * 100)),
    ("top-level-array", _packed([200, {}])),
    ("top-level-string", _packed("200")),
    ("top-level-nil", _packed(None)),
    ("headers-missing", _packed({"status_code": 200})),
    ("headers-a-list", _packed({"status_code": 200, "headers": [["x-a", b"1"]]})),
    ("headers-nil", _packed({"status_code": 200, "headers": None})),
    ("value-str", _packed({"status_code": 200, "headers": {"content-type": "text/plain"}})),
    ("value-int", _packed({"status_code": 200, "headers": {"content-length": 5}})),
    ("value-nil", _packed({"status_code": 200, "headers": {"x-a": None}})),
    ("value-bool", _packed({"status_code": 200, "headers": {"x-a": True}})),
    # Lists of values are the header-lists extension (PROTOCOL.md); each value obeys the same rules.
    ("value-list-int", _packed({"status_code": 200, "headers": {"x-a": [b"1", 2]}})),
    ("value-list-empty", _packed({"status_code": 200, "headers": {"x-a": []}})),
    ("value-list-CRLF", _packed({"status_code": 200, "headers": {"x-a": [b"1\r\nset-cookie: pwned=1"]}})),
    ("content-length-list", _packed({"status_code": 200, "headers": {"content-length": [b"5"]}})),
    ("value-map", _packed({"status_code": 200, "headers": {"x-a": {"b": b"1"}}})),
    ("name-bytes", _packed({"status_code": 200, "headers": {b"x-a": b"1"}})),
    ("name-int", _head_with_raw_headers(b"\x81\x07\xc4\x011")),
    ("name-CRLF", _packed({"status_code": 200, "headers": {"x-a\r\nset-cookie": b"pwned=1"}})),
    ("name-LF", _packed({"status_code": 200, "headers": {"x-a\nset-cookie": b"pwned=1"}})),
    ("name-CR", _packed({"status_code": 200, "headers": {"x-a\rset-cookie": b"pwned=1"}})),
    ("name-NUL", _packed({"status_code": 200, "headers": {"x-a\x00": b"1"}})),
    ("name-uppercase", _packed({"status_code": 200, "headers": {"Set-Cookie": b"pwned=1"}})),
    ("name-space", _packed({"status_code": 200, "headers": {"set-cookie ": b"pwned=1"}})),
    ("name-colon", _packed({"status_code": 200, "headers": {"set-cookie:": b"pwned=1"}})),
    ("name-empty", _packed({"status_code": 200, "headers": {"": b"1"}})),
    ("value-CRLF", _packed({"status_code": 200, "headers": {"x-a": b"ok\r\nSet-Cookie: pwned=1"}})),
    ("value-LF", _packed({"status_code": 200, "headers": {"x-a": b"ok\nSet-Cookie: pwned=1"}})),
    ("value-CR", _packed({"status_code": 200, "headers": {"x-a": b"ok\rSet-Cookie: pwned=1"}})),
    ("value-NUL", _packed({"status_code": 200, "headers": {"x-a": b"ok\x00pwned"}})),
    ("status-99", _packed({"status_code": 99, "headers": {}})),
    ("status-100", _packed({"status_code": 100, "headers": {}})),
    ("status-199", _packed({"status_code": 199, "headers": {}})),
    ("status-600", _packed({"status_code": 600, "headers": {}})),
    ("status--1", _packed({"status_code": -1, "headers": {}})),
    ("status-str", _packed({"status_code": "200", "headers": {}})),
    ("status-float", _packed({"status_code": 200.0, "headers": {}})),
    ("status-true", _packed({"status_code": True, "headers": {}})),
    ("status-2**64-1", _packed({"status_code": 2**64 - 1, "headers": {}})),
    ("status-missing", _packed({"headers": {}})),
    # 2,000 pairs with a repeated name, every value nil: just under the 16 KiB limit in base64.
    ("huge-map-2000-pairs", _head_with_raw_headers(_raw_map(2_000, b"\xa1x\xc0"))),
]


@pytest.mark.parametrize("value", [v for _, v in BAD_HEADS], ids=[i for i, _ in BAD_HEADS])
def test_a_bad_response_head_is_400_to_the_server_and_502_to_the_client_at_once(tunnel: Tunnel,
                                                                                value: str | None) -> None:
    call, item = tunnel.take("/files/bad-head")
    headers = {"X-ApiKey": KEYS["alpha"]} if value is None else {"X-ApiKey": KEYS["alpha"], HEAD_HEADER: value}
    with gevent.Timeout(1):  # at once: not after request_timeout_secs
        answer = tunnel.client.post(RESPOND + item["id"], data=b"BODY-THAT-MUST-NOT-REACH-THE-CLIENT",
                                    headers=headers)
        resp = call.get()
    assert answer.status_code == 400, answer.text
    assert resp.status_code == 502, resp.text
    assert b"BODY-THAT-MUST-NOT" not in resp.data
    assert "pwned" not in str(resp.headers).lower()
    # The id is used up: no second try with a good head gets through.
    assert tunnel.respond(item["id"], 200, {}, b"late").status_code == 404


# ---- servers: keys, ids, bounds ---------------------------------------------------------------------


def test_metrics_scrape_with_dead_weak_proxies_on_the_heap(tunnel: Tunnel) -> None:
    class Referent:
        pass
    referent = Referent()
    dead = [weakref.proxy(referent)]  # kept on the heap after its referent dies
    del referent
    resp = tunnel.client.get("/metrics")
    assert resp.status_code == 200 and b"ptth_greenlets" in resp.data, resp.text
    assert dead


def test_a_refused_listen_is_counted_audited_and_shown(tunnel: Tunnel) -> None:
    assert tunnel.listen(key="").status_code == 403
    wrong = "a-wrong-key-for-alpha-0123456789"
    assert tunnel.listen(key=wrong).status_code == 403
    stranger = "the-key-of-a-stranger-0123456789"
    resp = tunnel.listen("ghost", key=stranger)
    assert resp.status_code == 403 and "not registered" in resp.text
    assert samples(tunnel)[("ptth_backend_auth_rejected_total", ())] == 3
    rejected = [e for e in tunnel.relay.audit.recent if e["event"] == "backend_key_rejected"]
    assert [e["server"] for e in rejected] == ["alpha", "alpha", "ghost"]
    assert rejected[1]["tripcode"] == tripcode.derive(wrong) and rejected[0]["tripcode"] is None
    assert ("ghost", tripcode.derive(stranger), "127.0.0.1") in tunnel.relay.rendezvous.unregistered
    page = tunnel.client.get("/frontend/unregistered_servers").text
    assert tripcode.derive(stranger) in page and stranger not in page


def test_a_response_id_belongs_to_its_server(tunnel: Tunnel) -> None:
    call, item = tunnel.take("/x")
    forged = tunnel.respond(item["id"], 200, {}, b"forged", key=KEYS["beta"])
    assert forged.status_code == 403 and "another server" in forged.text
    assert tunnel.relay.audit.recent[-1]["request"] == item["id"]
    assert tunnel.respond("NOSUCHID", 200).status_code == 404
    assert tunnel.respond(item["id"], 200, {}, b"real").status_code == 200
    assert call.get(timeout=WAIT_SECS).data == b"real"


def test_backend_paths_take_their_own_method_only(tunnel: Tunnel) -> None:
    assert tunnel.client.put(LISTEN + "alpha").status_code == 405
    assert tunnel.client.post(LISTEN + "alpha").status_code == 403  # a listen carrying answers: needs the key
    assert tunnel.client.get(RESPOND + "SOMEID").status_code == 405
    assert tunnel.client.get(LISTEN + "alpha/extra").status_code == 404  # not a hot path: Flask's 404


def test_too_many_listens_are_429_with_retry_after(tunnel: Tunnel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rendezvous, "MAX_LISTENERS_PER_SERVER", 1)
    parked = gevent.spawn(tunnel.listen)
    gevent.sleep(0)
    resp = tunnel.listen()
    assert resp.status_code == 429 and resp.headers["Retry-After"] == "5"
    tunnel.relay.close()
    assert parked.get(timeout=WAIT_SECS).status_code == 204


def test_a_listen_asking_for_nothing_is_answered_at_once(tunnel: Tunnel) -> None:
    for headers in ({"X-PTTH-Wait-Secs": "0"}, {"X-PTTH-Max-Requests": "0"}):
        with gevent.Timeout(1):
            assert tunnel.listen(**headers).status_code == 204


def test_a_spec_002_servers_listen_ends_within_its_limit_and_ptth_servers_wait_longer(
        make_tunnel: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server announcing no feature gets SPEC_002_LISTEN_SECS at most; PTTH's get listen_timeout_secs."""
    monkeypatch.setattr(relay_module, "SPEC_002_LISTEN_SECS", 0.3)
    tunnel = make_tunnel(listen_timeout_secs=2)
    spec_002 = gevent.spawn(tunnel.listen)
    ptth = gevent.spawn(tunnel.listen, **{"X-PTTH-Features": "ack"})
    started = time.monotonic()
    assert spec_002.get(timeout=1.5).status_code == 204
    assert 0.3 <= time.monotonic() - started < 1.5
    assert not ptth.ready()  # still parked
    assert ptth.get(timeout=3).status_code == 204
    assert 2 <= time.monotonic() - started < 3  # listen_timeout_secs, up to the next tenth of a second


def test_listens_end_on_a_grid_so_that_a_fleets_re_listens_come_in_batches() -> None:
    ends = rendezvous.ListenEnds()
    assert ends.deadline(1000.03, 0) == 1000.03  # answered at once
    # 10 listens in a second: each ends on the 0.1 s grid.
    assert [round(ends.deadline(1001.05 + i / 10, 120), 6) for i in range(10)] == [
        round(1121.1 + i / 10, 6) for i in range(10)]

    def batches(second: int, per_second: int) -> list[int]:
        counts: dict[float, int] = {}
        for i in range(per_second):
            started = second + i / per_second
            end = round(ends.deadline(started, 120), 6)
            assert started + 120 <= end <= started + 120.1
            counts[end] = counts.get(end, 0) + 1
        return list(counts.values())

    # 320 in a second: finer as their number grows, batches of 32 at most...
    assert max(batches(1002, 320)) <= 2 * rendezvous.LISTEN_END_BATCH
    # ...and at the same rate the next second, of LISTEN_END_BATCH at most (a 0.05 s grid).
    assert max(batches(1003, 320)) <= rendezvous.LISTEN_END_BATCH


def test_an_acknowledged_batch_is_released_by_the_next_listen(tunnel: Tunnel) -> None:
    listener = gevent.spawn(tunnel.listen, **{"X-PTTH-Features": "ack"})
    gevent.sleep(0)
    call = tunnel.get("/frontend/servers/alpha/x")
    answer = listener.get(timeout=WAIT_SECS)
    batch = answer.headers["X-PTTH-Batch"]
    assert batch in tunnel.relay.rendezvous.leases
    acked = tunnel.listen(**{"X-PTTH-Features": "ack", "X-PTTH-Ack": batch, "X-PTTH-Wait-Secs": "0"})
    assert acked.status_code == 204 and batch not in tunnel.relay.rendezvous.leases
    (item,) = msgpack.unpackb(answer.data, raw=False)
    tunnel.respond(item["id"], 204)
    assert call.get(timeout=WAIT_SECS).status_code == 204


def test_a_server_that_leaves_fails_its_waiting_requests_at_once(tunnel: Tunnel,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rendezvous, "LEAVE_GRACE_SECS", 0.1)
    watcher = gevent.spawn(tunnel.relay.rendezvous.watch_presence, 0.05)
    try:
        tunnel.be_online()
        assert tunnel.client.post(LEAVE + "alpha", headers={"X-ApiKey": KEYS["beta"]}).status_code == 403
        call = tunnel.get("/frontend/servers/alpha/x")
        resp = tunnel.client.post(LEAVE + "alpha", headers={"X-ApiKey": KEYS["alpha"]})
        assert (resp.status_code, resp.text) == (200, "goodbye\n")
        answer = call.get(timeout=WAIT_SECS)
        assert answer.status_code == 502 and "went offline" in answer.text
    finally:
        watcher.kill()


# ---- clients: paths, servers, bounds ------------------------------------------------------------


@pytest.mark.parametrize(("path", "status", "location"), [
    ("/frontend/servers/alpha", 302, "alpha/"),
    ("/frontend/servers/alpha%2F..%2Fbeta/x", 400, None),
    ("/frontend/servers/alpha/../beta/x", 400, None),
    ("/servers/alpha/files/x", 308, "/frontend/servers/alpha/files/x"),
    ("/servers/alpha%2F..%2Fbeta/x", 400, None),
    ("/frontend/servers/nobody/x", 404, None),
    ("/frontend/servers/alpha/x", 502, None),  # registered, never connected: offline
])
def test_a_path_names_one_server_or_is_answered_at_once(tunnel: Tunnel, path: str, status: int,
                                                        location: str | None) -> None:
    with gevent.Timeout(1):
        resp = tunnel.client.get(path)
    assert resp.status_code == status, resp.text
    assert resp.headers.get("Location") == location


@pytest.mark.parametrize("path", [
    "/frontend/servers/alpha%2F..%2Fbeta/files/secret.txt",
    "/frontend/servers/beta%2F..%2Falpha/files/secret.txt",
    "/frontend/servers/alpha%2f..%2fbeta/files/secret.txt",
    "/frontend/servers/alpha/%2e%2e/beta/files/secret.txt",
    "/frontend/servers/alpha/../beta/files/secret.txt",
    "/frontend/servers/beta\\..\\alpha/files/secret.txt",
    "/frontend/servers/beta%5C..%5Calpha/files/secret.txt",
    "/frontend/servers/be%00ta/files/secret.txt",
    "/servers/beta%2F..%2Falpha/files/secret.txt",
    "/scraper/v1/server/beta%2F..%2Falpha/files/secret.txt",
])
def test_a_path_that_could_be_read_two_ways_is_refused(tunnel: Tunnel, path: str) -> None:
    """tests/e2e/test_edge.py sends two of these raw through gunicorn (curl --path-as-is)."""
    tunnel.be_online("alpha")
    tunnel.be_online("beta")
    with gevent.Timeout(1):
        resp = tunnel.client.get(path)
    # The scraper API is off here: its 404 comes first.
    assert resp.status_code == (404 if path.startswith("/scraper/") else 400), (path, resp.status_code)
    assert not tunnel.relay.rendezvous.pending, "a request reached a server's queue"


def test_a_path_starting_with_two_slashes_is_refused(tunnel: Tunnel) -> None:
    """werkzeug would route "//x" as "/x"; a proxy in front may not (the test client cannot send it as is)."""
    resp = tunnel.client.get("/", environ_overrides={"PATH_INFO": "//frontend/servers/alpha/x"})
    assert resp.status_code == 400 and "//" in resp.text


def test_the_alias_can_be_turned_off(make_tunnel: Any) -> None:
    resp = make_tunnel(servers_alias=False).client.get("/servers/alpha/x")
    assert resp.status_code == 404 and "servers_alias" in resp.text


def test_a_request_with_a_body_is_not_relayed(tunnel: Tunnel) -> None:
    tunnel.be_online()
    assert tunnel.client.post("/frontend/servers/alpha/x", data=b"body").status_code == 501


def test_a_request_head_over_the_limit_is_431(tunnel: Tunnel) -> None:
    tunnel.be_online()
    resp = tunnel.client.get("/frontend/servers/alpha/x", headers={f"x-big-{i}": "v" * 8000 for i in range(40)})
    assert resp.status_code == 431


def test_a_full_queue_is_503_with_retry_after(make_tunnel: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rendezvous, "MAX_QUEUED_PER_SERVER", 2)
    t = make_tunnel()
    t.be_online()
    waiting = [t.get("/frontend/servers/alpha/x") for _ in range(2)]
    resp = t.client.get("/frontend/servers/alpha/x")
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "5"
    assert [w.get(timeout=WAIT_SECS).status_code for w in waiting] == [502, 502]  # never picked up


def test_one_address_waits_its_turn_another_does_not(make_tunnel: Any) -> None:
    t = make_tunnel(requests_per_address=1)
    first, item = t.take("/first", environ_base={"REMOTE_ADDR": "203.0.113.7"})
    second = t.get("/frontend/servers/alpha/second", environ_base={"REMOTE_ADDR": "203.0.113.7"})
    other = t.get("/frontend/servers/alpha/other", environ_base={"REMOTE_ADDR": "198.51.100.1"})
    items = msgpack.unpackb(t.listen().data, raw=False)
    assert [i["req"]["uri"] for i in items] == ["/other"]  # the second waits for the first to finish
    t.respond(items[0]["id"], 200, {}, b"other")
    t.respond(item["id"], 200, {}, b"first")
    assert first.get(timeout=WAIT_SECS).data == b"first" and other.get(timeout=WAIT_SECS).data == b"other"
    (late,) = msgpack.unpackb(t.listen().data, raw=False)
    assert late["req"]["uri"] == "/second"
    t.respond(late["id"], 200, {}, b"second")
    assert second.get(timeout=WAIT_SECS).data == b"second"


# ---- the edge: addresses, operators, the relay's own pages -----------------------------------------


def request_from(peer: str, **headers: str) -> Request:
    return Request(EnvironBuilder(path="/metrics", headers=headers, environ_base={"REMOTE_ADDR": peer})
                   .get_environ())


def test_forwarded_for_counts_only_from_a_trusted_proxy(make_tunnel: Any, caplog: pytest.LogCaptureFixture) -> None:
    relay = make_tunnel(trusted_proxies=["127.0.0.1/32"]).relay
    assert relay.client_address(request_from("127.0.0.1", **{"X-Forwarded-For": "198.51.100.2"})) \
        == "198.51.100.2"
    for _ in range(2):
        assert relay.client_address(request_from("203.0.113.9", **{"X-Forwarded-For": "1.2.3.4"})) \
            == "203.0.113.9"
    assert sum("203.0.113.9 is not in trusted_proxies" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize(("peer", "headers", "operator"), [
    ("127.0.0.1", {}, True),
    ("203.0.113.9", {}, False),
    ("203.0.113.9", {"X-Forwarded-For": "127.0.0.1"}, False),  # a client cannot claim to be local
    ("127.0.0.1", {"X-Real-IP": "203.0.113.9"}, False),  # an untrusted proxy proves nothing
])
def test_operators_are_this_machine_only(tunnel: Tunnel, peer: str, headers: dict[str, str],
                                         operator: bool) -> None:
    assert tunnel.relay.is_operator(request_from(peer, **headers)) is operator
    for path in ("/metrics", "/frontend/unregistered_servers"):
        resp = tunnel.client.get(path, headers=headers, environ_base={"REMOTE_ADDR": peer})
        assert resp.status_code == (200 if operator else 403), path


def test_the_relays_own_pages_carry_its_headers_and_path_redirects(tunnel: Tunnel) -> None:
    for path in ("/", "/frontend/servers/", "/frontend/relay_up_check", "/no-such-page"):
        resp = tunnel.client.get(path)
        assert resp.headers["X-Frame-Options"] == "DENY", path
        assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"], path
    resp = tunnel.client.get("/frontend/servers", headers={"Host": "attacker.example"})
    assert resp.status_code in (301, 308) and resp.headers["Location"] == "/frontend/servers/"


def test_the_server_list_as_json_and_html(tunnel: Tunnel) -> None:
    tunnel.be_online()
    entries = tunnel.client.get("/frontend/servers/", headers={"Accept": "application/json"}).json
    assert [(e["name"], e["online"]) for e in entries] == [("alpha", True), ("beta", False)]
    page = tunnel.client.get("/frontend/servers/").text
    assert '<span class="badge on">online</span>' in page and '<span class="badge off">offline</span>' in page


def test_operators_pages_that_are_off_say_so(make_tunnel: Any) -> None:
    t = make_tunnel(metrics=False)
    assert t.client.get("/metrics").status_code == 404
    assert "audit_log" in t.client.get("/frontend/audit_log").text


# ---- the scraper API --------------------------------------------------------------------------------


def test_the_scraper_api_relays_like_the_frontend(make_tunnel: Any) -> None:
    key = "a-scraper-key-for-the-unit-tests-0123"
    t = make_tunnel(enable_scraper_api=True, scraper_keys=[{"name": "bot", "hash": tripcode.derive(key)}])
    assert t.client.get("/scraper/v1/test").status_code == 403
    assert t.client.get("/scraper/v1/test", headers={"X-ApiKey": key}).status_code == 200
    listener = gevent.spawn(t.listen)
    gevent.sleep(0)
    call = t.get("/scraper/v1/server/alpha/files/x", headers={"X-ApiKey": key})
    (item,) = msgpack.unpackb(listener.get(timeout=WAIT_SECS).data, raw=False)
    assert item["req"]["uri"] == "/files/x" and "x-apikey" not in item["req"]["headers"]
    t.respond(item["id"], 200, {}, b"scraped")
    assert call.get(timeout=WAIT_SECS).data == b"scraped"
    bad = t.client.get("/scraper/v1/server/alpha%2F..%2Fbeta/x", headers={"X-ApiKey": key})
    assert bad.status_code == 400
    events = [e["event"] for e in t.relay.audit.recent]
    assert events.count("scraper_key_used") == 3 and events.count("scraper_key_rejected") == 1


# ---- life: start, stop, reload --------------------------------------------------------------------


def test_closing_answers_parked_listens_at_once(tunnel: Tunnel) -> None:
    parked = [gevent.spawn(tunnel.listen), gevent.spawn(tunnel.client.post, "/7ZSFUKGV/tcp_listen/alpha/ssh",
                                                       headers={"X-ApiKey": KEYS["alpha"]})]
    gevent.sleep(0.05)
    assert not any(p.ready() for p in parked)
    tunnel.relay.close()
    assert [p.get(timeout=1).status_code for p in parked] == [204, 204]
    assert tunnel.listen().status_code == 204  # and new ones are not parked


def test_a_reload_ends_the_listens_of_a_removed_server(tunnel: Tunnel, tmp_path: Path) -> None:
    parked = gevent.spawn(tunnel.listen, "beta")
    gevent.sleep(0)
    audit = tmp_path / "audit.jsonl"
    tunnel.relay.reconfigure(parse_relay_config({
        "servers": [{"name": "alpha", "tripcode": tripcode.derive(KEYS["alpha"])}],
        "audit_log": str(audit)}, "test"))
    assert parked.get(timeout=1).status_code == 204
    assert tunnel.listen("beta").status_code == 403
    assert tunnel.relay.config.audit_log == str(audit)
    tunnel.relay.audit.set_path(None)  # closes the file
    assert "backend_key_rejected" in audit.read_text()


def test_create_app_starts_the_relay_and_keeps_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(f'[[servers]]\nname = "alpha"\ntripcode = "{tripcode.derive(KEYS["alpha"])}"\n')
    started: list[gevent.Greenlet] = []
    start = Relay.start
    monkeypatch.setattr(Relay, "start", lambda self: started.extend(start(self)) or started)
    app = create_app(load_relay_config(str(path)), config_path=str(path))
    try:
        relay = relay_of(app)
        assert relay is not None and relay.watcher is not None and relay_of(object()) is None
        # presence, forwarding, the dashboard's samples, the refusals' log, the config file
        assert len(started) == 5 and not any(g.dead for g in started)
        path.write_text(path.read_text().replace('"alpha"', '"gamma"'))
        assert relay.reload_config() and list(relay.config.servers) == ["gamma"]
        assert app.test_client().get("/frontend/relay_up_check").text == "Relay is up\n"
        relay.close()
    finally:
        gevent.killall(started)


def test_port_forwarding_needs_a_server_that_reads_promptly(make_tunnel: Any) -> None:
    """Under a WSGI server that hides its body readers (here werkzeug's test client) it refuses, 501."""
    client_key = "a-forwarding-client-key-0123456789"
    t = make_tunnel(clients=[{"name": "laptop", "tripcode": tripcode.derive(client_key), "allow": ["alpha:*"]}])
    resp = t.client.post("/frontend/tcp/connect/alpha/ssh", headers={"X-ApiKey": client_key})
    assert resp.status_code == 501 and "gunicorn" in resp.text
    assert t.client.post("/frontend/tcp/connect/alpha/bad%20name", headers={"X-ApiKey": client_key}) \
        .status_code == 400


# ---- cluster mode stays out of the single-process relay ---------------------------------------


def test_the_single_process_relay_never_imports_redis() -> None:
    """Without redis_url nothing of cluster mode loads (CLUSTER.md section 7): a fresh interpreter
    builds a Relay and its app and serves a request, and the redis client is not among its modules.
    (In this process another test may have imported it.)
    """
    script = f"""
import sys
from ptth_lib.config import parse_relay_config
from ptth_lib.relay.app import create_app, relay_of
app = create_app(parse_relay_config({{"servers": [{{"name": "alpha", "tripcode": {tripcode.derive(KEYS["alpha"])!r}}}]}},
                                    "test"))
assert app.test_client().get("/frontend/relay_up_check").status_code == 200
relay_of(app).close()
print(sorted(m for m in sys.modules if m == "redis" or m.startswith(("redis.", "ptth_lib.relay.cluster"))))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[2],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
