"""The tunnel's wire format (the spec's http_serde): MsgPack envelopes.

Two messages cross the backend API, named by sender:

- `RelayRequest`: a client's request, wrapped by the relay. A listen answer is
  a MsgPack array of them: `{"id": str, "req": {"method", "uri", "headers"}}`,
  plus, for servers that announce them, `"body"` (a request with a body the
  server fetches: its length, or -1 when unknown) and `"upgrade"` (a
  WebSocket handshake).
- `ServerResponseHead`: the server's status and headers, MsgPack then base64
  in the header `X-PTTH-2LJYXWC4` of the POST that streams the body. A header
  sent more than once (Set-Cookie) may be a list of values, to a relay that
  announces it takes them.

Header names are lowercase `str`, values `bytes`. Decoding trusts nothing:
anything malformed or oversized raises `ProtocolError`, never another type.
No sockets here; PROTOCOL.md is the prose version of this module.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from ptth_lib.errors import ProtocolError
from ptth_lib.wire.names import ID_RE

# URL paths of the backend API; "7ZSFUKGV" is the spec's cookie for it.
LISTEN_PATH = "/7ZSFUKGV/http_listen/{name}"
RESPONSE_PATH = "/7ZSFUKGV/http_response/{id}"
# A stopping server says so, and the relay counts it gone at once (PTTH's own).
LEAVE_PATH = "/7ZSFUKGV/http_leave/{name}"

# PTTH's own additions to a listen (PROTOCOL.md, "Acknowledged delivery"); a
# spec 002 server sends none of them and is served exactly as before.
# The server's listens carry `X-PTTH-Features: ack`; then each 200 answer
# names its batch in X-PTTH-Batch, and the next listen acknowledges it.
FEATURES_HEADER = "X-PTTH-Features"
BATCH_HEADER = "X-PTTH-Batch"
ACK_HEADER = "X-PTTH-Ack"
FEATURE_ACK = "ack"
# Web apps (PROTOCOL.md, "Web apps"): a server that fetches request bodies
# (REQUEST_BODY_PATH), one that takes WebSocket upgrades; and, in a listen
# answer's X-PTTH-Features, a relay that takes several values of a header.
FEATURE_BODIES = "bodies"
FEATURE_WEBSOCKET = "websocket"
FEATURE_HEADER_LISTS = "header-lists"
# Answers riding on a listen (PROTOCOL.md, "Small answers ride on the next
# listen"): a relay that names this feature in its listen answers takes a
# POSTed listen whose body carries complete small responses, so a small
# response costs the server no exchange of its own.
FEATURE_ANSWERS = "answers"
REQUEST_BODY_PATH = "/7ZSFUKGV/http_request_body/{id}"
# RelayRequest.body for a body whose length is not known in advance (chunked).
BODY_LENGTH_UNKNOWN = -1
# At most this many requests in the answer (the server's free capacity).
MAX_REQUESTS_HEADER = "X-PTTH-Max-Requests"
# Park at most this many seconds (0: answer at once, to check the connection).
WAIT_HEADER = "X-PTTH-Wait-Secs"

# A relay cluster's node names itself in its answers to a server's listens and
# POSTs, and each request id it hands out begins with its owner node's id
# (PROTOCOL.md, "Relay clusters"): a server that POSTs a response on a
# connection whose last answer named the owner saves the relay a hop.
NODE_HEADER = "X-PTTH-Node"

# TCP port forwarding (spec 003; forward_api.py). Servers use their own key:
TCP_LISTEN_PATH = "/7ZSFUKGV/tcp_listen/{name}/{port}"
TCP_ACCEPT_PATH = "/7ZSFUKGV/tcp_accept/{id}"
TCP_REFUSE_PATH = "/7ZSFUKGV/tcp_refuse/{id}"
TCP_DOWNSTREAM_PATH = "/7ZSFUKGV/tcp_downstream/{id}"
# ...clients use a key from a [[clients]] table:
TCP_CHECK_PATH = "/frontend/tcp/check"
TCP_CONNECT_PATH = "/frontend/tcp/connect/{server}/{port}"
TCP_UPSTREAM_PATH = "/frontend/tcp/upstream/{id}"
CONNECTION_ID_HEADER = "X-PTTH-Connection-Id"
CLIENT_NAME_HEADER = "X-PTTH-Client"

API_KEY_HEADER = "X-ApiKey"
RESPONSE_HEAD_HEADER = "X-PTTH-2LJYXWC4"
# Sent by a server with each listen, shown in the relay's server lists.
SERVER_VERSION_HEADER = "X-PTTH-Server-Version"
SERVER_HOST_HEADER = "X-PTTH-Server-Host"
# Longest version or host name the relay keeps; longer ones are cut.
MAX_REPORT_CHARS = 64

# A listen answer carries only request heads, never bodies; 4 MiB is room for
# a full queue of requests with large cookies, and still bounds a hostile relay.
MAX_LISTEN_BODY_BYTES = 4 * 1024 * 1024

# Answers a listen may carry: each body at most INLINE_BODY_BYTES (a larger
# one goes in its own POST, streamed), all of them with their heads at most
# MAX_ANSWERS_BYTES; the relay reads that much, after the key is checked.
INLINE_BODY_BYTES = 64 * 1024
MAX_ANSWERS_BYTES = 1024 * 1024

# The base64 response head travels in one HTTP header. 16 KiB is ten times a
# file server's head with room for large cookies; gunicorn.conf.py allows
# header fields just over this, and the relay's header parsing time grows
# with the square of the header block, so this is kept small on purpose.
MAX_RESPONSE_HEAD_BYTES = 16 * 1024

# A client request whose method, uri and headers add up to more than this is
# refused (431) at the relay, so that it always fits a listen answer.
MAX_REQUEST_HEAD_BYTES = 256 * 1024

# Hop-by-hop headers (RFC 9110 section 7.6.1) describe one connection, not the
# message, so they are dropped at every hop in both directions.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
    "proxy-connection", "proxy-authenticate", "proxy-authorization",
})

_TOKEN_RE = re.compile(rb"^[!#$%&'*+.^_`|~0-9a-z-]+\Z")
# Field values may hold visible characters, spaces and tabs (RFC 9110 5.5);
# every other control character is refused, CR, LF and NUL above all.
_BAD_VALUE_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# A Content-Length a client can rely on: plain digits, no sign, no list (RFC 9110 8.6).
_LENGTH_RE = re.compile(rb"^[0-9]{1,19}\Z")


@dataclass(frozen=True)
class RelayRequest:
    """A client's request as the relay hands it to a server."""

    id: str
    method: str
    uri: str
    headers: dict[str, bytes]
    # A body to fetch (REQUEST_BODY_PATH): its length, or BODY_LENGTH_UNKNOWN; None: no body.
    body: int | None = None
    # "websocket" for a WebSocket handshake; None for a plain request.
    upgrade: str | None = None


