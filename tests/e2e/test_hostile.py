"""Hostile peers and hostile input, against the real relay and server processes.

1. a server sending malformed response heads (X-PTTH-2LJYXWC4) to the real relay;
2. servers abusing the backend API (keys, ids, config reloads);
3. clients trying request smuggling on the relay's frontend, on raw sockets;
4. a malicious relay (a fake one run in this process) feeding the real ptth_server;
5. hostile files in the served folder: long paths, non-UTF-8 names, devices, FIFOs;
6. secrets: no API key or scraper key shows up anywhere the processes write.

The relay runs under gunicorn (gevent worker) and the server is the real
ptth_server, all on 127.0.0.1. Messages are built by hand with msgpack, never
with ptth_lib, so the wire format is pinned independently. Every wait is
bounded in count and time.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote, unquote

import msgpack
import pytest
import relay_modes
import requests
from conftest import Cluster, Proc, Relay, Server, new_key, tripcode_of, wait_until
from hypothesis import given, settings
from hypothesis import strategies as st
from procs import relay_samples

from ptth_lib.errors import ProtocolError
from ptth_lib.wire.envelope import MAX_RESPONSE_HEAD_BYTES, decode_response_head

LISTEN = "/7ZSFUKGV/http_listen/"
RESPOND = "/7ZSFUKGV/http_response/"
HEAD_HEADER = "X-PTTH-2LJYXWC4"
# A listen's wishes (PROTOCOL.md): how many requests it takes at most, whether it may be parked.
MAX_REQUESTS_HEADER = "X-PTTH-Max-Requests"
WAIT_HEADER = "X-PTTH-Wait-Secs"
# How long the fake relay parks a listen with nothing to send: past ptth_server's 1 s
# (PARKED_CUT_SECS), below which it takes a 204 as a relay answering at once.
PARK_SECS = 1.5
# "At once": answered without waiting for any timeout. The timeouts these must
# beat are 5 s or more; 2 s leaves room for a busy 2-core machine.
AT_ONCE_SECS = 2.0
SECRET = b"SECRET-6b1e0f0c-this-file-lies-outside-the-root"
# A saved relay config applies within one check interval (2 s).
RELOAD_DEADLINE_SECS = 10.0


# ---- helpers ---------------------------------------------------------------


def packed_head(obj: object) -> str:
    """A hand-built X-PTTH-2LJYXWC4 value: base64 of MsgPack."""
    return base64.b64encode(msgpack.packb(obj)).decode("ascii")


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def metric_total(relay: Relay, name: str) -> float:
    """The sum of every sample of metric `name` on /metrics."""
    return sum(value for (sample, _), value in relay_samples(relay.url).items() if sample == name)


def save_config(relay: Relay, text: str) -> None:
    """Save the relay config as editors do: write a new file, rename it over the old one."""
    tmp = relay.config.with_suffix(".saving")
    tmp.write_text(relay_modes.as_deployed(relay.config, text))
    os.replace(tmp, relay.config)


def relay_toml(servers: dict[str, str], extra: str = "") -> str:
    text = extra + "\n"
    for name, key in servers.items():
        text += f'[[servers]]\nname = "{name}"\ntripcode = "{tripcode_of(key)}"\n'
    return text


class ClientCall:
    """A client request running in a thread while the test plays the server."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        self.response: requests.Response | None = None
        self.error: BaseException | None = None
        self.finished_at = 0.0
        self._thread = threading.Thread(target=self._run, args=(url,), kwargs=kwargs, daemon=True)
        self._thread.start()

    def _run(self, url: str, **kwargs: Any) -> None:
        try:
            self.response = requests.get(url, timeout=60, **kwargs)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            self.error = e
        self.finished_at = time.monotonic()

    def join(self, timeout: float = 60) -> requests.Response:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "client request did not finish"
        assert self.response is not None, f"client request failed: {self.error!r}"
        return self.response


@dataclass
class HandServer:
    """Plays a registered server by hand: one listen per client request."""

    relay: Relay
    name: str
    key: str

    def listen(self, key: str | None = None, name: str | None = None, timeout: float = 30) -> requests.Response:
        headers = {} if key == "" else {"X-ApiKey": key or self.key}
        return requests.get(self.relay.url + LISTEN + quote(name or self.name, safe=""), headers=headers,
                            timeout=timeout)

    def take(self, path: str, **client_kwargs: Any) -> tuple[ClientCall, str]:
        """Start a client request for `path`, pick it up with a listen; return the call and its id."""
        box: dict[str, requests.Response] = {}
        listener = threading.Thread(target=lambda: box.update(r=self.listen()), daemon=True)
        listener.start()
        # A listen answered at once (a request left over in the queue) fails below, without waiting.
        wait_until(lambda: "r" in box or metric_total(self.relay, "ptth_listeners_waiting") >= 1,
                   "a parked listen", self.relay.proc, 10)
        call = ClientCall(f"{self.relay.url}/frontend/servers/{self.name}{path}", **client_kwargs)
        listener.join(15)
        assert "r" in box and box["r"].status_code == 200, box
        items = msgpack.unpackb(box["r"].content, raw=False)
        assert [item["req"]["uri"] for item in items] == [path], "the listen took another request"
        return call, items[0]["id"]

    def respond(self, rid: str, status: int = 200, headers: dict[str, bytes] | None = None,
                body: bytes = b"", key: str | None = None) -> requests.Response:
        head = packed_head({"status_code": status, "headers": headers or {}})
        return requests.post(self.relay.url + RESPOND + quote(rid, safe=""), data=body, timeout=30,
                             headers={"X-ApiKey": key or self.key, HEAD_HEADER: head})

    def round_trip(self, tag: str = "ok") -> None:
        """The legit flow still works: a client request answered by this server."""
        call, rid = self.take(f"/legit/{tag}")
        body = f"legit answer {tag}".encode()
        r = self.respond(rid, 200, {"content-length": str(len(body)).encode()}, body)
        assert r.status_code == 200, r.text
        resp = call.join()
        assert (resp.status_code, resp.content) == (200, body)


@dataclass
class HandRelay:
    relay: Relay
    raw: HandServer
    other: HandServer


@pytest.fixture(scope="module")
def hand(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HandRelay]:
    """A relay with two servers, raw and other, both played by hand."""
    c = Cluster(tmp_path_factory.mktemp("hand"))
    raw_key, other_key = new_key("raw"), new_key("other")
    relay = c.relay({"raw": raw_key, "other": other_key}, extra="listen_timeout_secs = 5\nrequest_timeout_secs = 5")
    yield HandRelay(relay, HandServer(relay, "raw", raw_key), HandServer(relay, "other", other_key))
    c.close()


# ---- 1. malformed response heads through the real relay ----------------------


