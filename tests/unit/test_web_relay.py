"""The relay's side of web apps, in-process (PROTOCOL.md "Web apps"): a `Relay` driven through its app.

As tests/unit/test_relay.py: no processes, servers and clients played in
greenlets against `app_for(relay)`. The edge cases of features, request
bodies and their GET, header lists, hop-by-hop headers, X-Forwarded-*,
host routing, basic auth and `--hash-password`; tests/e2e/test_web_relay_processes.py
checks the user-visible behaviour through the real relay under gunicorn.
"""

from __future__ import annotations

import base64
import os
import pty
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import msgpack
import pytest
from test_relay import KEYS, WAIT_SECS, Tunnel, relay_config
from werkzeug.security import generate_password_hash

from ptth_lib.config import parse_relay_config
from ptth_lib.errors import ConfigError
from ptth_lib.relay import basic_auth, trust
from ptth_lib.wire import tripcode
from ptth_lib.wire.envelope import connection_listed

REPO = Path(__file__).resolve().parents[2]
BODY = "/7ZSFUKGV/http_request_body/"
FEATURES = {"X-PTTH-Features": "ack, bodies, websocket"}
SUFFIX = ".tunnel.test"
PASSWORD_HASH = generate_password_hash("open sesame")


pytestmark = pytest.mark.usefixtures("bounded")  # fixtures: conftest.py


def server_entry(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "tripcode": tripcode.derive(KEYS[name]), **extra}


def take(t: Tunnel, path: str, name: str = "alpha", features: dict[str, str] = FEATURES,
         **kwargs: Any) -> tuple[gevent.Greenlet, dict[str, Any]]:
    """A client's request, picked up by a listen that announces `features`: the call and the item."""
    listener = gevent.spawn(t.listen, name, **features)
    gevent.sleep(0)
    call = t.get(path, **kwargs)
    answer = listener.get(timeout=WAIT_SECS)
    assert answer.status_code == 200, answer.data
    (item,) = msgpack.unpackb(answer.data, raw=False)
    return call, item


def fetch_body(t: Tunnel, rid: str, key: str | None = None) -> Any:
    return t.client.get(BODY + rid, headers={"X-ApiKey": KEYS["alpha"] if key is None else key})