@dataclass(frozen=True)
class ServerResponseHead:
    """Status and headers of a server's response, sent before its body.

    `multi` holds the headers sent more than once, each with all its values
    in order (Set-Cookie); a name is in `headers` or in `multi`, not both.
    """

    status_code: int
    headers: dict[str, bytes]
    multi: dict[str, tuple[bytes, ...]] = field(default_factory=dict)

    def lines(self) -> list[tuple[str, bytes]]:
        """Every header line, one per value."""
        return [*self.headers.items(), *((k, v) for k, values in self.multi.items() for v in values)]


def is_hop_by_hop(name: str) -> bool:
    """Tell whether a header belongs to one connection and must not be forwarded."""
    return name.lower() in HOP_BY_HOP


def connection_listed(pairs: Iterable[tuple[str, str | bytes]]) -> frozenset[str]:
    """The lowercase names every `Connection` header lists: hop-by-hop for this message (RFC 9110 7.6.1)."""
    names: set[str] = set()
    for name, value in pairs:
        if name.lower() == "connection":
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            names.update(t.strip().lower() for t in text.split(",") if t.strip())
    return frozenset(names)


def parse_features(value: str | None) -> frozenset[str]:
    """The tokens of an X-PTTH-Features header, lowercase; unknown ones are kept and ignored."""
    if not value:
        return frozenset()
    return frozenset(t.strip().lower() for t in value[:256].split(",") if t.strip())


def is_request_id(value: str) -> bool:
    """Tell whether `value` has the shape of a relay-made id (request or batch)."""
    return bool(ID_RE.match(value))


def clean_report(value: str | None) -> str | None:
    """A server's self-report, kept to printable ASCII and MAX_REPORT_CHARS."""
    if not value:
        return None
    kept = "".join(c for c in value if " " <= c <= "~")[:MAX_REPORT_CHARS]
    return kept or None