def _raw_map(entries: int, entry: bytes) -> bytes:
    """A MsgPack map header for `entries` pairs, then the same raw pair repeated."""
    return b"\xde" + entries.to_bytes(2, "big") + entry * entries


# The whole table of malformed heads is tests/unit/test_relay.py's BAD_HEADS, in-process. These go
# through gunicorn: no header, a header in Latin-1, CR/LF inside, and one just under gunicorn's limit.
BAD_HEADS: list[tuple[str, str | None]] = [
    ("missing", None),
    ("latin-1-text", "\u00e9t\u00e9\u00e9t\u00e9"),
    ("name-CRLF", packed_head({"status_code": 200, "headers": {"x-a\r\nset-cookie": b"pwned=1"}})),
    # 2,000 pairs with a repeated name, every value nil: just under the 16 KiB limit in base64.
    ("huge-map-2000-pairs", b64(b"\x82" + msgpack.packb("status_code") + msgpack.packb(200)
                                + msgpack.packb("headers") + _raw_map(2_000, b"\xa1x\xc0"))),
]


def _post_head(hand: HandRelay, rid: str, value: str | None) -> tuple[requests.Response, float]:
    headers = {"X-ApiKey": hand.raw.key}
    if value is not None:
        headers[HEAD_HEADER] = value
    started = time.monotonic()
    r = requests.post(hand.relay.url + RESPOND + rid, data=b"BODY-THAT-MUST-NOT-REACH-THE-CLIENT",
                      headers=headers, timeout=10)
    return r, started


def _assert_refused_at_once(hand: HandRelay, call: ClientCall, r: requests.Response, started: float,
                            what: str) -> None:
    post_secs = time.monotonic() - started
    resp = call.join()
    client_secs = call.finished_at - started
    problems = []
    # 431 (gunicorn's own answer to an oversized header) is as clear as 400 to the server.
    if r.status_code not in (400, 431) or post_secs >= AT_ONCE_SECS:
        problems.append(f"the server's POST got {r.status_code} after {post_secs:.1f} s "
                        f"(want 400 at once): {r.text[:200]!r}")
    if resp.status_code != 502 or client_secs >= AT_ONCE_SECS:
        problems.append(f"the client got {resp.status_code} after {client_secs:.1f} s "
                        f"(want 502 at once): {resp.text[:200]!r}")
    assert not problems, f"{what}: " + "; ".join(problems)
    assert b"BODY-THAT-MUST-NOT" not in resp.content
    assert "pwned" not in str(resp.headers).lower()


@pytest.mark.process
@pytest.mark.parametrize("value", [v for _, v in BAD_HEADS], ids=[i for i, _ in BAD_HEADS])
def test_bad_response_head_is_400_to_the_server_and_502_to_the_client_at_once(
        hand: HandRelay, value: str | None) -> None:
    call, rid = hand.raw.take("/files/bad-head")
    r, started = _post_head(hand, rid, value)
    _assert_refused_at_once(hand, call, r, started, "malformed head")
    # The id is used up: no second try with a good head gets through.
    assert hand.raw.respond(rid, 200, {}, b"late").status_code == 404


@pytest.mark.direct_relay  # nginx in front answers or changes this itself
@pytest.mark.process
def test_head_over_the_header_limit_is_refused_by_gunicorn(hand: HandRelay) -> None:
    """A head past gunicorn's field limit never reaches the relay's code: 431 to the server at once.

    Its client then waits for request_timeout_secs and gets 504 (PROTOCOL.md); ptth_server
    never sends such a head.
    """
    value = packed_head({"status_code": 200, "headers": {f"x-{i}": b"v" for i in range(10_000)}})
    call, rid = hand.raw.take("/files/huge-head")
    r, started = _post_head(hand, rid, value)
    assert r.status_code == 431 and time.monotonic() - started < AT_ONCE_SECS
    resp = call.join()
    assert resp.status_code == 504


@pytest.mark.process
def test_response_head_at_the_limit_is_accepted(hand: HandRelay) -> None:
    """PROTOCOL.md: the head header is "at most 16 KiB"; one of exactly that many characters is legal."""
    limit = MAX_RESPONSE_HEAD_BYTES
    n = limit // 2
    while len(packed_head({"status_code": 200, "headers": {"x-pad": b"a" * n}})) < limit:
        n += 1
    value = packed_head({"status_code": 200, "headers": {"x-pad": b"a" * n}})
    assert len(value) == limit
    call, rid = hand.raw.take("/files/big-head")
    r = requests.post(hand.relay.url + RESPOND + rid, data=b"ok", timeout=30,
                      headers={"X-ApiKey": hand.raw.key, HEAD_HEADER: value})
    resp = call.join()
    assert r.status_code == 200, (
        f"a {len(value)}-character head (the documented maximum) got {r.status_code} {r.reason}: "
        f"gunicorn's limit_request_field_size counts the header's name too")
    assert resp.status_code == 200 and resp.content == b"ok"


# Not starting with U+00A0: requests refuses to send a value that starts with whitespace, and
# an example that raises before its POST leaves its request unanswered for the next examples.
_HEAD_TEXT = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0xFF,
                                            blacklist_characters="\x7f", blacklist_categories=("Cc",)),
                     min_size=1, max_size=300).filter(lambda s: not s[0].isspace())
# Header values without control characters: those are test_control_characters_in_head_values'.
_PLAIN_VALUES = st.binary(max_size=60).map(lambda b: bytes(c for c in b if c >= 0x20 and c != 0x7F))


@pytest.mark.process
@settings(max_examples=30, deadline=None, database=None)
@given(st.one_of(st.binary(max_size=300).map(b64), _HEAD_TEXT,
                 _PLAIN_VALUES.map(lambda v: packed_head({"status_code": 200, "headers": {"x-a": v}})),
                 st.dictionaries(st.text(max_size=8), _PLAIN_VALUES, max_size=4).map(
                     lambda h: packed_head({"status_code": 200, "headers": h}))))
def test_random_heads_through_the_relay(hand: HandRelay, value: str) -> None:
    """Whatever the head, the relay answers at once: relayed if valid, else 400 and 502."""
    try:
        expected: int | None = decode_response_head(value).status_code
    except ProtocolError:
        expected = None
    call, rid = hand.raw.take("/files/random-head")
    r, started = _post_head(hand, rid, value)
    if expected is None:
        _assert_refused_at_once(hand, call, r, started, f"head {value[:80]!r}")
    else:
        resp = call.join()
        assert r.status_code == 200 and resp.status_code == expected


