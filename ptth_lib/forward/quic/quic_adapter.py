"""Everything PTTH relies on inside qh3 beyond its documented API, in one module.

qh3 (an aioquic fork whose connection core is native) has aioquic's sans-I/O
`QuicConnection` API; PTTH drives it from gevent (driver.py). What PTTH needs
beyond that API lives here and nowhere else in ptth_lib:

- Receive flow control (`PacedQuicConnection`). qh3's core grants a stream
  QUIC credit as it hands the stream's bytes to Python (a `stream_data`
  event popped from the core), not as the application reads them, and it has
  no hook to change that. So the bound is PTTH's own per-stream credit
  (credit.py, sent on a control stream by driver.QuicPeer): the core is
  wrapped (`_CountingCore`) to count each stream's bytes as it hands them
  out, and a peer that sends past the credit granted for a stream is a
  `violation` (the driver closes the connection at once). Every event is
  taken as soon as it comes; no stream waits for another. What holds, per
  stream: at most STREAM_WINDOW_BYTES received and unread in Python, and, from
  a peer that keeps to its credit, nothing more in qh3's core (it can only
  hold bytes sent within that credit and not handed out yet); from one that
  does not, at most `max_stream_data` (= STREAM_WINDOW_BYTES,
  driver.configure) more per stream, `max_data` per connection, until the
  events that show it are taken (at once). tests/unit/test_quic_adapter.py
  checks this on connections in memory, tests/unit/test_quic_credit.py the
  credit itself, and the e2e backpressure and fairness tests
  (tests/e2e/test_quic_forwarding.py) both end to end.
- Send flow control (`unacked_bytes`): the bytes of a stream qh3 holds that
  it has not sent yet (`get_send_buffer_size`). The driver's writers keep to
  the peer's credit, so this is at most a window per stream.
- A connection the relay has not trusted yet (`restrict`, `lift_restriction`).
  qh3 announces fixed stream counts (100 bidirectional, 103 unidirectional)
  and its windows cannot be raised later, so a restricted connection is
  bounded by what it is fed instead: at most UNTRUSTED_DATAGRAM_BYTES of UDP
  payload in all (every handshake byte, stream byte and out-of-order byte its
  core can hold comes out of that: this bounds the TLS handshake too), one
  bidirectional stream, `window_bytes` on it. A peer that goes past any of
  these is a protocol `violation`: the driver closes the connection at once.
  A peer's one unidirectional stream is its control stream (the first it may
  open: `peer_control_stream`), once trusted; bytes on it before, or on any
  other unidirectional stream, are a violation.
- The relay's certificate as the proxy saw it (`peer_certificate`, from
  `QuicConnection.get_peercert`), to check the pin.
- Retry (RFC 9000 8.1.2) at the relay's UDP socket (`parse_header`,
  `RetryTokens`, `encode_retry`). qh3's own retry token handler decrypts
  every token with RSA-2048 (a millisecond of CPU per forged Initial) and
  never expires one, so tokens are PTTH's: AES-GCM with a per-process key,
  bound to the address and the Retry's connection id, valid RETRY_TOKEN_SECS.

And, for the tests, `peer_limits` reads the credit a peer announced.

qh3 is pinned (requirements.txt) at VERIFIED_VERSION. `problems()` lists what
an installed qh3 lacks of all this; tests/unit/test_quic_adapter.py runs it
and drives every behaviour above on in-memory connections, and fails naming
the installed qh3 version when an upgrade changes any of it.
"""

from __future__ import annotations

import inspect
import ipaddress
import os
import struct
from dataclasses import dataclass
from typing import Any

import qh3
from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from qh3._hazmat import Buffer
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection, QuicConnectionError, QuicConnectionState
from qh3.quic.packet import (
    QuicErrorCode,
    QuicHeader,
    QuicPacketType,
    encode_quic_retry,
    pull_quic_header,
)

from ptth_lib.forward.quic.credit import WINDOW, CreditError, ReceiveCredit

# The qh3 release every internal below was read in and tested against.
VERIFIED_VERSION = "2.1.0"
INSTALLED_VERSION: str = qh3.__version__

# Bytes a stream may hold unread at the receiver: PTTH's credit window (credit.WINDOW),
# and the window qh3 announces on top of it (driver.configure).
STREAM_WINDOW_BYTES = WINDOW

# Bidirectional streams a peer may have open at once: qh3 announces 100, fixed.
MAX_STREAMS = 100

