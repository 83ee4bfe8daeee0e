"""What ptth_server does to headers as a reverse proxy for a web app: pure functions, no sockets.

- Hop-by-hop headers (RFC 9110 7.6.1) describe one connection: the fixed
  list (envelope.HOP_BY_HOP) and every name a `Connection` header lists are
  removed in both directions, as an HTTP/1.1 proxy must. A WebSocket
  handshake gets its own `Connection: Upgrade` and `Upgrade: websocket`.
- The request to the app says how its body is framed (`Content-Length` when
  the relay knows the length, else chunked), never `Expect` (the relay has
  answered the client's 100-continue already) and never the client's `Host`:
  the app gets its own host name, as nginx sends by default, and the public
  one in `X-Forwarded-Host`.
- The app's response headers become a response head: names lowercased;
  a header sent more than once keeps every value in order, as a list for a
  relay that takes lists (`header-lists`), else joined with ", " as RFC 9110
  5.3 allows for list-valued fields, except `Set-Cookie`, which can never be
  joined (RFC 6265 3: its dates hold commas): then only the first is kept.
- A `Location` that points at the app's own origin is rewritten to the
  public URL (nginx's `proxy_redirect default`), and so is a path-only one
  under the app's path, which the browser would otherwise resolve against
  the relay's root (see `rewrite_location`).
- The public URL and the client's address come from the X-Forwarded-*
  headers the relay puts in every request (PROTOCOL.md "Who is asking").
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from ptth_lib.wire.envelope import BODY_LENGTH_UNKNOWN, HOP_BY_HOP, connection_listed

_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
# An obsolete line folding (RFC 9112 5.2): a recipient replaces it with a space.
_OBS_FOLD_RE = re.compile(rb"\r?\n[ \t]+")
_BAD_VALUE_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# What X-Forwarded-Host may hold to be used in a URL: a host name or address and a port.
_HOST_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?\Z")
_PREFIX_RE = re.compile(r"^(/[!$&'()*+,;=:@%A-Za-z0-9._~-]*)*\Z")
_DEFAULT_PORTS = {"http": 80, "https": 443}

# Header names that cannot be joined with ", " (RFC 9110 5.3; RFC 6265 3).
_NEVER_JOINED = frozenset({"set-cookie", "set-cookie2"})
# The request headers the proxy sets itself, whatever the client sent.
_SET_BY_PROXY = frozenset({"host", "expect", "content-length"})

# Longest client address a log line shows.
_MAX_ADDRESS_CHARS = 64


@dataclass(frozen=True)
class PublicUrl:
    """Where the app is seen from outside: `base` (scheme://host + prefix) when known, and the prefix."""

    base: str | None
    prefix: str


def end_to_end(pairs: Iterable[tuple[str, str | bytes]]) -> list[tuple[str, bytes]]:
    """The headers without hop-by-hop ones (the fixed list and Connection-listed): lowercase names, bytes."""
    listed = list(pairs)
    drop = HOP_BY_HOP | connection_listed(listed)
    return [(name.lower(), value if isinstance(value, bytes) else value.encode("latin-1"))
            for name, value in listed if name.lower() not in drop]


def request_headers(headers: Mapping[str, bytes], body: int | None, websocket: bool) -> list[tuple[str, bytes]]:
    """The headers to send the app with a relayed request (its Host is added by the HTTP client).

    `body` is the relay's RelayRequest.body: None (no body), a length, or
    BODY_LENGTH_UNKNOWN (sent chunked).
    """
    out = [(k, v) for k, v in end_to_end(headers.items()) if k not in _SET_BY_PROXY]
    if body is None:
        if headers.get("content-length") == b"0":
            out.append(("content-length", b"0"))  # a POST with an empty body says so
    elif body == BODY_LENGTH_UNKNOWN:
        out.append(("transfer-encoding", b"chunked"))
    else:
        out.append(("content-length", str(body).encode("ascii")))
    if websocket:
        out += [("connection", b"Upgrade"), ("upgrade", b"websocket")]
    return out


def collect_response_headers(pairs: Iterable[tuple[str, str | bytes]], lists: bool
                             ) -> tuple[dict[str, bytes], dict[str, tuple[bytes, ...]]]:
    """An app's response headers as a response head's (headers, multi), hop-by-hop ones removed.

    `lists`: the relay takes a header's several values as a list (header-lists).
    Values are unfolded; a name that is not a token, or a value with control
    characters, is dropped (the relay would refuse the whole head).
    """
    values: dict[str, list[bytes]] = {}
    for name, raw in end_to_end(pairs):
        value = _OBS_FOLD_RE.sub(b" ", raw).strip(b" \t")
        if not _TOKEN_RE.match(name) or _BAD_VALUE_RE.search(value):
            continue
        values.setdefault(name, []).append(value)
    headers: dict[str, bytes] = {}
    multi: dict[str, tuple[bytes, ...]] = {}
    for name, vs in values.items():
        if len(vs) == 1:
            headers[name] = vs[0]
        elif lists and name != "content-length":
            multi[name] = tuple(vs)
        elif name in _NEVER_JOINED or name == "content-length":
            headers[name] = vs[0]
        else:
            headers[name] = b", ".join(vs)
    return headers, multi


def public_url(headers: Mapping[str, bytes], server_name: str) -> PublicUrl:
    """The public URL of the app's root, from the X-Forwarded-* headers the relay adds.

    Without X-Forwarded-Prefix (a relay that does not add it) the prefix is
    the relay's path for this server, /frontend/servers/NAME; without a usable
    X-Forwarded-Host the base is unknown (rewrites then give a path).
    """
    prefix_raw = headers.get("x-forwarded-prefix")
    prefix = _text(prefix_raw).rstrip("/") if prefix_raw is not None else None
    if prefix is None or not _PREFIX_RE.match(prefix):
        prefix = "/frontend/servers/" + quote(server_name, safe="")
    host = _text(headers.get("x-forwarded-host")).split(",")[0].strip()
    proto = _text(headers.get("x-forwarded-proto")).split(",")[0].strip().lower() or "http"
    if not _HOST_RE.match(host) or proto not in _DEFAULT_PORTS:
        return PublicUrl(None, prefix)
    return PublicUrl(f"{proto}://{host}{prefix}", prefix)


def rewrite_location(location: bytes, app_url: str, public: PublicUrl) -> bytes:
    """A Location (or Content-Location) seen by the client instead of the app's own.

    - `http://APP-HOST:PORT/APP-PATH/rest` (the app's origin and path, as
      given in web_app_url; also scheme-relative) becomes `PUBLIC/rest`: the
      public base, or the public prefix when the relay did not say its host.
    - A path `/APP-PATH/rest` becomes `PREFIX/rest`, unless it starts with
      PREFIX already (an app that reads X-Forwarded-Prefix builds its own).
    - Anything else (relative paths, other hosts, other schemes) stays.
    """
    text = location.decode("latin-1")
    app = urlsplit(app_url)
    app_path = app.path.rstrip("/")
    if text.startswith("/") and not text.startswith("//"):
        if public.prefix and _is_under(text, public.prefix):
            return location
        rest = _below(text, app_path)
        return location if rest is None else (public.prefix + rest or "/").encode("latin-1")
    try:
        target = urlsplit(text if "://" in text else f"{app.scheme}:{text}" if text.startswith("//") else "")
        port = target.port
    except ValueError:
        return location
    if (target.scheme.lower() != app.scheme or target.hostname is None or target.hostname != app.hostname
            or (port or _DEFAULT_PORTS[app.scheme]) != (app.port or _DEFAULT_PORTS[app.scheme])):
        return location
    after_host = text[text.index("//") + 2:]
    slash = min((i for i in (after_host.find(c) for c in "/?#") if i >= 0), default=len(after_host))
    rest = _below(after_host[slash:] or "/", app_path)
    if rest is None:
        return location
    if public.base is not None:
        return (public.base + rest).encode("latin-1")
    return ((public.prefix + rest) or "/").encode("latin-1")


def client_address(headers: Mapping[str, bytes]) -> str:
    """The client's address for log lines: X-Forwarded-For as the relay set it, or "-"."""
    first = _text(headers.get("x-forwarded-for")).split(",")[0].strip()
    kept = "".join(c for c in first if " " < c <= "~")[:_MAX_ADDRESS_CHARS]
    return kept or "-"


def _is_under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith((prefix + "/", prefix + "?", prefix + "#"))


def _below(path: str, app_path: str) -> str | None:
    """What follows `app_path` in `path` (with its query), or None if `path` is not under it."""
    if not app_path:
        return path
    if not _is_under(path, app_path):
        return None
    return path[len(app_path):]


def _text(value: bytes | None) -> str:
    return value.decode("latin-1") if value is not None else ""
