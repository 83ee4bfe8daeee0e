"""Tests for ptth_lib.forward.quic.credit (per-stream credit) and the driver's use of it.

First the bookkeeping alone (pure, with hypothesis): records, what a receiver
grants and when, what a sender may send. Then two driver.QuicPeer connected in
memory (real qh3, gevent, no sockets): a writer stops exactly at its credit
and goes on as the reader reads, a stream nobody reads does not hold up
another, and a peer that breaks the protocol (past its credit, a malformed
record, its control stream ended, another unidirectional stream) is closed
at once with the reason.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import gevent
import gevent.queue
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptth_lib.forward.quic import driver
from ptth_lib.forward.quic.cert import (
    RelayIdentity,
    client_configuration,
    load_or_create,
    server_configuration,
)
from ptth_lib.forward.quic.credit import (
    MAX_VARINT,
    RECORD,
    WINDOW,
    CreditError,
    ReceiveCredit,
    RecordReader,
    SendCredit,
    encode,
)
from ptth_lib.forward.quic.driver import QuicPeer, QuicStream
from ptth_lib.forward.quic.quic_adapter import STREAM_WINDOW_BYTES, PacedQuicConnection

MiB = 1024 * 1024


# ---- the bookkeeping ---------------------------------------------------------------------------

def test_a_record_is_sixteen_bytes_big_endian() -> None:
    assert encode(4, 0x0102030405060708) == b"\x00" * 7 + b"\x04" + bytes(range(1, 9))
    assert RECORD.size == 16


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, MAX_VARINT >> 2).map(lambda n: n * 4 + (n & 1)),
                          st.integers(0, MAX_VARINT)), max_size=20),
       st.lists(st.integers(1, 40), max_size=20))
def test_records_come_out_whole_however_the_stream_is_cut(records: list[tuple[int, int]], cuts: list[int]) -> None:
    data = b"".join(encode(*r) for r in records)
    reader = RecordReader()
    got: list[tuple[int, int]] = []
    at = 0
    for cut in cuts:
        got += reader.feed(data[at:at + cut])
        at += cut
    got += reader.feed(data[at:])
    assert got == records


@pytest.mark.parametrize("stream_id, max_offset", [(2, 10), (3, 10), (MAX_VARINT + 1, 10), (0, MAX_VARINT + 1),
                                                   (0, 2**64 - 1)])
def test_a_malformed_record_is_refused(stream_id: int, max_offset: int) -> None:
    with pytest.raises(CreditError, match="malformed credit record"):
        RecordReader().feed(struct.pack(">QQ", stream_id, max_offset))


def test_a_receiver_grants_after_a_quarter_window_read() -> None:
    credit = ReceiveCredit(window=1000)
    credit.receive(0, 1000)
    with pytest.raises(CreditError, match="sent 1001 bytes on stream 0, past its credit of 1000"):
        credit.receive(0, 1)
    credit = ReceiveCredit(window=1000)
    credit.receive(0, 1000)
    credit.read(0, 249)
    assert not credit.due() and credit.grants() == b""
    credit.read(0, 1)
    assert credit.due()
    assert credit.grants() == encode(0, 1250)
    assert not credit.due()
    credit.receive(0, 250)  # now exactly at the new credit
    with pytest.raises(CreditError):
        credit.receive(0, 1)


def test_grants_are_batched_one_record_per_stream() -> None:
    credit = ReceiveCredit(window=1000)
    for stream_id in (0, 4, 1):
        credit.receive(stream_id, 1000)
    for _ in range(10):
        credit.read(0, 100)
    credit.read(4, 300)
    assert credit.grants() == encode(0, 2000) + encode(4, 1300)


def test_a_dropped_stream_grants_nothing_and_a_forgotten_one_holds_nothing() -> None:
    credit = ReceiveCredit(window=1000)
    credit.receive(0, 800)
    credit.read(0, 300)
    credit.drop(0)
    assert credit.unread(0) == 0 and credit.grants() == b""
    with pytest.raises(CreditError):
        credit.receive(0, 201)  # still checked
    credit.forget(0)
    assert not (credit.granted or credit.received or credit.consumed)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["send", "read", "flush"]), st.integers(1, 3000)), max_size=60))
def test_credit_bounds_unread_bytes_and_never_stalls(steps: list[tuple[str, int]]) -> None:
    """A sender that keeps to its credit and a receiver: nothing past a window unread, and with
    everything read and flushed the sender always has room again."""
    window = 4096
    receiver, sender = ReceiveCredit(window), SendCredit(window)
    sender.track(0)
    for op, n in steps:
        if op == "send":
            n = min(n, sender.room(0))
            sender.spend(0, n)
            receiver.receive(0, n)
        elif op == "read":
            receiver.read(0, min(n, receiver.unread(0)))
        else:
            for stream_id, max_offset in RecordReader().feed(receiver.grants()):
                sender.grant(stream_id, max_offset)
        assert receiver.unread(0) <= window
        assert sender.sent[0] <= sender.max_offset[0] <= receiver.granted.get(0, window)
    receiver.read(0, receiver.unread(0))
    for stream_id, max_offset in RecordReader().feed(receiver.grants()):
        sender.grant(stream_id, max_offset)
    assert sender.room(0) >= window * 3 // 4


def test_a_sender_takes_grants_only_for_its_streams_and_never_back() -> None:
    sender = SendCredit(window=1000)
    assert sender.room(0) == 0 and not sender.grant(0, 5000)  # not tracked: ignored, nothing held
    assert not sender.max_offset
    sender.track(0)
    assert sender.room(0) == 1000
    sender.spend(0, 1000)
    assert sender.room(0) == 0
    assert sender.grant(0, 1500) and sender.room(0) == 500
    assert not sender.grant(0, 1500)
    with pytest.raises(CreditError, match="lowered stream 0's credit from 1500 to 1499"):
        sender.grant(0, 1499)
    sender.forget(0)
    assert not sender.max_offset and not sender.sent


# ---- two QuicPeers in memory -------------------------------------------------------------------

ADDR = ("127.0.0.1", 4433)


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> RelayIdentity:
    folder = tmp_path_factory.mktemp("relay")
    return load_or_create(str(folder / "relay.crt"), str(folder / "relay.key"))


class Link:
    """A proxy's QuicPeer and the relay's, trusted and with both control streams open."""

    def __init__(self, identity: RelayIdentity) -> None:
        quic = PacedQuicConnection(configuration=driver.configure(
            client_configuration(driver.ALPN, identity.fingerprint, None)))
        relay_quic = PacedQuicConnection(configuration=driver.configure(server_configuration(driver.ALPN, identity)),
                                         original_destination_connection_id=quic.original_destination_connection_id)
        self.accepted: gevent.queue.Queue[QuicStream] = gevent.queue.Queue()
        self.proxy = QuicPeer(quic, self._to(lambda: self.relay))
        self.relay = QuicPeer(relay_quic, self._to(lambda: self.proxy), on_stream=self.accepted.put)
        quic.connect(ADDR, now=gevent.get_hub().loop.now())
        self.proxy.transmit()
        with gevent.Timeout(10):
            self.proxy.handshake_done.wait()
            self.relay.handshake_done.wait()
        self.relay.trust()
        self.proxy.open_control()

    @staticmethod
    def _to(peer: Any) -> Any:
        def send(datagrams: list[bytes], addr: Any) -> None:  # delivered on the next loop turn
            gevent.get_hub().loop.run_callback(lambda: peer().datagrams_received(datagrams, ADDR))
        return send

    def close(self) -> None:
        self.proxy.close()
        self.relay.close()


@pytest.fixture
def link(identity: RelayIdentity) -> Iterator[Link]:
    made = Link(identity)
    yield made
    made.close()


def settle(secs: float = 0.3) -> None:
    gevent.sleep(secs)


def read_exactly(stream: QuicStream, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = stream.read(n - len(got))
        assert chunk, "the stream ended early"
        got += chunk
    return bytes(got)


def test_a_writer_stops_at_its_credit_and_goes_on_as_the_reader_reads(link: Link) -> None:
    stream = link.proxy.open_stream()
    data = bytes(range(256)) * (3 * MiB // 256)
    writer = gevent.spawn(stream.write, data)
    with gevent.Timeout(10):
        far = link.accepted.get()
    settle()
    # Nobody reads: exactly the window was sent, the rest waits in the writer, not in qh3.
    assert link.relay.quic.credit.received[far.stream_id] == STREAM_WINDOW_BYTES
    assert link.proxy.send_credit.room(stream.stream_id) == 0 and not writer.ready()
    assert link.proxy.quic.unacked_bytes(stream.stream_id) == 0
    with gevent.Timeout(10):
        assert read_exactly(far, len(data)) == data
        writer.get()
    assert not link.relay.quic.violation and not link.proxy.quic.violation


def test_a_stream_nobody_reads_does_not_hold_up_another(link: Link) -> None:
    slow = link.proxy.open_stream()
    gevent.spawn(slow.write, b"\x01" * (3 * MiB))
    with gevent.Timeout(10):
        link.accepted.get()
    settle()
    fast = link.proxy.open_stream()
    data = b"\x02" * (8 * MiB)
    writer = gevent.spawn(fast.write, data)
    with gevent.Timeout(10):
        far = link.accepted.get()
        assert read_exactly(far, len(data)) == data
        writer.get()
    assert link.relay.quic.credit.unread(slow.stream_id) == STREAM_WINDOW_BYTES


def assert_closed_for(link: Link, reason: str) -> None:
    with gevent.Timeout(5):
        link.relay.closed.wait()
        link.proxy.closed.wait()
    assert reason in link.relay.close_reason
    assert reason in link.proxy.close_reason  # the CONNECTION_CLOSE says why


def test_a_peer_past_its_credit_is_closed(link: Link) -> None:
    stream = link.proxy.open_stream()
    link.proxy.quic.send_stream_data(stream.stream_id, b"\x00" * (STREAM_WINDOW_BYTES + 1))  # not through write
    link.proxy.transmit()
    assert_closed_for(link, f"past its credit of {STREAM_WINDOW_BYTES}")


@pytest.mark.parametrize("bytes_on_control, reason", [
    (encode(0, WINDOW)[:8] + b"\xff" * 8, "malformed credit record"),
    (struct.pack(">QQ", 2, WINDOW), "malformed credit record"),
    (b"", "ended its control stream"),
])
def test_a_broken_control_stream_is_closed(link: Link, bytes_on_control: bytes, reason: str) -> None:
    control = link.proxy._control_stream
    assert control is not None
    link.proxy.quic.send_stream_data(control, bytes_on_control, end_stream=not bytes_on_control)
    link.proxy.transmit()
    assert_closed_for(link, reason)


def test_credit_lowered_is_closed(link: Link) -> None:
    stream = link.relay.open_stream()  # the relay's stream: the proxy grants its credit
    stream.write(b"x")
    settle()
    control = link.proxy._control_stream
    assert control is not None
    link.proxy.quic.send_stream_data(control, encode(stream.stream_id, WINDOW - 1))
    link.proxy.transmit()
    assert_closed_for(link, f"lowered stream {stream.stream_id}'s credit")


def test_a_second_unidirectional_stream_is_closed(link: Link) -> None:
    other = link.proxy.quic.get_next_available_stream_id(is_unidirectional=True)
    link.proxy.quic.send_stream_data(other, b"x")
    link.proxy.transmit()
    assert_closed_for(link, "sent on a unidirectional stream other than its control stream")


def test_grants_go_out_for_what_was_read() -> None:
    """The relay's records, as the proxy's RecordReader sees them (the bytes on the wire)."""
    credit = ReceiveCredit(WINDOW)
    credit.receive(0, WINDOW)
    credit.read(0, WINDOW // 4)
    assert RecordReader().feed(credit.grants()) == [(0, WINDOW + WINDOW // 4)]
