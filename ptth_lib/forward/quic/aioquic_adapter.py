"""Everything PTTH relies on inside aioquic beyond its documented API, in one module.

aioquic's documented surface (`QuicConnection`'s public methods, events,
`QuicConfiguration`) drives a connection, but three things PTTH needs are
only reachable through aioquic's internals, so they all live here and nowhere
else in ptth_lib:

- Flow control (`PacedQuicConnection`). aioquic widens a stream's receive
  window as bytes *arrive*, read or not, and buffers whatever the sender gives
  it. PTTH grants credit as the application *reads* (`consumed`) and lets a
  writer see how much of its stream is unacknowledged (`unacked_bytes`), so
  that nothing buffers without bound. A connection the relay has not trusted
  yet is *restricted* (`restrict`, `lift_restriction`): one stream, a hello's
  worth of credit, no MAX_DATA growth, and a bounded TLS handshake. This
  overrides `_write_stream_limits`, `_write_connection_limits` and
  `_handle_crypto_frame`, and reads the local `Limit`s, `_streams`,
  `_state` and the stream sender's buffer offsets.
- The relay's certificate as the proxy saw it (`peer_certificate`), to check
  the pin: the TLS context's `_peer_certificate`.
- Retry (RFC 9000 8.1.2) at the relay's UDP socket (`parse_header`,
  `RetryTokens`, `encode_retry`): what aioquic's asyncio server does inside
  itself, from `aioquic.quic.packet` and `aioquic.quic.retry`.

And, for the tests that play hostile peers, `peer_limits` and
`pretend_peer_limits` read and overwrite the credit a peer announced.

aioquic is pinned (requirements.txt) at VERIFIED_VERSION. `problems()` lists
what an installed aioquic lacks of all this; tests/unit/test_aioquic_adapter.py
runs it and drives every behaviour above on in-memory connections, and fails
naming the installed aioquic version when an upgrade changes any of it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import aioquic
from aioquic._buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import (
    MAX_STREAM_DATA_FRAME_CAPACITY,
    QuicConnection,
    QuicConnectionError,
    QuicConnectionState,
    QuicReceiveContext,
)
from aioquic.quic.packet import (
    QuicErrorCode,
    QuicFrameType,
    QuicHeader,
    QuicPacketType,
    encode_quic_retry,
    pull_quic_header,
)
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.recovery import QuicPacketSpace
from aioquic.quic.retry import QuicRetryTokenHandler
from aioquic.quic.stream import QuicStream
from aioquic.tls import Context, State
from cryptography import x509

# The aioquic release every internal below was read in and tested against.
VERIFIED_VERSION = "1.7.2"
INSTALLED_VERSION: str = aioquic.__version__

# Bytes a stream may hold unread at the receiver: enough for a 100 MiB/s stream over a
# 10 ms round trip. The sending side's bound (driver.SEND_BUFFER_BYTES) matches it.
STREAM_WINDOW_BYTES = 1024 * 1024

# Streams a trusted peer may have open at once (aioquic's default, kept as it was).
MAX_STREAMS = 128

# TLS handshake bytes a client may send the relay in one encryption level. Its
# ClientHello is well under 2 KiB; aioquic alone lets a peer announce a 16 MiB
# handshake message and buffers (and copies, again and again) what arrives of it.
MAX_PEER_CRYPTO_BYTES = 16 * 1024


class PacedQuicConnection(QuicConnection):
    """A QuicConnection whose stream windows follow what the application has read."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.consumed: dict[int, int] = {}  # stream id -> bytes the application has read
        self.restricted = False
        self._window_bytes = STREAM_WINDOW_BYTES  # each stream's unread bytes, at most
        self._restricted_window_bytes = STREAM_WINDOW_BYTES
        self._small_window_streams: set[int] = set()  # the peer's streams opened while restricted
        uni = self._local_max_streams_uni  # no unidirectional streams, ever: PTTH uses none
        uni.value = uni.sent = 0

    def restrict(self, window_bytes: int, max_streams: int) -> None:
        """Before the first datagram: the peer gets max_streams and window_bytes of credit in all.

        The transport parameters say so, and nothing is raised until `lift_restriction`.
        """
        self.restricted = True
        self._window_bytes = self._restricted_window_bytes = window_bytes
        self._local_max_data.value = self._local_max_data.sent = window_bytes
        self._local_max_stream_data_bidi_remote = window_bytes
        self._local_max_streams_bidi.value = self._local_max_streams_bidi.sent = max_streams

    def lift_restriction(self) -> None:
        """The peer is trusted: full windows and MAX_STREAMS for the streams it opens from now on."""
        if not self.restricted:
            return
        self.restricted = False
        # Its streams so far (the hello's) keep their small window: nobody reads them any more.
        self._small_window_streams = {i for i in self._streams if self._is_peer_stream(i)}
        self._window_bytes = STREAM_WINDOW_BYTES
        # A new stream still starts with the small window of the transport parameters;
        # _write_stream_limits raises it in the first packet after the stream's first bytes.
        streams = self._local_max_streams_bidi
        streams.value = streams.used + MAX_STREAMS - self._open_peer_streams()
        self._local_max_data.value = self._local_max_data.used + self._configuration.max_data

    def unacked_bytes(self, stream_id: int) -> int:
        """Bytes given to the stream that the peer has not acknowledged yet."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        return int(stream.sender._buffer_stop - stream.sender._buffer_start)

    def has_stream(self, stream_id: int) -> bool:
        """Tell whether aioquic still keeps the stream (it lets go once both sides are done)."""
        return stream_id in self._streams

    def is_closing(self) -> bool:
        """Tell whether the connection is closing, draining or gone."""
        return self._state in (QuicConnectionState.CLOSING, QuicConnectionState.DRAINING,
                               QuicConnectionState.TERMINATED)

    def _open_peer_streams(self) -> int:
        return sum(1 for stream_id in self._streams if self._is_peer_stream(stream_id))

    def _is_peer_stream(self, stream_id: int) -> bool:
        """A bidirectional stream the peer opened (RFC 9000 2.1: bit 0 is the opener, bit 1 uni)."""
        return stream_id % 4 == (1 if self._is_client else 0)

    def _write_connection_limits(self, builder: QuicPacketBuilder, space: QuicPacketSpace) -> None:
        # aioquic doubles MAX_DATA whenever half of it has arrived; a restricted
        # connection keeps what its transport parameters gave.
        if not self.restricted:
            super()._write_connection_limits(builder, space)

    def _handle_crypto_frame(self, context: QuicReceiveContext, frame_type: int, buf: Buffer) -> None:
        if not self._is_client:
            start = buf.tell()
            end = buf.pull_uint_var() + buf.pull_uint_var()  # offset + length
            buf.seek(start)
            if end > MAX_PEER_CRYPTO_BYTES:
                raise QuicConnectionError(error_code=QuicErrorCode.CRYPTO_BUFFER_EXCEEDED,
                                          frame_type=frame_type, reason_phrase="handshake too long")
        super()._handle_crypto_frame(context, frame_type, buf)

    def _write_stream_limits(self, builder: QuicPacketBuilder, space: QuicPacketSpace,
                             stream: QuicStream) -> None:
        # aioquic's own version doubles the window as bytes arrive (unbounded
        # buffering for a slow reader); this one grants credit as bytes are
        # read, in steps of half a window. Adapted from aioquic 1.7.2.
        assert stream.stream_id is not None
        if stream.max_stream_data_local:
            window = self._window_bytes
            if stream.stream_id in self._small_window_streams:
                window = self._restricted_window_bytes
            target = self.consumed.get(stream.stream_id, 0) + window
            if target - stream.max_stream_data_local >= window // 2:
                stream.max_stream_data_local = target
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            buf = builder.start_frame(
                QuicFrameType.MAX_STREAM_DATA,
                capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
                handler=self._on_max_stream_data_delivery,
                handler_args=(stream,),
            )
            buf.push_uint_var(stream.stream_id)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local


def peer_certificate(connection: QuicConnection) -> x509.Certificate | None:
    """The leaf certificate the peer presented, once the handshake is complete; else None.

    QuicConnection sets `tls` only in connect() or on the first datagram, and
    tls.Context keeps the peer's leaf certificate as `_peer_certificate`, set
    on the Certificate message and checked against CertificateVerify before
    the handshake can reach a POST_HANDSHAKE state.
    """
    context = getattr(connection, "tls", None)
    if context is None or context.state not in (State.CLIENT_POST_HANDSHAKE, State.SERVER_POST_HANDSHAKE):
        return None
    cert: x509.Certificate | None = context._peer_certificate
    return cert


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
    """Retry tokens sealed with a key of this process's: bound to an address, valid 30 s."""

    def __init__(self) -> None:
        self._handler = QuicRetryTokenHandler()

    def create(self, address: Any, original_cid: bytes, retry_cid: bytes, now: float) -> bytes:
        """A token for a peer at `address` whose first Initial went to `original_cid`."""
        return self._handler.create_token(address=address, original_destination_connection_id=original_cid,
                                          retry_source_connection_id=retry_cid, now=now)

    def validate(self, address: Any, destination_cid: bytes, token: bytes, now: float) -> bytes:
        """The original connection id a token was made for; ValueError if forged, expired or misdirected."""
        return self._handler.validate_token(address=address, destination_cid=destination_cid, token=token,
                                            now=now)


