"""QUIC for PTTH's blocking style: qh3's sans-I/O connection driven by gevent.

qh3's `QuicConnection` (aioquic's API over a native core) does no I/O: it is
fed datagrams and the time, and says what to send and when to wake it. Here
one greenlet per UDP socket reads datagrams, in batches, and feeds each
connection its share at once; a greenlet per connection runs its timer; and
every stream is a `QuicStream` with blocking `read()` and `write()` for the
greenlets that copy bytes, as sockets have. Each connection sends what it has
once per turn of the event loop, in one batch (udp.py: GSO where Linux has
it). No asyncio event loop anywhere.

Flow control is ours, per stream, both ways (credit.py), because qh3 grants
QUIC credit as it hands bytes over, whether or not anyone reads them:

- Receiving: as the application reads a stream (`read_done`), its credit
  grows, and the grants due go out on our control stream once per turn of
  the event loop. A peer that sends past its credit is closed
  (`PacedQuicConnection.violation`). So at most STREAM_WINDOW_BYTES of a
  stream are unread in Python, and no stream waits for another: a slow
  reader slows its own stream's writer at the other end, through the relay,
  and nothing else.
- Sending: `QuicStream.write` never gives qh3 more than the peer's credit for
  the stream allows; it waits for the peer's next grant (which the peer's
  control stream brings, `_control_received`). So a proxy never reads more
  from its TCP socket than the stream has room for, and qh3 never holds more
  than a window of a stream unsent.

A connection the relay accepts starts *restricted* (`restrict`): one stream,
a hello's worth of bytes on it, and a small budget of datagram bytes in all,
so a peer that has not proved who it is cannot make the relay hold more than
that; a peer that goes past a limit is closed at once (`violation`).
`QuicPeer.trust` lifts that once the hello is accepted, and opens our control
stream (a proxy opens its own with `open_control` once the relay accepted its
hello). A peer's only unidirectional stream is its control stream.

The qh3 internals these need are all in quic_adapter.py (with a unit test
that names the qh3 version when an upgrade breaks them); the backpressure
test in `tests/e2e/test_quic_forwarding.py` and the exhaustion tests in
`tests/e2e/test_quic_exhaustion.py` check that the bounds hold end to end.
The relay's UDP socket, which decides what connections to accept, is in
endpoint.py.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import gevent.socket
from qh3.quic import events
from qh3.quic.configuration import QuicConfiguration

from ptth_lib.config.keys import DEFAULT_QUIC_MAX_DATAGRAM_SIZE, check_max_datagram_size
from ptth_lib.errors import PtthError
from ptth_lib.forward.limits import PIECE_BYTES
from ptth_lib.forward.quic.credit import CreditError, RecordReader, SendCredit
from ptth_lib.forward.quic.quic_adapter import STREAM_WINDOW_BYTES, PacedQuicConnection
from ptth_lib.forward.quic.udp import (
    MAX_DATAGRAM_BYTES,
    UdpSocket,
    new_socket,
    size_buffers,
)

logger = logging.getLogger(__name__)

# The protocol name both sides announce in the TLS handshake (spec 004): a relay or
# proxy of another protocol fails the handshake instead of misreading the streams.
ALPN = "ptth-quic-1"

# A PING every few seconds: far below common NAT timeouts for UDP (30 s and
# up), and it lets a peer that went silent count as gone after
# IDLE_TIMEOUT_SECS, so the connections through it close within seconds (a
# restarted relay cannot tell the proxies that their old connection is gone).
KEEPALIVE_SECS = 3.0
IDLE_TIMEOUT_SECS = 10.0

# Application error codes in RESET_STREAM / STOP_SENDING / CONNECTION_CLOSE.
ERROR_ABORTED = 1


class StreamBrokenError(PtthError, OSError):
    """The stream was reset by the peer or by us, or its connection closed."""


def configure(config: QuicConfiguration, max_datagram_size: int = DEFAULT_QUIC_MAX_DATAGRAM_SIZE) -> QuicConfiguration:
    """Our settings on a configuration from cert.py: ALPN, windows, idle timeout, packet size.

    `max_datagram_size` is the largest UDP payload we send (a config's,
    checked by config.keys.check_max_datagram_size); path MTU discovery does
    not go past it.
    """
    problem = check_max_datagram_size(max_datagram_size)
    if problem:
        raise ValueError(f"max_datagram_size {problem}")
    config.alpn_protocols = [ALPN]
    config.max_stream_data = STREAM_WINDOW_BYTES
    config.max_data = 64 * STREAM_WINDOW_BYTES
    config.idle_timeout = IDLE_TIMEOUT_SECS
    config.max_datagram_size = max_datagram_size
    return config


class QuicStream:
    """One bidirectional QUIC stream, read and written like a blocking socket."""

    def __init__(self, peer: QuicPeer, stream_id: int) -> None:
        self.peer = peer
        self.stream_id = stream_id
        self._chunks: deque[bytes] = deque()
        self._eof = False
        self.broken = ""
        self._readable = gevent.event.Event()
        self._writable = gevent.event.Event()
        self._writable.set()
        self._ended = False
        self._dropped = False  # aborted by us: what still arrives is dropped

    def read(self, max_bytes: int = PIECE_BYTES) -> bytes:
        """Up to max_bytes, waiting for at least one; b"" at the peer's end of stream."""
        while not self._chunks and not self._eof and not self.broken:
            self._readable.clear()
            self._readable.wait()
        if self._chunks:
            data = self._chunks.popleft()
            if len(data) > max_bytes:
                self._chunks.appendleft(data[max_bytes:])
                data = data[:max_bytes]
            self.peer.read_done(self.stream_id, len(data))
            return data
        if self.broken:
            raise StreamBrokenError(self.broken)
        return b""

    def write(self, data: bytes) -> None:
        """Send data, in pieces as the peer's credit for the stream allows, waiting for its grants."""
        credit = self.peer.send_credit
        while data:
            if self.broken:
                raise StreamBrokenError(self.broken)
            room = credit.room(self.stream_id)
            if room <= 0:
                self._writable.clear()
                self._writable.wait()
                continue
            piece, data = data[:room], data[room:]
            self.peer.quic.send_stream_data(self.stream_id, piece)
            credit.spend(self.stream_id, len(piece))
            self.peer.transmit()

    def end(self) -> None:
        """Our end of stream: the peer reads b"" after the last byte (a half-close)."""
        if not self._ended and not self.broken:
            self._ended = True
            self.peer.quic.send_stream_data(self.stream_id, b"", end_stream=True)
            self.peer.transmit()

    def abort(self, reason: str = "aborted") -> None:
        """Reset both directions; the peer's read() and write() raise StreamBrokenError."""
        if self.broken:
            return
        self._break(reason)
        self._chunks.clear()  # nobody will read them
        self._dropped = True
        self.peer.quic.credit.drop(self.stream_id)
        # Either may find the stream already finished or reset on qh3's side.
        with contextlib.suppress(Exception):
            self.peer.quic.reset_stream(self.stream_id, ERROR_ABORTED)
        with contextlib.suppress(Exception):
            self.peer.quic.stop_stream(self.stream_id, ERROR_ABORTED)
        self.peer.transmit()

    # called by QuicPeer

    def _received(self, data: bytes, end: bool) -> None:
        if self._dropped:
            self.peer.quic.credit.drop(self.stream_id)
            return
        if data:
            self._chunks.append(data)
        if end:
            self._eof = True
        self._readable.set()

    def _break(self, reason: str) -> None:
        if not self.broken:
            self.broken = reason
        self._readable.set()
        self._writable.set()


