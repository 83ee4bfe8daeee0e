"""Tests for ptth_lib.forward.quic.quic_adapter: what PTTH relies on inside qh3, checked.

Every qh3 internal PTTH uses is in quic_adapter.py; these tests fail when a
qh3 upgrade breaks one, naming the installed qh3 version: first that the
names and signatures are there (`problems()`), then the behaviour, on two
connections in memory with datagrams passed by hand and a fake clock: every
stream's bytes counted against PTTH's credit as qh3 hands them over (and what
qh3's core holds from a peer that goes past it), no stream waiting for
another, a restricted connection's limits and datagram budget (which bounds
its handshake), the control stream and no other unidirectional stream, the
peer's certificate, Retry. The credit records themselves are
tests/unit/test_quic_credit.py's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from qh3.quic import events
from qh3.quic.packet import QuicPacketType

from ptth_lib.forward.quic import driver
from ptth_lib.forward.quic import quic_adapter as adapter
from ptth_lib.forward.quic.cert import (
    RelayIdentity,
    client_configuration,
    load_or_create,
    server_configuration,
)
from ptth_lib.forward.quic.quic_adapter import (
    INSTALLED_VERSION,
    MAX_STREAMS,
    STREAM_WINDOW_BYTES,
    UNTRUSTED_DATAGRAM_BYTES,
    VERIFIED_VERSION,
    PacedQuicConnection,
    PeerLimits,
    RetryTokens,
)

CLIENT_ADDR = ("127.0.0.1", 50000)
RELAY_ADDR = ("127.0.0.1", 30380)
MiB = 1024 * 1024
# The most stream bytes one packet carries (driver.configure's max_datagram_size is 1,350).
PACKET_BYTES = 1350


@contextmanager
def relied_on(what: str) -> Iterator[None]:
    """Turn any failure inside into one that names qh3, its version, and what broke."""
    try:
        yield
    except Exception as e:  # AssertionError too: the message must say it is qh3's doing
        raise AssertionError(f"qh3 {INSTALLED_VERSION} (PTTH was verified with {VERIFIED_VERSION}): {what} "
                             f"no longer works as ptth_lib/forward/quic/quic_adapter.py expects: "
                             f"{type(e).__name__}: {e}") from e


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> RelayIdentity:
    folder = tmp_path_factory.mktemp("relay")
    return load_or_create(str(folder / "relay.crt"), str(folder / "relay.key"))


class Pair:
    """A proxy's connection and the relay's, in memory, on a fake clock."""

    def __init__(self, identity: RelayIdentity, restrict: tuple[int, int] | None = None) -> None:
        self.now = 1000.0
        self.client = PacedQuicConnection(configuration=driver.configure(
            client_configuration(driver.ALPN, identity.fingerprint, None)))
        self.relay = PacedQuicConnection(configuration=driver.configure(server_configuration(driver.ALPN, identity)),
                                         original_destination_connection_id=self.client.original_destination_connection_id)
        if restrict is not None:
            self.relay.restrict(*restrict)
        self.received: dict[int, int] = {}  # stream id -> bytes the relay's application was given
        self.client.connect(RELAY_ADDR, now=self.now)
        self.exchange()

    def exchange(self, rounds: int = 2000) -> None:
        """Pass datagrams both ways, firing timers that fall due within a second, until all is quiet."""
        for _ in range(rounds):
            moved = False
            for data, _addr in self.client.datagrams_to_send(now=self.now):
                self.relay.receive_datagram(data, CLIENT_ADDR, now=self.now)
                moved = True
            for data, _addr in self.relay.datagrams_to_send(now=self.now):
                self.client.receive_datagram(data, RELAY_ADDR, now=self.now)
                moved = True
            self._drain_events()
            if moved:
                self.now += 0.001
                continue
            timers = [t for t in (self.client.get_timer(), self.relay.get_timer()) if t is not None]
            due = min(timers, default=None)
            if due is None or due > self.now + 1.0:
                return
            self.now = max(self.now, due)
            for conn in (self.client, self.relay):
                timer = conn.get_timer()
                if timer is not None and timer <= self.now:
                    conn.handle_timer(now=self.now)
        raise AssertionError("the connections never went quiet")

    def _drain_events(self) -> None:
        while (event := self.relay.next_event()) is not None:
            if isinstance(event, events.StreamDataReceived):
                self.received[event.stream_id] = self.received.get(event.stream_id, 0) + len(event.data)
        while self.client.next_event() is not None:
            pass

    def read_all(self, stream_id: int) -> None:
        """The relay's application reads all it was given, and grants the credit that frees
        (what QuicPeer.read_done does, the record going on the control stream: here by hand)."""
        credit = self.relay.credit
        credit.read(stream_id, self.received.get(stream_id, 0) - credit.consumed.get(stream_id, 0))
        credit.grants()

    def sent(self, stream_id: int, total: int) -> int:
        """Bytes of a stream of `total` the client has sent (the rest is queued)."""
        return total - self.client.unacked_bytes(stream_id)


def test_every_internal_relied_on_is_there() -> None:
    with relied_on("the names and signatures listed in quic_adapter._METHODS and the rest"):
        assert adapter.problems() == []


def test_a_stream_past_its_credit_is_a_violation(identity: RelayIdentity) -> None:
    with relied_on("PacedQuicConnection's counting core (credit as the application reads)"):
        pair = Pair(identity)
        stream_id = pair.client.get_next_available_stream_id()
        pair.client.send_stream_data(stream_id, b"\x5a" * STREAM_WINDOW_BYTES)
        pair.exchange()
        # Nobody reads: the whole window is handed over, and that is all right.
        assert pair.received[stream_id] == STREAM_WINDOW_BYTES and not pair.relay.violation
        pair.client.send_stream_data(stream_id, b"\x5a")
        pair.exchange()
        assert pair.relay.violation == (f"sent {STREAM_WINDOW_BYTES + 1} bytes on stream {stream_id}, "
                                        f"past its credit of {STREAM_WINDOW_BYTES}")


def test_a_peer_past_its_credit_gets_no_further(identity: RelayIdentity) -> None:
    with relied_on("PacedQuicConnection's counting core (what qh3's core holds from a peer past its credit)"):
        pair = Pair(identity)
        stream_id = pair.client.get_next_available_stream_id()
        data = b"\x5a" * (5 * MiB)
        pair.client.send_stream_data(stream_id, data)
        pair.exchange()
        assert pair.relay.violation.endswith(f"on stream {stream_id}, past its credit of {STREAM_WINDOW_BYTES}")
        # No event is taken after the violation: at most a packet past the credit reached
        # Python, and qh3's core, which grants QUIC credit only for what it handed over, let the
        # sender have at most one window (its max_stream_data) more, however long it waits.
        held = pair.received[stream_id]
        assert held < STREAM_WINDOW_BYTES + PACKET_BYTES
        pair.now += 5
        pair.exchange()
        assert pair.received[stream_id] == held
        assert pair.sent(stream_id, len(data)) <= held + STREAM_WINDOW_BYTES


def test_granted_credit_lets_the_peer_send_more(identity: RelayIdentity) -> None:
    with relied_on("PacedQuicConnection's counting core (credit as the application reads)"):
        pair = Pair(identity)
        stream_id = pair.client.get_next_available_stream_id()
        data = b"\x5a" * (4 * STREAM_WINDOW_BYTES)
        window = STREAM_WINDOW_BYTES
        for i in range(4):
            pair.client.send_stream_data(stream_id, data[i * window:(i + 1) * window])
            pair.exchange()
            assert pair.received[stream_id] == (i + 1) * window and not pair.relay.violation
            pair.read_all(stream_id)
        assert pair.relay.credit.granted[stream_id] == 5 * window


def test_no_stream_waits_for_another(identity: RelayIdentity) -> None:
    with relied_on("PacedQuicConnection's counting core (no stream waits for another)"):
        pair = Pair(identity)
        slow = pair.client.get_next_available_stream_id()
        pair.client.send_stream_data(slow, b"\x01" * STREAM_WINDOW_BYTES)
        pair.exchange()
        other = pair.client.get_next_available_stream_id()
        pair.client.send_stream_data(other, b"\x02" * 1000, end_stream=True)
        pair.exchange()
        assert pair.received[other] == 1000  # although the slow stream's window is all unread
        assert pair.relay.credit.unread(slow) == STREAM_WINDOW_BYTES


def test_a_stream_dropped_by_the_application_still_has_its_credit_checked(identity: RelayIdentity) -> None:
    with relied_on("PacedQuicConnection.credit (drop)"):
        pair = Pair(identity)
        stream_id = pair.client.get_next_available_stream_id()
        pair.client.send_stream_data(stream_id, b"\x01" * 1000)
        pair.exchange()
        pair.relay.credit.drop(stream_id)  # e.g. QuicStream.abort
        assert pair.relay.credit.unread(stream_id) == 0 and not pair.relay.credit.due()
        pair.client.send_stream_data(stream_id, b"\x01" * STREAM_WINDOW_BYTES)
        pair.exchange()
        assert pair.relay.violation.endswith(f"on stream {stream_id}, past its credit of {STREAM_WINDOW_BYTES}")


def test_a_restricted_connection_is_closed_past_its_window(identity: RelayIdentity) -> None:
    with relied_on("PacedQuicConnection.restrict (bytes on the first stream)"):
        window = 4099
        pair = Pair(identity, restrict=(window, 1))
        stream_id = pair.client.get_next_available_stream_id()
        pair.client.send_stream_data(stream_id, b"\x01" * window)
        pair.exchange()
        assert pair.received[stream_id] == window and not pair.relay.violation
        pair.client.send_stream_data(stream_id, b"\x01")
        pair.exchange()
        assert pair.relay.violation == "sent more than a hello before it was answered"


def test_a_restricted_connection_is_closed_on_a_second_stream(identity: RelayIdentity) -> None:
    with relied_on("PacedQuicConnection.restrict (streams)"):
        pair = Pair(identity, restrict=(4099, 1))
        for _ in range(2):
            pair.client.send_stream_data(pair.client.get_next_available_stream_id(), b"hello")
            pair.exchange()
        assert pair.relay.violation == "opened more streams than allowed before its hello"


def test_a_lifted_restriction_gives_full_windows(identity: RelayIdentity) -> None:
    with relied_on("PacedQuicConnection.lift_restriction"):
        pair = Pair(identity, restrict=(4099, 1))
        first = pair.client.get_next_available_stream_id()
        pair.client.send_stream_data(first, b"hello")
        pair.exchange()
        pair.relay.lift_restriction()
        second = pair.client.get_next_available_stream_id()
        pair.client.send_stream_data(second, b"\x02" * STREAM_WINDOW_BYTES, end_stream=True)
        pair.exchange()
        assert pair.received[second] == STREAM_WINDOW_BYTES and not pair.relay.violation
        assert adapter.peer_limits(pair.client).streams_bidi == MAX_STREAMS


def test_a_restricted_connection_is_fed_its_datagram_budget_and_no_more(identity: RelayIdentity) -> None:
    with relied_on("PacedQuicConnection.receive_datagram (the datagram budget, which bounds the handshake)"):
        relay = PacedQuicConnection(configuration=driver.configure(server_configuration(driver.ALPN, identity)),
                                    original_destination_connection_id=b"\x00" * 8)
        relay.restrict(4099, 1)
        client = PacedQuicConnection(configuration=driver.configure(
            client_configuration(driver.ALPN, identity.fingerprint, None)))
        client.connect(RELAY_ADDR, now=1000.0)
        initial = client.datagrams_to_send(now=1000.0)[0][0]
        fed = 0
        while fed + len(initial) <= UNTRUSTED_DATAGRAM_BYTES:  # the same Initial again and again
            relay.receive_datagram(initial, CLIENT_ADDR, now=1000.0)
            fed += len(initial)
        assert not relay.violation
        relay.receive_datagram(initial, CLIENT_ADDR, now=1000.0)
        assert relay.violation == "sent too much before its hello"


def test_a_unidirectional_stream_before_the_hello_is_a_violation(identity: RelayIdentity) -> None:
    with relied_on("PacedQuicConnection (unidirectional streams)"):
        pair = Pair(identity, restrict=(4099, 1))
        uni = pair.client.get_next_available_stream_id(is_unidirectional=True)
        pair.client.send_stream_data(uni, b"x")
        pair.exchange()
        assert pair.relay.violation == "opened a unidirectional stream before its hello"


def test_the_control_stream_is_the_only_unidirectional_stream(identity: RelayIdentity) -> None:
    with relied_on("PacedQuicConnection (unidirectional streams)"):
        pair = Pair(identity)
        control = pair.client.get_next_available_stream_id(is_unidirectional=True)
        assert control == pair.relay.peer_control_stream == 2
        assert pair.client.peer_control_stream == 3  # the relay's first
        pair.client.send_stream_data(control, b"\x00" * 32)
        pair.exchange()
        assert pair.relay.control_bytes == 32 and not pair.relay.violation
        other = pair.client.get_next_available_stream_id(is_unidirectional=True)
        pair.client.send_stream_data(other, b"x")
        pair.exchange()
        assert pair.relay.violation == "sent on a unidirectional stream other than its control stream"


def test_the_peer_certificate_is_the_relays(identity: RelayIdentity) -> None:
    with relied_on("QuicConnection.get_peercert"):
        fresh = PacedQuicConnection(configuration=driver.configure(
            client_configuration(driver.ALPN, identity.fingerprint, None)))
        assert adapter.peer_certificate(fresh) is None  # no TLS context before connect()
        pair = Pair(identity)
        seen = adapter.peer_certificate(pair.client)
        assert seen is not None
        expected = Path(identity.cert_path).read_bytes()
        assert seen.public_bytes(serialization.Encoding.PEM) == expected
        assert adapter.peer_certificate(pair.relay) is None  # proxies present none


def test_closing_is_seen(identity: RelayIdentity) -> None:
    with relied_on("QuicConnection._close_event and _state"):
        pair = Pair(identity)
        assert not pair.client.is_closing()
        pair.client.close(error_code=0, reason_phrase="bye")
        pair.exchange()  # the close goes out: closing (then draining) on both sides
        assert pair.client.is_closing() and pair.relay.is_closing()


def test_our_side_of_a_stream_is_kept_until_ended(identity: RelayIdentity) -> None:
    with relied_on("QuicConnection.get_send_buffer_size"):
        pair = Pair(identity)
        stream_id = pair.client.get_next_available_stream_id()
        pair.client.send_stream_data(stream_id, b"x" * 1000)
        assert pair.client.has_stream(stream_id) and pair.client.unacked_bytes(stream_id) == 1000
        pair.exchange()
        assert pair.client.has_stream(stream_id) and pair.client.unacked_bytes(stream_id) == 0
        pair.client.send_stream_data(stream_id, b"", end_stream=True)
        pair.exchange()
        assert not pair.client.has_stream(stream_id)


def test_retry_tokens_and_packets() -> None:
    with relied_on("qh3.quic.packet's Retry functions"):
        tokens = RetryTokens()
        token = tokens.create(CLIENT_ADDR, b"original", b"retry-cid", now=1000.0)
        assert tokens.validate(CLIENT_ADDR, b"retry-cid", token, now=1010.0) == b"original"
        for address, cid, now in ((("127.0.0.2", 50000), b"retry-cid", 1010.0),
                                  (("127.0.0.1", 50001), b"retry-cid", 1010.0),
                                  (CLIENT_ADDR, b"other-cid", 1010.0),
                                  (CLIENT_ADDR, b"retry-cid", 1100.0),
                                  (CLIENT_ADDR, b"retry-cid", 990.0)):
            with pytest.raises(ValueError):
                tokens.validate(address, cid, token, now=now)
        with pytest.raises(ValueError):
            RetryTokens().validate(CLIENT_ADDR, b"retry-cid", token, now=1010.0)  # another process's key
        for forged in (b"", b"\x00" * 11, token[:-1], bytes([token[0] ^ 1]) + token[1:]):
            with pytest.raises(ValueError):
                tokens.validate(CLIENT_ADDR, b"retry-cid", forged, now=1010.0)
        packet = adapter.encode_retry(1, b"retry-cid", b"peer-cid!", b"original", token)
        header = adapter.parse_header(packet, 9)
        assert header.packet_type == QuicPacketType.RETRY and not adapter.is_initial(header)
        assert (header.destination_cid, header.source_cid, header.token) == (b"peer-cid!", b"retry-cid", token)
        with pytest.raises(ValueError):
            adapter.parse_header(b"\xc0", 8)


def test_an_initial_is_seen_as_one(identity: RelayIdentity) -> None:
    with relied_on("qh3.quic.packet.pull_quic_header on a client's first datagram"):
        client = PacedQuicConnection(configuration=driver.configure(
            client_configuration(driver.ALPN, identity.fingerprint, None)))
        client.connect(RELAY_ADDR, now=1000.0)
        first = client.datagrams_to_send(now=1000.0)[0][0]
        header = adapter.parse_header(first, 8)
        assert adapter.is_initial(header) and header.token == b"" and len(first) >= 1200


def test_the_peer_limits_are_seen(identity: RelayIdentity) -> None:
    with relied_on("QuicConnection._applied_transport_parameters"):
        pair = Pair(identity)
        assert adapter.peer_limits(pair.client) == PeerLimits(MAX_STREAMS, 103, 64 * STREAM_WINDOW_BYTES,
                                                              STREAM_WINDOW_BYTES)
