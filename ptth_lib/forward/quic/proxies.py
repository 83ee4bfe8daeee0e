"""TCP port forwarding over QUIC (spec 004): the two proxies and what they share.

Each proxy keeps one QUIC connection to the QUIC relay (quic_relay.py) and
proves who it is on the first stream it opens (a `PeerHello` tip, with the
same key and name as on the HTTP side). After that every forwarded TCP
connection is one bidirectional QUIC stream:

- the client proxy (`QuicForwardClient`, ptth_quic_client.py) accepts a TCP
  connection on a local port, opens a stream with a `ClientConnect` tip, and
  waits for the relay's `Answer`;
- the server proxy (`QuicEndServer`, in ptth_server or
  ptth_quic_end_server.py) gets a stream with a `RelayOffer` tip, connects to
  the address its `[forwarded_ports]` gives that port name (and to nothing
  else), and answers OK or a refusal.

Then bytes flow both ways (`splice_tcp`): a TCP EOF becomes the stream's end
(a half-close), a reset or broken stream resets the other side. Both proxies
reconnect to the relay with backoff when it goes away; connections in flight
are cut (reset) on every side. Everything runs in greenlets of one gevent hub.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

import gevent
import gevent.event
import gevent.socket

from ptth_lib.errors import ProtocolError, PtthError, backoff_secs
from ptth_lib.forward.quic import cert as quic_cert
from ptth_lib.forward.quic import driver as quic_io
from ptth_lib.forward.quic.driver import QuicPeer, QuicStream, StreamBroken
from ptth_lib.wire import tip as quic_tip

logger = logging.getLogger(__name__)

# A tip must arrive whole within this long, or the stream is reset.
TIP_WAIT_SECS = 10.0
HANDSHAKE_SECS = 10.0
LOCAL_CONNECT_TIMEOUT_SECS = 5.0

# A connection to the relay that ends sooner than this counts as a failure, so
# a proxy the relay keeps dropping backs off as if it could not connect
# (errors.backoff_secs) instead of reconnecting several times a second.
STABLE_CONNECTION_SECS = 30.0


class RefusedError(PtthError):
    """The relay (or the server through it) refused; the message says why."""


@dataclass(frozen=True)
class RelayTarget:
    """Where a proxy finds the QUIC relay and how it knows it is the right one."""

    host: str
    port: int
    fingerprint: str | None  # the pinned SHA-256 of the relay's certificate
    ca_file: str | None


def read_tip(stream: QuicStream, timeout: float = TIP_WAIT_SECS) -> tuple[quic_tip.TipMessage, bytes]:
    """The stream's opening tip and the raw bytes that came after it in the same read.

    Raises ProtocolError (malformed, or the stream ended first), StreamBroken,
    or gevent.Timeout.
    """
    reader = quic_tip.TipReader()
    with gevent.Timeout(timeout):
        while True:
            data = stream.read(quic_tip.MAX_TIP_BYTES + 3)
            if not data:
                raise ProtocolError("the stream ended before its tip")
            message = reader.feed(data)
            if message is not None:
                return message, reader.rest


def splice_tcp(stream: QuicStream, sock: gevent.socket.socket, first: bytes = b"") -> str:
    """Copy both ways between a QUIC stream and a TCP socket until both ends close.

    `first` is stream data already read (what followed the tip). Returns ""
    after a clean close both ways, else the reason the connection was cut;
    the socket is closed either way (with a reset when cut).
    """
    failure: list[str] = []

    def cut(reason: str) -> None:
        if not failure:
            failure.append(reason)
            stream.abort(reason)
            _reset(sock)

    def stream_to_tcp() -> None:
        data = first
        try:
            while True:
                if data:
                    try:
                        sock.sendall(data)
                    except OSError as e:
                        return cut(f"TCP peer: {e.strerror or e}")
                data = stream.read()
                if not data:
                    break
        except StreamBroken as e:
            return cut(f"QUIC stream: {e}")
        try:
            sock.shutdown(socket.SHUT_WR)  # the far end's half-close, passed on
        except OSError:
            pass

    def tcp_to_stream() -> None:
        try:
            while True:
                try:
                    data = sock.recv(quic_io.READ_BYTES)
                except OSError as e:
                    return cut(f"TCP peer: {e.strerror or e}")
                if not data:
                    stream.end()
                    return
                stream.write(data)
        except StreamBroken as e:
            cut(f"QUIC stream: {e}")

    greenlets = [gevent.spawn(stream_to_tcp), gevent.spawn(tcp_to_stream)]
    try:
        gevent.joinall(greenlets)
    finally:
        gevent.killall(greenlets)
        sock.close()
    return failure[0] if failure else ""


def splice_streams(a: QuicStream, b: QuicStream, first_a: bytes = b"", first_b: bytes = b"") -> str:
    """The relay's copy between a client's stream and a server's; "" or the reason it was cut."""
    failure: list[str] = []

    def copy(src: QuicStream, dst: QuicStream, data: bytes) -> None:
        try:
            while True:
                if data:
                    dst.write(data)
                data = src.read()
                if not data:
                    dst.end()
                    return
        except StreamBroken as e:
            if not failure:
                failure.append(str(e))
            a.abort(str(e))
            b.abort(str(e))

    gevent.joinall([gevent.spawn(copy, a, b, first_a), gevent.spawn(copy, b, a, first_b)])
    return failure[0] if failure else ""


