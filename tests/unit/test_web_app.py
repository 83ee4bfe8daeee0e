"""The pure parts of ptth_server's web-app proxy: headers, Location, chunked bodies, the config keys.

No sockets: tests/e2e/test_web_app.py runs the whole proxy with real processes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ptth_lib.config import load_server_config, parse_server_config
from ptth_lib.errors import ConfigError
from ptth_lib.server.chunked import MAX_LINE_BYTES, ChunkedDecoder, ChunkedError
from ptth_lib.server.proxy_headers import (
    PublicUrl,
    client_address,
    collect_response_headers,
    end_to_end,
    public_url,
    request_headers,
    rewrite_location,
)
from ptth_lib.wire.envelope import connection_listed

STRONG_KEY = "a-strong-test-key-0123456789abcdef"

# ---- Location rewriting (nginx's proxy_redirect default, and paths under the app) -------------

PATH_MODE = PublicUrl("https://relay.example.com/frontend/servers/alpha", "/frontend/servers/alpha")
HOST_MODE = PublicUrl("https://alpha.tunnel.example.com", "")
NO_HOST = PublicUrl(None, "/frontend/servers/alpha")

LOCATIONS = [
    # (app URL, public, Location from the app, Location the client sees)
    ("http://127.0.0.1:8080", PATH_MODE, "http://127.0.0.1:8080/x?y=1#f",
     "https://relay.example.com/frontend/servers/alpha/x?y=1#f"),
    ("http://127.0.0.1:8080", PATH_MODE, "http://127.0.0.1:8080", "https://relay.example.com/frontend/servers/alpha/"),
    ("http://127.0.0.1:8080", PATH_MODE, "HTTP://127.0.0.1:8080/x", "https://relay.example.com/frontend/servers/alpha/x"),
    ("http://127.0.0.1:8080", PATH_MODE, "//127.0.0.1:8080/x", "https://relay.example.com/frontend/servers/alpha/x"),
    ("http://127.0.0.1:80", PATH_MODE, "http://127.0.0.1/x", "https://relay.example.com/frontend/servers/alpha/x"),
    ("http://127.0.0.1", PATH_MODE, "http://127.0.0.1:80/x", "https://relay.example.com/frontend/servers/alpha/x"),
    ("http://LocalHost:8080", PATH_MODE, "http://localhost:8080/x", "https://relay.example.com/frontend/servers/alpha/x"),
    ("http://[::1]:8080", PATH_MODE, "http://[::1]:8080/x", "https://relay.example.com/frontend/servers/alpha/x"),
    ("http://127.0.0.1:8080", HOST_MODE, "http://127.0.0.1:8080/x", "https://alpha.tunnel.example.com/x"),
    ("http://127.0.0.1:8080", NO_HOST, "http://127.0.0.1:8080/x", "/frontend/servers/alpha/x"),
    # another origin: another port, host, scheme, or not HTTP at all
    ("http://127.0.0.1:8080", PATH_MODE, "http://127.0.0.1:8081/x", "http://127.0.0.1:8081/x"),
    ("http://127.0.0.1:8080", PATH_MODE, "http://example.com/x", "http://example.com/x"),
    ("http://127.0.0.1:8080", PATH_MODE, "https://127.0.0.1:8080/x", "https://127.0.0.1:8080/x"),
    ("http://127.0.0.1:8080", PATH_MODE, "//example.com/x", "//example.com/x"),
    ("http://127.0.0.1:8080", PATH_MODE, "mailto:a@b", "mailto:a@b"),
    ("http://127.0.0.1:8080", PATH_MODE, "http://127.0.0.1:99999/x", "http://127.0.0.1:99999/x"),
    ("http://127.0.0.1:8080", PATH_MODE, "http://127.0.0.1:8080@evil.example/x", "http://127.0.0.1:8080@evil.example/x"),
    # paths: under the public prefix, unless the app put it there itself; relative ones stay
    ("http://127.0.0.1:8080", PATH_MODE, "/login?next=/", "/frontend/servers/alpha/login?next=/"),
    ("http://127.0.0.1:8080", PATH_MODE, "/", "/frontend/servers/alpha/"),
    ("http://127.0.0.1:8080", PATH_MODE, "/frontend/servers/alpha/x", "/frontend/servers/alpha/x"),
    ("http://127.0.0.1:8080", PATH_MODE, "/frontend/servers/alphabet", "/frontend/servers/alpha/frontend/servers/alphabet"),
    ("http://127.0.0.1:8080", HOST_MODE, "/login", "/login"),
    ("http://127.0.0.1:8080", PATH_MODE, "login", "login"),
    ("http://127.0.0.1:8080", PATH_MODE, "../x", "../x"),
    ("http://127.0.0.1:8080", PATH_MODE, "?page=2", "?page=2"),
    # an app below a path prefix
    ("http://127.0.0.1:8080/app/", PATH_MODE, "http://127.0.0.1:8080/app/x", "https://relay.example.com/frontend/servers/alpha/x"),
    ("http://127.0.0.1:8080/app", PATH_MODE, "http://127.0.0.1:8080/app", "https://relay.example.com/frontend/servers/alpha"),
    ("http://127.0.0.1:8080/app", PATH_MODE, "http://127.0.0.1:8080/other", "http://127.0.0.1:8080/other"),
    ("http://127.0.0.1:8080/app", PATH_MODE, "http://127.0.0.1:8080/application", "http://127.0.0.1:8080/application"),
    ("http://127.0.0.1:8080/app", PATH_MODE, "/app/x", "/frontend/servers/alpha/x"),
    ("http://127.0.0.1:8080/app", HOST_MODE, "/app/x", "/x"),
    ("http://127.0.0.1:8080/app", HOST_MODE, "/app", "/"),
    ("http://127.0.0.1:8080/app", PATH_MODE, "/other", "/other"),
]


@pytest.mark.parametrize(("app", "public", "location", "expected"), LOCATIONS,
                         ids=[f"{a}|{p.prefix or 'host'}|{loc}" for a, p, loc, _ in LOCATIONS])
def test_location_rewriting(app: str, public: PublicUrl, location: str, expected: str) -> None:
    assert rewrite_location(location.encode(), app, public) == expected.encode()


@given(st.binary(max_size=200))
def test_location_rewriting_never_fails(location: bytes) -> None:
    for public in (PATH_MODE, HOST_MODE, NO_HOST):
        assert isinstance(rewrite_location(location, "http://127.0.0.1:8080/app", public), bytes)


# ---- the public URL and the client, from the relay's X-Forwarded-* headers --------------------

PUBLIC_URLS = [
    ({"x-forwarded-proto": b"https", "x-forwarded-host": b"relay.example.com",
      "x-forwarded-prefix": b"/frontend/servers/alpha"}, PATH_MODE),
    ({"x-forwarded-proto": b"https", "x-forwarded-host": b"alpha.tunnel.example.com", "x-forwarded-prefix": b""},
     HOST_MODE),
    ({"x-forwarded-host": b"127.0.0.1:4000", "x-forwarded-prefix": b"/p/"},
     PublicUrl("http://127.0.0.1:4000/p", "/p")),
    ({}, NO_HOST),  # a relay without the web-app additions: its path for the server
    ({"x-forwarded-host": b"evil.example/x", "x-forwarded-prefix": b""}, PublicUrl(None, "")),
    ({"x-forwarded-host": b"a.example", "x-forwarded-proto": b"gopher"}, NO_HOST),
    ({"x-forwarded-host": b"a.example", "x-forwarded-prefix": b"no-slash"}, PublicUrl("http://a.example"
                                                                                      "/frontend/servers/alpha",
                                                                                      "/frontend/servers/alpha")),
]


@pytest.mark.parametrize(("headers", "expected"), PUBLIC_URLS)
def test_public_url(headers: dict[str, bytes], expected: PublicUrl) -> None:
    assert public_url(headers, "alpha") == expected


@pytest.mark.parametrize(("value", "expected"), [
    (b"203.0.113.7", "203.0.113.7"), (b"2001:db8::1", "2001:db8::1"), (b" 203.0.113.7 , 10.0.0.1", "203.0.113.7"),
    (None, "-"), (b"", "-"), (b"\x1b[31mred", "[31mred"), (b"x" * 100, "x" * 64),
])
def test_client_address(value: bytes | None, expected: str) -> None:
    assert client_address({} if value is None else {"x-forwarded-for": value}) == expected


# ---- hop-by-hop headers, both ways -------------------------------------------------------------

def test_connection_listed_names() -> None:
    pairs = [("Connection", "keep-alive, X-Private"), ("connection", b" Upgrade ,,"), ("X-Other", "Connection")]
    assert connection_listed(pairs) == {"keep-alive", "x-private", "upgrade"}


def test_end_to_end_drops_the_fixed_list_and_what_connection_lists() -> None:
    pairs = [("Connection", "X-Private"), ("X-Private", "s"), ("Keep-Alive", "5"), ("Transfer-Encoding", "chunked"),
             ("TE", "trailers"), ("Trailer", "X"), ("Upgrade", "h2c"), ("Proxy-Authorization", "Basic x"),
             ("Proxy-Connection", "keep-alive"), ("X-Public", "kept"), ("Set-Cookie", "a=1")]
    assert end_to_end(pairs) == [("x-public", b"kept"), ("set-cookie", b"a=1")]


REQUESTS = [
    # (headers from the relay, body, websocket, headers to the app)
    ({"accept": b"*/*", "host": b"relay.example.com", "x-forwarded-host": b"relay.example.com"}, None, False,
     [("accept", b"*/*"), ("x-forwarded-host", b"relay.example.com")]),
    ({"content-length": b"10", "expect": b"100-continue"}, 10, False, [("content-length", b"10")]),
    ({"content-length": b"0"}, None, False, [("content-length", b"0")]),
    ({"content-length": b"5"}, None, False, []),  # no body to send: no length that promises one
    ({"content-length": b"99"}, -1, False, [("transfer-encoding", b"chunked")]),
    ({"connection": b"X-A", "x-a": b"1", "te": b"trailers", "x-b": b"2"}, None, False, [("x-b", b"2")]),
    ({"upgrade": b"websocket", "connection": b"upgrade", "sec-websocket-key": b"k", "sec-websocket-version": b"13"},
     None, True, [("sec-websocket-key", b"k"), ("sec-websocket-version", b"13"), ("connection", b"Upgrade"),
                  ("upgrade", b"websocket")]),
]


@pytest.mark.parametrize(("headers", "body", "websocket", "expected"), REQUESTS)
def test_request_headers(headers: dict[str, bytes], body: int | None, websocket: bool,
                         expected: list[tuple[str, bytes]]) -> None:
    assert request_headers(headers, body, websocket) == expected


# ---- response headers: repeated ones as lists, or joined where RFC 9110 allows --------------------

APP_HEADERS = [("Content-Type", "text/html"), ("Set-Cookie", "a=1; Expires=Wed, 18 May 2033 03:33:20 GMT"),
               ("Set-Cookie", "b=2; HttpOnly"), ("Vary", "Accept"), ("Vary", "Cookie"), ("Connection", "close"),
               ("Link", "</a>; rel=preload"), ("X-Folded", "one\r\n two")]


def test_repeated_headers_become_lists_for_a_relay_that_takes_them() -> None:
    headers, multi = collect_response_headers(APP_HEADERS, lists=True)
    assert headers == {"content-type": b"text/html", "link": b"</a>; rel=preload", "x-folded": b"one two"}
    assert multi == {"set-cookie": (b"a=1; Expires=Wed, 18 May 2033 03:33:20 GMT", b"b=2; HttpOnly"),
                     "vary": (b"Accept", b"Cookie")}


def test_repeated_headers_are_joined_or_the_first_kept_for_an_older_relay() -> None:
    headers, multi = collect_response_headers(APP_HEADERS, lists=False)
    assert multi == {}
    assert headers["vary"] == b"Accept, Cookie"
    assert headers["set-cookie"] == b"a=1; Expires=Wed, 18 May 2033 03:33:20 GMT", "never joined: its dates hold commas"


def test_malformed_response_headers_are_dropped() -> None:
    headers, multi = collect_response_headers([("Bad Name", "x"), ("X-Nul", "a\x00b"), ("X-Ok", "fine"),
                                               ("Content-Length", "5"), ("Content-Length", "6")], lists=True)
    assert headers == {"x-ok": b"fine", "content-length": b"5"}, "content-length never becomes a list"
    assert multi == {}


# ---- chunked bodies, decoded as they arrive --------------------------------------------------------

def _encode_chunked(pieces: list[bytes], extension: bool = False) -> bytes:
    ext = b";name=value" if extension else b""
    return b"".join(b"%x%b\r\n%b\r\n" % (len(p), ext, p) for p in pieces if p) + b"0\r\nX-Trailer: t\r\n\r\n"


@given(st.lists(st.binary(max_size=300), max_size=8), st.lists(st.integers(1, 50), max_size=40), st.booleans())
def test_chunked_round_trip_in_any_split(pieces: list[bytes], cuts: list[int], extension: bool) -> None:
    encoded = _encode_chunked(pieces, extension) + b"the next response"
    decoder = ChunkedDecoder()
    out, i = b"", 0
    for size in [*cuts, len(encoded)]:
        if decoder.done:
            break
        out += decoder.feed(encoded[i:i + size])
        i += size
    assert decoder.done
    assert out == b"".join(pieces)


def test_chunked_data_is_passed_on_before_its_chunk_ends() -> None:
    decoder = ChunkedDecoder()
    assert decoder.feed(b"a\r\nhello") == b"hello"
    assert decoder.feed(b"world\r\n") == b"world"
    assert not decoder.done


@given(st.binary(max_size=500))
def test_chunked_garbage_only_raises_chunked_error(data: bytes) -> None:
    decoder = ChunkedDecoder()
    try:
        decoder.feed(data)
    except ChunkedError:
        pass


@pytest.mark.parametrize("data", [b"zz\r\n", b"\r\n", b"5\r\nhelloXX", b"11111111111111111\r\n", b"-1\r\n",
                                  b"5" * (MAX_LINE_BYTES + 1)])
def test_chunked_malformed(data: bytes) -> None:
    with pytest.raises(ChunkedError):
        ChunkedDecoder().feed(data)


# ---- the config keys -----------------------------------------------------------------------------

def _raw(**changes: object) -> dict[str, object]:
    raw: dict[str, object] = {"name": "alpha", "api_key": STRONG_KEY, "relay_url": "http://127.0.0.1:4000"}
    raw.update(changes)
    return raw


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080", "https://localhost", "http://[::1]:3000/app/",
                                 "http://grafana.lan:3000/grafana"])
def test_web_app_url_accepted(url: str) -> None:
    assert parse_server_config(_raw(web_app_url=url), "s").web_app_url == url


@pytest.mark.parametrize("url", ["127.0.0.1:8080", "ftp://127.0.0.1", "http://", "http://127.0.0.1:99999",
                                 "http://127.0.0.1/?x=1", "http://127.0.0.1/#top", "http://user:pw@127.0.0.1",
                                 "http://127.0.0.1/a b", "ws://127.0.0.1"])
def test_bad_web_app_url_is_one_line(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_server_config(_raw(web_app_url=url), "server.toml")
    message = str(info.value)
    assert message.startswith("server.toml: 'web_app_url' must be an http:// or https:// URL")
    assert "\n" not in message


def test_neither_folder_nor_app_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PTTH_API_KEY", raising=False)
    path = tmp_path / "ptth_server.toml"
    path.write_text(f'name = "alpha"\napi_key = "{STRONG_KEY}"\nrelay_url = "http://127.0.0.1:4000"\n')
    with pytest.raises(ConfigError) as info:
        load_server_config(path, {})
    message = str(info.value)
    assert "\n" not in message
    assert "file_server_root" in message and "web_app_url" in message


def test_web_app_alone_needs_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PTTH_API_KEY", raising=False)
    path = tmp_path / "ptth_server.toml"
    path.write_text(f'name = "alpha"\napi_key = "{STRONG_KEY}"\nrelay_url = "http://127.0.0.1:4000"\n')
    config, _ = load_server_config(path, {"web_app_url": "http://127.0.0.1:8080"})
    assert (config.web_app_url, config.file_server_root) == ("http://127.0.0.1:8080", None)