@pytest.mark.process
@pytest.mark.parametrize("value", [b"\x01", b"\x1b[31mred", b"\x7f"], ids=["SOH", "ESC", "DEL"])
def test_control_characters_in_head_values(cluster: Cluster, value: bytes) -> None:
    """PROTOCOL.md bans only CR, LF and NUL in values; gunicorn refuses to send any control character.

    Whatever the relay does with such a value (refuse it: 400 and 502; or drop it),
    both sides must get an answer at once and the request must not stay pending.
    """
    key = new_key("raw")
    relay = cluster.relay({"raw": key}, extra="listen_timeout_secs = 5\nrequest_timeout_secs = 5")
    raw = HandServer(relay, "raw", key)
    call, rid = raw.take("/files/ctl")
    head = packed_head({"status_code": 200, "headers": {"x-a": value, "content-length": b"4"}})
    started = time.monotonic()
    try:
        r = requests.post(relay.url + RESPOND + rid, data=b"body", timeout=AT_ONCE_SECS + 3,
                          headers={"X-ApiKey": key, HEAD_HEADER: head})
        post = f"{r.status_code} after {time.monotonic() - started:.1f} s"
    except requests.ReadTimeout:
        post = f"no answer in {AT_ONCE_SECS + 3:.0f} s"
    resp = call.join()
    client = f"{resp.status_code} after {call.finished_at - started:.1f} s"
    pending = metric_total(relay, "ptth_requests_pending")
    assert (resp.status_code != 500 and call.finished_at - started < AT_ONCE_SECS
            and post.endswith(" s") and not post.startswith("no") and pending == 0), (
        f"header value {value!r}: client got {client}, the server's POST got {post}, "
        f"ptth_requests_pending = {pending:.0f}")
    assert "Traceback" not in relay.proc.output(), relay.proc.output()[-2000:]


# ---- 2. abusing the backend API ----------------------------------------------


@pytest.mark.process
def test_response_without_a_key_is_403_and_leaves_the_request_answerable(hand: HandRelay) -> None:
    call, rid = hand.raw.take("/files/no-key")
    head = packed_head({"status_code": 200, "headers": {}})
    for headers in ({HEAD_HEADER: head}, {HEAD_HEADER: head, "X-ApiKey": ""}):
        r = requests.post(hand.relay.url + RESPOND + rid, data=b"forged", headers=headers, timeout=10)
        assert r.status_code == 403, r.text
    assert hand.raw.respond(rid, 200, {}, b"real").status_code == 200
    assert call.join().content == b"real"
    assert hand.raw.listen(key="").status_code == 403
    hand.raw.round_trip("after-no-key")


@pytest.mark.process
def test_another_registered_servers_key_is_refused(hand: HandRelay) -> None:
    raw, other = hand.raw, hand.other
    assert raw.listen(key=other.key).status_code == 403  # other's key, raw's name
    call, rid = raw.take("/files/cross")
    r = raw.respond(rid, 200, {}, b"forged by other", key=other.key)  # an id that belongs to raw
    assert r.status_code == 403, r.text
    assert raw.respond(rid, 200, {}, b"real").status_code == 200
    assert call.join().content == b"real"
    raw.round_trip("after-cross-key")
    other.round_trip("other-still-works")


@pytest.mark.process
def test_guessed_response_ids_are_404(hand: HandRelay) -> None:
    rng = random.Random(7)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    guesses = ["".join(rng.choice(alphabet) for _ in range(16)) for _ in range(30)]
    guesses += ["..", "%2e%2e", "A" * 2000, "\u00c4\u00d6\u00dc", "%00", "a/b", "0", "-1", "NOSUCHID"]
    for rid in guesses:
        for key in (hand.raw.key, hand.other.key):
            r = hand.raw.respond(rid, 200, {}, b"guess", key=key)
            assert r.status_code == 404, (rid[:40], r.status_code, r.text[:200])
    hand.raw.round_trip("after-guessing")


@pytest.mark.process
def test_replayed_response_id_while_the_first_answer_streams_is_404(hand: HandRelay) -> None:
    call, rid = hand.raw.take("/files/replay", stream=True)
    head = packed_head({"status_code": 200, "headers": {"content-length": b"200000"}})
    sock = socket.create_connection(("127.0.0.1", hand.relay.port), timeout=10)
    try:
        sock.sendall((f"POST {RESPOND}{rid} HTTP/1.1\r\nHost: x\r\nX-ApiKey: {hand.raw.key}\r\n"
                      f"{HEAD_HEADER}: {head}\r\nContent-Length: 200000\r\n\r\n").encode() + b"a" * 100_000)
        resp = call.join()
        assert resp.status_code == 200
        for body in (b"replayed", b"b" * 200_000):
            assert hand.raw.respond(rid, 200, {}, body).status_code == 404
        sock.sendall(b"a" * 100_000)
        assert resp.content == b"a" * 200_000
        answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200"), answer
    finally:
        sock.close()
    assert hand.raw.respond(rid, 200, {}, b"again").status_code == 404
    hand.raw.round_trip("after-replay")


@pytest.mark.process
def test_unregistered_names_are_listed_bounded_and_escaped(hand: HandRelay) -> None:
    # (The URL path must stay under gunicorn's 4,094-byte request line, and hold no "/".)
    names = [f"stranger-{i}" for i in range(55)] + ['<img src=x onerror="alert(1)">', "x" * 3000]
    for name in names:
        assert hand.raw.listen(key=new_key("stranger"), name=name).status_code == 403
    page = requests.get(hand.relay.url + "/frontend/unregistered_servers", timeout=10).text
    assert page.count("<tr>") - 1 <= 50, "the unregistered servers list is not bounded"
    assert "<img src=x" not in page
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in page or "&lt;img src=x" in page
    assert "x" * 65 not in page
    hand.raw.round_trip("after-strangers")


@pytest.mark.process
def test_a_server_removed_from_the_config_is_refused(cluster: Cluster) -> None:
    keys = {"raw": new_key("raw"), "gone": new_key("gone")}
    extra = "listen_timeout_secs = 1\nrequest_timeout_secs = 5"
    relay = cluster.relay(keys, extra=extra)
    raw, gone = HandServer(relay, "raw", keys["raw"]), HandServer(relay, "gone", keys["gone"])
    assert gone.listen().status_code == 204
    call, rid = raw.take("/files/before-reload")

    before = relay.proc.output().count("config reloaded from")
    save_config(relay, relay_toml({"raw": keys["raw"]}, extra))
    wait_until(lambda: relay.logged_by_all("config reloaded from", before), "config reload",
               relay.proc, RELOAD_DEADLINE_SECS)

    assert gone.listen().status_code == 403
    assert requests.get(f"{relay.url}/frontend/servers/gone/files/", timeout=10).status_code == 404
    assert raw.respond(rid, 200, {}, b"forged by gone", key=gone.key).status_code == 403
    assert raw.respond(rid, 200, {}, b"real").status_code == 200
    assert call.join().content == b"real"
    raw.round_trip("after-reload")


