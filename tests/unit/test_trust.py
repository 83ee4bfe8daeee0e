"""trust.py driven directly: which server a path names, which headers cross, whose address it is.

No processes: these are the pure rules the relay applies at its edge
(test_security.py checks them end to end through the real relay and nginx).
"""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ptth_lib.errors import BadPathError
from ptth_lib.relay import trust
from ptth_lib.relay.trust import ServerPath, parse_server_path

P = "/frontend/servers/"
LOOP = trust.parse_networks(["127.0.0.1/32", "::1/128"])


# ---- which server a path names ----------------------------------------------


@pytest.mark.parametrize(("raw", "name", "target"), [
    ("/frontend/servers/alpha/files/x", "alpha", "/files/x"),
    ("/frontend/servers/alpha/", "alpha", "/"),
    ("/frontend/servers/alpha/?q=1", "alpha", "/?q=1"),
    ("/frontend/servers/alpha", "alpha", None),
    ("/frontend/servers/alpha?q=1", "alpha", None),
    ("/frontend/servers/al%70ha/files/x", "alpha", "/files/x"),   # nginx decodes it the same way
    ("/frontend/servers/alpha/files/a%2Fb%3F%23.txt", "alpha", "/files/a%2Fb%3F%23.txt"),  # rest kept raw
    ("/frontend/servers/alpha/files//x", "alpha", "/files//x"),
    ("/frontend/servers/alpha/files/x?a=../b", "alpha", "/files/x?a=../b"),  # the query is not a path
    ("/frontend/servers/alpha/files/...x/..y/.z", "alpha", "/files/...x/..y/.z"),
    ("/frontend/servers/caf%C3%A9/", "caf\u00e9", "/"),
])
def test_paths_that_name_one_server(raw: str, name: str, target: str | None) -> None:
    assert parse_server_path(raw, P) == ServerPath(name, target)


@pytest.mark.parametrize("raw", [
    "/frontend/servers/beta%2F..%2Falpha/files/x",   # the finding: nginx reads beta, then alpha
    "/frontend/servers/beta%2falpha/",
    "/frontend/servers/beta%5C..%5Calpha/",
    "/frontend/servers/beta\\alpha/",
    "/frontend/servers/%2e%2e/x",
    "/frontend/servers/../x",
    "/frontend/servers/./x",
    "/frontend/servers/%2E/x",
    "/frontend/servers//alpha/files/x",             # an empty name
    "/frontend/servers/alpha/../beta/files/x",
    "/frontend/servers/alpha/%2e%2e/beta/files/x",  # nginx resolves it to beta's location
    "/frontend/servers/alpha/.%2E/beta/",
    "/frontend/servers/alpha/files/./x",
    "/frontend/servers/alpha/files/%2E",
    "/frontend/servers/alpha/files/x\\..\\y",
    "/frontend/servers/alpha/files/x%5c..%5cy",
    "/frontend/servers/al%00pha/",
    "/frontend/servers/al%0apha/",
    "/frontend/servers/al%7fpha/",
    "/frontend/servers/%ff/",
    "/frontend/servers/",
    "/servers/alpha/",
])
def test_ambiguous_paths_are_refused(raw: str) -> None:
    with pytest.raises(BadPathError):
        parse_server_path(raw, P)


@given(st.text(max_size=60))
def test_any_path_names_one_safe_server_or_is_refused(tail: str) -> None:
    """Whatever follows the prefix: a BadPathError, or a name a proxy can only read the same way."""
    try:
        parsed = parse_server_path(P + tail, P)
    except BadPathError:
        return
    assert parsed.name and parsed.name not in (".", "..")
    assert not any(c in parsed.name for c in "/\\") and all(c >= " " and c != "\x7f" for c in parsed.name)
    if parsed.target is not None:
        assert parsed.target.startswith("/")
        segments = parsed.target.partition("?")[0].split("/")
        assert not {".", ".."} & set(segments)


@given(st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._~-]{0,20}\Z"),
       st.lists(st.text(alphabet="abc xyz%?#/\u00e9", min_size=1, max_size=8), max_size=4))
def test_a_quoted_name_and_rest_come_back_unchanged(name: str, parts: list[str]) -> None:
    rest = "/".join(quote(p, safe="") for p in parts)
    if name in (".", ".."):
        return
    assert parse_server_path(P + quote(name, safe="") + "/" + rest, P) == ServerPath(name, "/" + rest)


# ---- which headers cross ------------------------------------------------------