# ---- for the tests that play hostile peers ---------------------------------------------------

@dataclass(frozen=True)
class PeerLimits:
    """The credit a peer announced to us: what we may open and send."""

    streams_bidi: int
    streams_uni: int
    max_data: int
    max_stream_data_bidi_remote: int  # for each stream we open


def peer_limits(connection: QuicConnection) -> PeerLimits:
    """What the peer has let us open and send so far."""
    c = connection
    return PeerLimits(c._remote_max_streams_bidi, c._remote_max_streams_uni, c._remote_max_data,
                      c._remote_max_stream_data_bidi_remote)


def pretend_peer_limits(connection: QuicConnection, limits: PeerLimits) -> None:
    """Act as if the peer had announced `limits` (a misbehaving peer ignoring what it was given)."""
    c = connection
    c._remote_max_streams_bidi = limits.streams_bidi
    c._remote_max_streams_uni = limits.streams_uni
    c._remote_max_data = limits.max_data
    c._remote_max_stream_data_bidi_remote = limits.max_stream_data_bidi_remote


# ---- what an aioquic upgrade could break -----------------------------------------------------

# Methods we override or call that aioquic does not document, with their parameter names.
_METHODS: dict[tuple[type, str], tuple[str, ...]] = {
    (QuicConnection, "_write_stream_limits"): ("self", "builder", "space", "stream"),
    (QuicConnection, "_write_connection_limits"): ("self", "builder", "space"),
    (QuicConnection, "_handle_crypto_frame"): ("self", "context", "frame_type", "buf"),
    (QuicConnection, "_on_max_stream_data_delivery"): ("self", "delivery", "stream"),
    (QuicRetryTokenHandler, "create_token"): ("self", "address", "original_destination_connection_id",
                                              "retry_source_connection_id", "now"),
    (QuicRetryTokenHandler, "validate_token"): ("self", "address", "destination_cid", "token", "now"),
}
_FUNCTIONS: dict[str, tuple[Any, tuple[str, ...]]] = {
    "pull_quic_header": (pull_quic_header, ("buf", "host_cid_length")),
    "encode_quic_retry": (encode_quic_retry, ("version", "source_cid", "destination_cid",
                                              "original_destination_cid", "retry_token", "unused")),
}
# Attributes of a fresh QuicConnection (client and server) we read or write.
_CONNECTION_ATTRIBUTES = ("_streams", "_state", "_configuration", "_is_client", "_local_max_data",
                          "_local_max_streams_bidi", "_local_max_streams_uni",
                          "_local_max_stream_data_bidi_remote", "_remote_max_streams_bidi",
                          "_remote_max_streams_uni", "_remote_max_data", "_remote_max_stream_data_bidi_remote")