# ---- 3. request smuggling on the frontend ----------------------------------


@dataclass
class SmuggleTunnel:
    relay: Relay
    server: Server


@pytest.fixture(scope="module")
def smuggle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmuggleTunnel]:
    tmp = tmp_path_factory.mktemp("smuggle")
    root = tmp / "root"
    root.mkdir()
    (root / "a.txt").write_bytes(b"alpha\n")
    c = Cluster(tmp)
    key = new_key("smug")
    relay = c.relay({"smug": key}, extra="request_timeout_secs = 5")
    server = c.server(relay, "smug", key, root, extra_args=["--log-level", "DEBUG"])
    yield SmuggleTunnel(relay, server)
    c.close()


_FRONT = b"GET /frontend/servers/smug/files/a.txt HTTP/1.1\r\nHost: x\r\n"
# Ends every payload, so that a connection kept alive closes after it.
_LAST = b"GET /frontend/relay_up_check HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def _hidden(tag: str) -> bytes:
    return f"GET /frontend/servers/smug/files/SMUGGLED-{tag} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)


# name -> (payload built from the hidden request, answers allowed for the first response)
SMUGGLING: dict[str, tuple[Callable[[bytes], bytes], tuple[int, ...]]] = {
    "CL.TE": (lambda h: _FRONT + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + h,
              (400,)),
    "TE.CL": (lambda h: _FRONT + b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n\r\n" % (len(h) + 5)
              + b"0\r\n\r\n" + h, (400,)),
    "duplicate-differing-CL": (lambda h: _FRONT + b"Content-Length: 0\r\nContent-Length: %d\r\n\r\n" % len(h)
                               + h, (400,)),
    "duplicate-equal-CL": (lambda h: _FRONT + b"Content-Length: %d\r\nContent-Length: %d\r\n\r\n"
                           % (len(h), len(h)) + h, (400,)),
    "CL-list": (lambda h: _FRONT + b"Content-Length: 0, %d\r\n\r\n" % len(h) + h, (400,)),
    "CL-plus-sign": (lambda h: _FRONT + b"Content-Length: +%d\r\n\r\n" % len(h) + h, (400,)),
    "obs-fold-TE": (lambda h: _FRONT + b"X-Padding: a\r\n Transfer-Encoding: chunked\r\n\r\n" + _chunked(h),
                    (400,)),
    "obs-fold-CL": (lambda h: _FRONT + b"Content-Length:\r\n %d\r\n\r\n" % len(h) + h, (400,)),
    "space-before-colon-TE": (lambda h: _FRONT + b"Transfer-Encoding : chunked\r\n\r\n" + _chunked(h),
                              (400,)),
    # gunicorn answers 501 (with the reason phrase "Bad Request") and closes the connection.
    "TE-xchunked": (lambda h: _FRONT + b"Transfer-Encoding: xchunked\r\nContent-Length: %d\r\n\r\n"
                    % len(h) + h, (400, 501)),
    "TE-chunked-identity": (lambda h: _FRONT + b"Transfer-Encoding: chunked, identity\r\n\r\n" + _chunked(h),
                            (400,)),
    "TE-chunked-twice": (lambda h: _FRONT + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + _chunked(_chunked(h)), (400,)),
    "TE-in-HTTP-1.0": (lambda h: _FRONT.replace(b"HTTP/1.1", b"HTTP/1.0")
                       + b"Transfer-Encoding: chunked\r\n\r\n" + _chunked(h), (400,)),
    "bare-LF": (lambda h: (_FRONT + b"Content-Length: %d\r\n\r\n" % len(h)).replace(b"\r\n", b"\n") + h,
                (400,)),
    "CR-in-header-value": (lambda h: _FRONT + b"X-A: a\rContent-Length: %d\r\n\r\n" % len(h) + h, (400,)),
    "NUL-in-header-value": (lambda h: _FRONT + b"X-A: a\x00b\r\nContent-Length: %d\r\n\r\n" % len(h) + h,
                            (400,)),
    # Well-framed requests whose body hides a request: one request with a body (501), never two.
    "request-in-CL-body": (lambda h: _FRONT + b"Content-Length: %d\r\n\r\n" % len(h) + h, (501,)),
    "request-in-chunked-body": (lambda h: _FRONT + b"Transfer-Encoding: chunked\r\n\r\n" + _chunked(h),
                                (501,)),
    "request-in-HEAD-body": (lambda h: _FRONT.replace(b"GET", b"HEAD", 1) + b"Content-Length: %d\r\n\r\n"
                             % len(h) + h, (501,)),
}


