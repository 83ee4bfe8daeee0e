"""Tests for ptth_lib.protocol (the wire format) and ptth_lib.tripcode."""

from __future__ import annotations

import base64

import blake3
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptth_lib.errors import ProtocolError, PtthError
from ptth_lib.wire import tripcode
from ptth_lib.wire.envelope import (
    HOP_BY_HOP,
    MAX_LISTEN_BODY_BYTES,
    MAX_RESPONSE_HEAD_BYTES,
    RelayRequest,
    ServerResponseHead,
    collect_headers,
    decode_requests,
    decode_response_head,
    encode_requests,
    encode_response_head,
    is_hop_by_hop,
)

# ---- strategies ---------------------------------------------------------

_TOKEN_CHARS = "!#$%&'*+.^_`|~0123456789abcdefghijklmnopqrstuvwxyz-"

header_names = st.text(alphabet=_TOKEN_CHARS, min_size=1, max_size=30)
# Field values: visible bytes, spaces and tabs; every other control byte is refused.
header_values = st.binary(max_size=200).map(lambda b: bytes(c for c in b if c == 9 or 32 <= c != 127))
headers = st.dictionaries(header_names, header_values, max_size=8)
# Request ids as the relay makes them (protocol._ID_RE); others are refused.
ids = st.from_regex(r"\A[A-Za-z0-9_-]{1,40}\Z")
methods = st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"]) | st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=10)
uris = st.text(max_size=100).filter(
    lambda s: not any((ord(c) < 32 and c != "\t") or c == "\x7f" for c in s)).map(lambda s: "/" + s)
relay_requests = st.builds(RelayRequest, id=ids, method=methods, uri=uris, headers=headers)
statuses = st.integers(min_value=200, max_value=599)


def _head_value(obj: object) -> str:
    """A hand-built X-PTTH-2LJYXWC4 value."""
    return base64.b64encode(msgpack.packb(obj)).decode("ascii")


def _listen_answer(*items: object) -> bytes:
    return msgpack.packb(list(items))


def _item(**req: object) -> dict[str, object]:
    full: dict[str, object] = {"method": "GET", "uri": "/", "headers": {}}
    full.update(req)
    return {"id": "JOZC7VRA", "req": full}


# ---- round trips ----------------------------------------------------------


@given(st.lists(relay_requests, max_size=6))
def test_requests_round_trip(batch: list[RelayRequest]) -> None:
    assert decode_requests(encode_requests(batch)) == batch


# A response head's content-length must be a number (test_response_content_length_*).
response_headers = st.dictionaries(header_names.filter(lambda n: n != "content-length"), header_values,
                                   max_size=8)


@given(statuses, response_headers)
def test_response_head_round_trip(status: int, hdrs: dict[str, bytes]) -> None:
    head = ServerResponseHead(status, hdrs)
    encoded = encode_response_head(head)
    assert isinstance(encoded, str)
    assert "\r" not in encoded and "\n" not in encoded
    encoded.encode("ascii")
    assert decode_response_head(encoded) == head


@given(st.integers(min_value=0, max_value=10**19 - 1))
def test_response_content_length_of_digits_passes(length: int) -> None:
    head = ServerResponseHead(200, {"content-length": str(length).encode()})
    assert decode_response_head(encode_response_head(head)) == head


@pytest.mark.parametrize("value", [b"", b"abc", b"-1", b"+5", b" 5", b"5 ", b"1,1", b"0x10", b"1" * 20,
                                   "\u0665".encode()])
def test_response_content_length_that_is_not_a_number_is_refused(value: bytes) -> None:
    """A client must be able to trust Content-Length: anything but plain digits is a bad head (502)."""
    with pytest.raises(ProtocolError, match="content-length"):
        decode_response_head(_head_value({"status_code": 200, "headers": {"content-length": value}}))


def test_empty_listen_answer() -> None:
    assert decode_requests(encode_requests([])) == []


# ---- the spec's wire shape, built by hand -------------------------------


def test_spec_listen_answer_decodes() -> None:
    wire = msgpack.packb([{"id": "JOZC7VRA", "req": {"method": "GET", "uri": "/files",
                                                      "headers": {"someclientheader": b"hello"}}}])
    assert decode_requests(wire) == [RelayRequest("JOZC7VRA", "GET", "/files", {"someclientheader": b"hello"})]


