"""Tests for ptth_lib.forward.quic.aioquic_adapter: what PTTH relies on inside aioquic, checked.

Every aioquic internal PTTH uses is in aioquic_adapter.py; these tests fail
when an aioquic upgrade breaks one, naming the installed aioquic version:
first that the names and signatures are there (`problems()`), then the
behaviour, on two connections in memory with datagrams passed by hand and a
fake clock: credit granted as the application reads, a restricted
connection's credit, the handshake bound, the peer's certificate, Retry.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from aioquic._buffer import Buffer
from aioquic.quic import events
from aioquic.quic.connection import QuicConnectionError
from aioquic.quic.packet import QuicErrorCode, QuicFrameType, QuicPacketType
from cryptography.hazmat.primitives import serialization

from ptth_lib.forward.quic import aioquic_adapter as adapter
from ptth_lib.forward.quic import driver
from ptth_lib.forward.quic.aioquic_adapter import (
    INSTALLED_VERSION,
    MAX_PEER_CRYPTO_BYTES,
    STREAM_WINDOW_BYTES,
    VERIFIED_VERSION,
    PacedQuicConnection,
    PeerLimits,
    RetryTokens,
)
from ptth_lib.forward.quic.cert import (
    RelayIdentity,
    client_configuration,
    load_or_create,
    server_configuration,
)

CLIENT_ADDR = ("127.0.0.1", 50000)
RELAY_ADDR = ("127.0.0.1", 30380)
MiB = 1024 * 1024


@contextmanager
def relied_on(what: str) -> Iterator[None]:
    """Turn any failure inside into one that names aioquic, its version, and what broke."""
    try:
        yield
    except Exception as e:  # AssertionError too: the message must say it is aioquic's doing
        raise AssertionError(f"aioquic {INSTALLED_VERSION} (PTTH was verified with {VERIFIED_VERSION}): {what} "
                             f"no longer works as ptth_lib/forward/quic/aioquic_adapter.py expects: "
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
        """The relay's application reads all it was given (what QuicPeer.read_done records)."""
        self.relay.consumed[stream_id] = self.received.get(stream_id, 0)


def test_every_internal_relied_on_is_there() -> None:
    with relied_on("the names and signatures listed in aioquic_adapter._METHODS and the rest"):
        assert adapter.problems() == []


def test_credit_is_granted_as_the_application_reads(identity: RelayIdentity) -> None:
    with relied_on("PacedQuicConnection._write_stream_limits (credit as the application reads)"):
        pair = Pair(identity)
        stream_id = pair.client.get_next_available_stream_id()
        data = b"\x5a" * (3 * MiB)
        pair.client.send_stream_data(stream_id, data, end_stream=True)
        pair.exchange()
        # Nobody reads: exactly one window arrives, however long the sender waits.
        assert pair.received[stream_id] == STREAM_WINDOW_BYTES
        assert pair.client.unacked_bytes(stream_id) == len(data) - STREAM_WINDOW_BYTES
        pair.now += 5
        pair.exchange()
        assert pair.received[stream_id] == STREAM_WINDOW_BYTES
        # Reading makes room for one more window, no more.
        pair.read_all(stream_id)
        pair.exchange()
        assert pair.received[stream_id] == 2 * STREAM_WINDOW_BYTES
        pair.read_all(stream_id)
        pair.exchange()
        assert pair.received[stream_id] == len(data)
        assert pair.client.unacked_bytes(stream_id) == 0  # all acknowledged


def test_a_restricted_connection_gets_its_credit_and_no_more_until_lifted(identity: RelayIdentity) -> None:
    with relied_on("PacedQuicConnection.restrict / lift_restriction and _write_connection_limits"):
        window = 4099
        pair = Pair(identity, restrict=(window, 1))
        assert adapter.peer_limits(pair.client) == PeerLimits(1, 0, window, window)
        stream_id = pair.client.get_next_available_stream_id()
        pair.client.send_stream_data(stream_id, b"\x01" * 10000)
        pair.exchange()
        assert pair.received[stream_id] == window
        pair.read_all(stream_id)  # reading a restricted connection's stream raises nothing in all
        pair.exchange()
        assert pair.received[stream_id] == window
        assert adapter.peer_limits(pair.client).max_data == window
        pair.relay.lift_restriction()
        pair.exchange()
        lifted = adapter.peer_limits(pair.client)
        assert lifted.streams_bidi > 100 and lifted.max_data > MiB and lifted.streams_uni == 0
        # A new stream gets a full window as soon as the relay sees it.
        second = pair.client.get_next_available_stream_id()
        pair.client.send_stream_data(second, b"\x02" * (2 * MiB))
        pair.exchange()
        assert pair.received[second] == STREAM_WINDOW_BYTES


