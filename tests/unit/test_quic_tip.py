"""Tests for ptth_lib.wire.tip: the tip messages that open QUIC streams."""

from __future__ import annotations

import itertools
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptth_lib import config
from ptth_lib.errors import ProtocolError, PtthError
from ptth_lib.wire import tip
from ptth_lib.wire.tip import (
    MAX_REASON_CHARS,
    MAX_TIP_BYTES,
    TIP_VERSION,
    Answer,
    ClientConnect,
    HelloAnswer,
    InnerTip,
    PeerHello,
    RelayOffer,
    TipMessage,
    TipReader,
    encode,
    refusal,
)

KEY = "test-key-aaaaaaaaaaaaaaaaaaaaaaaaaaaa"

EXAMPLES: list[TipMessage] = [
    PeerHello("server", "my_server", KEY),
    PeerHello("client", "laptop.home~1", KEY),
    HelloAnswer(True, ""),
    HelloAnswer(False, "unknown server name or wrong key"),
    ClientConnect("my_server", "ssh", InnerTip(51234)),
    ClientConnect("a" * 64, "p" * 64, InnerTip(0)),
    RelayOffer("laptop", "vnc-1", InnerTip(65535)),
    Answer(True, ""),
    Answer(False, "cannot connect to 127.0.0.1:22: Connection refused"),
]


def _frame(obj: Any) -> bytes:
    """A hand-built tip: header plus whatever MsgPack we like."""
    return _frame_body(msgpack.packb(obj))


def _frame_body(body: bytes, version: int = TIP_VERSION) -> bytes:
    return struct.pack(">BH", version, len(body)) + body


def _read(data: bytes) -> TipMessage:
    reader = TipReader()
    msg = reader.feed(data)
    assert msg is not None
    return msg


def _good(**overrides: Any) -> dict[str, Any]:
    """A valid connect tip as a map, with some keys replaced (None deletes)."""
    obj: dict[str, Any] = {"type": "connect", "server": "srv", "port": "ssh",
                           "inner": {"client_port": 5}}
    for k, v in overrides.items():
        if v is None:
            del obj[k]
        else:
            obj[k] = v
    return obj


# ---- round trips and the exact format --------------------------------------


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: TipMessage) -> None:
    assert _read(encode(msg)) == msg


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_byte_by_byte(msg: TipMessage) -> None:
    data = encode(msg)
    reader = TipReader()
    for b in data[:-1]:
        assert reader.feed(bytes([b])) is None
    assert reader.feed(data[-1:]) == msg
    assert reader.rest == b""
    assert reader.buffered == 0


def test_exact_bytes_of_a_connect_tip() -> None:
    # If this changes, the wire format changed: bump TIP_VERSION and PROTOCOL.md.
    wire = encode(ClientConnect("srv", "ssh", InnerTip(50000)))
    assert wire == (
        b"\x01" b"\x00\x38"                        # version 1, 56-byte body
        b"\x84"                                    # map of 4
        b"\xa4type" b"\xa7connect"
        b"\xa6server" b"\xa3srv"
        b"\xa4port" b"\xa3ssh"
        b"\xa5inner" b"\x81" b"\xabclient_port" b"\xcd\xc3\x50"  # map of 1, uint16 50000
    )


@pytest.mark.parametrize("msg, wire", [
    (PeerHello("client", "c", KEY), {"type": "hello", "role": "client", "name": "c", "key": KEY, "credit": 1}),
    (HelloAnswer(False, "no"), {"type": "hello_answer", "ok": False, "error": "no"}),
    (RelayOffer("c", "p", InnerTip(7)),
     {"type": "offer", "client": "c", "port": "p", "inner": {"client_port": 7}}),
    (Answer(True, ""), {"type": "answer", "ok": True, "error": ""}),
])
def test_wire_maps(msg: TipMessage, wire: dict[str, Any]) -> None:
    data = encode(msg)
    assert data[0] == TIP_VERSION
    assert struct.unpack(">H", data[1:3])[0] == len(data) - 3
    body = msgpack.unpackb(data[3:], raw=False)
    assert body == wire
    assert list(body) == list(wire)  # "type" first, then the fields in order