def test_our_listen_answer_has_the_spec_shape() -> None:
    wire = encode_requests([RelayRequest("JOZC7VRA", "GET", "/files", {"someclientheader": b"hello"})])
    assert msgpack.unpackb(wire, raw=False) == [
        {"id": "JOZC7VRA", "req": {"method": "GET", "uri": "/files", "headers": {"someclientheader": b"hello"}}}
    ]


def test_spec_response_head_decodes() -> None:
    value = _head_value({"status_code": 200, "headers": {"content-type": b"text/plain"}})
    assert decode_response_head(value) == ServerResponseHead(200, {"content-type": b"text/plain"})


def test_our_response_head_has_the_spec_shape() -> None:
    value = encode_response_head(ServerResponseHead(206, {"content-range": b"bytes 0-1/2"}))
    assert msgpack.unpackb(base64.b64decode(value), raw=False) == {
        "status_code": 206, "headers": {"content-range": b"bytes 0-1/2"}}


# ---- fuzz: only ProtocolError ---------------------------------------------


@settings(max_examples=500)
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_to_decode_requests(data: bytes) -> None:
    try:
        result = decode_requests(data)
    except ProtocolError:
        return
    assert isinstance(result, list)
    for r in result:
        assert isinstance(r, RelayRequest)


@settings(max_examples=500)
@given(st.text(max_size=2000))
def test_arbitrary_text_to_decode_response_head(value: str) -> None:
    try:
        result = decode_response_head(value)
    except ProtocolError:
        return
    assert isinstance(result, ServerResponseHead)


# Structured junk: valid MsgPack of the wrong shape reaches the checks past the unpacker.
_msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10) | st.binary(max_size=5)
                                                                | st.integers(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=500)
@given(_msgpack_values)
def test_wrong_shapes_to_decode_requests(obj: object) -> None:
    try:
        data = msgpack.packb(obj)
    except (TypeError, ValueError, OverflowError):
        return
    for candidate in (data, msgpack.packb([obj]), msgpack.packb([{"id": "x", "req": obj}])):
        try:
            decode_requests(candidate)
        except ProtocolError:
            pass


@settings(max_examples=500)
@given(_msgpack_values)
def test_wrong_shapes_to_decode_response_head(obj: object) -> None:
    for candidate in (obj, {"status_code": obj, "headers": {}}, {"status_code": 200, "headers": obj}):
        try:
            value = _head_value(candidate)
        except (TypeError, ValueError, OverflowError):
            continue
        try:
            decode_response_head(value)
        except ProtocolError:
            pass


@settings(max_examples=300)
@given(st.binary(min_size=1, max_size=400), st.data())
def test_truncated_listen_answers(tail: bytes, data: st.DataObject) -> None:
    wire = encode_requests([RelayRequest("id1", "GET", "/x", {"a": tail})])
    cut = data.draw(st.integers(min_value=0, max_value=len(wire) - 1))
    with pytest.raises(ProtocolError):
        decode_requests(wire[:cut])


# ---- table cases: response heads ----------------------------------------