class QuicPeer:
    """One QUIC connection and its streams, driven by gevent."""

    def __init__(self, quic: PacedQuicConnection, send: Callable[[list[bytes], Any], None],
                 on_stream: Callable[[QuicStream], None] | None = None) -> None:
        self.quic = quic
        self._send = send
        self.on_stream = on_stream  # called in a new greenlet for each stream the peer opens
        self.streams: dict[int, QuicStream] = {}
        self.handshake_done = gevent.event.Event()
        self.trusted = gevent.event.Event()  # set by trust(): the peer proved who it is
        self.closed = gevent.event.Event()
        self.last_answer = time.monotonic()  # when the peer last acknowledged a PING of ours
        self.close_reason = ""
        self.on_cid: Callable[[bytes, bool], None] = lambda cid, issued: None
        self._highest_peer_stream = -1
        self.send_credit = SendCredit(STREAM_WINDOW_BYTES)  # what the peer lets us send, per stream
        self._records = RecordReader()  # the peer's control stream
        self._control_stream: int | None = None  # ours, once open_control
        self._flush_scheduled = False
        self._timer_changed = gevent.event.Event()
        self._timer = gevent.spawn(self._run_timer)
        self._keepalive = gevent.spawn(self._run_keepalive)
        self._greenlets = [self._timer, self._keepalive]  # killed when the connection ends

    def open_stream(self) -> QuicStream:
        """A new bidirectional stream of ours."""
        if self.closed.is_set():
            raise StreamBrokenError(self.close_reason or "connection closed")
        stream_id = self.quic.get_next_available_stream_id()
        # Sending nothing creates the stream in qh3, which takes the id: two
        # open_stream() calls before any write must not get the same one.
        self.quic.send_stream_data(stream_id, b"")
        stream = QuicStream(self, stream_id)
        self.streams[stream_id] = stream
        self.send_credit.track(stream_id)
        return stream

    def open_control(self) -> None:
        """Open our control stream, once the hello is accepted: our credit grants go on it (credit.py)."""
        if self._control_stream is None and not self.closed.is_set():
            self._control_stream = self.quic.get_next_available_stream_id(is_unidirectional=True)
            self.quic.send_stream_data(self._control_stream, b"")
            self.transmit()

    def own(self, greenlet: gevent.Greenlet) -> None:
        """Kill `greenlet` when the connection ends (at once if it has)."""
        self._greenlets.append(greenlet)
        if self.closed.is_set():
            greenlet.kill(block=False)

    def trust(self) -> None:
        """The peer proved who it is: lift the restriction on its streams and credit."""
        self.quic.lift_restriction()
        self.trusted.set()
        self.open_control()

    def ping(self) -> None:
        """A PING now: last_answer moves when the peer acknowledges it, if it is still there."""
        self.quic.send_ping(0)
        self.transmit()

    def datagrams_received(self, datagrams: list[bytes], addr: Any) -> None:
        """Datagrams from the peer, oldest first (one batch from the socket)."""
        if len(datagrams) == 1:
            self.quic.receive_datagram(datagrams[0], addr, now=time.monotonic())
        else:
            self.quic.receive_many_datagrams(datagrams, addr, now=time.monotonic())
        self._process()

    def read_done(self, stream_id: int, n: int) -> None:
        """The application read n bytes: a grant may be due, sent with the next flush."""
        self.quic.credit.read(stream_id, n)
        if self.quic.credit.due():
            self.transmit()

    def transmit(self) -> None:
        """Send what qh3 has ready, soon: once per turn of the event loop, in one batch.

        Every write, read and datagram may give qh3 something to send; so
        callers only mark the connection, and one flush per loop turn sends
        for all of them, as few system calls as the socket allows (udp.py).
        """
        if not self._flush_scheduled:
            self._flush_scheduled = True
            gevent.get_hub().loop.run_callback(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        credit = self.quic.credit
        if self._control_stream is not None and credit.due() and not self.quic.is_closing():
            self.quic.send_stream_data(self._control_stream, credit.grants())
        batch: list[bytes] = []
        to = None
        for data, addr in self.quic.datagrams_to_send(now=time.monotonic()):
            if batch and addr != to:
                self._send_batch(batch, to)
                batch = []
            batch.append(data)
            to = addr
        if batch:
            self._send_batch(batch, to)
        self._timer_changed.set()
        self._forget_finished()

    def _send_batch(self, datagrams: list[bytes], addr: Any) -> None:
        try:
            self._send(datagrams, addr)
        except OSError as e:  # e.g. the network is down: QUIC retransmits later
            logger.debug("sendto failed: %s", e)

    def close(self, reason: str = "closing") -> None:
        """Close the connection (the peer sees CONNECTION_CLOSE)."""
        if not self.quic.is_closing():
            self.quic.close(error_code=0, reason_phrase=reason[:100])
            self.transmit()
        self._terminated(reason)

    def _process(self) -> None:
        while not self.quic.violation and (event := self.quic.next_event()) is not None:
            if isinstance(event, events.StreamDataReceived):
                if event.stream_id & 2:
                    self._control_received(event.data, event.end_stream)
                    continue
                stream = self.streams.get(event.stream_id)
                if stream is None:
                    if event.stream_id <= self._highest_peer_stream or not self.quic._is_peer_stream(event.stream_id):
                        self.quic.forget(event.stream_id)  # late bytes of a stream we have finished with
                        continue
                    self._highest_peer_stream = event.stream_id
                    stream = QuicStream(self, event.stream_id)
                    self.streams[event.stream_id] = stream
                    self.send_credit.track(event.stream_id)
                    if self.on_stream is not None:
                        gevent.spawn(self.on_stream, stream)
                stream._received(event.data, event.end_stream)
            elif isinstance(event, events.StreamReset):
                if event.stream_id & 2:
                    self.quic.violate("reset its control stream")
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream._break("reset by the peer")
            elif isinstance(event, events.StopSendingReceived):
                if event.stream_id & 2:
                    self.quic.violate("stopped reading our control stream")
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream._break("the peer stopped reading")
            elif isinstance(event, events.PingAcknowledged):
                self.last_answer = time.monotonic()
            elif isinstance(event, events.HandshakeCompleted):
                self.handshake_done.set()
            elif isinstance(event, events.ConnectionIdIssued):
                self.on_cid(event.connection_id, True)
            elif isinstance(event, events.ConnectionIdRetired):
                self.on_cid(event.connection_id, False)
            elif isinstance(event, events.ConnectionTerminated):
                self._terminated(event.reason_phrase or f"closed (error {event.error_code})")
        if self.quic.violation and not self.closed.is_set():
            logger.info("quic peer closed: it %s", self.quic.violation)
            self.close(f"the peer {self.quic.violation}")
        self.transmit()

    def _control_received(self, data: bytes, end: bool) -> None:
        """Bytes of the peer's control stream (the adapter has checked it is that one): credit records."""
        try:
            for stream_id, max_offset in self._records.feed(data):
                if self.send_credit.grant(stream_id, max_offset):
                    stream = self.streams.get(stream_id)
                    if stream is not None:
                        stream._writable.set()
        except CreditError as e:
            self.quic.violate(str(e))
            return
        if end:
            self.quic.violate("ended its control stream")

    def _forget_finished(self) -> None:
        done = []
        for stream_id, stream in self.streams.items():
            if not self.quic.has_stream(stream_id) and (stream.broken or (stream._eof and not stream._chunks)):
                done.append(stream_id)  # over on both sides, and nothing of ours is left to send
        for stream_id in done:
            del self.streams[stream_id]
            self.quic.forget(stream_id)
            self.send_credit.forget(stream_id)

    def _run_keepalive(self) -> None:
        """A PING now and then, so NAT boxes keep the mapping and a dead peer is noticed."""
        while not self.closed.wait(KEEPALIVE_SECS):
            self.ping()

    def _run_timer(self) -> None:
        while not self.closed.is_set():
            deadline = self.quic.get_timer()
            self._timer_changed.clear()
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            if self._timer_changed.wait(timeout):
                continue  # re-armed: look at the new deadline
            self.quic.handle_timer(now=time.monotonic())
            self._process()

    def _terminated(self, reason: str) -> None:
        if self.closed.is_set():
            return
        self.close_reason = reason
        self.closed.set()
        for stream in list(self.streams.values()):
            stream._break(f"connection closed: {reason}")
        self.handshake_done.set()  # wake waiters; they check closed
        # block=False: the kills run after the flush already scheduled, which
        # sends our CONNECTION_CLOSE.
        for greenlet in self._greenlets:
            if greenlet is not gevent.getcurrent():
                greenlet.kill(block=False)


def connect(host: str, port: int, configuration: QuicConfiguration, timeout: float,
            on_stream: Callable[[QuicStream], None] | None = None) -> QuicPeer:
    """Open a QUIC connection to (host, port); raise OSError if no handshake within timeout."""
    infos = gevent.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    family, _, _, _, addr = infos[0]
    sock = new_socket(family)
    sock.connect(addr)
    udp = UdpSocket(sock)
    quic = PacedQuicConnection(configuration=configuration)
    peer = QuicPeer(quic, udp.send_batch, on_stream)

    def receive() -> None:
        try:
            while not peer.closed.is_set():
                try:
                    batch = udp.recv_batch()
                except ConnectionRefusedError:  # ICMP port unreachable: nothing listens there now
                    if peer.handshake_done.is_set():
                        peer.close("the relay is gone (port unreachable)")
                        break
                    gevent.sleep(0.2)  # still connecting: it may be starting
                    continue
                except OSError as e:
                    logger.debug("recv: %s", e)
                    gevent.sleep(0.2)
                    continue
                peer.datagrams_received([data for data, _ in batch], addr)
        finally:
            udp.close()

    peer.own(gevent.spawn(receive))  # a closed connection must not leave it waiting in recv()
    quic.connect(addr, now=time.monotonic())
    peer.transmit()
    if not peer.handshake_done.wait(timeout) or peer.closed.is_set():
        reason = peer.close_reason or f"no answer within {timeout:.0f} s"
        peer.close("handshake failed")
        raise OSError(f"QUIC handshake with {host}:{port} failed: {reason}")
    return peer


__all__ = ["ALPN", "MAX_DATAGRAM_BYTES", "QuicPeer", "QuicStream", "StreamBrokenError", "configure", "connect",
           "size_buffers"]
