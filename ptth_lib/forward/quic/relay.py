"""The QUIC relay (spec 004): where client proxies' streams meet server proxies'.

Every proxy keeps one QUIC connection here. Its first stream must carry a
`PeerHello` whose key matches the tripcode of that server (`[[servers]]`) or
client (`[[clients]]`) in the relay config, the same tables as the HTTP
relay's; nothing else is accepted from a connection before that. Then:

1. a client opens a stream with `ClientConnect(server, port, inner)`;
2. the relay checks the client's `allow` list and that the server is
   connected, opens a stream to that server's proxy with
   `RelayOffer(client, port, inner)` (the inner tip re-wrapped, untouched);
3. the server answers OK or a refusal, and the relay passes the `Answer` back;
4. on OK the relay copies bytes between the two streams until both end, and
   a reset on either side resets the other.

Refusals go back as an `Answer` with the reason, and the stream is closed.

Before its hello a connection gets one stream, a hello's worth of credit
(endpoint.py) and HELLO_WAIT_SECS from its first packet; every greenlet
that serves it ends with it. Several server proxies may share a name (as on
the HTTP side): the relay keeps each connection and gives connects to them in
turn.
"""

from __future__ import annotations

import logging
import secrets
import time

import gevent
import gevent.event

from ptth_lib.config import RelayConfig
from ptth_lib.errors import ProtocolError
from ptth_lib.forward.quic.driver import QuicPeer, QuicStream, StreamBrokenError
from ptth_lib.forward.quic.streams import TIP_WAIT_SECS, QuicStreamEnd, read_tip, send_refusal
from ptth_lib.forward.splice import Splice, in_greenlets
from ptth_lib.wire import tip, tripcode

logger = logging.getLogger(__name__)

# A new connection must have its hello accepted within this long of its first
# packet (handshake, first stream, the whole tip), or it is closed: a proxy
# does all that in a few round trips.
HELLO_WAIT_SECS = 10.0

# Server proxies connected under one name at once; another hello is refused.
# As many as the HTTP relay parks listens for one name.
MAX_SERVER_CONNECTIONS = 32

# When a server proxy connects, the older connections under its name must
# answer a PING within this long (a few slow round trips) or are closed: a
# proxy killed without a word and restarted at once must not keep getting
# connects until the QUIC idle timeout (10 s) notices it is gone.
PROBE_SECS = 3.0