BAD_HEADS = [
    ("status as string", {"status_code": "200", "headers": {}}),
    ("status 99", {"status_code": 99, "headers": {}}),
    ("status 199", {"status_code": 199, "headers": {}}),
    ("status 600", {"status_code": 600, "headers": {}}),
    ("status True", {"status_code": True, "headers": {}}),
    ("status float", {"status_code": 200.0, "headers": {}}),
    ("status missing", {"headers": {}}),
    ("status None", {"status_code": None, "headers": {}}),
    ("headers missing", {"status_code": 200}),
    ("headers a list", {"status_code": 200, "headers": [["a", b"b"]]}),
    ("uppercase header name", {"status_code": 200, "headers": {"Content-Type": b"text/plain"}}),
    ("header name with space", {"status_code": 200, "headers": {"content type": b"x"}}),
    ("header name with colon", {"status_code": 200, "headers": {"x:y": b"x"}}),
    ("empty header name", {"status_code": 200, "headers": {"": b"x"}}),
    ("header name with newline", {"status_code": 200, "headers": {"x\r\nset-cookie": b"x"}}),
    ("non-ascii header name", {"status_code": 200, "headers": {"caf\u00e9": b"x"}}),
    ("header value CRLF injection", {"status_code": 200, "headers": {"x-a": b"ok\r\nset-cookie: evil=1"}}),
    ("header value LF", {"status_code": 200, "headers": {"x-a": b"ok\nx"}}),
    ("header value CR", {"status_code": 200, "headers": {"x-a": b"ok\rx"}}),
    ("header value NUL", {"status_code": 200, "headers": {"x-a": b"ok\x00x"}}),
    ("header value str", {"status_code": 200, "headers": {"content-type": "text/plain"}}),
    ("header value int", {"status_code": 200, "headers": {"content-length": 5}}),
    ("header value None", {"status_code": 200, "headers": {"x-a": None}}),
    ("not a map", [200, {}]),
    ("a bare int", 200),
]


@pytest.mark.parametrize("obj", [o for _, o in BAD_HEADS], ids=[i for i, _ in BAD_HEADS])
def test_bad_response_head(obj: object) -> None:
    with pytest.raises(ProtocolError):
        decode_response_head(_head_value(obj))


def test_response_head_status_bounds_accepted() -> None:
    for status in (200, 204, 206, 304, 404, 599):
        assert decode_response_head(_head_value({"status_code": status, "headers": {}})).status_code == status


@pytest.mark.parametrize("value", [
    None, "", "not base64!", "AAAA=AAA", "\u00e9\u00e9\u00e9\u00e9", "gqtzdGF0dXNfY29kZczI",  # truncated
    "YWJj\n", " " + _head_value({"status_code": 200, "headers": {}}),
], ids=["none", "empty", "punctuation", "padding-inside", "non-ascii", "truncated-msgpack", "newline",
        "leading-space"])
def test_bad_response_head_encoding(value: str | None) -> None:
    with pytest.raises(ProtocolError):
        decode_response_head(value)


def test_too_large_response_head() -> None:
    big = {"status_code": 200, "headers": {"x-big": b"a" * MAX_RESPONSE_HEAD_BYTES}}
    value = _head_value(big)
    assert len(value) > MAX_RESPONSE_HEAD_BYTES
    with pytest.raises(ProtocolError, match="too large"):
        decode_response_head(value)


def test_too_large_text_is_refused_before_decoding() -> None:
    with pytest.raises(ProtocolError, match="too large"):
        decode_response_head("A" * (MAX_RESPONSE_HEAD_BYTES + 4))


def test_extra_data_after_head_is_refused() -> None:
    packed = msgpack.packb({"status_code": 200, "headers": {}}) + b"\x00"
    with pytest.raises(ProtocolError):
        decode_response_head(base64.b64encode(packed).decode())


def test_protocol_error_types() -> None:
    assert issubclass(ProtocolError, PtthError)
    assert issubclass(ProtocolError, ValueError)


# ---- table cases: listen answers -----------------------------------------

