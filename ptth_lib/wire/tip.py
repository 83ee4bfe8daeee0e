"""Tip messages: the small header that opens each QUIC stream (spec 004).

Every bidirectional QUIC stream between a proxy and the QUIC relay starts with
one tip message in each direction; after the tip the stream carries raw bytes
(TCP data, for a forwarded connection). The exchanges are:

    stream opened by   opener sends      the other side answers
    server proxy       PeerHello         HelloAnswer     (first stream, once)
    client proxy       PeerHello         HelloAnswer     (first stream, once)
    client proxy       ClientConnect     Answer          (one stream per TCP connection)
    relay              RelayOffer        Answer          (to the server proxy, per connection)

A tip is framed as:

    offset  size  field
    0       1     version: TIP_VERSION = 1
    1       2     N, the length of the body: unsigned big-endian, 1..MAX_TIP_BYTES (4096)
    3       N     body: exactly one MsgPack map

The body is a map of at most 8 distinct keys, all MsgPack str; "type" (a str)
names the message and the other keys are exactly its fields, no more and no
fewer. Strings are MsgPack str (never bin), booleans MsgPack true/false,
integers any MsgPack int format; arrays, bin, ext and floats never appear.
Our encoder writes "type" first, then the fields in the order below; a
decoder accepts any order. The messages:

- `PeerHello`, "hello", server or client proxy -> relay:
  {"type": "hello", "role": "server" | "client", "name": str, "key": str,
  "credit": int}.
  `name` is the proxy's name in the relay config (1-64 of A-Z a-z 0-9 . _ ~ -,
  the first a letter or digit); `key` is the API key the HTTP side uses
  (1-256 printable ASCII, no spaces), which the relay hashes into a tripcode.
  `credit` is the version of the per-stream credit protocol the proxy speaks
  (forward/quic/credit.py), CREDIT_VERSION = 1, 0..255; a hello without it
  decodes as 0 (a PTTH from before credit), and the relay refuses any
  version but its own with a one-line reason naming both.
- `HelloAnswer`, "hello_answer", relay -> proxy:
  {"type": "hello_answer", "ok": bool, "error": str}.
- `ClientConnect`, "connect", client proxy -> relay:
  {"type": "connect", "server": str, "port": str, "inner": InnerTip},
  "connect me to port `port` of server `server` and pass `inner` on".
  `server` follows the name rule above; `port` is a forwarded port name
  (1-64 of A-Z a-z 0-9 _ -).
- `RelayOffer`, "offer", relay -> server proxy:
  {"type": "offer", "client": str, "port": str, "inner": InnerTip},
  "client `client` wants your port `port`"; `inner` is the client's, re-wrapped.
- `InnerTip`, only ever as the value of "inner": a map {"client_port": int},
  the TCP end client's ephemeral port (0..65535), for logs. It is a map so
  that it can grow; the relay passes it on unchanged.
- `Answer`, "answer", server proxy -> relay, then relay -> client proxy:
  {"type": "answer", "ok": bool, "error": str}.

In both answers `error` is "" when `ok` is true, and otherwise a reason of
1-200 printable ASCII characters (`refusal` makes one from any text).

Example, ClientConnect("srv", "ssh", InnerTip(50000)), 59 bytes:

    01 0038                                         version 1, 56-byte body
    84                                              map of 4
    a4 "type"  a7 "connect"
    a6 "server"  a3 "srv"
    a4 "port"  a3 "ssh"
    a5 "inner"  81 ab "client_port" cd c350         map of 1, uint16 50000

Decoding trusts nothing: anything malformed raises `ProtocolError` with a
one-line reason, never another type. No sockets here.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import msgpack

from ptth_lib.errors import ProtocolError
from ptth_lib.wire import tripcode
from ptth_lib.wire.names import NAME_RE, PORT_NAME_RE

TIP_VERSION = 1

# The per-stream credit protocol (forward/quic/credit.py) a PeerHello says it speaks.
CREDIT_VERSION = 1

# A tip holds two names, a key and a reason: a few hundred bytes. 4 KiB leaves
# room to grow and bounds what a hostile peer makes us buffer per stream.
MAX_TIP_BYTES = 4096

# Refusal reasons end up in logs on three machines; one short line is enough.
MAX_REASON_CHARS = 200

# Generated keys are 43 characters (tripcode.GENERATED_KEY_BYTES); this bounds
# what the relay hashes for a hostile peer while allowing long hand-made keys.
MAX_KEY_CHARS = 256

_HEADER = struct.Struct(">BH")


Role = Literal["server", "client"]
_ROLES = ("server", "client")


@dataclass(frozen=True)
class InnerTip:
    """The client proxy's part of a connect tip, which the relay passes on untouched."""

    client_port: int

    def __post_init__(self) -> None:
        port = self.client_port
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ProtocolError(f"bad client_port {_show(port)}: expected an integer 0..65535")


