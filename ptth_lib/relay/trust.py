"""What the relay lets across its edge, and whom it believes. No Flask, no sockets.

The relay trusts no client and no server (README, "Security"):

- The server a request goes to is decided from one canonical reading of the
  raw request path (`parse_server_path`). Anything a proxy in front could
  read differently (an encoded `/` or a backslash or control character in the
  server's name, a `.` or `..` segment anywhere) is refused, so the URL
  prefix an operator protects in nginx is the prefix the relay routes by.
- Every server shares the relay's origin under `/frontend/servers/NAME/`, so
  a visitor's credentials for the relay or its front proxy (`Cookie`,
  `Authorization`, keys) never reach a server (`client_headers_for_server`),
  and headers from a server that would act on the relay's edge or origin
  (`X-Accel-*`, `X-Sendfile`, HSTS, `Set-Cookie`, `Alt-Svc`, ...) are dropped
  (`server_headers_for_client`); relayed content is sandboxed into an origin
  of its own by CSP unless the operator marks the server trusted.
- A client's address comes from `X-Forwarded-For` only through proxies whose
  own address is in `trusted_proxies` (`client_address`).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from ptth_lib.errors import BadPathError
from ptth_lib.wire.envelope import HOP_BY_HOP, connection_listed

# Address blocks as the config lists them ("127.0.0.1/32", "::1/128").
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))

# Headers a client sends that are for the relay or its front proxy, never for
# a server: credentials on the relay's origin, our own key header, and what
# only a proxy may say about a request (the relay does not pass a client's
# claims about itself on as if a proxy had checked them).
_CLIENT_HEADERS_KEPT_FROM_SERVERS = frozenset({
    "cookie", "authorization", "proxy-authorization", "x-apikey",
    "forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-forwarded-port",
    "x-forwarded-prefix", "x-real-ip",
})

# In host mode (a server on a host of its own) these client credentials are the
# server's: the visitor's browser sent them to that host.
_HOST_MODE_CREDENTIALS = frozenset({"cookie", "authorization"})

# Client headers for the relay itself: it meets `Expect: 100-continue` when
# the server starts fetching the body, so the app never sees the expectation.
_CLIENT_HEADERS_RELAY_ANSWERS = frozenset({"expect"})

# A WebSocket handshake's headers, hop-by-hop otherwise (with sec-websocket-*).
_WEBSOCKET_HEADERS = frozenset({"upgrade", "connection"})

# Headers from a server that act on the relay's edge or on its whole origin
# rather than on the server's own response: the front proxy obeys X-Accel-*
# and X-Sendfile (serving files it holds, internal locations); HSTS, Alt-Svc,
# Clear-Site-Data, reporting endpoints and Service-Worker-Allowed change how
# browsers treat every page of the relay; cookies and auth challenges land on
# the origin all servers share.
_SERVER_HEADERS_DROPPED = frozenset({
    "set-cookie", "set-cookie2", "www-authenticate",
    "strict-transport-security", "public-key-pins", "public-key-pins-report-only", "expect-ct",
    "alt-svc", "clear-site-data", "service-worker-allowed",
    "report-to", "reporting-endpoints", "nel",
    "x-sendfile", "x-sendfile-type", "x-lighttpd-send-file",
    "x-content-type-options",  # replaced by ours
})
_SERVER_HEADER_PREFIXES_DROPPED = ("x-accel-",)
# ...of which these act on an origin only: a server on a host of its own may send them.
_HOST_MODE_SERVER_HEADERS = frozenset({
    "set-cookie", "set-cookie2", "www-authenticate", "strict-transport-security", "clear-site-data",
    "service-worker-allowed", "report-to", "reporting-endpoints", "nel", "x-content-type-options",
})

# What every relayed response gets unless its server is trusted: its own
# opaque origin (no allow-same-origin), so its script can read neither the
# relay's pages nor other servers' files; no MIME sniffing into HTML.
SANDBOX_CSP = ("sandbox allow-downloads allow-forms allow-modals allow-popups "
               "allow-popups-to-escape-sandbox allow-scripts")
RELAYED_HEADERS = (("Content-Security-Policy", SANDBOX_CSP), ("X-Content-Type-Options", "nosniff"))
TRUSTED_RELAYED_HEADERS = (("X-Content-Type-Options", "nosniff"),)

# The relay's own answers: no script, no style (its HTML pages add their two
# inlined stylesheets by hash, relay/views.py PAGE_CSP), never framed, no sniffing.
RELAY_PAGE_HEADERS = (
    ("Content-Security-Policy", ("default-src 'none'; img-src 'self'; "
                                 "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
)

# Headers that say a proxy handled the request. From a peer that is not a
# trusted proxy they prove nothing, but they do show the request came through
# a proxy: such a request is never taken for one made on the relay's machine.
PROXY_HEADERS = ("HTTP_X_FORWARDED_FOR", "HTTP_FORWARDED", "HTTP_X_REAL_IP")

# A host as it may be passed on: a name or an address, maybe a port.
_HOST_RE = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9._~-]+)(:[0-9]{1,5})?\Z")
# An RFC 7239 value that needs no quotes (a token).
_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")

# Longest address kept from a header: an IPv6 address with a zone fits.
_MAX_ADDRESS_CHARS = 64


@dataclass(frozen=True)
class ServerPath:
    """A request for one server: its name and the target to hand it (raw, from "/").

    `target` is None when the path ends with the name, without the slash after it.
    """

    name: str
    target: str | None


def parse_server_path(raw_target: str, prefix: str) -> ServerPath:
    """Split a raw request target under `prefix` into the server's name and the rest.

    `raw_target` is the target as the client sent it (percent-escapes intact,
    maybe a query); `prefix` is e.g. "/frontend/servers/". The name segment is
    percent-decoded; the rest goes to the server as sent. Raises BadPathError
    for a name holding `/`, `\\`, a control character or not UTF-8, for an
    empty or dot name, and for a `.` or `..` segment or a backslash anywhere
    in the path: browsers never send those, and proxies in front resolve them
    before matching their locations, so the relay would route differently
    from what the operator's proxy checked.
    """
    path, sep, query = raw_target.partition("?")
    if not path.startswith(prefix):
        raise BadPathError(f"path does not start with {prefix}")
    _check_whole_path(path)
    name_raw, slash, rest = path[len(prefix):].partition("/")
    name = _decode_name(name_raw)
    return ServerPath(name, "/" + rest + sep + query if slash else None)


def _check_whole_path(path: str) -> None:
    if "\\" in path or "%5c" in path.lower():
        raise BadPathError("a backslash in the path")
    for segment in path.split("/"):
        if ("." in segment or "%" in segment) and _percent_decode(segment) in (b".", b".."):
            raise BadPathError("a '.' or '..' segment in the path")


def _decode_name(raw: str) -> str:
    decoded = _percent_decode(raw)
    if decoded in (b"", b".", b".."):
        raise BadPathError("no server name in the path")
    if any(b < 0x20 or b == 0x7F for b in decoded) or b"/" in decoded or b"\\" in decoded:
        raise BadPathError("the server name holds '/', a backslash or a control character")
    try:
        return decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise BadPathError("the server name is not UTF-8") from None


def _percent_decode(segment: str) -> bytes:
    return unquote_to_bytes(segment.encode("utf-8", "surrogateescape"))


def client_headers_for_server(pairs: Iterable[tuple[str, str]], *, host_mode: bool = False,
                              keep_authorization: bool = True, websocket: bool = False) -> list[tuple[str, str]]:
    """The client's request headers a server may see (names as given).

    Path mode (the default): credentials for the relay's origin and proxy
    claims stay here. Host mode: the server has an origin of its own, so the
    visitor's Cookie and Authorization are its (Authorization not when
    `keep_authorization` is False: the relay's basic auth consumed it).
    Hop-by-hop headers, and those the client's Connection header names, are
    dropped (RFC 9110 7.6.1), except a WebSocket handshake's own.
    """
    pairs = list(pairs)
    listed = connection_listed(pairs)
    kept = []
    for k, v in pairs:
        name = k.lower()
        if websocket and (name in _WEBSOCKET_HEADERS or name.startswith("sec-websocket-")):
            kept.append((k, "upgrade" if name == "connection" else v))
        elif not _stays_at_relay(name, listed, host_mode, keep_authorization):
            kept.append((k, v))
    return kept


def _stays_at_relay(name: str, listed: frozenset[str], host_mode: bool, keep_authorization: bool) -> bool:
    """Tell whether a client's request header (lowercase name) stops at the relay."""
    if _is_hop_by_hop(name, listed) or name in _CLIENT_HEADERS_RELAY_ANSWERS:
        return True
    if host_mode and name in _HOST_MODE_CREDENTIALS:
        return name == "authorization" and not keep_authorization
    return name in _CLIENT_HEADERS_KEPT_FROM_SERVERS