def collect_headers(pairs: Iterable[tuple[str, str | bytes]], keep: Collection[str] = ()) -> dict[str, bytes]:
    """Lowercase names, drop hop-by-hop headers (but those in `keep`), join repeats with ", "."""
    out: dict[str, bytes] = {}
    for name, value in pairs:
        key = name.lower()
        if key in HOP_BY_HOP and key not in keep:
            continue
        raw = value if isinstance(value, bytes) else value.encode("latin-1")
        out[key] = out[key] + b", " + raw if key in out else raw
    return out


def head_size(method: str, uri: str, headers: Mapping[str, bytes]) -> int:
    """About how many bytes a request head takes in a listen answer."""
    return 64 + len(method) + len(uri) + sum(len(k) + len(v) + 8 for k, v in headers.items())


def encode_requests(requests: Iterable[RelayRequest]) -> bytes:
    """Encode a listen answer."""
    packed: bytes = msgpack.packb([_request_item(r) for r in requests])
    return packed


def encode_request_item(request: RelayRequest) -> bytes:
    """One request as an item of a listen answer, encoded alone (a cluster queues heads so)."""
    packed: bytes = msgpack.packb(_request_item(request))
    return packed


def _request_item(r: RelayRequest) -> dict[str, Any]:
    item: dict[str, Any] = {"id": r.id, "req": {"method": r.method, "uri": r.uri, "headers": r.headers}}
    if r.body is not None:
        item["body"] = r.body
    if r.upgrade is not None:
        item["upgrade"] = r.upgrade
    return item


def decode_requests(data: bytes) -> list[RelayRequest]:
    """Decode a listen answer; raise ProtocolError if it is not one."""
    items = _unpack(data, MAX_LISTEN_BODY_BYTES)
    if not isinstance(items, list):
        raise ProtocolError("listen answer is not an array")
    return [_decode_item(item) for item in items]


def decode_request_item(data: bytes) -> RelayRequest:
    """Decode what encode_request_item made; raise ProtocolError if it is not that."""
    return _decode_item(_unpack(data, MAX_LISTEN_BODY_BYTES))


def _decode_item(item: Any) -> RelayRequest:
    req = item.get("req") if isinstance(item, dict) else None
    if not isinstance(req, dict):
        raise ProtocolError("listen answer item lacks 'req'")
    rid, method, uri = item.get("id"), req.get("method"), req.get("uri")
    if not (isinstance(rid, str) and isinstance(method, str) and isinstance(uri, str)):
        raise ProtocolError("listen answer item has a bad id, method or uri")
    if not ID_RE.match(rid) or not _TOKEN_RE.match(method.lower().encode("utf-8", "replace")):
        raise ProtocolError("listen answer item has a malformed id or method")
    if not uri.startswith("/") or _BAD_VALUE_RE.search(uri.encode("utf-8", "replace")):
        raise ProtocolError("listen answer item has a bad uri")
    body, upgrade = item.get("body"), item.get("upgrade")
    if body is not None and (isinstance(body, bool) or not isinstance(body, int)
                             or body < BODY_LENGTH_UNKNOWN):
        raise ProtocolError("listen answer item has a bad body length")
    if upgrade is not None and upgrade != "websocket":
        raise ProtocolError("listen answer item has an unknown upgrade")
    return RelayRequest(rid, method, uri, _check_headers(req.get("headers")), body, upgrade)


def encode_response_head(head: ServerResponseHead) -> str:
    """Encode a response head for the X-PTTH-2LJYXWC4 header (multi values as MsgPack lists)."""
    packed = msgpack.packb(_head_map(head))
    return base64.b64encode(packed).decode("ascii")


def _head_map(head: ServerResponseHead) -> dict[str, Any]:
    headers: dict[str, bytes | list[bytes]] = {**head.headers, **{k: list(v) for k, v in head.multi.items()}}
    return {"status_code": head.status_code, "headers": headers}


@dataclass(frozen=True)
class InlineAnswer:
    """A complete small response carried by a listen: the request it answers, its head and whole body."""

    request_id: str
    head: ServerResponseHead
    body: bytes


def encode_answers(answers: Iterable[InlineAnswer]) -> bytes:
    """The body of a listen that carries answers: a MsgPack array of {"id", "head", "body"}."""
    packed: bytes = msgpack.packb([{"id": a.request_id, "head": _head_map(a.head), "body": a.body}
                                   for a in answers])
    return packed