def test_a_client_never_gets_unidirectional_streams(identity: RelayIdentity) -> None:
    with relied_on("PacedQuicConnection's zero local_max_streams_uni"):
        assert adapter.peer_limits(Pair(identity).client).streams_uni == 0


def test_a_handshake_longer_than_the_bound_is_refused(identity: RelayIdentity) -> None:
    with relied_on("PacedQuicConnection._handle_crypto_frame"):
        relay = PacedQuicConnection(configuration=driver.configure(server_configuration(driver.ALPN, identity)),
                                    original_destination_connection_id=b"\x00" * 8)
        buf = Buffer(capacity=16)
        buf.push_uint_var(MAX_PEER_CRYPTO_BYTES)  # offset
        buf.push_uint_var(1)  # length: one byte past the bound
        buf.seek(0)
        with pytest.raises(QuicConnectionError) as caught:
            relay._handle_crypto_frame(None, QuicFrameType.CRYPTO, buf)  # type: ignore[arg-type]
        assert caught.value.error_code == QuicErrorCode.CRYPTO_BUFFER_EXCEEDED


def test_the_peer_certificate_is_the_relays(identity: RelayIdentity) -> None:
    with relied_on("tls.Context._peer_certificate"):
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
    with relied_on("QuicConnection._state"):
        pair = Pair(identity)
        assert not pair.client.is_closing()
        pair.client.close(error_code=0, reason_phrase="bye")
        pair.exchange()  # the close goes out: closing (then draining) on both sides
        assert pair.client.is_closing() and pair.relay.is_closing()


def test_retry_tokens_and_packets() -> None:
    with relied_on("aioquic.quic.retry.QuicRetryTokenHandler and aioquic.quic.packet's Retry functions"):
        tokens = RetryTokens()
        token = tokens.create(CLIENT_ADDR, b"original", b"retry-cid", now=1000.0)
        assert tokens.validate(CLIENT_ADDR, b"retry-cid", token, now=1010.0) == b"original"
        for address, cid, now in ((("127.0.0.2", 50000), b"retry-cid", 1010.0),
                                  (CLIENT_ADDR, b"other-cid", 1010.0),
                                  (CLIENT_ADDR, b"retry-cid", 1100.0)):
            with pytest.raises(ValueError):
                tokens.validate(address, cid, token, now=now)
        with pytest.raises(ValueError):
            RetryTokens().validate(CLIENT_ADDR, b"retry-cid", token, now=1010.0)  # another process's key
        packet = adapter.encode_retry(1, b"retry-cid", b"peer-cid!", b"original", token)
        header = adapter.parse_header(packet, 9)
        assert header.packet_type == QuicPacketType.RETRY and not adapter.is_initial(header)
        assert (header.destination_cid, header.source_cid, header.token) == (b"peer-cid!", b"retry-cid", token)
        with pytest.raises(ValueError):
            adapter.parse_header(b"\xc0", 8)


def test_an_initial_is_seen_as_one(identity: RelayIdentity) -> None:
    with relied_on("aioquic.quic.packet.pull_quic_header on a client's first datagram"):
        client = PacedQuicConnection(configuration=driver.configure(
            client_configuration(driver.ALPN, identity.fingerprint, None)))
        client.connect(RELAY_ADDR, now=1000.0)
        first = client.datagrams_to_send(now=1000.0)[0][0]
        header = adapter.parse_header(first, 8)
        assert adapter.is_initial(header) and header.token == b"" and len(first) >= 1200


def test_the_peer_limits_can_be_faked(identity: RelayIdentity) -> None:
    with relied_on("QuicConnection._remote_max_* (what a hostile peer test overwrites)"):
        pair = Pair(identity, restrict=(4099, 1))
        pretended = PeerLimits(64, 0, 1 << 30, MiB)
        adapter.pretend_peer_limits(pair.client, pretended)
        assert adapter.peer_limits(pair.client) == pretended
