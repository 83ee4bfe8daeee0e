"""TCP port forwarding over QUIC (spec 004): the two proxies and their link to the QUIC relay.

Each proxy keeps one QUIC connection to the QUIC relay (relay.py) and proves
who it is on the first stream it opens (a `PeerHello` tip, with the same key
and name as on the HTTP side). After that every forwarded TCP connection is
one bidirectional QUIC stream:

- the client proxy (`QuicClientProxy`: ptth_client with `quic_relay`, or
  ptth_quic_client.py) accepts a TCP connection on a local port
  (forward/client.py), opens a stream with a `ClientConnect` tip, and waits
  for the relay's `Answer`;
- the server proxy (`QuicEndServer`: ptth_server with a `[quic]` table, or
  ptth_quic_end_server.py) gets a stream with a `RelayOffer` tip, connects to
  the address its `[forwarded_ports]` gives that port name (and to nothing
  else), and answers OK or a refusal.

Then the stream and the TCP socket are spliced (splice.py, streams.py): a
TCP EOF becomes the stream's end (a half-close), a reset or broken stream
resets the other side. Both proxies reconnect to the relay with backoff when
it goes away; connections in flight are cut (reset) on every side.
Everything runs in greenlets of one gevent hub per thread.
"""

from __future__ import annotations

import logging
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import gevent
import gevent.event
import gevent.hub
import gevent.socket

from ptth_lib.config import ClientConfig, Forward, QuicRelayTarget, ServerConfig
from ptth_lib.errors import ProtocolError, PtthError, backoff_secs
from ptth_lib.forward import client
from ptth_lib.forward.limits import LOCAL_CONNECT_TIMEOUT_SECS, RELAY_CONNECT_TIMEOUT_SECS
from ptth_lib.forward.quic import cert, driver
from ptth_lib.forward.quic.driver import QuicPeer, QuicStream, StreamBrokenError
from ptth_lib.forward.quic.streams import TIP_WAIT_SECS, QuicStreamEnd, read_tip, send_refusal
from ptth_lib.forward.splice import Splice, TcpEnd, in_greenlets, reset
from ptth_lib.wire import tip

logger = logging.getLogger(__name__)

T = TypeVar("T")

# A connection to the relay that ends sooner than this counts as a failure, so
# a proxy the relay keeps dropping backs off as if it could not connect
# (errors.backoff_secs) instead of reconnecting several times a second.
STABLE_CONNECTION_SECS = 30.0

# What a stopping proxy waits for its CONNECTION_CLOSE and resets to go out.
CLOSE_FLUSH_SECS = 0.3

# The desktop app's client tries again this long after the relay refused its key or showed another
# certificate: the admin may add the key meanwhile, and nobody else would restart the app.
REFUSED_RETRY_SECS = 30.0


class RefusedError(PtthError):
    """The relay (or the server through it) refused; the message says why."""


def connect_to_relay(target: QuicRelayTarget, hello: tip.PeerHello,
                     on_stream: Callable[[QuicStream], None] | None = None) -> QuicPeer:
    """Open the QUIC connection, check the relay's certificate, say hello.

    Raises OSError (unreachable), RefusedError (wrong certificate, or the
    relay refused the key), ProtocolError (not a PTTH relay).
    """
    config = driver.configure(cert.client_configuration(driver.ALPN, target.fingerprint, target.ca_file,
                                                        server_name=target.host), target.max_datagram_size)
    peer = driver.connect(target.host, target.port, config, RELAY_CONNECT_TIMEOUT_SECS, on_stream)
    try:
        if target.fingerprint is not None:
            # Checked before the key is sent: a relay with another certificate never sees it.
            der = cert.peer_certificate_der(peer.quic)
            if der is None or not cert.matches(der, target.fingerprint):
                got = cert.fingerprint_of(der) if der else "none"
                raise RefusedError(f"the relay at {target.host}:{target.port} has certificate {got}, "
                                   f"not the pinned {target.fingerprint}")
        stream = peer.open_stream()
        stream.write(tip.encode(hello))
        answer, _ = read_tip(stream)
        if not isinstance(answer, tip.HelloAnswer):
            raise ProtocolError(f"expected a hello answer, got {type(answer).__name__}")
        if not answer.ok:
            raise RefusedError(f"the relay refused {hello.role} {hello.name!r}: {answer.error}")
        stream.end()
        peer.open_control()  # our credit grants (credit.py) go on it from now on
        return peer
    except BaseException as e:
        peer.close("hello failed")
        if isinstance(e, StreamBrokenError):
            # A relay from before stream credit cannot read our hello's "credit" and closes at once.
            older = " (a relay older than this proxy? run the same PTTH version on both)" \
                if "no valid hello" in str(e) else ""
            raise OSError(f"the relay closed the connection: {e}{older}") from None
        if isinstance(e, gevent.Timeout):
            raise OSError("the relay did not answer the hello") from None
        raise


