"""Exhaustion before authentication: what a peer without a valid hello can make the QUIC relay hold.

Anyone who knows the relay's address and its (public) certificate
fingerprint can open QUIC connections to it. Until a hello is accepted the
relay must hold next to nothing for them:

1. Before its hello a connection gets one stream and a hello's worth of
   credit; a peer that ignores the limits is closed at once; every greenlet
   of a connection ends with it. (The hello deadline for the whole
   connection is in test_quic_hostile.py.)

The attackers are the test process (ptth_lib.quic_io, valid QUIC and TLS, the
relay's certificate pinned). Every figure measured is printed (`pytest -s`).
"""

from __future__ import annotations

import gc
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import gevent
import gevent.socket
import pytest

from ptth_lib import quic_cert, quic_io, quic_tip
from ptth_lib.config import load_relay_config
from ptth_lib.quic_endpoint import UNTRUSTED_WINDOW_BYTES, QuicServerEndpoint
from ptth_lib.quic_relay import QuicRelay
from tests.quic_cluster import QuicForwarding, open_quic, rss_bytes, say_hello
from tests.tcp_peers import EchoServer

pytestmark = pytest.mark.process

MiB = 1024 * 1024
# "At once", for a cut the relay decides on its own: well under the hello deadline (10 s).
PROMPT_SECS = 5.0


@pytest.fixture(scope="module")
def fw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuicForwarding]:
    echo = EchoServer()
    f = QuicForwarding(Path(tmp_path_factory.mktemp("quic-exhaustion")), targets={"echo": echo.port},
                       allow=["alpha:echo"], forwards=["echo"])
    f.start_relay()
    f.start_server()
    f.start_client()
    yield f
    f.close()
    echo.close()


def laptop_hello(fw: QuicForwarding) -> quic_tip.PeerHello:
    return quic_tip.PeerHello("client", "laptop", fw.client_key)


def wait_for(predicate: Callable[[], bool], deadline: float) -> bool:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if predicate():
            return True
        gevent.sleep(0.05)
    return False


# ---- 1. streams and bytes before the hello -----------------------------------------------

def test_an_unauthenticated_connection_gets_one_stream_and_a_hello_of_credit(fw: QuicForwarding) -> None:
    """The transport parameters bound what a stranger can send; an accepted hello lifts them."""
    peer = open_quic(fw.relay_port, fw.fingerprint)
    try:
        q = peer.quic
        announced = (q._remote_max_streams_bidi, q._remote_max_streams_uni, q._remote_max_data,
                     q._remote_max_stream_data_bidi_remote)
        print(f"\ncredit before the hello: streams, uni streams, bytes, bytes per stream = {announced}")
        assert announced == (1, 0, UNTRUSTED_WINDOW_BYTES, UNTRUSTED_WINDOW_BYTES)
        answer = say_hello(peer, laptop_hello(fw))
        assert isinstance(answer, quic_tip.HelloAnswer) and answer.ok, answer
        assert wait_for(lambda: q._remote_max_streams_bidi > 100 and q._remote_max_data > MiB, PROMPT_SECS), \
            (q._remote_max_streams_bidi, q._remote_max_data)
        # A new stream's own credit is raised as soon as the relay sees it: a stream carries MiBs.
        stream = peer.open_stream()
        stream.write(quic_tip.encode(quic_tip.ClientConnect("alpha", "echo", quic_tip.InnerTip(1))))
        with gevent.Timeout(PROMPT_SECS):
            assert isinstance(quic_tip.TipReader().feed(stream.read()), quic_tip.Answer)
        data = b"\x5a" * (3 * MiB)
        got = bytearray()

        def send() -> None:
            stream.write(data)
            stream.end()

        sender = gevent.spawn(send)
        with gevent.Timeout(20):
            while chunk := stream.read():
                got += chunk
        sender.get()
        assert bytes(got) == data
    finally:
        peer.close()