BAD_LISTEN_ANSWERS = [
    ("not an array", msgpack.packb({"id": "x"})),
    ("item not a map", _listen_answer("JOZC7VRA")),
    ("no req", _listen_answer({"id": "JOZC7VRA"})),
    ("req not a map", _listen_answer({"id": "JOZC7VRA", "req": ["GET", "/"]})),
    ("id missing", _listen_answer({"req": _item()["req"]})),
    ("id an int", _listen_answer({"id": 7, "req": _item()["req"]})),
    ("id bytes", _listen_answer({"id": b"JOZC7VRA", "req": _item()["req"]})),
    ("method bytes", _listen_answer(_item(method=b"GET"))),
    ("method missing", _listen_answer({"id": "a", "req": {"uri": "/", "headers": {}}})),
    ("uri missing", _listen_answer({"id": "a", "req": {"method": "GET", "headers": {}}})),
    ("uri bytes", _listen_answer(_item(uri=b"/"))),
    ("uri without slash", _listen_answer(_item(uri="files"))),
    ("absolute uri", _listen_answer(_item(uri="http://evil/"))),
    ("empty uri", _listen_answer(_item(uri=""))),
    ("uri with CRLF", _listen_answer(_item(uri="/a\r\nHost: evil"))),
    ("uri with NUL", _listen_answer(_item(uri="/a\x00b"))),
    ("headers missing", _listen_answer({"id": "a", "req": {"method": "GET", "uri": "/"}})),
    ("headers a list", _listen_answer(_item(headers=[]))),
    ("uppercase header name", _listen_answer(_item(headers={"Host": b"x"}))),
    ("header value with CRLF", _listen_answer(_item(headers={"x-a": b"a\r\nb: c"}))),
    ("header value str", _listen_answer(_item(headers={"x-a": "text"}))),
    ("header name bytes", _listen_answer(_item(headers={b"x-a": b"text"}))),
    ("non-base64 is not msgpack either", b"\xc1"),
    ("empty body", b""),
    ("truncated", _listen_answer(_item())[:-3]),
    ("extra data", _listen_answer(_item()) + b"\x90"),
    ("non-utf8 str", b"\x91\x82\xa2id\xa2\xff\xfe\xa3req\x80"),
    ("int map key", msgpack.packb([{1: "x"}])),
]


