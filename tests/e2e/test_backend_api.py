"""The relay's backend API, driven by hand: this test plays the server with MsgPack.

Nothing from ptth_lib is used to build messages, so these tests pin the wire
format of PROTOCOL.md, and the error answers 403/404/502/504 and cuts.
"""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import Iterator

import msgpack
import pytest
import requests
from conftest import Cluster, Relay, new_key, tripcode_of
from procs import relay_samples, unlabelled

pytestmark = pytest.mark.process

LISTEN = "/7ZSFUKGV/http_listen/"
RESPOND = "/7ZSFUKGV/http_response/"


def listen(relay: Relay, name: str, key: str, timeout: float = 30) -> requests.Response:
    return requests.get(relay.url + LISTEN + name, headers={"X-ApiKey": key}, timeout=timeout)


def head_header(status: int, headers: dict[str, bytes]) -> str:
    return base64.b64encode(msgpack.packb({"status_code": status, "headers": headers})).decode()


def respond(relay: Relay, rid: str, key: str, status: int, headers: dict[str, bytes], body) -> requests.Response:  # type: ignore[no-untyped-def]
    return requests.post(relay.url + RESPOND + rid, data=body, timeout=30,
                         headers={"X-ApiKey": key, "X-PTTH-2LJYXWC4": head_header(status, headers)})


