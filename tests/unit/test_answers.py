"""Small answers riding on a listen: their wire form (envelope.py) and the carrier (server/answers.py)."""

from __future__ import annotations

import threading
import time

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ptth_lib.errors import ProtocolError
from ptth_lib.server.answers import AnswerCarrier
from ptth_lib.wire.envelope import (
    INLINE_BODY_BYTES,
    MAX_ANSWERS_BYTES,
    BadAnswer,
    InlineAnswer,
    ServerResponseHead,
    answer_size,
    decode_answers,
    encode_answers,
)

_TOKEN_CHARS = "!#$%&'*+.^_`|~0123456789abcdefghijklmnopqrstuvwxyz-"
names = st.text(alphabet=_TOKEN_CHARS, min_size=1, max_size=20).filter(lambda n: n != "content-length")
values = st.binary(max_size=60).map(lambda b: bytes(c for c in b if c == 9 or 32 <= c != 127))
ids = st.from_regex(r"\A[A-Z2-7]{16}\Z")
answers = st.builds(InlineAnswer, request_id=ids,
                    head=st.builds(ServerResponseHead, status_code=st.integers(200, 599),
                                   headers=st.dictionaries(names, values, max_size=5)),
                    body=st.binary(max_size=300))


def ok(request_id: str = "AAAAAAAAAAAAAAAA", body: bytes = b"hi") -> InlineAnswer:
    return InlineAnswer(request_id, ServerResponseHead(200, {"content-length": str(len(body)).encode()}), body)


@given(st.lists(answers, max_size=6))
def test_answers_round_trip(batch: list[InlineAnswer]) -> None:
    assert decode_answers(encode_answers(batch)) == batch


@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_protocol_error(data: bytes) -> None:
    try:
        decode_answers(data)
    except ProtocolError:
        pass


def test_a_malformed_answer_is_told_apart_from_the_rest() -> None:
    good = msgpack.unpackb(encode_answers([ok("AAAAAAAAAAAAAAAA")]))[0]
    items = [good,
             {"id": "BBBBBBBBBBBBBBBB", "head": {"status_code": "200", "headers": {}}, "body": b""},
             {"id": "CCCCCCCCCCCCCCCC", "head": {"status_code": 101, "headers": {}}, "body": b""},
             {"id": "DDDDDDDDDDDDDDDD", "head": {"status_code": 200, "headers": {"x": b"a\nb"}}, "body": b""},
             {"id": "EEEEEEEEEEEEEEEE", "head": {"status_code": 200, "headers": {}},
              "body": b"x" * (INLINE_BODY_BYTES + 1)},
             {"id": "FFFFFFFFFFFFFFFF", "head": {"status_code": 200, "headers": {}}, "body": "text, not bytes"}]
    decoded = decode_answers(msgpack.packb(items))
    assert decoded[0] == ok("AAAAAAAAAAAAAAAA")
    assert [type(a) for a in decoded[1:]] == [BadAnswer] * 5
    assert [a.request_id for a in decoded] == [i["id"] for i in items]
    assert "switches protocols" in decoded[2].reason  # type: ignore[union-attr]


@pytest.mark.parametrize("wire", [msgpack.packb({"id": "x"}), msgpack.packb([{"head": {}}]),
                                  msgpack.packb([{"id": "not an id!"}]), msgpack.packb([1, 2]),
                                  b"\xc1", b"x" * (MAX_ANSWERS_BYTES + 1)])
def test_a_whole_that_is_not_answers_is_refused(wire: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_answers(wire)


def test_answer_size_bounds_the_encoding() -> None:
    a = InlineAnswer("AAAAAAAAAAAAAAAA", ServerResponseHead(200, {"content-type": b"text/plain" * 20,
                                                                 "content-length": b"65536"}), b"x" * 65536)
    assert len(encode_answers([a])) <= answer_size(a.head, len(a.body))


# ---- the carrier ------------------------------------------------------------------------------


def test_take_returns_as_soon_as_every_request_is_settled() -> None:
    carrier = AnswerCarrier(["A" * 16, "B" * 16])
    assert carrier.offer(ok("A" * 16))
    threading.Timer(0.05, carrier.settle, ["B" * 16]).start()
    started = time.monotonic()
    assert carrier.take(wait_secs=5) == [ok("A" * 16)]
    assert time.monotonic() - started < 4  # the settle ended the wait, not the 5 s


def test_an_offer_after_take_is_refused_and_take_waits_no_longer_than_asked() -> None:
    carrier = AnswerCarrier(["A" * 16, "B" * 16])
    started = time.monotonic()
    assert carrier.take(wait_secs=0.05) == []
    assert 0.04 < time.monotonic() - started < 4
    assert not carrier.offer(ok("A" * 16))  # its listen has gone: POST it


def test_answers_past_the_byte_bound_are_refused() -> None:
    big = b"x" * INLINE_BODY_BYTES
    count = MAX_ANSWERS_BYTES // INLINE_BODY_BYTES + 2
    ids = [f"{i:016d}" for i in range(count)]
    carrier = AnswerCarrier(ids)
    taken = [carrier.offer(ok(i, big)) for i in ids]
    assert taken[0] and not taken[-1]
    kept = carrier.take(wait_secs=0)
    assert len(kept) == taken.count(True)
    assert sum(answer_size(a.head, len(a.body)) for a in kept) <= MAX_ANSWERS_BYTES


def test_in_a_cluster_only_answers_the_listens_node_holds_are_carried() -> None:
    carrier = AnswerCarrier(["NODEAAAA" + "1" * 8, "NODEBBBB" + "2" * 8], node="NODEAAAA")
    assert carrier.offer(ok("NODEAAAA" + "1" * 8))
    assert not carrier.offer(ok("NODEBBBB" + "2" * 8))  # another node's client: POST it to its owner
    assert carrier.take(wait_secs=0) == [ok("NODEAAAA" + "1" * 8)]