# UDP payload a connection the relay has not trusted yet may send it, in all: an honest
# proxy's handshake (two Initials with a post-quantum key share, its Finished, ACKs) and
# its hello (at most 4 KiB) take about 10 KiB, with retransmissions and keepalive PINGs
# while it waits for the answer well under this. It bounds every byte qh3 can buffer for
# the connection (handshake, streams, out of order) before the hello is accepted.
UNTRUSTED_DATAGRAM_BYTES = 64 * 1024

# How long a Retry token is valid: a round trip, with a wide margin.
RETRY_TOKEN_SECS = 30.0


class _CountingCore:
    """qh3's native core, counting each stream's bytes as it hands them out (`_delivered`).

    QuicConnection reads events with `_core.next_event()`; every other
    attribute is the core's. Once the peer is a `violation`, it hands out
    nothing more: the driver closes the connection.
    """

    def __init__(self, core: Any, connection: PacedQuicConnection) -> None:
        self._core = core
        self._connection = connection

    def __getattr__(self, name: str) -> Any:
        return getattr(self._core, name)

    def next_event(self) -> tuple[Any, ...] | None:
        c = self._connection
        if c.violation:
            return None
        event: tuple[Any, ...] | None = self._core.next_event()
        if event is not None and event[0] == "stream_data":
            c._delivered(event[1], len(event[2]))
        return event


class PacedQuicConnection(QuicConnection):
    """A QuicConnection whose peer may send no more on a stream than PTTH's credit grants (credit.py)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.credit = ReceiveCredit(STREAM_WINDOW_BYTES)  # what the peer may send on each stream
        self.violation = ""  # why the peer must be closed (it went past a limit); "" if it did not
        self.restricted = False
        self._restricted_window_bytes = STREAM_WINDOW_BYTES
        self._restricted_streams = MAX_STREAMS
        self._datagram_budget = 0  # UDP payload a restricted connection may still send
        self._send_closed: set[int] = set()  # streams whose sending side we ended or reset
        # The peer's control stream (credit.py): its first unidirectional stream, the only one it may use.
        self.peer_control_stream = 3 if self._is_client else 2
        self.control_bytes = 0  # bytes received on it

    # ---- the untrusted peer ----

    def restrict(self, window_bytes: int, max_streams: int,
                 datagram_bytes: int = UNTRUSTED_DATAGRAM_BYTES) -> None:
        """Before the first datagram: the peer may send datagram_bytes in all, on max_streams streams,
        window_bytes on each, until `lift_restriction`; past any of these, `violation` says so."""
        self.restricted = True
        self._restricted_window_bytes = window_bytes
        self._restricted_streams = max_streams
        self._datagram_budget = datagram_bytes

    def lift_restriction(self) -> None:
        """The peer is trusted: its credit, MAX_STREAMS and its control stream, no datagram budget."""
        self.restricted = False

    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None:
        if self.restricted:
            self._datagram_budget -= len(data)
            if self._datagram_budget < 0:
                self.violate("sent too much before its hello")
                return
        if not self.violation:
            super().receive_datagram(data, addr, now)

    def receive_many_datagrams(self, datagrams: list[bytes], addr: Any, now: float) -> None:
        if self.restricted:  # rare (a handshake); one at a time, counted
            for data in datagrams:
                self.receive_datagram(data, addr, now)
        elif not self.violation:
            super().receive_many_datagrams(datagrams, addr, now)

    # ---- what the peer sends, against its credit ----

    def _create_core(self, remote_addr: Any, initial_dcid: bytes, now: float) -> None:
        super()._create_core(remote_addr, initial_dcid, now)
        self._core = _CountingCore(self._core, self)  # type: ignore[assignment]

    def _delivered(self, stream_id: int, n: int) -> None:
        """qh3's core handed n bytes of a stream to us (called by _CountingCore)."""
        if stream_id & 2:
            if self.restricted:
                self.violate("opened a unidirectional stream before its hello")
            elif stream_id != self.peer_control_stream:
                self.violate("sent on a unidirectional stream other than its control stream")
            self.control_bytes += n
            return
        try:
            self.credit.receive(stream_id, n)
        except CreditError as e:
            self.violate(str(e))
            return
        if self.restricted:
            peer_streams = sum(1 for s in self.credit.received if self._is_peer_stream(s))
            if peer_streams > self._restricted_streams:
                self.violate("opened more streams than allowed before its hello")
            elif self.credit.received[stream_id] > self._restricted_window_bytes:
                self.violate("sent more than a hello before it was answered")

    def forget(self, stream_id: int) -> None:
        """The stream is over on both sides: drop its counts."""
        self.credit.forget(stream_id)
        self._send_closed.discard(stream_id)

    # ---- sending ----

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        """qh3's, without parsing every packet's header for a qlog nobody keeps (a sixth of the
        relay's CPU at 75 MiB/s)."""
        core = self._core
        if core is None or self._quic_logger is not None:
            return super().datagrams_to_send(now)
        poll = core._core.poll_transmit if isinstance(core, _CountingCore) else core.poll_transmit
        datagrams = []
        try:
            while (transmit := poll(now)) is not None:
                datagrams.append((transmit[0], transmit[1]))
        except RuntimeError as e:  # what QuicConnection._call_core turns into QuicConnectionError
            raise QuicConnectionError(QuicErrorCode.INTERNAL_ERROR, None, str(e)) from e
        return datagrams

    def send_stream_data(self, stream_id: int, data: Any, end_stream: bool = False) -> None:
        super().send_stream_data(stream_id, data, end_stream)
        if end_stream:
            self._send_closed.add(stream_id)

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        self._send_closed.add(stream_id)
        super().reset_stream(stream_id, error_code)

    def unacked_bytes(self, stream_id: int) -> int:
        """Bytes given to the stream that qh3 has not sent yet (sent bytes wait for the peer's credit)."""
        return self.get_send_buffer_size(stream_id)

    def has_stream(self, stream_id: int) -> bool:
        """Tell whether our side of the stream may still send: not ended nor reset, or bytes still queued."""
        return stream_id not in self._send_closed or self.get_send_buffer_size(stream_id) > 0

    def is_closing(self) -> bool:
        """Tell whether the connection is closing, draining or gone."""
        return self._close_event is not None or self._state == QuicConnectionState.TERMINATED

    def violate(self, reason: str) -> None:
        """The peer broke a rule: `violation` says which (the first), and the driver closes the connection."""
        if not self.violation:
            self.violation = reason

    def _is_peer_stream(self, stream_id: int) -> bool:
        """A bidirectional stream the peer opened (RFC 9000 2.1: bit 0 is the opener, bit 1 uni)."""
        return stream_id % 4 == (1 if self._is_client else 0)