class ClientCall:
    """A client request running in a thread while the test plays the server."""

    def __init__(self, url: str, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self.response: requests.Response | None = None
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.elapsed = 0.0
        self._thread = threading.Thread(target=self._run, args=(url,), kwargs=kwargs, daemon=True)
        self._thread.start()

    def _run(self, url: str, **kwargs) -> None:  # type: ignore[no-untyped-def]
        try:
            self.response = requests.get(url, timeout=60, **kwargs)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            self.error = e
        self.elapsed = time.monotonic() - self.started

    def join(self, timeout: float = 60) -> ClientCall:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "client request did not finish"
        return self


@pytest.fixture
def relay_and_key(cluster: Cluster) -> tuple[Relay, str]:
    key = new_key("raw")
    relay = cluster.relay({"raw": key, "other": new_key("other")},
                          extra="listen_timeout_secs = 2\nrequest_timeout_secs = 3")
    return relay, key


def take_requests(relay: Relay, key: str, count: int = 1) -> list[dict]:  # type: ignore[type-arg]
    """Listen until `count` requests arrived; returns the decoded items."""
    got: list[dict] = []  # type: ignore[type-arg]
    deadline = time.monotonic() + 20
    while len(got) < count and time.monotonic() < deadline:
        r = listen(relay, "raw", key)
        assert r.status_code in (200, 204)
        if r.status_code == 200:
            assert r.headers["Content-Type"] == "application/msgpack"
            got.extend(msgpack.unpackb(r.content, raw=False))
    assert len(got) == count
    return got


def call_and_take(relay: Relay, key: str, url: str) -> tuple[ClientCall, dict]:  # type: ignore[type-arg]
    """Park a listen, then start a client request for `url`; return the call and the item the listen took."""
    box: dict[str, requests.Response] = {}
    listener = threading.Thread(target=lambda: box.update(r=listen(relay, "raw", key)), daemon=True)
    listener.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and unlabelled(relay_samples(relay.url)).get("ptth_listeners_waiting") != 1:
        time.sleep(0.02)
    client = ClientCall(url)
    listener.join(15)
    assert "r" in box and box["r"].status_code == 200, box
    (item,) = msgpack.unpackb(box["r"].content, raw=False)
    return client, item


def test_round_trip_by_hand(relay_and_key: tuple[Relay, str]) -> None:
    relay, key = relay_and_key
    assert listen(relay, "raw", key).status_code == 204  # nothing queued: 204 after the timeout
    client = ClientCall(f"{relay.url}/frontend/servers/raw/some/path?q=1%2F2", headers={"X-Hello": "hi"})
    (item,) = take_requests(relay, key)
    assert set(item) == {"id", "req"}
    req = item["req"]
    assert (req["method"], req["uri"]) == ("GET", "/some/path?q=1%2F2")
    assert req["headers"]["x-hello"] == b"hi"  # lowercase names, byte values
    assert all(name == name.lower() for name in req["headers"])
    assert "connection" not in req["headers"]
    assert len(base64.b32decode(item["id"])) * 8 >= 64  # unguessable id

    def body() -> Iterator[bytes]:
        yield b"part one, "
        yield b"part two"

    r = respond(relay, item["id"], key, 201, {"content-type": b"text/x-test", "x-server": b"yes",
                                               "content-length": b"18"}, body())
    assert r.status_code == 200  # P7: answered once the client has the body
    client.join()
    assert client.response is not None
    assert client.response.status_code == 201
    assert client.response.content == b"part one, part two"
    assert client.response.headers["X-Server"] == "yes"
    assert client.response.headers["Content-Type"] == "text/x-test"

    # The id is used up now.
    assert respond(relay, item["id"], key, 200, {}, b"again").status_code == 404


def test_every_queued_request_comes_in_one_listen(relay_and_key: tuple[Relay, str]) -> None:
    relay, key = relay_and_key
    assert listen(relay, "raw", key).status_code == 204  # be seen online
    clients = [ClientCall(f"{relay.url}/frontend/servers/raw/{i}") for i in range(5)]
    time.sleep(0.5)  # let all five queue up
    r = listen(relay, "raw", key)
    items = msgpack.unpackb(r.content, raw=False)
    assert sorted(i["req"]["uri"] for i in items) == [f"/{i}" for i in range(5)]
    for item in items:
        respond(relay, item["id"], key, 200, {}, item["req"]["uri"].encode())
    for i, c in enumerate(clients):
        assert c.join().response is not None and c.response.content == f"/{i}".encode()


def test_backend_auth(relay_and_key: tuple[Relay, str]) -> None:
    relay, key = relay_and_key
    assert listen(relay, "raw", "wrong-" + key).status_code == 403
    assert requests.get(relay.url + LISTEN + "raw", timeout=10).status_code == 403  # no key
    stranger = new_key("stranger")
    r = listen(relay, "stranger", stranger)
    assert r.status_code == 403
    page = requests.get(relay.url + "/frontend/unregistered_servers", timeout=10).text
    assert "stranger" in page and tripcode_of(stranger) in page
    assert stranger not in page and key not in page


def test_response_ids_belong_to_one_server(relay_and_key: tuple[Relay, str], cluster: Cluster) -> None:
    relay, key = relay_and_key
    listen(relay, "raw", key)
    client = ClientCall(f"{relay.url}/frontend/servers/raw/x")
    (item,) = take_requests(relay, key)
    other_key = new_key("intruder")
    assert respond(relay, item["id"], other_key, 200, {}, b"forged").status_code == 403
    assert respond(relay, "NOSUCHID", key, 200, {}, b"").status_code == 404
    assert respond(relay, item["id"], key, 200, {}, b"real").status_code == 200
    assert client.join().response is not None and client.response.content == b"real"


def test_offline_server_gets_502_at_once(cluster: Cluster) -> None:
    relay = cluster.relay({"never": new_key("never")}, extra="request_timeout_secs = 20")
    started = time.monotonic()
    r = requests.get(f"{relay.url}/frontend/servers/never/files/", timeout=30)
    assert r.status_code == 502
    assert "offline" in r.text
    assert time.monotonic() - started < 5  # not after request_timeout_secs (20 s)


def test_not_picked_up_is_502_and_no_head_is_504(relay_and_key: tuple[Relay, str]) -> None:
    relay, key = relay_and_key
    assert listen(relay, "raw", key).status_code == 204  # seen just now, then not listening
    r = requests.get(f"{relay.url}/frontend/servers/raw/late", timeout=30)
    assert r.status_code == 502
    assert "did not pick up" in r.text

    # The server has not listened for seconds: offline. A listen parked first brings it back.
    client, item = call_and_take(relay, key, f"{relay.url}/frontend/servers/raw/slow")  # never answered
    client.join()
    assert client.response is not None and client.response.status_code == 504, client.response.text
    assert respond(relay, item["id"], key, 200, {}, b"too late").status_code == 404


def test_malformed_head_is_400_for_the_server_and_502_for_the_client(relay_and_key: tuple[Relay, str]) -> None:
    relay, key = relay_and_key
    listen(relay, "raw", key)
    client = ClientCall(f"{relay.url}/frontend/servers/raw/x")
    (item,) = take_requests(relay, key)
    bad = base64.b64encode(msgpack.packb({"status_code": "200", "headers": {}})).decode()
    r = requests.post(relay.url + RESPOND + item["id"], data=b"", timeout=10,
                      headers={"X-ApiKey": key, "X-PTTH-2LJYXWC4": bad})
    assert r.status_code == 400
    assert client.join().response is not None and client.response.status_code == 502


def test_injected_header_value_is_refused(relay_and_key: tuple[Relay, str]) -> None:
    relay, key = relay_and_key
    listen(relay, "raw", key)
    client = ClientCall(f"{relay.url}/frontend/servers/raw/x")
    (item,) = take_requests(relay, key)
    r = respond(relay, item["id"], key, 200, {"x-evil": b"a\r\nSet-Cookie: pwned=1"}, b"")
    assert r.status_code == 400
    resp = client.join().response
    assert resp is not None and resp.status_code == 502 and "pwned" not in resp.headers.get("Set-Cookie", "")


def _raw_post(relay: Relay, rid: str, key: str, head: str, body_start: bytes, chunked: bool,
              content_length: int = 0) -> socket.socket:
    """Start a response POST by hand and return the socket, body unfinished."""
    sock = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    lines = [f"POST {RESPOND}{rid} HTTP/1.1", f"Host: 127.0.0.1:{relay.port}", f"X-ApiKey: {key}",
             f"X-PTTH-2LJYXWC4: {head}"]
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {content_length}")
    payload = b"%x\r\n%s\r\n" % (len(body_start), body_start) if chunked else body_start
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
    return sock


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
def test_server_dying_mid_body_cuts_the_client(relay_and_key: tuple[Relay, str], chunked: bool) -> None:
    """A body that breaks off must never reach the client as a complete response."""
    relay, key = relay_and_key
    listen(relay, "raw", key)
    client = ClientCall(f"{relay.url}/frontend/servers/raw/big", stream=True)
    (item,) = take_requests(relay, key)
    head = head_header(200, {"content-length": b"1000000"})
    sock = _raw_post(relay, item["id"], key, head, b"x" * 300_000, chunked, content_length=1000000)
    client.join()
    assert client.response is not None and client.response.status_code == 200
    time.sleep(0.3)
    sock.close()  # the server dies after 300,000 of 1,000,000 bytes
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        client.response.content  # noqa: B018 - reading the body must fail, not return 1000 bytes


def test_server_body_longer_or_shorter_than_its_content_length_is_cut(relay_and_key: tuple[Relay, str]) -> None:
    relay, key = relay_and_key
    listen(relay, "raw", key)
    for declared, actual in ((100, 50), (100, 150)):
        client = ClientCall(f"{relay.url}/frontend/servers/raw/lying", stream=True)
        (item,) = take_requests(relay, key)
        try:
            r = respond(relay, item["id"], key, 200, {"content-length": str(declared).encode()},
                        iter([b"y" * actual]))
            assert r.status_code != 200, "the relay told the server a mismatched body was delivered"
        except requests.ConnectionError:
            pass  # the relay cut the server: fine too
        client.join()
        assert client.response is not None
        try:
            body = client.response.content
        except requests.exceptions.RequestException:
            continue  # cut: good
        assert len(body) == declared and actual > declared  # gunicorn truncated to the declared length
        raise AssertionError(f"a {actual}-byte body declared as {declared} was passed off as complete")


@pytest.mark.direct_relay  # nginx in front answers or changes this itself
def test_client_leaving_stops_the_servers_upload(relay_and_key: tuple[Relay, str]) -> None:
    relay, key = relay_and_key
    listen(relay, "raw", key)
    client = ClientCall(f"{relay.url}/frontend/servers/raw/endless", stream=True)
    (item,) = take_requests(relay, key)
    sent = 0
    chunk = b"z" * 65536

    def endless() -> Iterator[bytes]:
        nonlocal sent
        while sent < 1 << 30:
            sent += len(chunk)
            yield chunk

    result: dict[str, object] = {}

    def upload() -> None:
        try:
            result["status"] = respond(relay, item["id"], key, 200, {}, endless()).status_code
        except requests.RequestException as e:
            result["error"] = e

    uploader = threading.Thread(target=upload, daemon=True)
    uploader.start()
    client.join()
    assert client.response is not None
    next(client.response.iter_content(65536))
    client.response.close()  # the client leaves
    uploader.join(30)
    assert not uploader.is_alive(), "the relay kept reading from the server after the client left"
    assert result.get("status") != 200  # an error status or a cut connection
    assert sent < 64 * 1024 * 1024


def test_hop_by_hop_headers_from_the_server_are_dropped(relay_and_key: tuple[Relay, str]) -> None:
    relay, key = relay_and_key
    listen(relay, "raw", key)
    client = ClientCall(f"{relay.url}/frontend/servers/raw/x")
    (item,) = take_requests(relay, key)
    r = respond(relay, item["id"], key, 200, {"upgrade": b"h2c", "keep-alive": b"timeout=999",
                                               "proxy-authenticate": b"Basic", "x-kept": b"1",
                                               "content-length": b"2"}, b"ok")
    assert r.status_code == 200
    resp = client.join().response
    assert resp is not None and resp.content == b"ok"
    assert resp.headers["X-Kept"] == "1"
    for name in ("Upgrade", "Proxy-Authenticate"):
        assert name not in resp.headers
    assert "timeout=999" not in resp.headers.get("Keep-Alive", "")


def test_a_listen_whose_server_hung_up_gets_no_requests(cluster: Cluster) -> None:
    """A NAT box or proxy that drops the listen's connection must not swallow requests."""
    key = new_key("raw")
    relay = cluster.relay({"raw": key}, extra="listen_timeout_secs = 60\nrequest_timeout_secs = 5")
    dead = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    dead.sendall(f"GET {LISTEN}raw HTTP/1.1\r\nHost: x\r\nX-ApiKey: {key}\r\n\r\n".encode())
    time.sleep(0.5)  # parked first, so it would be first in line for a request
    dead.close()
    live: dict[str, requests.Response] = {}
    live_listen = threading.Thread(target=lambda: live.update(r=listen(relay, "raw", key, timeout=70)),
                                   daemon=True)
    live_listen.start()
    time.sleep(0.5)
    client = ClientCall(f"{relay.url}/frontend/servers/raw/hello")
    live_listen.join(10)
    assert "r" in live and live["r"].status_code == 200, "the request went to the dead listen"
    (item,) = msgpack.unpackb(live["r"].content, raw=False)
    assert respond(relay, item["id"], key, 200, {}, b"hi").status_code == 200
    resp = client.join().response
    assert resp is not None and (resp.status_code, resp.content) == (200, b"hi")


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
def test_body_bytes_reach_the_client_as_they_arrive(relay_and_key: tuple[Relay, str], chunked: bool) -> None:
    """A server that trickles its body (a log being written, say) is not held back by relay buffering."""
    relay, key = relay_and_key
    listen(relay, "raw", key)
    client = ClientCall(f"{relay.url}/frontend/servers/raw/trickle", stream=True)
    (item,) = take_requests(relay, key)
    sock = _raw_post(relay, item["id"], key, head_header(200, {"content-length": b"2000"}),
                     b"a" * 1000, chunked, content_length=2000)
    client.join()
    assert client.response is not None
    first: list[bytes] = []
    reader = threading.Thread(target=lambda: first.append(client.response.raw.read(1000)), daemon=True)
    reader.start()
    reader.join(5)  # the second half is not sent yet: only relay buffering could hold the first back
    assert first == [b"a" * 1000], "the first 1000 bytes did not arrive before the rest was sent"
    rest = b"%x\r\n%s\r\n0\r\n\r\n" % (1000, b"b" * 1000) if chunked else b"b" * 1000
    sock.sendall(rest)
    assert client.response.raw.read(1000) == b"b" * 1000
    sock.close()


# ---- small answers riding on a listen (PROTOCOL.md) ---------------------------------------------


def listen_carrying(relay: Relay, name: str, key: str, answers: list[dict], **headers: str,  # type: ignore[type-arg]
                    ) -> requests.Response:
    return requests.post(relay.url + LISTEN + name, data=msgpack.packb(answers), timeout=30,
                         headers={"X-ApiKey": key, "Content-Type": "application/msgpack", **headers})


def answer(rid: str, status: int, headers: dict[str, bytes], body: bytes) -> dict:  # type: ignore[type-arg]
    return {"id": rid, "head": {"status_code": status, "headers": headers}, "body": body}


def test_answers_ride_on_the_next_listen(relay_and_key: tuple[Relay, str]) -> None:
    """A listen POSTed with answers delivers each to its client at once, then serves as a listen."""
    relay, key = relay_and_key
    r = listen(relay, "raw", key, timeout=10)
    assert "answers" in r.headers["X-PTTH-Features"]  # the relay says it takes them
    calls = {path: ClientCall(f"{relay.url}/frontend/servers/raw{path}")
             for path in ("/ok", "/head-only", "/bad-length", "/switch", "/bad-head")}
    items = {item["req"]["uri"]: item["id"] for item in take_requests(relay, key, len(calls))}
    started = time.monotonic()
    r = listen_carrying(relay, "raw", key, [
        answer(items["/ok"], 201, {"content-length": b"5", "x-server": b"yes"}, b"hello"),
        answer(items["/head-only"], 204, {}, b""),
        answer(items["/bad-length"], 200, {"content-length": b"9"}, b"short"),
        answer(items["/switch"], 101, {}, b""),
        {"id": items["/bad-head"], "head": {"status_code": "200", "headers": {}}, "body": b""},
    ], **{"X-PTTH-Wait-Secs": "0"})
    assert r.status_code == 204, r.text  # then a listen as any other: nothing is queued
    got = {path: call.join(10) for path, call in calls.items()}
    assert time.monotonic() - started < 2  # at once, not at request_timeout_secs
    ok = got["/ok"].response
    assert ok is not None and (ok.status_code, ok.content, ok.headers["X-Server"]) == (201, b"hello", "yes")
    assert got["/head-only"].response is not None and got["/head-only"].response.status_code == 204
    for path in ("/bad-length", "/switch", "/bad-head"):
        failed = got[path].response
        assert failed is not None and failed.status_code == 502, (path, failed)
        assert b"short" not in failed.content
    # Each id is used up, whichever way it was answered.
    assert respond(relay, items["/ok"], key, 200, {}, b"again").status_code == 404
    samples = relay_samples(relay.url)
    assert samples[("ptth_server_answers_total", (("way", "listen"),))] == 5
    assert "Traceback" not in relay.proc.output()


def test_answers_are_the_servers_own_and_bounded(cluster: Cluster) -> None:
    """Another server's key cannot answer raw's request; no key reads nothing; too much is 413."""
    key, other_key = new_key("raw"), new_key("other")
    relay = cluster.relay({"raw": key, "other": other_key}, extra="listen_timeout_secs = 2\nrequest_timeout_secs = 3")
    assert listen(relay, "raw", key, timeout=10).status_code == 204  # raw is online: its requests wait
    client = ClientCall(f"{relay.url}/frontend/servers/raw/mine")
    (item,) = take_requests(relay, key)
    forged = [answer(item["id"], 200, {"content-length": b"6"}, b"forged")]
    assert listen_carrying(relay, "raw", "", forged).status_code == 403
    # Other's own listen may carry answers, but not to raw's requests: the relay drops this one.
    assert listen_carrying(relay, "other", other_key, forged, **{"X-PTTH-Wait-Secs": "0"}).status_code == 204
    assert "belongs to another server" in relay.proc.output()
    r = requests.post(relay.url + LISTEN + "raw", data=b"x" * (1024 * 1024 + 1), timeout=30,
                      headers={"X-ApiKey": key, "Content-Type": "application/msgpack"})
    assert r.status_code == 413
    assert listen_carrying(relay, "raw", key, [answer(item["id"], 200, {"content-length": b"4"}, b"real")],
                           **{"X-PTTH-Wait-Secs": "0"}).status_code == 204
    client.join(10)
    assert client.response is not None and client.response.content == b"real"


def test_a_head_answer_riding_on_a_listen_sends_no_body(relay_and_key: tuple[Relay, str]) -> None:
    """As with a POST, a HEAD's answer keeps its content-length and its body (if any) stays at the relay."""
    relay, key = relay_and_key
    assert listen(relay, "raw", key, timeout=10).status_code == 204  # raw is online: its requests wait
    box: dict[str, requests.Response] = {}
    asking = threading.Thread(target=lambda: box.update(r=requests.head(
        f"{relay.url}/frontend/servers/raw/page", timeout=20)), daemon=True)
    asking.start()
    (item,) = take_requests(relay, key)
    assert item["req"]["method"] == "HEAD"
    r = listen_carrying(relay, "raw", key, [answer(item["id"], 200, {"content-length": b"1234"}, b"sloppy app")],
                        **{"X-PTTH-Wait-Secs": "0"})
    assert r.status_code == 204
    asking.join(10)
    assert box["r"].status_code == 200 and box["r"].headers["Content-Length"] == "1234"