def connect_to_relay(target: RelayTarget, hello: quic_tip.PeerHello,
                     on_stream: Callable[[QuicStream], None] | None = None) -> QuicPeer:
    """Open the QUIC connection, check the relay's certificate, say hello.

    Raises OSError (unreachable), RefusedError (wrong certificate, or the
    relay refused the key), ProtocolError (not a PTTH relay).
    """
    config = quic_io.configure(quic_cert.client_configuration(quic_io.ALPN, target.fingerprint, target.ca_file,
                                                              server_name=target.host))
    peer = quic_io.connect(target.host, target.port, config, HANDSHAKE_SECS, on_stream)
    try:
        if target.fingerprint is not None:
            # Checked before the key is sent: a relay with another certificate never sees it.
            der = quic_cert.peer_certificate_der(peer.quic)
            if der is None or not quic_cert.matches(der, target.fingerprint):
                got = quic_cert.fingerprint_of(der) if der else "none"
                raise RefusedError(f"the relay at {target.host}:{target.port} has certificate {got}, "
                                   f"not the pinned {target.fingerprint}")
        stream = peer.open_stream()
        stream.write(quic_tip.encode(hello))
        answer, _ = read_tip(stream)
        if not isinstance(answer, quic_tip.HelloAnswer):
            raise ProtocolError(f"expected a hello answer, got {type(answer).__name__}")
        if not answer.ok:
            raise RefusedError(f"the relay refused {hello.role} {hello.name!r}: {answer.error}")
        stream.end()
        return peer
    except BaseException as e:
        peer.close("hello failed")
        if isinstance(e, StreamBroken):
            raise OSError(f"the relay closed the connection: {e}") from None
        if isinstance(e, gevent.Timeout):
            raise OSError("the relay did not answer the hello") from None
        raise


class _RelayLink:
    """Keeps one QUIC connection to the relay open, reconnecting with backoff."""

    def __init__(self, what: str, target: RelayTarget, hello: quic_tip.PeerHello,
                 on_stream: Callable[[QuicStream], None] | None = None, must_start: bool = False) -> None:
        self.what = what
        self.must_start = must_start  # a first attempt that fails is fatal (a program run by hand)
        self.target = target
        self.hello = hello
        self.on_stream = on_stream
        self.peer: QuicPeer | None = None
        self.connected = gevent.event.Event()
        self.fatal: str = ""  # a refusal that retrying cannot fix
        self.started = False  # connected at least once
        self.stopping = False

    def stop(self) -> None:
        """Close the connection to the relay: every stream breaks, each TCP connection is reset.

        Waits a moment so the CONNECTION_CLOSE and the resets go out before
        the process ends; the relay then cuts the far ends at once.
        """
        self.stopping = True
        if self.peer is not None:
            self.peer.close(f"the {self.what} is stopping")
            gevent.sleep(0.3)

    def run_forever(self) -> None:
        failures = 0  # attempts in a row that failed, or whose connection did not last
        state = ""
        while True:
            try:
                peer = connect_to_relay(self.target, self.hello, self.on_stream)
            except RefusedError as e:
                self.fatal = str(e)
                if not self.must_start:  # otherwise the program prints it, as its one line
                    logger.error("%s", e)
                self.connected.set()
                return
            except (OSError, ProtocolError) as e:
                if self.must_start and not self.started:
                    self.fatal = f"cannot connect to the QUIC relay at {self.target.host}:{self.target.port}: {e}"
                    self.connected.set()
                    return
                if state != str(e):
                    logger.warning("%s: cannot connect to the QUIC relay at %s:%d: %s; retrying with backoff",
                                   self.what, self.target.host, self.target.port, e)
                    state = str(e)
                gevent.sleep(backoff_secs(failures))
                failures = min(failures + 1, 16)
                continue
            state = ""
            logger.info("%s: connected to the QUIC relay at %s:%d as %r", self.what, self.target.host,
                        self.target.port, self.hello.name)
            self.peer = peer
            self.started = True
            self.connected.set()
            connected_at = time.monotonic()
            peer.closed.wait()
            self.connected.clear()
            self.peer = None
            if self.stopping:
                return
            if time.monotonic() - connected_at >= STABLE_CONNECTION_SECS:
                failures = 0
            delay = backoff_secs(failures)
            failures = min(failures + 1, 16)
            logger.warning("%s: lost the QUIC relay (%s); reconnecting in %.1f s", self.what, peer.close_reason,
                           delay)
            gevent.sleep(delay)