@dataclass(frozen=True)
class PeerHello:
    """A server or client proxy tells the relay who it is, with its API key."""

    TYPE: ClassVar[str] = "hello"
    role: Role
    name: str
    key: str = dataclasses.field(repr=False)  # never in logs
    credit: int = CREDIT_VERSION

    def __post_init__(self) -> None:
        credit = self.credit
        if isinstance(credit, bool) or not isinstance(credit, int) or not 0 <= credit <= 255:
            raise ProtocolError(f"bad credit version {_show(credit)}: expected an integer 0..255")
        if self.role not in _ROLES:
            raise ProtocolError(f"bad role {_show(self.role)}: expected 'server' or 'client'")
        _check_name("name", self.name)
        key = self.key
        if not (isinstance(key, str) and 0 < len(key) <= MAX_KEY_CHARS and tripcode.is_sendable(key)):
            # The key itself is never shown, not even in an error.
            raise ProtocolError(f"bad key: expected 1-{MAX_KEY_CHARS} printable ASCII, no spaces")


@dataclass(frozen=True)
class HelloAnswer:
    """The relay accepts or refuses a PeerHello."""

    TYPE: ClassVar[str] = "hello_answer"
    ok: bool
    error: str

    def __post_init__(self) -> None:
        _check_answer(self.ok, self.error)


@dataclass(frozen=True)
class ClientConnect:
    """A client proxy asks the relay for a port of a server."""

    TYPE: ClassVar[str] = "connect"
    server: str
    port: str
    inner: InnerTip

    def __post_init__(self) -> None:
        _check_name("server", self.server)
        _check_port(self.port)
        _check_inner(self.inner)


@dataclass(frozen=True)
class RelayOffer:
    """The relay tells a server proxy that a client wants one of its ports."""

    TYPE: ClassVar[str] = "offer"
    client: str
    port: str
    inner: InnerTip

    def __post_init__(self) -> None:
        _check_name("client", self.client)
        _check_port(self.port)
        _check_inner(self.inner)


@dataclass(frozen=True)
class Answer:
    """A server proxy (then the relay) accepts or refuses a connection."""

    TYPE: ClassVar[str] = "answer"
    ok: bool
    error: str

    def __post_init__(self) -> None:
        _check_answer(self.ok, self.error)


TipMessage = PeerHello | HelloAnswer | ClientConnect | RelayOffer | Answer

_BY_TYPE: dict[str, type[TipMessage]] = {
    cls.TYPE: cls for cls in (PeerHello, HelloAnswer, ClientConnect, RelayOffer, Answer)
}


def refusal(reason: str) -> Answer:
    """An Answer refusing a connection, with `reason` cut to a valid one-line reason."""
    return Answer(False, _clean_reason(reason))


def encode(msg: TipMessage) -> bytes:
    """Frame a tip message: version, big-endian length, MsgPack map."""
    if type(msg) not in _BY_TYPE.values():
        raise TypeError(f"not a tip message: {type(msg).__name__}")
    body: bytes = msgpack.packb({"type": msg.TYPE, **dataclasses.asdict(msg)})
    if len(body) > MAX_TIP_BYTES:
        raise ProtocolError(f"tip is {len(body)} bytes, over the {MAX_TIP_BYTES}-byte limit")
    return _HEADER.pack(TIP_VERSION, len(body)) + body