@pytest.mark.parametrize("wire", [w for _, w in BAD_LISTEN_ANSWERS], ids=[i for i, _ in BAD_LISTEN_ANSWERS])
def test_bad_listen_answer(wire: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_requests(wire)


def test_too_large_listen_answer() -> None:
    wire = _listen_answer(_item(headers={"cookie": b"a" * MAX_LISTEN_BODY_BYTES}))
    with pytest.raises(ProtocolError, match="too large"):
        decode_requests(wire)


def test_deeply_nested_listen_answer() -> None:
    wire = b"\x91" * 100_000 + b"\x90"
    with pytest.raises(ProtocolError):
        decode_requests(wire)


def test_huge_declared_length_is_refused() -> None:
    # An array header claiming 2**32-1 items, then nothing: must not allocate or hang.
    with pytest.raises(ProtocolError):
        decode_requests(b"\xdd\xff\xff\xff\xff")


# ---- collect_headers -----------------------------------------------------

HOP_NAMES = ["Connection", "Keep-Alive", "Transfer-Encoding", "TE", "Trailer", "Upgrade",
             "Proxy-Authorization", "Proxy-Authenticate", "Proxy-Connection"]


@pytest.mark.parametrize("name", HOP_NAMES)
@pytest.mark.parametrize("case", [str, str.lower, str.upper, str.swapcase], ids=["as-is", "lower", "upper", "swap"])
def test_collect_headers_drops_hop_by_hop(name: str, case) -> None:  # type: ignore[no-untyped-def]
    out = collect_headers([(case(name), "x"), ("Content-Type", "text/plain")])
    assert out == {"content-type": b"text/plain"}
    assert is_hop_by_hop(case(name))


def test_hop_by_hop_set_is_lowercase() -> None:
    assert all(h == h.lower() for h in HOP_BY_HOP)
    assert {n.lower() for n in HOP_NAMES} <= HOP_BY_HOP


def test_collect_headers_lowercases_and_joins_repeats() -> None:
    out = collect_headers([("Accept", "text/html"), ("X-Thing", b"one"), ("ACCEPT", "application/json"),
                           ("x-thing", "two"), ("Cache-Control", "no-cache")])
    assert out == {"accept": b"text/html, application/json", "x-thing": b"one, two",
                   "cache-control": b"no-cache"}


def test_collect_headers_keeps_end_to_end_headers() -> None:
    names = ["Content-Length", "Content-Type", "Content-Range", "Accept-Ranges", "Etag", "Last-Modified",
             "Range", "If-None-Match", "Authorization", "Cookie", "Host"]
    out = collect_headers([(n, "v") for n in names])
    assert set(out) == {n.lower() for n in names}


def test_collect_headers_str_values_are_latin1() -> None:
    assert collect_headers([("X-Name", "caf\u00e9")]) == {"x-name": "caf\u00e9".encode("latin-1")}


@given(st.lists(st.tuples(st.sampled_from(["A", "b", "Connection", "TE", "x-Y"]),
                          st.binary(max_size=10)), max_size=10))
def test_collect_headers_property(pairs: list[tuple[str, bytes]]) -> None:
    out = collect_headers(pairs)
    assert all(k == k.lower() and k not in HOP_BY_HOP for k in out)
    for key, value in out.items():
        parts = [v for n, v in pairs if n.lower() == key]
        assert value == b", ".join(parts)


# ---- tripcode ------------------------------------------------------------

SPEC_TRIPCODE = "v7tW77nRaiC9s31Y6JoDcHTOHNzEDhhmKHZRBHKc87s="


def test_tripcode_known_answer() -> None:
    independent = base64.b64encode(blake3.blake3(b"secretpassword").digest()).decode("ascii")
    assert independent == SPEC_TRIPCODE
    assert tripcode.derive("secretpassword") == SPEC_TRIPCODE


def test_tripcode_is_of_utf8() -> None:
    key = "cl\u00e9-\u65e5\u672c-0123456789abcdef"
    assert tripcode.derive(key) == base64.b64encode(blake3.blake3(key.encode("utf-8")).digest()).decode()


@given(st.text(max_size=100))
def test_tripcode_derive_property(key: str) -> None:
    code = tripcode.derive(key)
    assert len(code) == 44 and tripcode.is_valid(code)
    assert tripcode.matches(key, code) is bool(key)


def test_matches() -> None:
    assert tripcode.matches("secretpassword", SPEC_TRIPCODE) is True
    assert tripcode.matches("secretpassworD", SPEC_TRIPCODE) is False
    assert tripcode.matches("secretpassword ", SPEC_TRIPCODE) is False
    assert tripcode.matches(None, SPEC_TRIPCODE) is False
    assert tripcode.matches("", SPEC_TRIPCODE) is False
    assert tripcode.matches("", tripcode.derive("")) is False, "an empty key never matches"
    assert tripcode.matches("secretpassword", "") is False


def test_matches_with_non_ascii_tripcode_is_false() -> None:
    """A malformed tripcode must not make the comparison raise."""
    assert tripcode.matches("secretpassword", "\u00e9" * 44) is False


def test_is_strong_boundary() -> None:
    assert tripcode.MIN_API_KEY_CHARS == 20
    assert not tripcode.is_strong("")
    assert not tripcode.is_strong("secretpassword")
    assert not tripcode.is_strong("x" * 19)
    assert tripcode.is_strong("x" * 20)
    assert tripcode.is_strong("x" * 21)


def test_generate_key() -> None:
    keys = {tripcode.generate_key() for _ in range(20)}
    assert len(keys) == 20
    for key in keys:
        assert tripcode.is_strong(key)
        assert len(key) >= 43
        # It is written into TOML and sent in a header: plain URL-safe ASCII.
        assert all(c.isascii() and (c.isalnum() or c in "-_") for c in key)


@pytest.mark.parametrize(("value", "valid"), [
    (SPEC_TRIPCODE, True),
    (tripcode.derive("anything-at-all-long-enough"), True),
    ("", False),
    (SPEC_TRIPCODE[:-1], False),            # padding missing
    (SPEC_TRIPCODE + "A=", False),          # not a multiple of 4 characters
    ("A" * 40 + "AA==", False),             # 31 bytes
    ("A" * 44 + "AAAA", False),             # 35 bytes
    ("v7tW77nRaiC9s31Y6JoDcHTOHNzEDhhmKHZRBHKc87s=\n", False),
    (" " + SPEC_TRIPCODE, False),
    ("!" * 44, False),
    ("\u00e9" * 44, False),
    ("secretpassword", False),
])
def test_is_valid(value: str, valid: bool) -> None:
    assert tripcode.is_valid(value) is valid


def test_is_valid_urlsafe_alphabet_refused() -> None:
    code = base64.b64encode(b"\xfb\xff" * 16).decode()  # contains + and /
    assert "+" in code or "/" in code
    assert tripcode.is_valid(code)
    urlsafe = code.replace("+", "-").replace("/", "_")
    assert not tripcode.is_valid(urlsafe)