def _raw_exchange(port: int, payload: bytes, deadline_secs: float = 15) -> bytes:
    """Send `payload` on a fresh connection; read until the relay closes it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=deadline_secs)
    out = b""
    try:
        sock.sendall(payload)
        end = time.monotonic() + deadline_secs
        while time.monotonic() < end:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            out += data
        else:
            raise AssertionError(f"the relay kept the connection open: {out[:500]!r}")
    finally:
        sock.close()
    return out


def _statuses(raw: bytes) -> list[int]:
    return [int(s) for s in re.findall(rb"(?:^|\n)HTTP/1\.[01] (\d{3}) ", raw)]


@pytest.mark.direct_relay  # nginx in front parses (and refuses) these itself
@pytest.mark.process
@pytest.mark.parametrize("case", list(SMUGGLING))
def test_request_smuggling_is_refused(smuggle: SmuggleTunnel, case: str) -> None:
    build, allowed = SMUGGLING[case]
    tag = re.sub(r"[^A-Za-z0-9]", "_", case)
    raw = _raw_exchange(smuggle.relay.port, build(_hidden(tag)) + _LAST)
    statuses = _statuses(raw)
    assert statuses, raw[:500]
    assert statuses[0] in allowed, f"{case}: gunicorn/relay answered {statuses} ({raw[:300]!r})"
    assert statuses[1:] in ([], [200]), f"{case}: more answers than requests: {statuses}"
    # A control request through the same relay: once the server logged it, it
    # would have logged a smuggled one sent before it.
    control = f"CONTROL-{tag}"
    r = requests.get(f"{smuggle.relay.url}/frontend/servers/smug/files/{control}", timeout=10)
    assert r.status_code == 404
    wait_until(lambda: control in smuggle.server.proc.output(), "the control request in the server log",
               smuggle.server.proc, 10)
    log = smuggle.server.proc.output()
    assert f"SMUGGLED-{tag}" not in log, f"{case}: a smuggled request reached the server"
    wait_until(lambda: metric_total(smuggle.relay, "ptth_requests_pending") == 0, "no requests pending",
               smuggle.relay.proc, 10)


@pytest.mark.direct_relay  # nginx in front answers or changes this itself
@pytest.mark.process
def test_smuggling_attempts_leave_the_tunnel_working(smuggle: SmuggleTunnel) -> None:
    for build, _ in SMUGGLING.values():
        _raw_exchange(smuggle.relay.port, build(_hidden("again")) + _LAST)
    r = requests.get(f"{smuggle.relay.url}/frontend/servers/smug/files/a.txt", timeout=10)
    assert (r.status_code, r.content) == (200, b"alpha\n")
    assert "SMUGGLED-again" not in smuggle.server.proc.output()
    assert smuggle.relay.proc.popen.poll() is None
    assert "Traceback" not in smuggle.relay.proc.output()


# ---- 4. a malicious relay ----------------------------------------------------

Answer = bytes | Callable[[BaseHTTPRequestHandler], None]


@dataclass
class Post:
    path: str
    head: str | None
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeRelay:
    """A malicious relay: answers ptth_server's listens with crafted bodies and records its POSTs.

    Apart from what it sends, it answers listens as the relay does, so that
    ptth_server's pace depends on the script alone: a listen asking for no
    requests (a server at capacity) gets a 204 at once and nothing scripted;
    one asking not to wait gets the next scripted answer or a 204 at once;
    any other is parked until a scripted answer is there, or for PARK_SECS
    and then gets a 204 (a 204 sooner would make the server back off, as it
    does from a relay that answers parked listens at once). Each scripted
    answer goes to one listen; the next listen on the same connection gets a
    204, which the server counts as a success, so a run of malformed answers
    does not grow its backoff. `idle_listens` counts the 204s to listens
    that asked for requests.
    """

    name: str
    script: deque[Answer] = field(default_factory=deque)
    post_answers: dict[str, Callable[[BaseHTTPRequestHandler], None]] = field(default_factory=dict)
    posts: list[Post] = field(default_factory=list)
    idle_listens: int = 0
    wrong_paths: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _crafted_last: set[tuple[str, int]] = field(default_factory=set)  # connections just given one

    def start(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake._on_listen(self)

            def do_POST(self) -> None:
                fake._on_post(self)

        class Quiet(ThreadingHTTPServer):
            daemon_threads = True
            # The server POSTs up to 64 responses at once; socketserver's default backlog
            # of 5 made a loaded machine reset some, and a POST cut mid-body is not retried.
            request_queue_size = 128

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a peer hanging up mid-answer is expected here

        self.httpd = Quiet(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def as_relay(self) -> Relay:
        return Relay(cast(Proc, None), self.port, Path("/nonexistent"))

    def _on_listen(self, h: BaseHTTPRequestHandler) -> None:
        if h.path != LISTEN + self.name:
            with self.lock:
                self.wrong_paths.append(h.path)
            _send(h, 404, b"no\n")
            return
        peer = cast(tuple[str, int], h.client_address)
        if h.headers.get(MAX_REQUESTS_HEADER) == "0":
            _send(h, 204, b"")
            return
        parks = h.headers.get(WAIT_HEADER) != "0"
        park_until = time.monotonic() + PARK_SECS
        with self.lock:
            answer: Answer | None = None
            crafted_last = peer in self._crafted_last
            self._crafted_last.discard(peer)
            while not crafted_last and answer is None:
                if self.script:
                    answer = self.script.popleft()
                    self._crafted_last.add(peer)
                elif not parks or time.monotonic() >= park_until:
                    break
                else:
                    self.lock.release()
                    try:
                        time.sleep(0.02)
                    finally:
                        self.lock.acquire()
            if answer is None:
                self.idle_listens += 1
        if answer is None:
            if parks:
                time.sleep(max(0.0, park_until - time.monotonic()))
            _send(h, 204, b"")
        elif isinstance(answer, bytes):
            _send(h, 200, answer, "application/msgpack")
        else:
            answer(h)

    def _on_post(self, h: BaseHTTPRequestHandler) -> None:
        body = _read_body(h)
        with self.lock:
            self.posts.append(Post(h.path, h.headers.get(HEAD_HEADER), dict(h.headers.items()), body))
        rid = unquote(h.path[len(RESPOND):])
        custom = self.post_answers.get(rid)
        if custom is not None:
            custom(h)
        else:
            _send(h, 200, b"delivered\n", "text/plain")

    def wait_idle(self, proc: Proc, listens: int = 3, deadline: float = 60) -> None:
        """Wait until the script is used up and the server has listened `listens` more times."""
        wait_until(lambda: not self.script, "the script to be used up", proc, deadline)
        with self.lock:
            target = self.idle_listens + listens
        wait_until(lambda: self.idle_listens >= target, "the server to keep listening", proc, 20)


def _send(h: BaseHTTPRequestHandler, status: int, body: bytes, ctype: str | None = None) -> None:
    h.send_response(status)
    if ctype:
        h.send_header("Content-Type", ctype)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


def _read_body(h: BaseHTTPRequestHandler) -> bytes:
    if "chunked" in h.headers.get("Transfer-Encoding", "").lower():
        out = bytearray()
        while True:
            size = int(h.rfile.readline(1000).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while h.rfile.readline(1000) not in (b"\r\n", b"\n", b""):
                    pass
                return bytes(out)
            out += h.rfile.read(size)
            h.rfile.readline(10)
    return h.rfile.read(int(h.headers.get("Content-Length") or 0))


def _stream_bytes(total: int, sent: list[int], done: threading.Event, status: int = 200) -> Callable[
        [BaseHTTPRequestHandler], None]:
    """An answer of `total` bytes (a MsgPack bin32 header, then filler), chunked, counting what is sent."""
    def answer(h: BaseHTTPRequestHandler) -> None:
        h.connection.settimeout(10)  # a peer that stops reading but stays connected
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/msgpack")
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            block = b"\x00" * (256 * 1024)
            first = b"\xc6" + (total - 5).to_bytes(4, "big") + block[5:]
            while sent[0] < total:
                data = first if sent[0] == 0 else block
                h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                sent[0] += len(data)
            h.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass
        finally:
            h.close_connection = True
            done.set()
    return answer


@dataclass
class Hostile:
    fake: FakeRelay
    server: Server
    root: Path


@pytest.fixture
def hostile(cluster: Cluster, tmp_path: Path) -> Iterator[Hostile]:
    """A real ptth_server connected to a fake relay; a secret file lies next to its root."""
    (tmp_path / "secret.txt").write_bytes(SECRET)
    root = tmp_path / "root"
    root.mkdir()
    (root / "ok.txt").write_bytes(b"fine\n")
    (root / "link-out").symlink_to(tmp_path / "secret.txt")
    fake = FakeRelay("victim")
    fake.start()
    try:
        server = cluster.server(fake.as_relay(), "victim", new_key("victim"), root, wait=False)
        wait_until(lambda: fake.idle_listens >= 2, "the server to listen at the fake relay", server.proc, 20)
        yield Hostile(fake, server, root)
    finally:
        fake.stop()


def _item(rid: str, uri: str, method: str = "GET", headers: dict[str, bytes] | None = None) -> dict[str, object]:
    return {"id": rid, "req": {"method": method, "uri": uri, "headers": headers or {}}}


def _listen_answer(*items: object) -> bytes:
    return msgpack.packb(list(items))


_GARBAGE_LISTEN_ANSWERS: list[tuple[str, bytes]] = [
    ("reserved byte", b"\xc1"),
    ("empty body", b""),
    ("random bytes", random.Random(3).randbytes(1000)),
    ("truncated", _listen_answer(_item("a", "/files/ok.txt"))[:-3]),
    ("extra data", _listen_answer(_item("a", "/files/ok.txt")) + b"\xc0"),
    ("a map", msgpack.packb({"id": "a", "req": {}})),
    ("array of strings", msgpack.packb(["GET", "/files/ok.txt"])),
    ("item without req", _listen_answer({"id": "a"})),
    ("id an int", _listen_answer({"id": 7, "req": _item("a", "/")["req"]})),
    ("method bytes", _listen_answer(_item("a", "/files/ok.txt", method=cast(str, b"GET")))),
    ("uri absolute URL", _listen_answer(_item("a", "http://evil.example/files/ok.txt"))),
    ("uri empty", _listen_answer(_item("a", ""))),
    ("uri with CRLF", _listen_answer(_item("a", "/files/ok.txt\r\nHost: evil"))),
    ("uri with LF", _listen_answer(_item("a", "/files/ok.txt\nx"))),
    ("uri with NUL", _listen_answer(_item("a", "/files/ok.txt\x00.png"))),
    ("headers a list", _listen_answer({"id": "a", "req": {"method": "GET", "uri": "/", "headers": []}})),
    ("uppercase header", _listen_answer(_item("a", "/", headers={"Host": b"x"}))),
    ("header value CRLF", _listen_answer(_item("a", "/", headers={"x-a": b"1\r\nx-b: 2"}))),
    ("deeply nested", b"\x91" * 100_000 + b"\x90"),
    ("huge declared array", b"\xdd\xff\xff\xff\xff"),
    ("500,000 nils", b"\xdd" + (500_000).to_bytes(4, "big") + b"\xc0" * 500_000),
    ("a good item then a bad one", _listen_answer(_item("GOOD-BUT-BATCHED", "/files/ok.txt"), {"id": 1})),
]


def _assert_clean_log(log: str) -> None:
    assert "Traceback" not in log, log[-3000:]
    assert "bug in the listen loop" not in log and "bug while answering" not in log, log[-3000:]
    for line in log.splitlines():
        assert not line.startswith((" ", "\t")), f"a multi-line log entry: {line!r}"


@pytest.mark.process
def test_malformed_listen_answers_are_logged_once_and_survived(hostile: Hostile) -> None:
    fake, proc = hostile.fake, hostile.server.proc
    with fake.lock:
        fake.script.extend(body for _, body in _GARBAGE_LISTEN_ANSWERS)

        def status(code: int) -> Callable[[BaseHTTPRequestHandler], None]:
            return lambda h: _send(h, code, b"nope\n", "text/plain")

        fake.script.extend([status(500), status(404), status(302)])
    fake.wait_idle(proc, deadline=90)
    assert proc.popen.poll() is None, "ptth_server died:\n" + proc.output()[-3000:]
    log = proc.output()
    _assert_clean_log(log)
    malformed = log.count("malformed listen answer")
    assert 1 <= malformed <= len(_GARBAGE_LISTEN_ANSWERS), log[-3000:]
    assert log.count("relay answered") <= 3
    assert fake.posts == [], "the server answered a request from a malformed listen answer"
    assert fake.wrong_paths == []


_HOSTILE_URIS = [
    "/files/../secret.txt", "/files/%2e%2e/secret.txt", "/files/%2E%2E%2Fsecret.txt", "/files/..%2fsecret.txt",
    "/files/..%5csecret.txt", "/files/./../secret.txt", "/files/ok.txt/../../secret.txt", "/../secret.txt",
    "/%2e%2e/secret.txt", "//secret.txt", "/files//secret.txt", "/files/link-out", "/files/%00secret.txt",
    "/files/ok.txt%00", "/files/%0d%0aSet-Cookie:%20x", "/files/ok.txt%0d%0a", "/files/%252e%252e/secret.txt",
    "/files/\u2025/secret.txt", "/files/\uff0e\uff0e/secret.txt", "/files/%ff%fe", "/files/%ed%b3%bf",
    "/files/" + "%2e%2e/" * 50 + "etc/passwd",
]


@pytest.mark.process
def test_hostile_uris_never_leave_the_root(hostile: Hostile) -> None:
    fake, proc = hostile.fake, hostile.server.proc
    secret_path = str(hostile.root.parent / "secret.txt")
    uris = _HOSTILE_URIS + ["/files/" + secret_path, "/files/" + quote(secret_path, safe=""), secret_path,
                            "/files/%2f" + quote(secret_path.lstrip("/"))]
    items = [_item(f"H{i}", uri) for i, uri in enumerate(uris)]
    items.append(_item("CTRL", "/files/ok.txt"))
    items.append(_item("H-hdr", "/files/ok.txt", headers={"range": b"bytes=-100000000", "if-range": b"\xff"}))
    # A huge batch: 1,000 requests at once, all trying to escape.
    items += [_item(f"B{i}", "/files/%2e%2e/secret.txt") for i in range(1000)]
    # Malformed ids and methods make the server refuse their whole answer (one log line each),
    # so they come in answers of their own, and get no POST at all.
    malformed = [_item("M1", "/files/../secret.txt", method="GET\r\nX-Injected: 1"),
                 _item("M2", "/files/ok.txt", method="")]
    malformed += [_item(rid, "/files/ok.txt") for rid in ["../../7ZSFUKGV/http_listen/victim",
                                                          "id\r\nX-Injected: 1", "%2F..%2F", "\u00e9\u00e9",
                                                          "x" * 2000, ""]]
    with fake.lock:
        fake.script.extend(_listen_answer(item) for item in malformed)
        fake.script.append(_listen_answer(*items))
    expected = len(items)
    wait_until(lambda: len(fake.posts) >= expected, f"{expected} POSTs", proc, 90)
    fake.wait_idle(proc)
    assert proc.popen.poll() is None, proc.output()[-3000:]
    _assert_clean_log(proc.output())

    by_id: dict[str, Post] = {}
    for post in fake.posts:
        assert post.path.startswith(RESPOND), post.path
        rest = post.path[len(RESPOND):]
        assert "/" not in rest, f"the id escaped its path segment: {post.path!r}"
        assert "x-injected" not in {k.lower() for k in post.headers}
        assert SECRET not in post.body, f"the secret was served for {post.path}"
        by_id[unquote(rest)] = post
    assert set(by_id) == {str(i["id"]) for i in items}  # type: ignore[index]

    def status_of(rid: str) -> int:
        head = msgpack.unpackb(base64.b64decode(by_id[rid].head or ""), raw=False)
        return int(head["status_code"])

    assert status_of("CTRL") == 200 and by_id["CTRL"].body == b"fine\n"
    for i, uri in enumerate(uris):
        assert status_of(f"H{i}") in (400, 403, 404), uri
    assert proc.output().count("malformed id or method") >= 1
    assert {status_of(f"B{i}") for i in range(1000)} == {404}


@pytest.mark.process
def test_oversized_listen_answer_is_not_read_whole(hostile: Hostile) -> None:
    """The server must stop reading a listen answer past its 4 MiB limit, not buffer it all."""
    fake, proc = hostile.fake, hostile.server.proc
    sent, done = [0], threading.Event()
    with fake.lock:
        fake.script.append(_stream_bytes(64 * 1024 * 1024, sent, done))
    assert done.wait(60), "the oversized answer did not finish"
    fake.wait_idle(proc)
    assert proc.popen.poll() is None, proc.output()[-3000:]
    _assert_clean_log(proc.output())
    assert sent[0] < 16 * 1024 * 1024, (
        f"ptth_server read {sent[0] / 2**20:.0f} MiB of a listen answer whose limit is 4 MiB: "
        f"server_loop reads the whole body (r.content) before decode_requests checks its size")


@pytest.mark.process
def test_huge_answer_to_a_response_post_is_not_read_whole(hostile: Hostile) -> None:
    """The relay's answer to a POST is a short status line; a huge one must not be buffered."""
    fake, proc = hostile.fake, hostile.server.proc
    sent, done = [0], threading.Event()
    fake.post_answers["BIG-ANSWER"] = _stream_bytes(64 * 1024 * 1024, sent, done)
    with fake.lock:
        fake.script.append(_listen_answer(_item("BIG-ANSWER", "/files/ok.txt")))
    assert done.wait(60), "the huge POST answer did not finish"
    fake.wait_idle(proc)
    assert proc.popen.poll() is None, proc.output()[-3000:]
    _assert_clean_log(proc.output())
    assert sent[0] < 16 * 1024 * 1024, (
        f"ptth_server read {sent[0] / 2**20:.0f} MiB of the relay's answer to one response POST: "
        "server_loop._post reads the whole answer body (no stream=True, r.text)")