class QuicRelay:
    """Connected proxies, and the streams between them."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.servers: dict[str, list[QuicPeer]] = {}  # name -> its server proxies' connections, oldest first
        self._turn: dict[str, int] = {}  # name -> where the next connect starts looking in servers[name]
        self._probed: dict[QuicPeer, float] = {}  # connection -> when it was asked for a PING answer

    def on_peer(self, peer: QuicPeer) -> None:
        """A new QUIC connection: wait for its hello, then serve its streams until it closes."""
        first: gevent.event.AsyncResult = gevent.event.AsyncResult()

        def before_hello(stream: QuicStream) -> None:
            # The transport parameters allow one stream; this catches any other, and
            # nothing waits on it.
            if first.ready():
                stream.abort("one stream before the hello")
            else:
                first.set(stream)

        peer.on_stream = before_hello
        try:
            with gevent.Timeout(HELLO_WAIT_SECS):
                gevent.wait([first, peer.closed], count=1)
                if peer.closed.is_set():
                    raise StreamBrokenError(peer.close_reason)
                stream = first.get()
                hello, _ = read_tip(stream, HELLO_WAIT_SECS)
        except (gevent.Timeout, ProtocolError, StreamBrokenError) as e:
            reason = f"no hello within {HELLO_WAIT_SECS:.0f} s" if isinstance(e, gevent.Timeout) else str(e)
            logger.info("quic peer closed before a valid hello: %s", reason)
            peer.close("no valid hello")
            return
        if not isinstance(hello, tip.PeerHello):
            return self._refuse_hello(peer, stream, "the first stream must carry a hello")
        problem = self._check(hello)
        if not problem and hello.role == "server" \
                and len(self.servers.get(hello.name, ())) >= MAX_SERVER_CONNECTIONS:
            problem = f"server {hello.name!r} already has {MAX_SERVER_CONNECTIONS} connections"
        if problem:
            logger.warning("quic %s %r refused: %s", hello.role, hello.name, problem)
            return self._refuse_hello(peer, stream, problem)
        peer.trust()  # first, so the raised limits go out with the answer
        try:
            stream.write(tip.encode(tip.HelloAnswer(True, "")))
            stream.end()
        except StreamBrokenError:
            pass  # the connection is closing: peer.closed says so below
        if hello.role == "server":
            self._serve_server(hello.name, peer)
        else:
            logger.info("quic client %r connected", hello.name)
            peer.on_stream = lambda s: self._connect(hello.name, s)
            peer.closed.wait()
        logger.info("quic %s %r disconnected: %s", hello.role, hello.name, peer.close_reason)

    def _serve_server(self, name: str, peer: QuicPeer) -> None:
        """Keep a server proxy's connection among its name's until it closes."""
        peers = self.servers.setdefault(name, [])
        older = list(peers)
        peers.append(peer)
        logger.info("quic server %r connected%s", name, f" ({len(peers)} connections)" if older else "")
        peer.on_stream = lambda s: s.abort("servers do not open streams")
        if older:
            gevent.spawn(self._probe, name, older)
        try:
            peer.closed.wait()
        finally:
            peers.remove(peer)
            if not peers and self.servers.get(name) is peers:
                del self.servers[name]
                self._turn.pop(name, None)

    def _probe(self, name: str, peers: list[QuicPeer]) -> None:
        """Close those of `peers` that do not answer a PING within PROBE_SECS."""
        asked = time.monotonic()
        for peer in peers:
            self._probed[peer] = asked
            peer.ping()
        gevent.sleep(PROBE_SECS)
        for peer in peers:
            if self._probed.get(peer) == asked:
                del self._probed[peer]
            if not peer.closed.is_set() and peer.last_answer < asked:
                logger.warning("quic server %r: an older connection did not answer a PING within %.0f s; "
                               "closing it", name, PROBE_SECS)
                peer.close("gone: no answer to a PING")

    def _pick_server(self, name: str) -> QuicPeer | None:
        """The next of `name`'s connections in turn, skipping closed ones and those not answering a PING."""
        peers = self.servers.get(name, [])
        for _ in range(len(peers)):
            turn = self._turn.get(name, 0) % len(peers)
            self._turn[name] = turn + 1
            peer = peers[turn]
            asked = self._probed.get(peer)
            if not peer.closed.is_set() and (asked is None or peer.last_answer >= asked):
                return peer
        return None

    def _check(self, hello: tip.PeerHello) -> str:
        if hello.credit != tip.CREDIT_VERSION:
            older = " (a PTTH from before stream credit)" if hello.credit == 0 else ""
            return (f"version mismatch: this {hello.role} proxy speaks stream credit version {hello.credit}{older}, "
                    f"the relay {tip.CREDIT_VERSION}; run the same PTTH version on both")
        if hello.role == "server":
            registered = self.config.servers.get(hello.name)
            code = registered.tripcode if registered else None
        else:
            client = self.config.clients.get(hello.name)
            code = client.tripcode if client else None
        # Compare even for an unknown name, so timing does not tell names apart.
        ok = tripcode.matches(hello.key, code or tripcode.derive(secrets.token_hex(16)))
        return "" if ok and code else f"unknown {hello.role} or wrong key (register its tripcode)"

    def _refuse_hello(self, peer: QuicPeer, stream: QuicStream, reason: str) -> None:
        try:
            stream.write(tip.encode(tip.HelloAnswer(False, reason)))
            stream.end()
        except StreamBrokenError:
            pass
        gevent.sleep(0.2)  # let the answer go out before the close
        peer.close(reason)

    def _connect(self, client_name: str, stream: QuicStream) -> None:
        """One client stream: check, offer to the server, pass the answer back, splice."""
        try:
            connect, first_up = read_tip(stream)
        except (ProtocolError, StreamBrokenError, gevent.Timeout) as e:
            logger.info("bad stream from client %r: %s", client_name, e)
            stream.abort("bad tip")
            return
        if not isinstance(connect, tip.ClientConnect):
            stream.abort("expected a connect")
            return
        label = f"{client_name} -> {connect.server}:{connect.port}"
        client = self.config.clients.get(client_name)
        if client is None or not client.may_reach(connect.server, connect.port):
            return self._answer_refusal(stream, label, f"client {client_name!r} may not reach "
                                        f"{connect.server}:{connect.port}")
        server_peer = self._pick_server(connect.server)
        if server_peer is None:
            return self._answer_refusal(stream, label, f"server {connect.server!r} is not connected")
        try:
            upstream = server_peer.open_stream()
            upstream.write(tip.encode(tip.RelayOffer(client_name, connect.port, connect.inner)))
            answer, first_down = read_tip(upstream, TIP_WAIT_SECS)
        except (ProtocolError, StreamBrokenError, gevent.Timeout) as e:
            return self._answer_refusal(stream, label, f"server {connect.server!r} did not answer: {e}")
        if not isinstance(answer, tip.Answer):
            upstream.abort("expected an answer")
            return self._answer_refusal(stream, label, f"server {connect.server!r} sent a bad answer")
        try:
            stream.write(tip.encode(answer))
        except StreamBrokenError:
            upstream.abort("client left")
            return
        if not answer.ok:
            logger.info("quic connection %s refused by the server: %s", label, answer.error)
            stream.end()
            return
        logger.info("quic connection %s open", label)
        reason = Splice(QuicStreamEnd(stream, first_up, "client's stream"),
                        QuicStreamEnd(upstream, first_down, "server's stream"), in_greenlets).run()
        logger.info("quic connection %s closed%s", label, f" ({reason})" if reason else "")

    def _answer_refusal(self, stream: QuicStream, label: str, reason: str) -> None:
        logger.info("quic connection %s refused: %s", label, reason)
        send_refusal(stream, reason)