def test_a_hello_says_its_credit_version() -> None:
    assert PeerHello("server", "srv", KEY).credit == tip.CREDIT_VERSION == 1
    # A proxy from before stream credit sends no "credit": it decodes as version 0, which the
    # relay refuses by name (relay.py), instead of an unreadable tip.
    old = _read(_frame({"type": "hello", "role": "server", "name": "srv", "key": KEY}))
    assert isinstance(old, PeerHello) and old.credit == 0
    assert _read(_frame({"type": "hello", "role": "server", "name": "srv", "key": KEY, "credit": 2})).credit == 2
    for bad in (True, -1, 256, "1"):
        with pytest.raises(ProtocolError, match="bad credit version"):
            _read(_frame({"type": "hello", "role": "server", "name": "srv", "key": KEY, "credit": bad}))


def test_hand_built_tip_decodes() -> None:
    assert _read(_frame(_good())) == ClientConnect("srv", "ssh", InnerTip(5))
    # Key order on the wire does not matter.
    assert _read(_frame({"port": "ssh", "inner": {"client_port": 5}, "server": "srv",
                         "type": "connect"})) == ClientConnect("srv", "ssh", InnerTip(5))


def test_trailing_raw_bytes_are_kept_in_rest() -> None:
    data = encode(Answer(True, "")) + b"SSH-2.0-OpenSSH\r\n" + encode(Answer(True, ""))
    reader = TipReader()
    assert reader.feed(data) == Answer(True, "")
    assert reader.rest == data[len(encode(Answer(True, ""))):]


def test_trailing_bytes_arriving_with_the_last_byte_of_the_tip() -> None:
    tip = encode(HelloAnswer(True, ""))
    reader = TipReader()
    assert reader.feed(tip[:2]) is None
    assert reader.feed(tip[2:-1]) is None
    assert reader.buffered == len(tip) - 1
    assert reader.feed(tip[-1:] + b"raw") == HelloAnswer(True, "")
    assert reader.rest == b"raw"


def test_empty_feeds_are_harmless() -> None:
    reader = TipReader()
    assert reader.feed(b"") is None
    tip = encode(Answer(True, ""))
    assert reader.feed(tip[:1]) is None
    assert reader.feed(b"") is None
    assert reader.feed(tip[1:]) == Answer(True, "")


def test_feeding_after_the_tip_is_a_bug() -> None:
    reader = TipReader()
    reader.feed(encode(Answer(True, "")))
    with pytest.raises(RuntimeError):
        reader.feed(b"more")


def test_a_full_size_tip_is_read_whole() -> None:
    # The reader waits for all MAX_TIP_BYTES of an announced body, then decodes it
    # (here a valid map padded with zeros, which MsgPack calls extra data).
    body = msgpack.packb(_good())
    reader = TipReader()
    assert reader.feed(struct.pack(">BH", TIP_VERSION, MAX_TIP_BYTES) + body) is None
    assert reader.buffered == 3 + len(body)
    assert reader.feed(b"\x00" * (MAX_TIP_BYTES - len(body) - 1)) is None
    assert reader.buffered == 3 + MAX_TIP_BYTES - 1
    with pytest.raises(ProtocolError, match="ExtraData"):
        reader.feed(b"\x00raw stream bytes")


# ---- validation on construction -------------------------------------------


def test_name_rule_is_configs() -> None:
    # Tips and configs check names with the one rule of wire/names.py.
    assert tip.NAME_RE is config.NAME_RE


