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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from ptth_lib.errors import BadPathError

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

# What every relayed response gets unless its server is trusted: its own
# opaque origin (no allow-same-origin), so its script can read neither the
# relay's pages nor other servers' files; no MIME sniffing into HTML.
SANDBOX_CSP = ("sandbox allow-downloads allow-forms allow-modals allow-popups "
               "allow-popups-to-escape-sandbox allow-scripts")
RELAYED_HEADERS = (("Content-Security-Policy", SANDBOX_CSP), ("X-Content-Type-Options", "nosniff"))
TRUSTED_RELAYED_HEADERS = (("X-Content-Type-Options", "nosniff"),)

# The relay's own pages: nothing but inline style, never framed, no sniffing.
RELAY_PAGE_HEADERS = (
    ("Content-Security-Policy", ("default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; "
                                 "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
)

# Headers that say a proxy handled the request. From a peer that is not a
# trusted proxy they prove nothing, but they do show the request came through
# a proxy: such a request is never taken for one made on the relay's machine.
PROXY_HEADERS = ("HTTP_X_FORWARDED_FOR", "HTTP_FORWARDED", "HTTP_X_REAL_IP")

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


def client_headers_for_server(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The client's request headers a server may see (names as given)."""
    return [(k, v) for k, v in pairs if k.lower() not in _CLIENT_HEADERS_KEPT_FROM_SERVERS]


def is_dropped_from_server(name: str) -> bool:
    """Tell whether a response header from a server must not reach the client (lowercase name)."""
    return name in _SERVER_HEADERS_DROPPED or name.startswith(_SERVER_HEADER_PREFIXES_DROPPED)


def server_headers_for_client(headers: Mapping[str, bytes]) -> tuple[dict[str, bytes], list[str]]:
    """Split a server's response headers into those passed on and the names dropped."""
    kept: dict[str, bytes] = {}
    dropped: list[str] = []
    for name, value in headers.items():
        if is_dropped_from_server(name):
            if name != "x-content-type-options":
                dropped.append(name)
        else:
            kept[name] = value
    return kept, dropped


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
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


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