def peer_certificate(connection: QuicConnection) -> x509.Certificate | None:
    """The leaf certificate the peer presented, once the handshake is complete; else None.

    qh3 keeps the peer's leaf as the TLS context's peer_certificate, set on the
    Certificate message and checked against CertificateVerify before the
    handshake can complete.
    """
    if not getattr(connection, "_handshake_complete", False):
        return None
    cert = connection.get_peercert()
    return None if cert is None else x509.load_der_x509_certificate(cert.public_bytes())


# ---- Retry, at the relay's UDP socket ---------------------------------------------------------

def parse_header(datagram: bytes, cid_length: int) -> QuicHeader:
    """The header of a datagram's first packet (raises ValueError if it is not a QUIC packet)."""
    return pull_quic_header(Buffer(data=datagram), host_cid_length=cid_length)


def is_initial(header: QuicHeader) -> bool:
    """Tell whether a packet header (parse_header's) is a long-header Initial."""
    return bool(header.packet_type == QuicPacketType.INITIAL)


def encode_retry(version: int, source_cid: bytes, destination_cid: bytes, original_destination_cid: bytes,
                 token: bytes) -> bytes:
    """A Retry packet (RFC 9000 17.2.5) carrying `token`."""
    return encode_quic_retry(version=version, source_cid=source_cid, destination_cid=destination_cid,
                             original_destination_cid=original_destination_cid, retry_token=token)