def answer_size(head: ServerResponseHead, body_bytes: int) -> int:
    """About how many bytes an answer takes in a listen's body (an upper bound for MAX_ANSWERS_BYTES)."""
    return 64 + body_bytes + sum(len(k) + len(v) + 8 for k, v in head.lines())


@dataclass(frozen=True)
class BadAnswer:
    """An answer in a listen's body that is malformed: its request's client gets 502."""

    request_id: str
    reason: str


def decode_answers(data: bytes) -> list[InlineAnswer | BadAnswer]:
    """Decode a listen's answers; a malformed one is a BadAnswer, in its place.

    Raises ProtocolError if the whole is not an array of maps with ids: then
    no answer can be told from another.
    """
    items = _unpack(data, MAX_ANSWERS_BYTES)
    if not isinstance(items, list):
        raise ProtocolError("answers are not an array")
    out: list[InlineAnswer | BadAnswer] = []
    for item in items:
        rid = item.get("id") if isinstance(item, dict) else None
        if not isinstance(rid, str) or not ID_RE.match(rid):
            raise ProtocolError("an answer has no valid request id")
        body = item.get("body")
        try:
            if not isinstance(body, bytes) or len(body) > INLINE_BODY_BYTES:
                raise ProtocolError(f"answer to {rid} has no body, or one over {INLINE_BODY_BYTES} bytes")
            head = _response_head(item.get("head"))
            if head.status_code == 101:
                raise ProtocolError(f"answer to {rid} switches protocols: that needs a response POST")
            out.append(InlineAnswer(rid, head, body))
        except ProtocolError as e:
            out.append(BadAnswer(rid, str(e)))
    return out


def decode_response_head(value: str | None) -> ServerResponseHead:
    """Decode the X-PTTH-2LJYXWC4 header; raise ProtocolError if malformed."""
    if not value:
        raise ProtocolError(f"missing {RESPONSE_HEAD_HEADER} header")
    if len(value) > MAX_RESPONSE_HEAD_BYTES:
        raise ProtocolError(f"{RESPONSE_HEAD_HEADER} header is too large")
    try:
        packed = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as e:
        raise ProtocolError(f"{RESPONSE_HEAD_HEADER} is not base64") from e
    return _response_head(_unpack(packed, MAX_RESPONSE_HEAD_BYTES))


def _response_head(obj: Any) -> ServerResponseHead:
    if not isinstance(obj, dict):
        raise ProtocolError("response head is not a map")
    status = obj.get("status_code")
    if isinstance(status, bool) or not isinstance(status, int) or not (200 <= status <= 599 or status == 101):
        raise ProtocolError("response head has no valid integer status_code")
    raw = obj.get("headers")
    lists = {k: v for k, v in raw.items() if isinstance(v, list)} if isinstance(raw, Mapping) else {}
    headers = _check_headers({k: v for k, v in raw.items() if k not in lists} if lists and raw else raw)
    multi = {k: tuple(_check_headers({k: value})[k] for value in values) for k, values in lists.items()}
    if "content-length" in multi or any(not values for values in multi.values()):
        raise ProtocolError("response head has an empty list of values, or several content-lengths")
    length = headers.get("content-length")
    if length is not None and not _LENGTH_RE.match(length):
        raise ProtocolError(f"content-length {length[:40]!r} is not a number")
    return ServerResponseHead(status, headers, multi)


def _unpack(data: bytes, limit: int) -> Any:
    if len(data) > limit:
        raise ProtocolError("message is too large")
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises many types (ValueError, ExtraData, TypeError...)
        raise ProtocolError(f"not valid MsgPack: {type(e).__name__}") from e


def _check_headers(headers: Any) -> dict[str, bytes]:
    """Accept only lowercase token names and bytes values without CR, LF or NUL."""
    if not isinstance(headers, Mapping):
        raise ProtocolError("headers is not a map")
    for name, value in headers.items():
        if not isinstance(name, str) or not _TOKEN_RE.match(name.encode("utf-8", "replace")):
            raise ProtocolError(f"bad header name {name!r}")
        if not isinstance(value, bytes) or _BAD_VALUE_RE.search(value):
            raise ProtocolError(f"bad value for header {name!r}")
    return dict(headers)