def test_extra_streams_before_the_hello_close_the_connection(fw: QuicForwarding) -> None:
    """A peer that ignores the one-stream limit is closed at once, not left to buffer."""
    pid = fw.relay_proc.pid
    rss_before = rss_bytes(pid)
    peer = open_quic(fw.relay_port, fw.fingerprint)
    writers: list[gevent.Greenlet] = []
    try:
        first = peer.open_stream()
        first.write(b"\x01\x10\x00")  # a tip announcing 4 KiB, never finished: the relay waits for it
        q = peer.quic
        q._remote_max_streams_bidi = 64  # the attacker pretends it was given more
        q._remote_max_data = 1 << 30
        q._remote_max_stream_data_bidi_remote = MiB
        writers = []
        for _ in range(8):
            stream = peer.open_stream()
            stream.write(b"\x00")  # takes the stream's id
            writers.append(gevent.spawn(stream.write, b"\x00" * 256 * 1024))
        assert peer.closed.wait(PROMPT_SECS), "the relay kept a connection with extra streams before its hello"
        print(f"\nclosed by the relay: {peer.close_reason}; relay RSS "
              f"{rss_before / MiB:.0f} -> {rss_bytes(pid) / MiB:.0f} MiB")
    finally:
        peer.close()
        gevent.killall(writers)
    assert fw.works()


def live_greenlets() -> list[str]:
    """What each live greenlet of this process runs."""
    gc.collect()
    return [getattr(g._run, "__qualname__", repr(g._run)) for g in gc.get_objects()
            if isinstance(g, gevent.Greenlet) and not g.dead]


def test_every_greenlet_of_a_connection_ends_with_it(fw: QuicForwarding) -> None:
    """In-process relay (the real QuicRelay and endpoint, the module's config and certificate).

    Strangers that open streams and go away, and a client that connects, forwards
    and goes away, leave no greenlet and no state behind.
    """
    sock = gevent.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    identity = quic_cert.load_or_create(str(fw.tmp / "relay.crt"), str(fw.tmp / "relay.key"))
    relay = QuicRelay(load_relay_config(fw.relay_config))
    endpoint = QuicServerEndpoint(sock, quic_io.configure(quic_cert.server_configuration(quic_io.ALPN, identity)),
                                  relay.on_peer)
    server = gevent.spawn(endpoint.serve_forever)
    port = sock.getsockname()[1]
    try:
        baseline = live_greenlets()
        peers = [open_quic(port, fw.fingerprint) for _ in range(3)]
        _silent, partial, busy = peers
        partial.open_stream().write(b"\x01\x10\x00")
        for _ in range(6):  # honours the limits: only the first can carry bytes
            busy.open_stream().write(b"\x01\x10\x00" + b"\x00" * 4000)
        client = open_quic(port, fw.fingerprint)
        answer = say_hello(client, laptop_hello(fw))
        assert isinstance(answer, quic_tip.HelloAnswer) and answer.ok, answer
        connect = client.open_stream()
        connect.write(quic_tip.encode(quic_tip.ClientConnect("alpha", "echo", quic_tip.InnerTip(1))))
        with gevent.Timeout(PROMPT_SECS):
            assert connect.read()  # a refusal: alpha is connected to the other relay
        gevent.sleep(0.5)
        for peer in (*peers, client):
            peer.close()
        assert wait_for(lambda: len(live_greenlets()) <= len(baseline), PROMPT_SECS), \
            f"left running: {sorted(live_greenlets())}, before: {sorted(baseline)}"
        assert not endpoint.peers
        assert not relay.servers
    finally:
        server.kill()
        sock.close()


def test_the_relay_still_serves(fw: QuicForwarding) -> None:
    """Runs last: after all of the above, the relay and both proxies are up and forward."""
    fw.assert_up(fw.relay_proc, fw.server_proc, fw.client_proc)
    assert fw.works()