def _is_hop_by_hop(name: str, listed: frozenset[str]) -> bool:
    """RFC 9110 7.6.1: the hop-by-hop headers, any Proxy-*, and those Connection names."""
    return name in HOP_BY_HOP or name.startswith("proxy-") or name in listed


def is_dropped_from_server(name: str, host_mode: bool = False) -> bool:
    """Tell whether a response header from a server must not reach the client (lowercase name).

    In host mode the server's origin is its own, so what acts on an origin
    (cookies, auth challenges, HSTS, reporting) is its business; what acts on
    the relay's edge (nginx's X-Accel-* and X-Sendfile, Alt-Svc, the
    relay's certificate) never is.
    """
    if host_mode and name in _HOST_MODE_SERVER_HEADERS:
        return False
    return name in _SERVER_HEADERS_DROPPED or name.startswith(_SERVER_HEADER_PREFIXES_DROPPED)


def server_headers_for_client(headers: Mapping[str, bytes] | Iterable[tuple[str, bytes]], *,
                              host_mode: bool = False, upgrade: bool = False,
                              ) -> tuple[list[tuple[str, bytes]], list[str]]:
    """Split a server's response header lines into those passed on and the names dropped.

    One pair per line (a header sent several times keeps each value, in
    order). Hop-by-hop headers, and those the server's Connection header
    names, go; for a switch to WebSocket (`upgrade`) the handshake's own stay.
    """
    lines = list(headers.items() if isinstance(headers, Mapping) else headers)
    listed = connection_listed(lines)
    kept: list[tuple[str, bytes]] = []
    dropped: list[str] = []
    for name, value in lines:
        if upgrade and (name in _WEBSOCKET_HEADERS or name.startswith("sec-websocket-")):
            kept.append((name, value))
        elif _is_hop_by_hop(name, listed):
            continue
        elif is_dropped_from_server(name, host_mode):
            if name != "x-content-type-options":
                dropped.append(name)
        elif host_mode and name in ("set-cookie", "set-cookie2"):
            kept.append((name, _host_only_cookie(value)))
        else:
            kept.append((name, value))
    return kept, dropped