def login(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# ---- features --------------------------------------------------------------------------------------


def test_listen_answers_name_the_relays_features_and_the_server_s_are_remembered(tunnel: Tunnel) -> None:
    answer = tunnel.listen(**{"X-PTTH-Wait-Secs": "0", "X-PTTH-Features": "Bodies, websocket, future"})
    assert answer.status_code == 204
    assert "header-lists" in connection_listed([("connection", answer.headers["X-PTTH-Features"])])
    assert tunnel.relay.rendezvous.servers["alpha"].features == {"bodies", "websocket", "future"}
    call, item = take(tunnel, "/frontend/servers/alpha/x")
    tunnel.respond(item["id"], 204)
    assert call.get(timeout=WAIT_SECS).status_code == 204
    # A later listen that announces nothing takes the features back.
    tunnel.listen(**{"X-PTTH-Wait-Secs": "0"})
    assert tunnel.relay.rendezvous.servers["alpha"].features == frozenset()


@pytest.mark.parametrize(("features", "kwargs", "status", "words"), [
    ("ack", {"method": "POST", "data": b"body"}, 501, "bodies"),
    ("ack, websocket", {"method": "PUT", "data": b"body"}, 501, "bodies"),
    ("ack, bodies", {"headers": {"Upgrade": "websocket", "Connection": "Upgrade"}}, 501, "websocket"),
    # Under the test client the relay cannot take a connection over: a WebSocket needs gunicorn.
    ("ack, bodies, websocket", {"headers": {"Upgrade": "websocket", "Connection": "Upgrade"}}, 501, "gunicorn"),
    ("ack, bodies, websocket", {"method": "POST", "data": b"x",
                                "headers": {"Upgrade": "websocket", "Connection": "Upgrade"}}, 400, "handshake"),
])
def test_what_a_server_did_not_announce_is_refused_before_it(tunnel: Tunnel, features: str, kwargs: dict[str, Any],
                                                            status: int, words: str) -> None:
    tunnel.listen(**{"X-PTTH-Wait-Secs": "0", "X-PTTH-Features": features})
    resp = tunnel.client.open("/frontend/servers/alpha/x", **kwargs)
    assert (resp.status_code, words in resp.text) == (status, True), resp.text
    assert tunnel.relay.rendezvous.servers["alpha"].queue.qsize() == 0


def test_another_upgrade_than_websocket_is_ignored_and_the_request_relayed(tunnel: Tunnel) -> None:
    """`curl --http2 http://...` asks for h2c: RFC 9110 lets a server ignore it, and so does the relay."""
    tunnel.listen(**{"X-PTTH-Wait-Secs": "0", "X-PTTH-Features": "ack, bodies, websocket"})
    call, item = take(tunnel, "/frontend/servers/alpha/x",
                      headers={"Upgrade": "h2c", "Connection": "Upgrade, HTTP2-Settings", "HTTP2-Settings": "AAMAAABk"})
    assert "upgrade" not in item and not {"upgrade", "http2-settings"} & set(item["req"]["headers"])
    tunnel.respond(item["id"], 204)
    assert call.get(timeout=WAIT_SECS).status_code == 204


def test_an_upgrade_header_connection_does_not_name_is_dropped(tunnel: Tunnel) -> None:
    call, item = take(tunnel, "/frontend/servers/alpha/x", headers={"Upgrade": "websocket"})
    assert "upgrade" not in item and "upgrade" not in item["req"]["headers"]
    tunnel.respond(item["id"], 204)
    call.get(timeout=WAIT_SECS)


# ---- request bodies ----------------------------------------------------------------------------


def test_a_body_is_announced_and_fetched_once_by_its_own_server(make_tunnel: Any) -> None:
    t = make_tunnel()
    call, item = take(t, "/frontend/servers/alpha/form", method="POST", data=b"a=1&b=2",
                      headers={"Content-Type": "application/x-www-form-urlencoded", "Expect": "100-continue"})
    assert (item["req"]["method"], item["body"]) == ("POST", 7)
    assert item["req"]["headers"]["content-length"] == b"7" and "expect" not in item["req"]["headers"]
    assert fetch_body(t, item["id"], KEYS["beta"]).status_code == 403
    assert fetch_body(t, item["id"], "").status_code == 403
    assert fetch_body(t, "AAAAAAAAAAAAAAAA").status_code == 404
    got = fetch_body(t, item["id"])
    assert (got.status_code, got.data, got.headers["Content-Type"]) == (200, b"a=1&b=2", "application/octet-stream")
    assert fetch_body(t, item["id"]).status_code == 404  # once
    t.respond(item["id"], 200, {"content-length": b"2"}, b"ok")
    assert call.get(timeout=WAIT_SECS).data == b"ok"


def test_a_request_without_a_body_has_nothing_to_fetch(tunnel: Tunnel) -> None:
    call, item = take(tunnel, "/frontend/servers/alpha/x")
    assert "body" not in item
    assert fetch_body(tunnel, item["id"]).status_code == 404
    tunnel.respond(item["id"], 204)
    call.get(timeout=WAIT_SECS)


def test_an_answer_without_the_body_makes_the_body_unfetchable(tunnel: Tunnel) -> None:
    call, item = take(tunnel, "/frontend/servers/alpha/x", method="PUT", data=b"unwanted")
    tunnel.respond(item["id"], 405, {"content-length": b"0"})
    assert call.get(timeout=WAIT_SECS).status_code == 405
    assert fetch_body(tunnel, item["id"]).status_code == 404


@pytest.mark.parametrize(("limit", "size", "status"), [(0, 100_000, 200), (10, 10, 200), (10, 11, 413)])
def test_a_declared_body_over_the_limit_is_413_before_the_server_sees_it(make_tunnel: Any, limit: int, size: int,
                                                                        status: int) -> None:
    t = make_tunnel(max_request_body_bytes=limit)
    if status == 413:
        t.listen(**{"X-PTTH-Wait-Secs": "0", **FEATURES})
        resp = t.client.post("/frontend/servers/alpha/x", data=b"x" * size)
        assert resp.status_code == 413 and "max_request_body_bytes" in resp.text
        assert t.relay.rendezvous.servers["alpha"].queue.qsize() == 0
        return
    call, item = take(t, "/frontend/servers/alpha/x", method="POST", data=b"x" * size)
    assert fetch_body(t, item["id"]).data == b"x" * size
    t.respond(item["id"], 200, {"content-length": b"0"})
    assert call.get(timeout=WAIT_SECS).status_code == 200


def test_a_chunked_body_passing_the_limit_is_cut_and_the_client_gets_413(make_tunnel: Any) -> None:
    t = make_tunnel(max_request_body_bytes=100)

    def pieces() -> Iterator[bytes]:
        for _ in range(5):
            yield b"y" * 50

    call, item = take(t, "/frontend/servers/alpha/x", method="POST", headers={"Transfer-Encoding": "chunked"},
                      environ_overrides=chunked(pieces()))
    assert item["body"] == -1
    with pytest.raises(Exception, match="max_request_body_bytes"):  # no socket to cut: the WSGI server drops it
        fetch_body(t, item["id"]).get_data()
    resp = call.get(timeout=WAIT_SECS)
    assert resp.status_code == 413


def chunked(pieces: Iterator[bytes]) -> dict[str, Any]:
    """What a WSGI server gives the app for a chunked body: a stream to read() until b"", no length."""
    return {"wsgi.input": _Stream(pieces), "wsgi.input_terminated": True, "CONTENT_LENGTH": ""}


class _Stream:
    """A client's chunked body as the test client reads it: read() until b""."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self._pieces = pieces
        self._held = b""

    def read(self, size: int = -1) -> bytes:
        """What has arrived, up to `size`: at most one piece at a time, as from a socket."""
        if not self._held:
            self._held = next(self._pieces, b"")
        out, self._held = (self._held, b"") if size < 0 else (self._held[:size], self._held[size:])
        return out


def test_the_head_timeout_counts_from_the_last_piece_of_the_body(make_tunnel: Any) -> None:
    t = make_tunnel(request_timeout_secs=1)

    def slow() -> Iterator[bytes]:
        for _ in range(3):
            gevent.sleep(0.6)  # 1.8 s in all: over the timeout, each piece within it
            yield b"z" * 10

    call, item = take(t, "/frontend/servers/alpha/x", method="POST", headers={"Transfer-Encoding": "chunked"},
                      environ_overrides=chunked(slow()))
    assert fetch_body(t, item["id"]).data == b"z" * 30
    t.respond(item["id"], 200, {"content-length": b"2"}, b"ok")
    assert call.get(timeout=WAIT_SECS).status_code == 200


# ---- headers ---------------------------------------------------------------------------------------


def test_repeated_response_headers_are_one_line_each(tunnel: Tunnel) -> None:
    call, item = take(tunnel, "/frontend/servers/alpha/x")
    head = base64.b64encode(msgpack.packb({"status_code": 200, "headers": {
        "link": [b"</a>; rel=preload", b"</b>; rel=preload"], "set-cookie": [b"a=1", b"b=2"],
        "content-length": b"0"}})).decode()
    assert tunnel.respond(item["id"], head=head).status_code == 200
    resp = call.get(timeout=WAIT_SECS)
    assert resp.headers.getlist("Link") == ["</a>; rel=preload", "</b>; rel=preload"]
    assert "Set-Cookie" not in resp.headers  # path mode: the relay's origin


def test_hop_by_hop_headers_and_those_connection_names_stop_at_the_relay(tunnel: Tunnel) -> None:
    call, item = take(tunnel, "/frontend/servers/alpha/x", headers={
        "Connection": "keep-alive, X-Private", "X-Private": "secret", "Keep-Alive": "timeout=5", "TE": "trailers",
        "Trailer": "X-T", "Proxy-Connection": "close", "Proxy-Foo": "1", "X-Kept": "yes"})
    sent = item["req"]["headers"]
    assert sent["x-kept"] == b"yes"
    assert not {"connection", "x-private", "keep-alive", "te", "trailer", "proxy-connection", "proxy-foo"} & set(sent)
    tunnel.respond(item["id"], 200, {"connection": b"x-internal", "x-internal": b"1", "keep-alive": b"5",
                                     "x-end": b"yes", "content-length": b"0"})
    resp = call.get(timeout=WAIT_SECS)
    assert resp.headers["X-End"] == "yes" and "X-Internal" not in resp.headers and "Keep-Alive" not in resp.headers


@pytest.mark.parametrize(("peer", "sent", "expected"), [
    # An untrusted peer's claims are replaced, never appended to.
    ("203.0.113.9", {"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil",
                     "Forwarded": "for=6.6.6.6", "X-Real-IP": "6.6.6.6"},
     {"x-forwarded-for": b"203.0.113.9", "x-forwarded-proto": b"http", "x-forwarded-host": b"relay.test",
      "forwarded": b"for=203.0.113.9;proto=http;host=relay.test"}),
    # nginx on this machine (trusted): the client it reports, its scheme and host.
    ("127.0.0.1", {"X-Forwarded-For": "6.6.6.6, 198.51.100.2", "X-Forwarded-Proto": "https",
                   "X-Forwarded-Host": "public.example:8443"},
     {"x-forwarded-for": b"198.51.100.2", "x-forwarded-proto": b"https",
      "x-forwarded-host": b"public.example:8443",
      "forwarded": b'for=198.51.100.2;proto=https;host="public.example:8443"'}),
    ("::1", {"X-Forwarded-For": "2001:db8::7"},
     {"x-forwarded-for": b"2001:db8::7", "forwarded": b'for="[2001:db8::7]";proto=http;host=relay.test'}),
])
def test_the_server_is_told_who_asks(make_tunnel: Any, peer: str, sent: dict[str, str],
                                     expected: dict[str, bytes]) -> None:
    t = make_tunnel(trusted_proxies=["127.0.0.1/32", "::1/128"])
    call, item = take(t, "/frontend/servers/alpha/x", headers={"Host": "relay.test", **sent},
                      environ_base={"REMOTE_ADDR": peer})
    headers = item["req"]["headers"]
    assert {k: headers.get(k) for k in expected} == expected
    assert headers["x-forwarded-prefix"] == b"/frontend/servers/alpha" and "x-real-ip" not in headers
    t.respond(item["id"], 204)
    call.get(timeout=WAIT_SECS)


# ---- host routing --------------------------------------------------------------------------------


@pytest.mark.parametrize(("host", "name"), [
    ("alpha.tunnel.test", "alpha"), ("ALPHA.Tunnel.Test:8443", "alpha"), ("alpha.tunnel.test.", "alpha"),
    ("a.b.tunnel.test", "a.b"), (".tunnel.test", ""), ("tunnel.test", None), ("alpha.tunnel.test.evil", None),
    ("alphatunnel.test", None), ("[::1]:80", None), ("", None),
])
def test_host_names_a_server_only_under_the_suffix(host: str, name: str | None) -> None:
    assert trust.host_server_name(host, SUFFIX) == name
    assert trust.host_server_name(host, "") is None


def test_every_path_on_a_server_host_goes_to_that_server(make_tunnel: Any) -> None:
    t = make_tunnel(server_host_suffix=SUFFIX)
    for path in ("/", "/frontend/servers/beta/x?q=1", "/7ZSFUKGV/http_listen/alpha", "/metrics", "/a/../b?c=%2F"):
        call, item = take(t, path, headers={"Host": "Alpha.tunnel.test:443", "Cookie": "app=1",
                                            "Authorization": "Bearer app-token"})
        headers = item["req"]["headers"]
        assert item["req"]["uri"] == path
        assert (headers["cookie"], headers["authorization"]) == (b"app=1", b"Bearer app-token")
        assert headers["x-forwarded-prefix"] == b""
        t.respond(item["id"], 200, {"content-length": b"0", "set-cookie": b"sid=1; Domain=tunnel.test; Path=/",
                                    "www-authenticate": b"Bearer", "x-accel-redirect": b"/internal",
                                    "strict-transport-security": b"max-age=60"})
        resp = call.get(timeout=WAIT_SECS)
        assert resp.headers["Set-Cookie"] == "sid=1; Path=/"  # kept on the server's own host
        assert resp.headers["WWW-Authenticate"] == "Bearer" and "Strict-Transport-Security" in resp.headers
        assert "X-Accel-Redirect" not in resp.headers and "Content-Security-Policy" not in resp.headers


@pytest.mark.parametrize(("host", "status"), [("nobody.tunnel.test", 404), ("bad%name.tunnel.test", 400),
                                              (".tunnel.test", 400)])
def test_a_host_that_names_no_server_is_answered_at_once(make_tunnel: Any, host: str, status: int) -> None:
    t = make_tunnel(server_host_suffix=SUFFIX)
    resp = t.client.get("/frontend/servers/alpha/x", headers={"Host": host})
    assert resp.status_code == status and len(resp.text.splitlines()) == 1


def test_path_mode_still_works_beside_host_routing_and_the_host_comes_from_a_trusted_proxy(
        make_tunnel: Any) -> None:
    t = make_tunnel(server_host_suffix=SUFFIX, trusted_proxies=["127.0.0.1/32"])
    call, item = take(t, "/frontend/servers/alpha/x", headers={"Host": "relay.tunnel.example"})
    assert item["req"]["uri"] == "/x"
    t.respond(item["id"], 204)
    call.get(timeout=WAIT_SECS)
    # Only a trusted proxy's X-Forwarded-Host routes by host.
    call, item = take(t, "/y", headers={"Host": "127.0.0.1", "X-Forwarded-Host": "beta.tunnel.test"},
                      name="beta", environ_base={"REMOTE_ADDR": "127.0.0.1"})
    assert item["req"]["uri"] == "/y"
    t.relay.rendezvous.servers["beta"].features = frozenset()
    assert t.client.get("/y", headers={"Host": "relay", "X-Forwarded-Host": "beta.tunnel.test"},
                        environ_base={"REMOTE_ADDR": "203.0.113.9"}).status_code == 404  # not routed by host


def test_host_routing_follows_a_reload(make_tunnel: Any) -> None:
    t = make_tunnel()
    t.be_online()
    assert t.client.get("/x", headers={"Host": "alpha.tunnel.test"}).status_code == 404  # the relay's own 404
    t.relay.reconfigure(relay_config(server_host_suffix=SUFFIX, max_request_body_bytes=3))
    call, item = take(t, "/x", headers={"Host": "alpha.tunnel.test"})
    t.respond(item["id"], 204)
    call.get(timeout=WAIT_SECS)
    assert t.client.post("/x", data=b"four", headers={"Host": "alpha.tunnel.test"}).status_code == 413


# ---- basic auth ----------------------------------------------------------------------------------


@pytest.fixture
def guarded(make_tunnel: Any) -> Tunnel:
    t: Tunnel = make_tunnel([server_entry("alpha", basic_auth=[f"alice:{PASSWORD_HASH}"]), server_entry("beta")],
                            server_host_suffix=SUFFIX)
    return t


@pytest.mark.parametrize("authorization", [None, login("alice", "wrong"), login("bob", "open sesame"),
                                           "Bearer x", "Basic !!!", login("alice", "")])
@pytest.mark.parametrize("host", ["relay.test", "alpha.tunnel.test"])
def test_wrong_or_missing_credentials_are_401_and_nothing_reaches_the_server(
        guarded: Tunnel, authorization: str | None, host: str) -> None:
    guarded.be_online()
    path = "/frontend/servers/alpha/x" if host == "relay.test" else "/x"
    headers = {"Host": host, **({"Authorization": authorization} if authorization else {})}
    resp = guarded.client.get(path, headers=headers)
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"] == 'Basic realm="alpha", charset="UTF-8"'
    assert guarded.relay.rendezvous.servers["alpha"].queue.qsize() == 0


@pytest.mark.parametrize(("path", "host"), [("/frontend/servers/alpha/x", "relay.test"), ("/x", "alpha.tunnel.test")])
def test_right_credentials_pass_and_are_consumed(guarded: Tunnel, path: str, host: str) -> None:
    call, item = take(guarded, path, headers={"Host": host, "Authorization": login("alice", "open sesame")})
    assert "authorization" not in item["req"]["headers"]
    guarded.respond(item["id"], 204)
    assert call.get(timeout=WAIT_SECS).status_code == 204


def test_a_verified_login_is_remembered_briefly(guarded: Tunnel, monkeypatch: pytest.MonkeyPatch) -> None:
    checks: list[str] = []
    real = basic_auth.check_password_hash
    monkeypatch.setattr(basic_auth, "check_password_hash", lambda h, p: checks.append(p) or real(h, p))
    for _ in range(3):
        call, item = take(guarded, "/frontend/servers/alpha/x",
                          headers={"Authorization": login("alice", "open sesame")})
        guarded.respond(item["id"], 204)
        call.get(timeout=WAIT_SECS)
    assert checks == ["open sesame"]
    assert guarded.client.get("/frontend/servers/alpha/x",
                              headers={"Authorization": login("alice", "open sesamE")}).status_code == 401
    assert len(checks) == 2  # a wrong password is always checked
    monkeypatch.setattr(basic_auth, "VERIFIED_SECS", 0.0)
    logins = basic_auth.Logins()
    server = guarded.relay.config.servers["alpha"]
    assert logins.check(server, login("alice", "open sesame")) and logins.check(server, login("alice", "open sesame"))
    assert len(checks) == 4


def test_a_server_without_basic_auth_lets_everyone_in(guarded: Tunnel) -> None:
    call, item = take(guarded, "/frontend/servers/beta/x", name="beta")
    guarded.respond(item["id"], 204, key=KEYS["beta"])
    assert call.get(timeout=WAIT_SECS).status_code == 204


@pytest.mark.parametrize(("entries", "words"), [
    (["alice"], "USER:HASH"), (["alice:plaintext"], "USER:HASH"), ([":" + PASSWORD_HASH], "USER:HASH"),
    ([f"alice:{PASSWORD_HASH}", f"alice:{PASSWORD_HASH}"], "twice"), ([42], "USER:HASH"),
])
def test_a_bad_basic_auth_entry_is_one_line_naming_the_key(entries: list[Any], words: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_relay_config({"servers": [server_entry("alpha", basic_auth=entries)]}, "relay.toml")
    message = str(e.value)
    assert "basic_auth" in message and words in message and "\n" not in message
    assert "plaintext" not in message.partition("'alice")[2] or words == "USER:HASH"


@pytest.mark.parametrize(("raw", "key"), [
    ({"server_host_suffix": "tunnel.test"}, "server_host_suffix"),
    ({"server_host_suffix": ".bad_host"}, "server_host_suffix"),
    ({"max_request_body_bytes": -1}, "max_request_body_bytes"),
    ({"server_host_suffix": SUFFIX, "servers": [server_entry("alpha"), {**server_entry("beta"), "name": "ALPHA"}]},
     "differ only in case"),
])
def test_bad_web_app_keys_are_one_line(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        parse_relay_config(raw, "relay.toml")


def test_hash_password_asks_twice_on_the_terminal_and_prints_an_entry() -> None:
    def run(*answers: str) -> tuple[int, str]:
        pid, fd = pty.fork()
        if pid == 0:  # the child: ptth_relay.py on the pty, its controlling terminal
            os.chdir(REPO)
            os.execv(sys.executable, [sys.executable, "ptth_relay.py", "--hash-password"])
        output = b""
        for prompt, answer in zip((b"user name:", b"password:", b"again:"), answers, strict=True):
            deadline = time.monotonic() + 20
            while prompt not in output:  # answer only once asked: getpass turns echo off first
                assert time.monotonic() < deadline, output
                output += os.read(fd, 1024)
            os.write(fd, answer.encode() + b"\n")
        while True:
            try:
                piece = os.read(fd, 4096)
            except OSError:  # EIO: the child is gone
                break
            if not piece:
                break
            output += piece
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status), output.decode()

    code, out = run("alice", "s3cret pass", "s3cret pass")
    assert code == 0, out
    entry = out.strip().splitlines()[-1].strip().strip('"')
    user, _, stored = entry.partition(":")
    assert user == "alice" and basic_auth.check_password_hash(stored, "s3cret pass")
    assert "s3cret" not in out  # never echoed
    parse_relay_config({"servers": [server_entry("alpha", basic_auth=[entry])]}, "relay.toml")
    code, out = run("alice", "one", "two")
    assert code == 2 and "differ" in out.strip().splitlines()[-1]


def test_a_101_to_a_request_that_is_no_websocket_handshake_never_reaches_its_client(tunnel: Tunnel) -> None:
    call, item = take(tunnel, "/frontend/servers/alpha/x", headers={"Upgrade": "websocket"})  # no Connection
    answer = tunnel.respond(item["id"], 101, {"upgrade": b"websocket", "connection": b"upgrade"})
    assert answer.status_code == 400 and "101" in answer.text
    assert call.get(timeout=WAIT_SECS).status_code == 502