def splice_tcp(stream: QuicStream, sock: socket.socket, first: bytes = b"",
               tally: client.ForwardTally | None = None) -> str:
    """Copy both ways between a stream (after its tip; `first` followed it) and a TCP socket.

    Returns "" after a clean close both ways, else the reason it was cut; the
    socket is closed either way (with a reset when cut). A client's `tally` counts it.
    """
    splice = Splice(TcpEnd(sock, watch_secs=None), QuicStreamEnd(stream, first), in_greenlets)
    if tally is None:
        return splice.run()
    with tally.running(splice):
        return splice.run()


class _RelayLink:
    """Keeps one QUIC connection to the relay open, reconnecting with backoff."""

    def __init__(self, what: str, target: QuicRelayTarget, hello: tip.PeerHello,
                 on_stream: Callable[[QuicStream], None] | None = None, must_start: bool = False,
                 keep_trying: bool = False) -> None:
        self.what = what
        self.must_start = must_start  # a first attempt that fails is fatal (a program run by hand)
        self.keep_trying = keep_trying  # a refusal is retried after REFUSED_RETRY_SECS (the desktop app)
        self.target = target
        self.hello = hello
        self.on_stream = on_stream
        self.peer: QuicPeer | None = None
        self.connected = gevent.event.Event()
        self.fatal: str = ""  # a refusal that retrying cannot fix
        self.problem: str = ""  # why it is not connected now
        self.tried = False  # the first attempt has ended, one way or the other
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
            gevent.sleep(CLOSE_FLUSH_SECS)

    def run_forever(self) -> None:
        failures = 0  # attempts in a row that failed, or whose connection did not last
        state = ""
        while True:
            try:
                peer = connect_to_relay(self.target, self.hello, self.on_stream)
            except RefusedError as e:
                self.problem, self.tried = str(e), True
                if not self.must_start and state != str(e):  # otherwise the program prints it, as its one line
                    logger.error("%s", e)
                state = str(e)
                if self.keep_trying:
                    gevent.sleep(REFUSED_RETRY_SECS)
                    continue
                self.fatal = str(e)
                self.connected.set()
                return
            except (OSError, ProtocolError) as e:
                self.problem = f"cannot connect to the QUIC relay at {self.target.host}:{self.target.port}: {e}"
                self.tried = True
                if self.must_start and not self.started:
                    self.fatal = self.problem
                    self.connected.set()
                    return
                if state != str(e):
                    logger.warning("%s: cannot connect to the QUIC relay at %s:%d: %s; retrying with backoff",
                                   self.what, self.target.host, self.target.port, e)
                    state = str(e)
                gevent.sleep(backoff_secs(failures))
                failures = min(failures + 1, 16)
                continue
            state = self.problem = ""
            self.tried = True
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
            self.problem = f"lost the QUIC relay ({peer.close_reason})"
            if time.monotonic() - connected_at >= STABLE_CONNECTION_SECS:
                failures = 0
            delay = backoff_secs(failures)
            failures = min(failures + 1, 16)
            logger.warning("%s: lost the QUIC relay (%s); reconnecting in %.1f s", self.what, peer.close_reason,
                           delay)
            gevent.sleep(delay)