class RetryTokens:
    """Retry tokens sealed with a key of this process's: bound to an address, valid RETRY_TOKEN_SECS.

    A token is a nonce and, sealed with AES-GCM, the time it was made and the
    original connection id; the address and the Retry's connection id are its
    associated data, so a token used from elsewhere or for another Retry fails.
    """

    def __init__(self) -> None:
        self._aead = AESGCM(AESGCM.generate_key(bit_length=128))

    def create(self, address: Any, original_cid: bytes, retry_cid: bytes, now: float) -> bytes:
        """A token for a peer at `address` whose first Initial went to `original_cid`."""
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, struct.pack("!d", now) + original_cid, _bound_to(address, retry_cid))
        return nonce + sealed

    def validate(self, address: Any, destination_cid: bytes, token: bytes, now: float) -> bytes:
        """The original connection id a token was made for; ValueError if forged, expired or misdirected."""
        try:
            plain = self._aead.decrypt(token[:12], token[12:], _bound_to(address, destination_cid))
        except (InvalidTag, ValueError):
            raise ValueError("invalid retry token") from None
        (made,) = struct.unpack("!d", plain[:8])
        if not made <= now <= made + RETRY_TOKEN_SECS:
            raise ValueError("expired retry token")
        return plain[8:]


def _bound_to(address: Any, cid: bytes) -> bytes:
    ip = ipaddress.ip_address(address[0]).packed
    return bytes([len(ip)]) + ip + struct.pack("!H", address[1]) + cid


# ---- for the tests -----------------------------------------------------------------------------

@dataclass(frozen=True)
class PeerLimits:
    """The credit a peer announced to us: what we may open and send."""

    streams_bidi: int
    streams_uni: int
    max_data: int
    max_stream_data_bidi_remote: int  # for each stream we open


def peer_limits(connection: QuicConnection) -> PeerLimits:
    """What the peer announced in its transport parameters (qh3 keeps them as it applied them)."""
    p = connection._applied_transport_parameters
    if p is None:
        return PeerLimits(0, 0, 0, 0)
    return PeerLimits(p.initial_max_streams_bidi or 0, p.initial_max_streams_uni or 0, p.initial_max_data or 0,
                      p.initial_max_stream_data_bidi_remote or 0)


# ---- what a qh3 upgrade could break ------------------------------------------------------------

# Methods we override or call that qh3 does not document, with their parameter names.
_METHODS: dict[tuple[type, str], tuple[str, ...]] = {
    (QuicConnection, "_create_core"): ("self", "remote_addr", "initial_dcid", "now"),
    (QuicConnection, "_drain_core"): ("self",),
    (QuicConnection, "receive_datagram"): ("self", "data", "addr", "now"),
    (QuicConnection, "receive_many_datagrams"): ("self", "datagrams", "addr", "now"),
    (QuicConnection, "send_stream_data"): ("self", "stream_id", "data", "end_stream"),
    (QuicConnection, "reset_stream"): ("self", "stream_id", "error_code"),
    (QuicConnection, "get_send_buffer_size"): ("self", "stream_id"),
    (QuicConnection, "datagrams_to_send"): ("self", "now"),
}
_FUNCTIONS: dict[str, tuple[Any, tuple[str, ...]]] = {
    "pull_quic_header": (pull_quic_header, ("buf", "host_cid_length")),
    "encode_quic_retry": (encode_quic_retry, ("version", "source_cid", "destination_cid",
                                              "original_destination_cid", "retry_token", "unused")),
}
# Attributes of a fresh QuicConnection we read.
_CONNECTION_ATTRIBUTES = ("_core", "_state", "_close_event", "_is_client", "_handshake_complete",
                          "_applied_transport_parameters", "_quic_logger")
_CLOSING_STATES = ("TERMINATED",)


def problems() -> list[str]:
    """What the installed qh3 lacks of the internals this module relies on; [] if nothing.

    It checks that names exist and signatures match; the behaviour is the unit test's.
    """
    found: list[str] = []
    for (owner, name), parameters in _METHODS.items():
        found += _signature_problems(f"{owner.__name__}.{name}", getattr(owner, name, None), parameters)
    for name, (function, parameters) in _FUNCTIONS.items():
        found += _signature_problems(name, function, parameters)
    found += [f"QuicConnectionState.{s} is missing" for s in _CLOSING_STATES if not hasattr(QuicConnectionState, s)]
    connection = QuicConnection(configuration=QuicConfiguration(is_client=True))
    found += [f"QuicConnection has no {a}" for a in _CONNECTION_ATTRIBUTES if not hasattr(connection, a)]
    return sorted(set(found))


def _signature_problems(name: str, function: Any, parameters: tuple[str, ...]) -> list[str]:
    if function is None:
        return [f"{name} is missing"]
    got = tuple(inspect.signature(function).parameters)
    if got != parameters:
        return [f"{name} takes {got}, not {parameters}"]
    return []