# ---- 5. hostile files through the relay ---------------------------------------


@dataclass
class OddTunnel:
    relay: Relay
    server: Server
    root: Path
    device: bool

    @property
    def base(self) -> str:
        return f"{self.relay.url}/frontend/servers/odd"


@pytest.fixture(scope="module")
def odd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OddTunnel]:
    tmp = tmp_path_factory.mktemp("odd")
    root = tmp / "root"
    root.mkdir()
    (root / "ok.txt").write_bytes(b"fine\n")
    broot = os.fsencode(root)
    with open(os.path.join(broot, b"caf\xe9.txt"), "wb") as f:
        f.write(b"latin-1 name\n")
    os.mkdir(os.path.join(broot, b"d\xff\xfe"))
    with open(os.path.join(broot, b"d\xff\xfe", b"inner.txt"), "wb") as f:
        f.write(b"inner of a non-UTF-8 folder\n")
    (root / "zero").symlink_to("/dev/zero")
    (root / "urandom").symlink_to("/dev/urandom")
    os.mkfifo(root / "fifo")
    (root / "fifo-link").symlink_to(root / "fifo")
    device = True
    try:
        os.mknod(root / "zero-device", 0o644 | stat.S_IFCHR, os.makedev(1, 5))
    except OSError:
        device = False
    c = Cluster(tmp)
    key = new_key("odd")
    relay = c.relay({"odd": key}, extra="request_timeout_secs = 10")
    server = c.server(relay, "odd", key, root)
    yield OddTunnel(relay, server, root, device)
    c.close()