@pytest.mark.parametrize("make", [
    lambda: PeerHello("admin", "srv", KEY),  # type: ignore[arg-type]
    lambda: PeerHello("server", "", KEY),
    lambda: PeerHello("server", "has space", KEY),
    lambda: PeerHello("server", ".hidden", KEY),
    lambda: PeerHello("server", "a" * 65, KEY),
    lambda: PeerHello("server", "srv", ""),
    lambda: PeerHello("server", "srv", "has a space in the key"),
    lambda: PeerHello("server", "srv", "k" * 257),
    lambda: PeerHello("server", "srv", "ké" * 20),
    lambda: HelloAnswer(True, "but an error"),
    lambda: HelloAnswer(False, ""),
    lambda: Answer(1, ""),  # type: ignore[arg-type]
    lambda: Answer(False, "two\nlines"),
    lambda: Answer(False, "x" * (MAX_REASON_CHARS + 1)),
    lambda: Answer(False, "caf\u00e9"),
    lambda: ClientConnect("srv", "ss.h", InnerTip(1)),
    lambda: ClientConnect("srv", "", InnerTip(1)),
    lambda: ClientConnect("s/v", "ssh", InnerTip(1)),
    lambda: ClientConnect("srv", "ssh", 1),  # type: ignore[arg-type]
    lambda: RelayOffer("", "ssh", InnerTip(1)),
    lambda: InnerTip(-1),
    lambda: InnerTip(65536),
    lambda: InnerTip(True),
    lambda: InnerTip("22"),  # type: ignore[arg-type]
])
def test_bad_messages_cannot_be_built(make: Any) -> None:
    with pytest.raises(ProtocolError):
        make()


def test_limits_are_inclusive() -> None:
    Answer(False, "x" * MAX_REASON_CHARS)
    PeerHello("server", "a" * 64, "k" * tip.MAX_KEY_CHARS)
    ClientConnect("a" * 64, "p" * 64, InnerTip(65535))


def test_the_key_never_shows() -> None:
    hello = PeerHello("server", "srv", KEY)
    assert KEY not in repr(hello)
    secret = "my secret key with spaces"
    with pytest.raises(ProtocolError) as info:
        PeerHello("server", "srv", secret)
    assert "secret" not in str(info.value)
    with pytest.raises(ProtocolError) as info:
        _read(_frame({"type": "hello", "role": "server", "name": "srv", "key": secret}))
    assert "secret" not in str(info.value)


def test_refusal_makes_a_valid_reason() -> None:
    assert refusal("cannot connect: Connection refused") == Answer(
        False, "cannot connect: Connection refused")
    assert refusal("two\nlines\x00 caf\u00e9").error == "two?lines? caf?"
    assert len(refusal("x" * 1000).error) == MAX_REASON_CHARS
    assert refusal("").error == "refused"
    assert refusal(" \n ").error == "?"


def test_encode_refuses_what_is_not_a_message() -> None:
    with pytest.raises(TypeError):
        encode(InnerTip(1))  # type: ignore[arg-type]


def test_errors_are_ours() -> None:
    assert issubclass(ProtocolError, PtthError)
    assert issubclass(ProtocolError, ValueError)


# ---- malformed tips --------------------------------------------------------