class QuicEndServer:
    """The server-side proxy: serves the relay's offers for our forwarded ports."""

    def __init__(self, name: str, api_key: str, target: RelayTarget,
                 forwarded_ports: dict[str, tuple[str, int]]) -> None:
        self.forwarded_ports = forwarded_ports
        self.link = _RelayLink("quic end server", target, quic_tip.PeerHello("server", name, api_key),
                               self._serve)

    def run_forever(self) -> None:
        self.link.run_forever()

    def _serve(self, stream: QuicStream) -> None:
        try:
            offer, first = read_tip(stream)
        except (ProtocolError, StreamBroken, gevent.Timeout) as e:
            logger.warning("bad stream from the relay: %s", e)
            stream.abort("bad tip")
            return
        if not isinstance(offer, quic_tip.RelayOffer):
            stream.abort("expected an offer")
            return
        label = f"from client {offer.client} (port {offer.inner.client_port}) to {offer.port}"
        address = self.forwarded_ports.get(offer.port)
        if address is None:
            return self._refuse(stream, label, f"port {offer.port!r} is not forwarded")
        try:
            sock = gevent.socket.create_connection(address, timeout=LOCAL_CONNECT_TIMEOUT_SECS)
        except OSError as e:
            return self._refuse(stream, label, f"cannot connect to port {offer.port}: {e.strerror or e}")
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            stream.write(quic_tip.encode(quic_tip.Answer(True, "")))
        except StreamBroken:
            sock.close()
            return
        logger.info("quic connection %s (%s:%d) open", label, *address)
        reason = splice_tcp(stream, sock, first)
        logger.info("quic connection %s closed%s", label, f" ({reason})" if reason else "")

    def _refuse(self, stream: QuicStream, label: str, reason: str) -> None:
        logger.warning("quic connection %s refused: %s", label, reason)
        send_refusal(stream, reason)


class QuicForwardClient:
    """The client-side proxy: local TCP ports forwarded through the QUIC relay."""

    def __init__(self, name: str, api_key: str, target: RelayTarget) -> None:
        self.link = _RelayLink("quic client", target, quic_tip.PeerHello("client", name, api_key),
                               must_start=True)

    def serve(self, listener: gevent.socket.socket, server: str, port: str) -> None:
        """Accept TCP connections on `listener` forever, one greenlet each."""
        while True:
            sock, peer_addr = listener.accept()
            gevent.spawn(self._forward, sock, peer_addr, server, port)

    def _forward(self, sock: gevent.socket.socket, peer_addr: tuple[str, int], server: str, port: str) -> None:
        label = f"{peer_addr[0]}:{peer_addr[1]} -> {server}:{port}"
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = self.link.peer
        if peer is None:
            logger.warning("quic connection %s refused: not connected to the relay", label)
            return _reset(sock)
        try:
            stream = peer.open_stream()
            stream.write(quic_tip.encode(quic_tip.ClientConnect(server, port, quic_tip.InnerTip(peer_addr[1]))))
            answer, first = read_tip(stream, timeout=2 * TIP_WAIT_SECS)
        except (ProtocolError, StreamBroken, gevent.Timeout) as e:
            logger.warning("quic connection %s failed: %s", label, e)
            return _reset(sock)
        if not isinstance(answer, quic_tip.Answer):
            stream.abort("expected an answer")
            return _reset(sock)
        if not answer.ok:
            logger.warning("quic connection %s refused: %s", label, answer.error)
            stream.abort("refused")
            return _reset(sock)
        logger.info("quic connection %s open", label)
        reason = splice_tcp(stream, sock, first)
        logger.info("quic connection %s closed%s", label, f" ({reason})" if reason else "")


def send_refusal(stream: QuicStream, reason: str) -> None:
    """Answer a stream's tip with a refusal and end it (if the peer is still there)."""
    try:
        stream.write(quic_tip.encode(quic_tip.refusal(reason)))
        stream.end()
    except StreamBroken:
        pass


def _reset(sock: socket.socket) -> None:
    """Close with a reset, so the TCP peer sees a cut, not an end."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()