class TipReader:
    """Reads the one tip at the start of a stream, then hands back what follows.

    Feed it the stream's bytes until `feed` returns the message; the bytes that
    came after the tip in that last piece are in `rest` (raw stream data). It
    never holds more than 3 + MAX_TIP_BYTES bytes. After a ProtocolError the
    stream is unusable: reset it and drop the reader.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._done = False
        self.rest = b""

    @property
    def buffered(self) -> int:
        """How many bytes of an unfinished tip it holds."""
        return len(self._buf)

    def feed(self, data: bytes) -> TipMessage | None:
        """Take more bytes; return the tip once complete, else None."""
        if self._done:
            raise RuntimeError("the tip was already read: the rest of the stream is raw data")
        view = memoryview(data)
        if not view:
            return None
        if len(self._buf) < _HEADER.size:
            take = _HEADER.size - len(self._buf)
            self._buf += view[:take]
            view = view[take:]
            if self._buf[0] != TIP_VERSION:
                raise ProtocolError(f"bad tip version {self._buf[0]}: expected {TIP_VERSION}")
            if len(self._buf) < _HEADER.size:
                return None
            length = _HEADER.unpack(self._buf)[1]
            if not 0 < length <= MAX_TIP_BYTES:
                raise ProtocolError(f"bad tip length {length}: expected 1..{MAX_TIP_BYTES}")
        total = _HEADER.size + _HEADER.unpack_from(self._buf)[1]
        take = total - len(self._buf)
        self._buf += view[:take]
        if len(self._buf) < total:
            return None
        self._done = True
        self.rest = bytes(view[take:])
        body = bytes(self._buf[_HEADER.size:])
        self._buf.clear()
        return _decode_body(body)


def _decode_body(body: bytes) -> TipMessage:
    obj = _unpack(body)
    if not isinstance(obj, dict):
        raise ProtocolError(f"tip is a MsgPack {type(obj).__name__}, not a map")
    fields = dict(obj)
    kind = fields.pop("type", None)
    cls = _BY_TYPE.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown tip type {_show(kind)}")
    if kind == "hello":
        fields.setdefault("credit", 0)  # a proxy from before stream credit: the relay refuses it by name
    if "inner" in fields:
        fields["inner"] = _build(InnerTip, fields["inner"], "inner tip")
    msg: TipMessage = _build(cls, fields, f"{kind!r} tip")
    return msg


def _build(cls: type[Any], fields: Any, what: str) -> Any:
    """Make a message from a decoded map, whose keys must be exactly its fields."""
    if not isinstance(fields, dict):
        raise ProtocolError(f"{what} is not a map")
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names if n not in fields]
    if missing:
        raise ProtocolError(f"{what} lacks {', '.join(missing)}")
    extra = [k for k in fields if k not in names]
    if extra:
        raise ProtocolError(f"{what} has unknown keys {_show(extra)}")
    return cls(**fields)  # __post_init__ checks types and values


def _unpack(body: bytes) -> Any:
    try:
        # Tips hold no arrays, binary or extension types; no map needs more than 8 keys.
        return msgpack.unpackb(
            body, raw=False, strict_map_key=True, object_pairs_hook=_unique_keys,
            max_str_len=MAX_TIP_BYTES, max_bin_len=0, max_array_len=0, max_map_len=8,
            max_ext_len=0,
        )
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises many types (ValueError, ExtraData, StackError...)
        raise ProtocolError(f"tip is not valid MsgPack: {type(e).__name__}") from e


def _unique_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """A map whose keys are all distinct str (MsgPack allows repeats; we do not)."""
    out = dict(pairs)
    if len(out) != len(pairs) or not all(isinstance(k, str) for k in out):
        raise ProtocolError("tip map has a repeated or non-string key")
    return out


def _check_name(field: str, value: object) -> None:
    # fullmatch, not match: the pattern's "$" would also match before a final newline.
    if not (isinstance(value, str) and NAME_RE.fullmatch(value)):
        raise ProtocolError(f"bad {field} name {_show(value)}: expected 1-64 of A-Z a-z 0-9 . _ ~ -")


def _check_port(value: object) -> None:
    if not (isinstance(value, str) and PORT_NAME_RE.fullmatch(value)):
        raise ProtocolError(f"bad port name {_show(value)}: expected 1-64 of A-Z a-z 0-9 _ -")


def _check_inner(value: object) -> None:
    if not isinstance(value, InnerTip):
        raise ProtocolError(f"bad inner tip {_show(value)}: expected a map with client_port")


def _check_answer(ok: object, error: object) -> None:
    if not isinstance(ok, bool):
        raise ProtocolError(f"bad ok {_show(ok)}: expected true or false")
    if not isinstance(error, str):
        raise ProtocolError(f"bad error {_show(error)}: expected a string")
    if ok and error:
        raise ProtocolError("an answer with ok=true must have an empty error")
    if not ok and not (0 < len(error) <= MAX_REASON_CHARS and _is_printable_ascii(error)):
        raise ProtocolError(
            f"bad refusal reason {_show(error)}: expected 1-{MAX_REASON_CHARS} printable ASCII")


def _is_printable_ascii(text: str) -> bool:
    return all(" " <= c <= "~" for c in text)


def _clean_reason(text: str) -> str:
    kept = "".join(c if " " <= c <= "~" else "?" for c in text[:MAX_REASON_CHARS]).strip()
    return kept or "refused"


def _show(value: object) -> str:
    """A peer's value for an error message: repr, so one line, and short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