_LIMIT_ATTRIBUTES = ("value", "sent", "used")
_STREAM_ATTRIBUTES = ("max_stream_data_local", "max_stream_data_local_sent", "stream_id", "sender")
_SENDER_ATTRIBUTES = ("_buffer_start", "_buffer_stop")
_CLOSING_STATES = ("CLOSING", "DRAINING", "TERMINATED")
_TLS_STATES = ("CLIENT_POST_HANDSHAKE", "SERVER_POST_HANDSHAKE")


def problems() -> list[str]:
    """What the installed aioquic lacks of the internals this module relies on; [] if nothing.

    It checks that names exist and signatures match; the behaviour is the unit test's.
    """
    found: list[str] = []
    for (owner, name), parameters in _METHODS.items():
        found += _signature_problems(f"{owner.__name__}.{name}", getattr(owner, name, None), parameters)
    for name, (function, parameters) in _FUNCTIONS.items():
        found += _signature_problems(name, function, parameters)
    if not isinstance(MAX_STREAM_DATA_FRAME_CAPACITY, int):
        found.append("aioquic.quic.connection.MAX_STREAM_DATA_FRAME_CAPACITY is not an int")
    found += [f"QuicConnectionState.{s} is missing" for s in _CLOSING_STATES if not hasattr(QuicConnectionState, s)]
    found += [f"tls.State.{s} is missing" for s in _TLS_STATES if not hasattr(State, s)]
    if "_peer_certificate" not in vars(Context(is_client=True)):
        found.append("tls.Context has no _peer_certificate")
    connection = QuicConnection(configuration=QuicConfiguration(is_client=True))
    found += [f"QuicConnection has no {a}" for a in _CONNECTION_ATTRIBUTES if not hasattr(connection, a)]
    for limit in ("_local_max_data", "_local_max_streams_bidi", "_local_max_streams_uni"):
        value = getattr(connection, limit, None)
        found += [f"QuicConnection.{limit} has no {a}" for a in _LIMIT_ATTRIBUTES if not hasattr(value, a)]
    stream = QuicStream(stream_id=0, max_stream_data_local=1, max_stream_data_remote=1)
    found += [f"QuicStream has no {a}" for a in _STREAM_ATTRIBUTES if not hasattr(stream, a)]
    found += [f"QuicStream.sender has no {a}" for a in _SENDER_ATTRIBUTES if not hasattr(stream.sender, a)]
    return sorted(set(found))


def _signature_problems(name: str, function: Any, parameters: tuple[str, ...]) -> list[str]:
    if function is None:
        return [f"{name} is missing"]
    got = tuple(inspect.signature(function).parameters)
    if got != parameters:
        return [f"{name} takes {got}, not {parameters}"]
    return []