class QuicEndServer:
    """The server-side proxy: serves the relay's offers for a server config's forwarded ports.

    `run` serves in the calling thread's gevent hub until stopped: by
    `stop_on_signals` (ptth_quic_end_server), or from another thread by the
    function `stopper` returns (ptth_server, which runs it in a thread).
    """

    def __init__(self, config: ServerConfig) -> None:
        assert config.quic is not None and config.api_key is not None
        self.forwarded_ports = dict(config.forwarded_ports)
        self.link = _RelayLink("quic end server", config.quic, tip.PeerHello("server", config.name, config.api_key),
                               self._serve)
        self._runner: gevent.Greenlet | None = None

    def run(self) -> int:
        """Serve until stopped, or until the relay refuses us for good; then 1 if it did, else 0."""
        self._runner = gevent.spawn(self.link.run_forever)
        self._runner.join()
        return 1 if self.link.fatal else 0

    def stop(self) -> None:
        """Close the connection to the relay (its TCP connections are reset) and end `run` (in a greenlet)."""
        self.link.stop()
        if self._runner is not None:
            self._runner.kill()

    def stopper(self) -> Callable[[], None]:
        """A function that stops this server from any thread (gevent's async watcher is the one way in)."""
        wake = gevent.get_hub().loop.async_()
        wake.start(lambda: gevent.spawn(self.stop))
        return wake.send  # type: ignore[no-any-return]

    def stop_on_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            gevent.signal_handler(sig, lambda: gevent.spawn(self.stop))

    def _serve(self, stream: QuicStream) -> None:
        try:
            offer, first = read_tip(stream)
        except (ProtocolError, StreamBrokenError, gevent.Timeout) as e:
            logger.warning("bad stream from the relay: %s", e)
            stream.abort("bad tip")
            return
        if not isinstance(offer, tip.RelayOffer):
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
            stream.write(tip.encode(tip.Answer(True, "")))
        except StreamBrokenError:
            sock.close()
            return
        logger.info("quic connection %s (%s:%d) open", label, *address)
        reason = splice_tcp(stream, sock, first)
        logger.info("quic connection %s closed%s", label, f" ({reason})" if reason else "")

    def _refuse(self, stream: QuicStream, label: str, reason: str) -> None:
        logger.warning("quic connection %s refused: %s", label, reason)
        send_refusal(stream, reason)