def _host_only_cookie(value: bytes) -> bytes:
    """A Set-Cookie without its Domain attribute: the cookie stays on the server's own host.

    A server's host is NAME.SUFFIX; `Domain=SUFFIX` would hand the cookie to
    every other server's host (and to the relay's, if it is SUFFIX itself).
    """
    parts = value.split(b";")
    kept = [parts[0]] + [p for p in parts[1:] if p.strip()[:7].lower() != b"domain="]
    return b";".join(kept) if len(kept) != len(parts) else value


def forwarded_headers(client: str, proto: str, host: str, prefix: str) -> list[tuple[str, str]]:
    """What the relay tells a server about who asks: X-Forwarded-* and RFC 7239 Forwarded."""
    shown_for = f'"[{client}]"' if ":" in client else client
    shown_host = host if host and _TOKEN_RE.match(host) else '"' + host.replace("\\", "").replace('"', "") + '"'
    return [
        ("X-Forwarded-For", client),
        ("X-Forwarded-Proto", proto),
        ("X-Forwarded-Host", host),
        ("X-Forwarded-Prefix", prefix),
        ("Forwarded", f"for={shown_for};proto={proto};host={shown_host}"),
    ]


def clean_host(value: str | None) -> str:
    """A Host (or X-Forwarded-Host) value fit to pass on, or "" : one name[:port], no spaces or commas."""
    if not value:
        return ""
    value = value.split(",", 1)[0].strip()
    return value if len(value) <= 255 and _HOST_RE.match(value) else ""


def host_server_name(host: str, suffix: str) -> str | None:
    """The server NAME a host NAME+suffix names (case as sent, port ignored); None if not one of ours.

    "" for a host that is the suffix with nothing before it, or names
    something that cannot be a server's name (the caller answers 400).
    """
    if not suffix:
        return None
    name = host.lower()
    if name.startswith("["):
        return None  # an IPv6 literal
    name = name.rpartition(":")[0] if ":" in name else name
    name = name.removesuffix(".")
    if not name.endswith(suffix):
        return None
    return name[:-len(suffix)]


def parse_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """Address blocks from config strings; ValueError names the first bad one."""
    out = []
    for entry in entries:
        try:
            out.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an address or block such as \"127.0.0.1/32\"") from None
    return tuple(out)


def is_in(address: str, networks: Iterable[Network]) -> bool:
    """Tell whether `address` (an IP as text) lies in one of `networks`; False if it is no IP."""
    ip = _parse_ip(address)
    return ip is not None and any(ip in net for net in networks)


@functools.lru_cache(maxsize=4096)  # asked several times per request (who is asking, which scheme, which host)
def _parse_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """`address` as an IP (an IPv4-mapped IPv6 one as IPv4, a zone dropped); None if it is none."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def client_address(peer: str, forwarded_for: str | None, trusted_proxies: tuple[Network, ...]) -> str:
    """The client's address: the peer's, or through trusted proxies, the one they report.

    X-Forwarded-For is read from the right, each hop written by the proxy
    before it; the first hop that is not a trusted proxy is the client. A
    header from an untrusted peer is ignored: anyone can write one.
    """
    address = peer
    if not forwarded_for or not is_in(peer, trusted_proxies):
        return address[:_MAX_ADDRESS_CHARS]
    for hop in reversed(forwarded_for.split(",")):
        hop = hop.strip()
        try:
            ipaddress.ip_address(hop.split("%", 1)[0])
        except ValueError:
            break  # a proxy wrote nonsense: believe the last proxy that we can
        address = hop
        if not is_in(hop, trusted_proxies):
            break
    return address[:_MAX_ADDRESS_CHARS]


@functools.lru_cache(maxsize=4096)  # asked for every request; clients come back
def fairness_key(address: str) -> str:
    """The unit one client's share is counted by: its IPv4 address, or its IPv6 /64.

    One IPv6 host usually has a whole /64 to pick addresses from.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip)