MALFORMED: list[tuple[str, bytes, str]] = [
    ("version 0", _frame_body(msgpack.packb(_good()), version=0), "bad tip version 0"),
    ("version 2", _frame_body(msgpack.packb(_good()), version=2), "bad tip version 2"),
    ("version only", b"\x7f", "bad tip version 127"),
    ("length 0", b"\x01\x00\x00", "bad tip length 0"),
    ("length over", struct.pack(">BH", 1, MAX_TIP_BYTES + 1), f"bad tip length {MAX_TIP_BYTES + 1}"),
    ("length max", b"\x01\xff\xff", "bad tip length 65535"),
    ("not msgpack", _frame_body(b"\xc1"), "not valid MsgPack"),
    ("truncated msgpack", _frame_body(msgpack.packb(_good())[:-1]), "not valid MsgPack"),
    ("two objects", _frame_body(msgpack.packb(_good()) + b"\x00"), "not valid MsgPack: ExtraData"),
    ("array", _frame([1, 2]), "not valid MsgPack"),
    ("int", _frame(5), "not a map"),
    ("string", _frame("connect"), "not a map"),
    ("nil", _frame(None), "not a map"),
    ("no type", _frame(_good(type=None)), "unknown tip type None"),
    ("unknown type", _frame(_good(type="listen")), "unknown tip type 'listen'"),
    ("type not str", _frame(_good(type=3)), "unknown tip type 3"),
    ("type is bin", _frame(_good(type=b"connect")), "not valid MsgPack"),
    ("missing field", _frame(_good(port=None)), "lacks port"),
    ("missing inner", _frame(_good(inner=None)), "lacks inner"),
    ("extra field", _frame(_good(extra=1)), "unknown keys"),
    ("inner extra", _frame(_good(inner={"client_port": 1, "x": 2})), "inner tip has unknown keys"),
    ("inner missing", _frame(_good(inner={})), "inner tip lacks client_port"),
    ("inner not map", _frame(_good(inner=22)), "inner tip is not a map"),
    ("inner port str", _frame(_good(inner={"client_port": "22"})), "bad client_port"),
    ("inner port bool", _frame(_good(inner={"client_port": True})), "bad client_port"),
    ("inner port float", _frame(_good(inner={"client_port": 22.0})), "bad client_port"),
    ("inner port big", _frame(_good(inner={"client_port": 2**64 - 1})), "bad client_port"),
    ("inner port neg", _frame(_good(inner={"client_port": -1})), "bad client_port"),
    ("server bin", _frame(_good(server=b"srv")), "not valid MsgPack"),
    ("server int", _frame(_good(server=1)), "bad server name 1"),
    ("server bad", _frame(_good(server="a b")), "bad server name"),
    ("server newline", _frame(_good(server="srv\n")), "bad server name"),
    ("port bad", _frame(_good(port="ss~h")), "bad port name"),
    ("port long", _frame(_good(port="p" * 65)), "bad port name"),
    ("int key", _frame({1: 2}), "not valid MsgPack"),
    ("bin key", _frame({b"type": "connect"}), "not valid MsgPack"),
    ("empty bin key", _frame({b"": 1, "type": "answer"}), "repeated or non-string key"),
    ("repeated key", _frame_body(b"\x82\xa4type\xa6answer\xa4type\xa6answer"), "repeated"),
    ("deep nesting", _frame_body(b"\x81\xa0" * 2000 + b"\xc0"), "not valid MsgPack"),
    ("ext type", _frame_body(b"\x81\xa4type\xd4\x01\x00"), "not valid MsgPack"),
    ("ok not bool", _frame({"type": "answer", "ok": 1, "error": ""}), "bad ok 1"),
    ("error not str", _frame({"type": "answer", "ok": False, "error": None}), "bad error None"),
    ("ok with error", _frame({"type": "answer", "ok": True, "error": "x"}), "must have an empty"),
    ("refused no reason", _frame({"type": "hello_answer", "ok": False, "error": ""}),
     "bad refusal reason"),
    ("reason too long", _frame({"type": "answer", "ok": False, "error": "x" * 201}),
     "bad refusal reason"),
    ("bad role", _frame({"type": "hello", "role": "relay", "name": "n", "key": KEY}), "bad role"),
    ("role bin", _frame({"type": "hello", "role": b"server", "name": "n", "key": KEY}),
     "not valid MsgPack"),
    ("key int", _frame({"type": "hello", "role": "server", "name": "n", "key": 5}), "bad key"),
]


@pytest.mark.parametrize("data, reason", [(d, r) for _, d, r in MALFORMED],
                         ids=[name for name, _, _ in MALFORMED])
def test_malformed_tips_are_refused(data: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        TipReader().feed(data)
    message = str(info.value)
    assert reason in message
    assert "\n" not in message and len(message) < 200


@pytest.mark.parametrize("data", [d for _, d, _ in MALFORMED], ids=[n for n, _, _ in MALFORMED])
def test_malformed_tips_are_refused_byte_by_byte(data: bytes) -> None:
    reader = TipReader()
    with pytest.raises(ProtocolError):
        for b in data:
            reader.feed(bytes([b]))
    assert reader.buffered <= MAX_TIP_BYTES + 3


def test_bad_header_is_refused_before_the_body() -> None:
    # A hostile peer announcing a huge tip is refused on its third byte.
    reader = TipReader()
    assert reader.feed(b"\x01\x10") is None
    with pytest.raises(ProtocolError, match="length"):
        reader.feed(b"\x01")
    with pytest.raises(ProtocolError, match="version"):
        TipReader().feed(b"G")  # an HTTP client on the wrong port


def test_incomplete_tip_waits() -> None:
    tip = encode(Answer(True, ""))
    reader = TipReader()
    assert reader.feed(tip[:-1]) is None
    assert reader.buffered == len(tip) - 1
    assert reader.rest == b""


# ---- properties ------------------------------------------------------------

names = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._~-]{0,63}\Z")
ports = st.from_regex(r"\A[A-Za-z0-9_-]{1,64}\Z")
keys = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=256)
reasons = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=1,
                  max_size=MAX_REASON_CHARS)