class QuicClientProxy:
    """The client-side proxy over QUIC: forward/client.py's transport for `quic_relay`.

    On the command line everything runs in the main thread's gevent hub. In
    the desktop app (`background`) the hub has a thread of its own, the
    window's thread reaches it through `call`, and a refusal is retried.
    """

    socket_class = gevent.socket.socket

    def __init__(self, config: ClientConfig, background: bool = False) -> None:
        assert config.quic is not None
        self.link = _RelayLink("quic client", config.quic, tip.PeerHello("client", config.name, config.api_key),
                               must_start=not background, keep_trying=background)
        self._background = background
        self._runner: gevent.Greenlet | None = None
        self._hub: gevent.hub.Hub | None = None
        self._hub_ready = threading.Event()
        self._hub_thread: threading.Thread | None = None  # in the background: the thread the hub runs in

    @property
    def stopping(self) -> bool:
        return self.link.stopping

    @property
    def fatal(self) -> str:
        return self.link.fatal

    def connect(self) -> None:
        """Start the connection to the relay (and, in the background, the hub's thread)."""
        if not self._background:
            self._hub = gevent.get_hub()
            self._runner = gevent.spawn(self.link.run_forever)
            return
        self._hub_thread = threading.Thread(target=self._run_hub, daemon=True, name="ptth-client-quic")
        self._hub_thread.start()
        self._hub_ready.wait()

    def _run_hub(self) -> None:
        self._hub = gevent.get_hub()
        self._runner = gevent.spawn(self.link.run_forever)
        self._stopped = gevent.event.Event()
        self._hub_ready.set()
        # Until stop() has finished, not merely until the link ends: the thread's end stops its hub,
        # and the greenlet running stop() must still hand its result back.
        self._stopped.wait()

    def check(self) -> str:
        """Wait for the first attempt (ClientError if the relay cannot be reached or refuses)."""
        self.call(self.link.connected.wait)
        if self.link.fatal:
            raise client.ClientError(self.link.fatal)
        if self.link.problem:
            raise client.ClientError(self.link.problem)
        return self.link.hello.name

    def relay_state(self) -> client.RelayState:
        if self.link.peer is not None:
            return client.RelayState(True, "", self.link.hello.name)
        return client.RelayState(False if self.link.tried else None, self.link.problem)

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` in a greenlet of the hub's thread and wait for its result (directly if already there)."""
        if self._hub_thread is None or threading.current_thread() is self._hub_thread:
            return fn()
        assert self._hub is not None
        done: queue.Queue[tuple[bool, Any]] = queue.Queue(1)

        def run() -> None:
            try:
                done.put((True, fn()))
            except BaseException as e:  # noqa: BLE001 (handed to the caller's thread, as if raised there)
                done.put((False, e))

        self._hub.loop.run_callback_threadsafe(gevent.spawn, run)
        ok, value = done.get()
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    @staticmethod
    def spawn(target: Callable[[], None], name: str) -> None:
        gevent.spawn(target)

    @staticmethod
    def pause(secs: float) -> None:
        gevent.sleep(secs)

    def wait_for_signal(self) -> None:
        """Serve until SIGTERM or SIGINT, or a refusal on reconnecting (`fatal` then says why)."""
        assert self._runner is not None
        runner = self._runner
        for sig in (signal.SIGTERM, signal.SIGINT):
            gevent.signal_handler(sig, runner.kill)
        runner.join()

    def stop(self) -> None:
        """Close the connection to the relay: every open stream is reset."""
        if self._runner is None:
            return
        runner = self._runner

        def stop() -> None:
            self.link.stop()
            runner.kill()
            if self._background:
                self._stopped.set()

        self.call(stop)

    def serve(self, sock: socket.socket, peer: tuple[str, int], forward: Forward,
              tally: client.ForwardTally) -> None:
        """One TCP connection: a stream with a connect tip, the relay's answer, then the splice."""
        label = f"{peer[0]}:{peer[1]} -> {forward.server}:{forward.port}"
        quic = self.link.peer
        if quic is None:
            logger.warning("quic connection %s refused: not connected to the relay", label)
            tally.refused("not connected to the relay")
            return reset(sock)
        try:
            stream = quic.open_stream()
            stream.write(tip.encode(tip.ClientConnect(forward.server, forward.port, tip.InnerTip(peer[1]))))
            answer, first = read_tip(stream, timeout=2 * TIP_WAIT_SECS)
        except (ProtocolError, StreamBrokenError, gevent.Timeout) as e:
            logger.warning("quic connection %s failed: %s", label, e)
            tally.refused(f"failed: {e}")
            return reset(sock)
        if not isinstance(answer, tip.Answer):
            stream.abort("expected an answer")
            return reset(sock)
        if not answer.ok:
            logger.warning("quic connection %s refused: %s", label, answer.error)
            tally.refused(f"refused: {answer.error}")
            stream.abort("refused")
            return reset(sock)
        logger.info("quic connection %s open", label)
        reason = splice_tcp(stream, sock, first, tally)
        logger.info("quic connection %s closed%s", label, f" ({reason})" if reason else "")