def test_client_credentials_and_proxy_claims_stay_at_the_relay() -> None:
    sent = [("Cookie", "session=relay"), ("Authorization", "Basic b3A6cHc="), ("X-ApiKey", "k"),
            ("X-Forwarded-For", "1.2.3.4"), ("Forwarded", "for=1.2.3.4"), ("X-Real-IP", "1.2.3.4"),
            ("X-Forwarded-Host", "evil"), ("Range", "bytes=0-1"), ("Accept", "*/*"),
            ("If-None-Match", '"x"'), ("User-Agent", "curl")]
    kept = trust.client_headers_for_server(sent)
    assert [k for k, _ in kept] == ["Range", "Accept", "If-None-Match", "User-Agent"]


def test_headers_acting_on_the_relay_edge_are_dropped() -> None:
    head = {
        "content-type": b"text/html", "content-length": b"5", "etag": b'"e"', "cache-control": b"no-cache",
        "content-security-policy": b"default-src 'self'", "location": b"../x",
        "set-cookie": b"sid=1; Path=/", "strict-transport-security": b"max-age=0",
        "x-accel-redirect": b"/internal/secret", "x-accel-buffering": b"yes", "x-sendfile": b"/etc/passwd",
        "x-lighttpd-send-file": b"/etc/passwd", "alt-svc": b'h3=":443"', "clear-site-data": b'"*"',
        "service-worker-allowed": b"/", "www-authenticate": b"Basic", "nel": b"{}", "report-to": b"{}",
        "x-content-type-options": b"sniff-please",
    }
    kept, dropped = trust.server_headers_for_client(head)
    assert {name for name, _ in kept} == {"content-type", "content-length", "etag", "cache-control",
                                          "content-security-policy", "location"}
    assert "x-content-type-options" not in dropped  # replaced by the relay's own, not worth a log line
    assert set(dropped) == set(head) - {name for name, _ in kept} - {"x-content-type-options"}


def test_relayed_content_is_sandboxed_without_the_relay_origin() -> None:
    csp = dict(trust.RELAYED_HEADERS)["Content-Security-Policy"]
    tokens = csp.split()
    assert tokens[0] == "sandbox" and "allow-same-origin" not in tokens
    assert dict(trust.RELAYED_HEADERS)["X-Content-Type-Options"] == "nosniff"
    assert "Content-Security-Policy" not in dict(trust.TRUSTED_RELAYED_HEADERS)


# ---- whose address it is ------------------------------------------------------


@pytest.mark.parametrize(("peer", "xff", "expected"), [
    ("203.0.113.7", None, "203.0.113.7"),
    ("203.0.113.7", "1.2.3.4", "203.0.113.7"),               # not a trusted proxy: its header is ignored
    ("127.0.0.1", None, "127.0.0.1"),
    ("127.0.0.1", "198.51.100.2", "198.51.100.2"),          # nginx on this machine
    ("127.0.0.1", "6.6.6.6, 198.51.100.2", "198.51.100.2"),  # the client's own claim comes first: ignored
    ("127.0.0.1", "198.51.100.2, 127.0.0.1", "198.51.100.2"),  # two trusted hops
    ("127.0.0.1", "127.0.0.1, 127.0.0.1", "127.0.0.1"),
    ("127.0.0.1", "garbage, 198.51.100.2", "198.51.100.2"),
    ("127.0.0.1", "198.51.100.2, garbage", "127.0.0.1"),    # the proxy wrote nonsense: believe the proxy
    ("::1", "2001:db8::1", "2001:db8::1"),
    ("::ffff:127.0.0.1", "198.51.100.9", "198.51.100.9"),
])
def test_client_address_believes_only_trusted_proxies(peer: str, xff: str | None, expected: str) -> None:
    assert trust.client_address(peer, xff, LOOP) == expected


def test_client_address_with_no_trusted_proxy_is_the_peer() -> None:
    assert trust.client_address("127.0.0.1", "198.51.100.2", ()) == "127.0.0.1"


def test_fairness_counts_an_ipv6_host_by_its_64() -> None:
    assert trust.fairness_key("2001:db8:1:2:aaaa::1") == trust.fairness_key("2001:db8:1:2:bbbb::9")
    assert trust.fairness_key("2001:db8:1:3::1") != trust.fairness_key("2001:db8:1:2::1")
    assert trust.fairness_key("198.51.100.2") == "198.51.100.2"
    assert trust.fairness_key("::ffff:198.51.100.2") == "198.51.100.2"


def test_networks_from_config() -> None:
    nets = trust.parse_networks(["10.0.0.0/8", "::1", "192.168.1.7"])
    assert trust.is_in("10.2.3.4", nets) and trust.is_in("::1", nets) and trust.is_in("192.168.1.7", nets)
    assert not trust.is_in("192.168.1.8", nets) and not trust.is_in("not-an-ip", nets)
    with pytest.raises(ValueError, match="not an address"):
        trust.parse_networks(["10.0.0.0/33"])