inners = st.builds(InnerTip, st.integers(0, 65535))
messages: st.SearchStrategy[TipMessage] = st.one_of(
    st.builds(PeerHello, st.sampled_from(["server", "client"]), names, keys),
    st.just(HelloAnswer(True, "")),
    st.builds(HelloAnswer, st.just(False), reasons),
    st.builds(ClientConnect, names, ports, inners),
    st.builds(RelayOffer, names, ports, inners),
    st.just(Answer(True, "")),
    st.builds(Answer, st.just(False), reasons),
)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@settings(max_examples=300)
@given(messages, st.binary(max_size=50), st.lists(st.integers(0, 10_000), max_size=8))
def test_any_message_round_trips_in_any_split(msg: TipMessage, after: bytes, cuts: list[int]) -> None:
    data = encode(msg)
    assert len(data) <= MAX_TIP_BYTES + 3
    reader = TipReader()
    got: TipMessage | None = None
    rest = b""
    for piece in _split(data + after, cuts):
        if got is None:
            got = reader.feed(piece)
            rest = reader.rest
        else:
            rest += piece  # the caller's job once the tip is read
    assert got == msg
    assert rest == after


def _feed_all(pieces: list[bytes]) -> None:
    reader = TipReader()
    try:
        for piece in pieces:
            assert reader.buffered <= MAX_TIP_BYTES + 3
            if reader.feed(piece) is not None:
                return
            assert reader.buffered <= MAX_TIP_BYTES + 3
    except ProtocolError:
        assert reader.buffered <= MAX_TIP_BYTES + 3


@settings(max_examples=500)
@given(st.lists(st.binary(max_size=3000), max_size=6))
def test_arbitrary_bytes_only_raise_protocol_error(pieces: list[bytes]) -> None:
    _feed_all(pieces)


@settings(max_examples=500)
@given(st.integers(0, 0xFFFF), st.binary(max_size=5000), st.lists(st.integers(0, 6000), max_size=5))
def test_arbitrary_bodies_only_raise_protocol_error(length: int, body: bytes, cuts: list[int]) -> None:
    # A valid version byte gets random bytes past the header check.
    _feed_all(_split(struct.pack(">BH", TIP_VERSION, length) + body, cuts))


_msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["type", "ok", "error", "inner", "client_port", "server", "port", "client",
                         "role", "name", "key"]) | st.text(max_size=5) | st.binary(max_size=5),
        inner, max_size=6),
    max_leaves=20,
)
_tip_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["hello", "hello_answer", "connect", "offer", "answer", "x"])},
    optional={k: _msgpack_values for k in ["ok", "error", "inner", "server", "port", "client",
                                           "role", "name", "key"]},
)


@settings(max_examples=150)  # recursive values are slow to draw: 500 took 12 s of `make test`
@given(_tip_like | _msgpack_values)
def test_structured_junk_only_raises_protocol_error(obj: Any) -> None:
    body = msgpack.packb(obj)
    if not 0 < len(body) <= MAX_TIP_BYTES:
        return
    try:
        msg = _read(_frame_body(body))
    except ProtocolError:
        return
    assert _read(encode(msg)) == msg


def test_encode_refuses_an_oversized_tip(monkeypatch: pytest.MonkeyPatch) -> None:
    # No valid message comes near 4 KiB today; the check guards fields added later.
    monkeypatch.setattr(tip, "MAX_TIP_BYTES", 20)
    with pytest.raises(ProtocolError, match="over the 20-byte limit"):
        encode(PeerHello("server", "srv", KEY))