def _get_bounded(url: str, limit: int = 1 << 20) -> tuple[int, bytes, float]:
    """GET `url`, reading at most `limit` bytes of body; return status, body, seconds."""
    started = time.monotonic()
    with requests.get(url, stream=True, timeout=10) as r:
        body = r.raw.read(limit)
        return r.status_code, body, time.monotonic() - started


@pytest.mark.process
@pytest.mark.parametrize("path,allowed", [
    ("/files/" + "a" * 5000, (404, 414)),
    ("/files/" + "b/" * 2000 + "c", (404, 414)),
    ("/files/" + "%2e%2e/" * 700, (400, 403, 404, 414)),
    ("/files/" + "d" * 300, (404,)),  # one name past NAME_MAX (255)
    ("/files/" + "e/" * 1900 + "f", (404,)),  # 3,800 characters: under gunicorn's 4,094-byte line
    ("/files/ok.txt?" + "q=1&" * 900, (200,)),
], ids=["5000-chars", "4000-char-segments", "dotdot-x700", "name-past-NAME_MAX", "1900-segments", "long-query"])
def test_very_long_paths_are_refused_not_failed(odd: OddTunnel, path: str, allowed: tuple[int, ...]) -> None:
    status, body, secs = _get_bounded(odd.base + path)
    assert status in allowed, (status, body[:300])
    assert secs < 5
    if status == 200:
        assert body == b"fine\n"
    assert odd.server.proc.popen.poll() is None


@pytest.mark.process
def test_names_that_are_not_utf8_list_and_download(odd: OddTunnel) -> None:
    page = requests.get(odd.base + "/files/", timeout=10)
    assert page.status_code == 200
    assert 'href="caf%E9.txt"' in page.text
    assert 'href="d%FF%FE/"' in page.text
    assert "caf\ufffd.txt" in page.text  # shown with a replacement character
    r = requests.get(odd.base + "/files/caf%E9.txt", timeout=10)
    assert (r.status_code, r.content) == (200, b"latin-1 name\n")
    sub = requests.get(odd.base + "/files/d%FF%FE/", timeout=10)
    assert sub.status_code == 200 and 'href="inner.txt"' in sub.text
    r = requests.get(odd.base + "/files/d%FF%FE/inner.txt", timeout=10)
    assert (r.status_code, r.content) == (200, b"inner of a non-UTF-8 folder\n")
    # The same name in UTF-8 is another name, and does not exist.
    assert requests.get(odd.base + "/files/caf%C3%A9.txt", timeout=10).status_code == 404


