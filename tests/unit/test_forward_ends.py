"""Tests for the splice's ends over HTTP (http_streams.RelayStreams) and QUIC (streams.QuicStreamEnd).

RelayStreams talks to a stand-in relay in this process: a raw TCP server
that reads the chunked POST byte by byte and answers as each test says, or
streams a chunked response. QuicStreamEnd wraps a fake stream. (TcpEnd and
the splice itself are in test_splice.py; the real relay and proxies in
tests/e2e.)
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import requests

from ptth_lib.forward.http_streams import RelayStreams
from ptth_lib.forward.quic.driver import StreamBrokenError
from ptth_lib.forward.quic.streams import QuicStreamEnd
from ptth_lib.forward.splice import CutError

WAIT_SECS = 10.0


@dataclass
class StandIn:
    """A raw HTTP/1.1 server for one connection at a time; `answer` is what it sends after the body."""

    answer: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    received: bytearray = field(default_factory=bytearray)
    events: list[tuple[float, bytes]] = field(default_factory=list)  # (when, bytes) as they arrived
    ended: threading.Event = field(default_factory=threading.Event)  # the connection closed (either way)
    read_nothing: bool = False
    hold: bool = False  # keep the connection open after the answer, until close()

    def __post_init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conn: socket.socket | None = None
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/tcp/upstream/x"

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        self.conn = conn
        with conn:
            if self.read_nothing:
                self.ended.wait(WAIT_SECS)
                return
            conn.settimeout(WAIT_SECS)
            try:
                while not self.received.endswith(b"0\r\n\r\n"):
                    data = conn.recv(65536)
                    if not data:
                        break
                    self.received += data
                    self.events.append((time.monotonic(), data))
                else:
                    conn.sendall(self.answer)
                    if self.hold:
                        self.ended.wait(WAIT_SECS)
            except OSError:
                pass
        self.ended.set()

    def body(self) -> bytes:
        return bytes(self.received).partition(b"\r\n\r\n")[2]

    def close(self) -> None:
        self.ended.set()
        self.listener.close()


@pytest.fixture
def stand_in() -> Iterator[StandIn]:
    s = StandIn()
    yield s
    s.close()


class FakeResponse:
    """What RelayStreams uses of a streaming requests.Response."""

    def __init__(self, chunks: Iterator[bytes], sock: socket.socket | None = None) -> None:
        self._chunks = chunks
        self.raw = type("Raw", (), {"connection": type("Conn", (), {"sock": sock})()})()
        self.closed = False

    def iter_content(self, chunk_size: None) -> Iterator[bytes]:
        return self._chunks

    def close(self) -> None:
        self.closed = True


def streams(post_url: str, chunks: Iterator[bytes] | None = None, sock: socket.socket | None = None) -> RelayStreams:
    response = FakeResponse(chunks or iter(()), sock)
    return RelayStreams(response, post_url, {"X-ApiKey": "k"})  # type: ignore[arg-type]


def wait_until(predicate: Callable[[], bool]) -> None:
    end = time.monotonic() + WAIT_SECS
    while not predicate():
        assert time.monotonic() < end, "not within the deadline"
        time.sleep(0.01)


# ---- the POST: the pieces as its chunked body ------------------------------------------------

def test_each_piece_goes_out_as_one_chunk_at_once(stand_in: StandIn) -> None:
    def pieces() -> Iterator[bytes]:
        for piece in (b"a", b"bc", b"x" * 70000):
            yield piece
            wait_until(lambda piece=piece: stand_in.body().endswith(b"%x\r\n%b\r\n" % (len(piece), piece)))

    streams(stand_in.url).pour(pieces())
    assert stand_in.body() == b"1\r\na\r\n2\r\nbc\r\n11170\r\n" + b"x" * 70000 + b"\r\n0\r\n\r\n"
    head = bytes(stand_in.received).partition(b"\r\n\r\n")[0].lower()
    assert b"transfer-encoding: chunked" in head and b"x-apikey: k" in head


def test_empty_pieces_are_skipped_not_taken_for_the_end(stand_in: StandIn) -> None:
    streams(stand_in.url).pour(iter([b"", b"a", b""]))
    assert stand_in.body() == b"1\r\na\r\n0\r\n\r\n"


def test_a_piece_that_cannot_be_had_cuts_the_body(stand_in: StandIn) -> None:
    def pieces() -> Iterator[bytes]:
        yield b"half"
        raise CutError("TCP peer: Connection reset by peer")

    with pytest.raises(CutError, match="TCP peer: Connection reset by peer"):
        streams(stand_in.url).pour(pieces())
    assert stand_in.ended.wait(WAIT_SECS)
    assert stand_in.body() == b"4\r\nhalf\r\n", "the body must break off, never end with its last chunk"


def test_an_answer_other_than_200_is_a_cut(stand_in: StandIn) -> None:
    stand_in.answer = (b"HTTP/1.1 409 Conflict\r\nContent-Type: text/plain\r\nContent-Length: 21\r\n\r\n"
                       b"upstream already sent")
    with pytest.raises(CutError, match=r"^relay answered 409 .*upstream already sent"):
        streams(stand_in.url).pour(iter([b"a"]))


def test_an_unreachable_relay_is_a_cut() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    with pytest.raises(CutError, match="^relay stream: .*refused"):
        streams(f"http://127.0.0.1:{port}/x").pour(iter([b"a"]))


def test_abort_cuts_a_post_the_relay_does_not_read() -> None:
    stand_in = StandIn(read_nothing=True)
    s = streams(stand_in.url)
    failed: list[BaseException] = []

    def post() -> None:
        try:
            s.pour(iter([b"\0" * 65536] * 1000))  # 64 MiB: blocks once the socket buffers are full
        except CutError as e:
            failed.append(e)

    poster = threading.Thread(target=post, daemon=True)
    poster.start()
    time.sleep(0.5)
    assert poster.is_alive()
    s.abort("stopping")
    poster.join(WAIT_SECS)
    assert not poster.is_alive() and failed and str(failed[0]).startswith("relay stream:")
    stand_in.close()


# ---- the response: the far side's bytes -------------------------------------------------------

def test_the_response_is_read_chunk_by_chunk_empty_ones_skipped() -> None:
    s = streams("http://127.0.0.1:1/", iter([b"", b"one", b"", b"two"]))
    assert [s.read(), s.read(), s.read(), s.read()] == [b"one", b"two", b"", b""]


def test_a_broken_response_is_a_cut() -> None:
    def chunks() -> Iterator[bytes]:
        yield b"one"
        raise requests.exceptions.ChunkedEncodingError("Connection broken: IncompleteRead")

    s = streams("http://127.0.0.1:1/", chunks())
    assert s.read() == b"one"
    with pytest.raises(CutError, match="^relay stream: "):
        s.read()


def test_a_real_chunked_response(stand_in: StandIn) -> None:
    """Through requests and urllib3 as the proxies read it: each chunk as it arrives, then the end."""
    stand_in.answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\none\r\n"
    stand_in.hold = True
    got: list[bytes] = []
    with requests.post(stand_in.url, data=iter([b"go"]), stream=True, timeout=WAIT_SECS) as r:
        s = RelayStreams(r, stand_in.url, {})
        got.append(s.read())  # the first chunk, before the second is even sent
        assert stand_in.conn is not None
        stand_in.conn.sendall(b"3\r\ntwo\r\n0\r\n\r\n")
        got += [s.read(), s.read()]
    assert got == [b"one", b"two", b""]


def test_the_watch_sees_the_relay_close_the_response() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    relay_side, _ = server.accept()
    with server, client:
        s = streams("http://127.0.0.1:1/", iter(()), sock=client)
        assert s.check() == ""
        relay_side.close()  # a FIN from the relay
        wait_until(lambda: s.check() != "")
        assert s.check() == "relay stream: the relay closed the incoming connection"


def test_a_response_that_ended_cleanly_is_no_longer_watched() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    relay_side, _ = server.accept()
    with server, client:
        s = streams("http://127.0.0.1:1/", iter([b"last"]), sock=client)
        assert s.read() == b"last" and s.read() == b""
        relay_side.close()  # the relay may close it now: not a cut
        time.sleep(0.2)
        assert s.check() == ""


# ---- a QUIC stream -------------------------------------------------------------------------

class FakeStream:
    def __init__(self, reads: list[bytes | Exception]) -> None:
        self.reads = reads
        self.written: list[bytes] = []
        self.ended = False
        self.aborted = ""

    def read(self) -> bytes:
        item = self.reads.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def write(self, data: bytes) -> None:
        if self.aborted:
            raise StreamBrokenError("reset by the peer")
        self.written.append(data)

    def end(self) -> None:
        self.ended = True

    def abort(self, reason: str) -> None:
        self.aborted = reason


def quic_end(stream: FakeStream, first: bytes = b"", label: str = "QUIC stream") -> QuicStreamEnd:
    return QuicStreamEnd(stream, first, label)  # type: ignore[arg-type]


def test_the_bytes_after_the_tip_come_first() -> None:
    e = quic_end(FakeStream([b"then this", b""]), first=b"after the tip")
    assert [e.read(), e.read(), e.read()] == [b"after the tip", b"then this", b""]


def test_no_bytes_after_the_tip() -> None:
    assert quic_end(FakeStream([b""])).read() == b""


@pytest.mark.parametrize("label", ["QUIC stream", "server's stream"])
def test_a_broken_stream_is_a_cut_named_by_its_label(label: str) -> None:
    stream = FakeStream([StreamBrokenError("reset by the peer")])
    e = quic_end(stream, label=label)
    with pytest.raises(CutError, match=f"^{label}: reset by the peer$"):
        e.read()
    e.abort("cut")
    with pytest.raises(CutError, match=f"^{label}: reset by the peer$"):
        e.write(b"x")
    assert stream.aborted == "cut"


def test_pour_writes_then_ends() -> None:
    stream = FakeStream([])
    quic_end(stream).pour(iter([b"a", b"b"]))
    assert stream.written == [b"a", b"b"] and stream.ended