@pytest.mark.process
@pytest.mark.parametrize("name", ["zero", "urandom", "zero-device", "fifo", "fifo-link"])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_devices_and_fifos_are_refused_quickly(odd: OddTunnel, name: str, method: str) -> None:
    if name == "zero-device" and not odd.device:
        pytest.skip("cannot create a device node here (needs CAP_MKNOD)")
    started = time.monotonic()
    with requests.request(method, f"{odd.base}/files/{name}", stream=True, timeout=10) as r:
        body = r.raw.read(1 << 20)
    secs = time.monotonic() - started
    assert r.status_code in (403, 404), (name, r.status_code)
    assert len(body) < 100 and b"\x00\x00\x00\x00" not in body
    assert secs < AT_ONCE_SECS
    page = requests.get(odd.base + "/files/", timeout=10).text
    assert f'href="{name}"' not in page
    assert odd.server.proc.popen.poll() is None


# ---- 6. secrets never leak ------------------------------------------------------


@pytest.mark.process
def test_no_key_appears_in_any_output(cluster: Cluster, tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    server_key, wrong_key, stranger_key = new_key("alpha"), new_key("wrong"), new_key("stranger")
    scraper_key, bad_scraper_key = new_key("scraper"), new_key("scraper-bad")
    secrets = {"server key": server_key, "wrong key": wrong_key, "stranger key": stranger_key,
               "scraper key": scraper_key, "bad scraper key": bad_scraper_key}
    extra = (f'listen_timeout_secs = 2\nrequest_timeout_secs = 5\naudit_log = "{audit}"\n'
             f'enable_scraper_api = true\n[[scraper_keys]]\nname = "monitor"\nhash = "{tripcode_of(scraper_key)}"\n')
    relay = cluster.relay({"alpha": server_key}, extra=extra,
                          env={"PTTH_LOG_LEVEL": "debug", "PTTH_ACCESS_LOG": "-"})
    root = tmp_path / "root"
    root.mkdir()
    (root / "data.bin").write_bytes(os.urandom(300_000))
    (root / "note.txt").write_bytes(b"note\n")
    server = cluster.server(relay, "alpha", server_key, root, extra_args=["--log-level", "DEBUG"])
    seen: list[str] = []  # every body and header block any answer carried

    def keep(r: requests.Response) -> requests.Response:
        seen.append(f"{r.status_code} {r.reason}\n{dict(r.headers)}\n{r.content.decode('latin-1')}")
        return r

    base = f"{relay.url}/frontend/servers/alpha/files"
    assert keep(requests.get(f"{base}/data.bin", timeout=30)).status_code == 200
    assert keep(requests.get(f"{base}/note.txt", headers={"Range": "bytes=1-2"}, timeout=30)).status_code == 206
    assert keep(requests.get(f"{base}/missing", timeout=30)).status_code == 404
    assert keep(requests.get(f"{base}/", timeout=30)).status_code == 200
    listen_url = relay.url + LISTEN
    for name, key in (("alpha", wrong_key), ("nobody", stranger_key), ("alpha", server_key + "x"),
                      ("alpha", scraper_key)):
        assert keep(requests.get(listen_url + name, headers={"X-ApiKey": key}, timeout=10)).status_code == 403
    head = packed_head({"status_code": 200, "headers": {}})
    for key in (wrong_key, server_key):
        r = requests.post(relay.url + RESPOND + "NOSUCHID", headers={"X-ApiKey": key, HEAD_HEADER: head},
                          data=b"x", timeout=10)
        assert keep(r).status_code == 404
    scraper = relay.url + "/scraper/v1"
    for path in ("/test", "/server_list", "/server/alpha/files/note.txt", "/server/alpha/files/nope"):
        assert keep(requests.get(scraper + path, headers={"X-ApiKey": scraper_key}, timeout=10)).status_code in (
            200, 404)
    for key in (bad_scraper_key, server_key, wrong_key):
        assert keep(requests.get(scraper + "/test", headers={"X-ApiKey": key}, timeout=10)).status_code == 403
    for path, headers in (("/metrics", {}), ("/frontend/servers/", {}),
                          ("/frontend/servers/", {"Accept": "application/json"}),
                          ("/frontend/unregistered_servers", {}), ("/frontend/audit_log", {}),
                          ("/scraper/v1/server_list", {"X-ApiKey": scraper_key})):
        assert keep(requests.get(relay.url + path, headers=headers, timeout=10)).status_code == 200
    wait_until(lambda: audit.exists() and "scraper_key_rejected" in audit.read_text(), "audit entries",
               relay.proc, 5)
    server.proc.stop()
    time.sleep(0.5)

    places = {"relay output": relay.proc.output(), "server output": server.proc.output(),
              "audit log file": audit.read_text(), "answers received": "\n".join(seen)}
    assert "request " in places["server output"]  # DEBUG lines were on
    leaks = [f"{what} in {where}" for where, text in places.items() for what, key in secrets.items()
             if key in text]
    assert not leaks, "keys leaked: " + ", ".join(leaks)
    for entry in audit.read_text().splitlines():
        json.loads(entry)


@pytest.mark.process
def test_scraper_key_is_not_relayed_to_the_server(cluster: Cluster) -> None:
    """A scraper key is the relay's credential: the server behind the tunnel must not receive it."""
    raw_key, scraper_key = new_key("raw"), new_key("scraper")
    extra = (f'listen_timeout_secs = 5\nrequest_timeout_secs = 5\nenable_scraper_api = true\n'
             f'[[scraper_keys]]\nname = "monitor"\nhash = "{tripcode_of(scraper_key)}"\n')
    relay = cluster.relay({"raw": raw_key}, extra=extra)
    raw = HandServer(relay, "raw", raw_key)
    box: dict[str, requests.Response] = {}
    listener = threading.Thread(target=lambda: box.update(r=raw.listen()), daemon=True)
    listener.start()
    wait_until(lambda: metric_total(relay, "ptth_listeners_waiting") >= 1, "a parked listen", relay.proc, 10)
    call = ClientCall(f"{relay.url}/scraper/v1/server/raw/files/x", headers={"X-ApiKey": scraper_key})
    listener.join(15)
    assert "r" in box and box["r"].status_code == 200
    (item,) = msgpack.unpackb(box["r"].content, raw=False)
    assert raw.respond(item["id"], 200, {}, b"x").status_code == 200
    assert call.join().status_code == 200
    headers = item["req"]["headers"]
    assert scraper_key.encode() not in box["r"].content, (
        f"the relay passed the client's scraper key to server 'raw' in its request headers "
        f"({sorted(headers)})")
