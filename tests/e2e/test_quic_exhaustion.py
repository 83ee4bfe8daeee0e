"""Exhaustion before authentication: what a peer without a valid hello can make the QUIC relay hold.

Anyone who knows the relay's address and its (public) certificate
fingerprint can open QUIC connections to it. Until a hello is accepted the
relay must hold next to nothing for them, however many come, and honest
proxies must still get in:

1. Before its hello a connection may use one stream, a hello's worth of
   bytes on it and a small budget of datagram bytes (quic_adapter.py); a peer
   that goes past them is closed at once; every greenlet of a connection ends
   with it. (The hello deadline for the whole
   connection is in test_quic_hostile.py.)
2. An Initial without a token gets a Retry and no state; a flood of them
   leaves the relay's memory alone and honest proxies prompt; half-open
   connections are capped per address.

The attackers are the test process (ptth_lib.forward.quic.driver, valid QUIC and TLS, the
relay's certificate pinned) and, for the flood, a process of its own
(tests/e2e/quic_cluster.py). Every figure measured is printed (`pytest -s`).
"""

from __future__ import annotations

import gc
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import astuple
from pathlib import Path

import gevent
import gevent.socket
import pytest
from qh3.quic.packet import QuicPacketType
from quic_cluster import (
    InitialFlood,
    QuicForwarding,
    first_initials,
    honest_hello_secs,
    open_quic,
    rss_bytes,
    say_hello,
)
from tcp_peers import EchoServer

from ptth_lib.config import load_relay_config
from ptth_lib.forward.quic import cert, driver
from ptth_lib.forward.quic.endpoint import (
    MAX_HALF_OPEN_PER_ADDRESS,
    HalfOpenCount,
    QuicServerEndpoint,
    address_key,
)
from ptth_lib.forward.quic.quic_adapter import (
    MAX_STREAMS,
    UNTRUSTED_DATAGRAM_BYTES,
    parse_header,
    peer_limits,
)
from ptth_lib.forward.quic.relay import QuicRelay
from ptth_lib.wire import tip

pytestmark = pytest.mark.process

MiB = 1024 * 1024
# "At once", for a cut the relay decides on its own: well under the hello deadline (10 s).
PROMPT_SECS = 5.0
# An honest proxy's handshake and hello, flood or not (it takes tens of milliseconds).
HONEST_SECS = 5.0
# The flood: 1,200 Initials, each a new ClientHello. Before Retry, each made the relay
# keep a connection and do a TLS handshake: about +110 MiB of RSS for these.
FLOOD_RATE = 200.0
FLOOD_SECS = 6.0
FLOOD_RSS_GROWTH_LIMIT = 16 * MiB


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


def laptop_hello(fw: QuicForwarding) -> tip.PeerHello:
    return tip.PeerHello("client", "laptop", fw.client_key)


def wait_for(predicate: Callable[[], bool], deadline: float) -> bool:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if predicate():
            return True
        gevent.sleep(0.05)
    return False


# ---- 1. streams and bytes before the hello -----------------------------------------------

def test_an_unauthenticated_connection_may_send_a_hello_and_then_carries_mibs(fw: QuicForwarding) -> None:
    """qh3 announces its fixed limits before the hello; an accepted hello lifts the relay's own."""
    peer = open_quic(fw.relay_port, fw.fingerprint)
    try:
        announced = astuple(peer_limits(peer.quic))
        print(f"\ncredit announced before the hello: streams, uni streams, bytes, bytes per stream = {announced}")
        assert announced[0] == MAX_STREAMS
        answer = say_hello(peer, laptop_hello(fw))
        assert isinstance(answer, tip.HelloAnswer) and answer.ok, answer
        # A new stream carries MiBs at once.
        stream = peer.open_stream()
        stream.write(tip.encode(tip.ClientConnect("alpha", "echo", tip.InnerTip(1))))
        with gevent.Timeout(PROMPT_SECS):
            assert isinstance(tip.TipReader().feed(stream.read()), tip.Answer)
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


@pytest.mark.parametrize("version, older", [(0, " (a PTTH from before stream credit)"), (2, "")])
def test_a_proxy_of_another_credit_version_is_refused_by_name(fw: QuicForwarding, version: int, older: str) -> None:
    """A hello without stream credit (an older PTTH) or with another version: a one-line refusal, then closed."""
    peer = open_quic(fw.relay_port, fw.fingerprint)
    try:
        hello = laptop_hello(fw)
        answer = say_hello(peer, tip.PeerHello(hello.role, hello.name, hello.key, version))
        assert answer == tip.HelloAnswer(False, f"version mismatch: this client proxy speaks stream credit version "
                                                f"{version}{older}, the relay 1; run the same PTTH version on both")
        assert peer.closed.wait(PROMPT_SECS)
    finally:
        peer.close()


def test_extra_streams_before_the_hello_close_the_connection(fw: QuicForwarding) -> None:
    """A peer that opens more than one stream before its hello is closed at once, not left to buffer."""
    pid = fw.relay_proc.pid
    rss_before = rss_bytes(pid)
    peer = open_quic(fw.relay_port, fw.fingerprint)
    writers: list[gevent.Greenlet] = []
    try:
        first = peer.open_stream()
        first.write(b"\x01\x10\x00")  # a tip announcing 4 KiB, never finished: the relay waits for it
        for _ in range(8):
            stream = peer.open_stream()
            writers.append(gevent.spawn(stream.write, b"\x00" * 256 * 1024))
        assert peer.closed.wait(PROMPT_SECS), "the relay kept a connection with extra streams before its hello"
        print(f"\nclosed by the relay: {peer.close_reason}; relay RSS "
              f"{rss_before / MiB:.0f} -> {rss_bytes(pid) / MiB:.0f} MiB")
    finally:
        peer.close()
        gevent.killall(writers)
    assert fw.works()


def test_too_many_bytes_before_the_hello_close_the_connection(fw: QuicForwarding) -> None:
    """A peer that sends more than a hello's worth, or past the datagram budget, is closed at once."""
    peer = open_quic(fw.relay_port, fw.fingerprint)
    try:
        first = peer.open_stream()
        writer = gevent.spawn(first.write, b"\x01\x10\x00" + b"\x00" * (2 * UNTRUSTED_DATAGRAM_BYTES))
        assert peer.closed.wait(PROMPT_SECS), "the relay kept a connection that sent MiBs before its hello"
        print(f"\nclosed by the relay: {peer.close_reason}")
        writer.kill()
    finally:
        peer.close()
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
    identity = cert.load_or_create(str(fw.tmp / "relay.crt"), str(fw.tmp / "relay.key"))
    relay = QuicRelay(load_relay_config(fw.relay_config))
    endpoint = QuicServerEndpoint(sock, driver.configure(cert.server_configuration(driver.ALPN, identity)),
                                  relay.on_peer)
    server = gevent.spawn(endpoint.serve_forever)
    port = sock.getsockname()[1]
    try:
        baseline = live_greenlets()
        peers = [open_quic(port, fw.fingerprint) for _ in range(3)]
        _silent, partial, busy = peers
        partial.open_stream().write(b"\x01\x10\x00")
        for _ in range(6):  # past the limits: the relay closes it
            busy.open_stream().write(b"\x01\x10\x00" + b"\x00" * 4000)
        client = open_quic(port, fw.fingerprint)
        answer = say_hello(client, laptop_hello(fw))
        assert isinstance(answer, tip.HelloAnswer) and answer.ok, answer
        connect = client.open_stream()
        connect.write(tip.encode(tip.ClientConnect("alpha", "echo", tip.InnerTip(1))))
        with gevent.Timeout(PROMPT_SECS):
            assert connect.read()  # a refusal: alpha is connected to the other relay
        gevent.sleep(0.5)
        for peer in (*peers, client):
            peer.close()
        assert wait_for(lambda: len(live_greenlets()) <= len(baseline), PROMPT_SECS), \
            f"left running: {sorted(live_greenlets())}, before: {sorted(baseline)}"
        assert not endpoint.peers
        assert endpoint.half_open.total == 0 and not endpoint.half_open.by_address
        assert not relay.servers
    finally:
        server.kill()
        sock.close()


# ---- 2. Initials, Retry and half-open connections ----------------------------------------------------

def test_an_initial_without_a_token_gets_a_retry_and_nothing_else(fw: QuicForwarding) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1.0)
        initials = first_initials(fw.relay_port)
        for _ in range(3):
            sock.sendto(next(initials), ("127.0.0.1", fw.relay_port))
        types = []
        try:
            while True:
                data = sock.recv(65536)
                types.append(parse_header(data, 8).packet_type)
        except TimeoutError:
            pass
    assert types == [QuicPacketType.RETRY] * 3, types


def test_an_initial_flood_leaves_honest_proxies_prompt(fw: QuicForwarding) -> None:
    pid = fw.relay_proc.pid
    alone = [honest_hello_secs(fw.relay_port, fw.fingerprint, laptop_hello(fw)) for _ in range(5)]
    rss_before = peak = rss_bytes(pid)
    flood = InitialFlood(fw.tmp, fw.relay_port, FLOOD_RATE, FLOOD_SECS)
    try:
        gevent.sleep(1.0)
        client = fw.start_client(wait=False, forwards=["echo"])  # a real proxy, connecting during the flood
        during = []
        while flood.proc.popen.poll() is None:
            during.append(honest_hello_secs(fw.relay_port, fw.fingerprint, laptop_hello(fw), timeout=HONEST_SECS))
            peak = max(peak, rss_bytes(pid))
            gevent.sleep(0.2)
        sent = flood.sent()
        assert client.wait_for_output(r"forwarding 127\.0\.0\.1:\d+ to alpha:echo over QUIC")
        client.kill()
    finally:
        flood.kill()
    print(f"\nflood: {sent} Initials in {FLOOD_SECS:.0f} s; relay RSS {rss_before / MiB:.0f} MiB, peak "
          f"{peak / MiB:.0f} MiB; honest hello alone median {statistics.median(alone):.3f} s, during the "
          f"flood median {statistics.median(during):.3f} s, max {max(during):.3f} s ({len(during)} hellos)")
    assert sent >= FLOOD_RATE * FLOOD_SECS * 0.8
    assert peak - rss_before < FLOOD_RSS_GROWTH_LIMIT
    assert fw.works()


def test_half_open_connections_are_capped_per_address(fw: QuicForwarding) -> None:
    """Handshakes that never say hello: the first 16 from an address get in, the others get no answer."""
    results: list[object] = []

    def attempt() -> None:
        try:
            results.append(open_quic(fw.relay_port, fw.fingerprint, timeout=3.0))
        except OSError as e:
            results.append(e)

    gevent.joinall([gevent.spawn(attempt) for _ in range(MAX_HALF_OPEN_PER_ADDRESS + 3)])
    peers = [r for r in results if isinstance(r, driver.QuicPeer)]
    try:
        assert len(peers) == MAX_HALF_OPEN_PER_ADDRESS, results
        assert all(not p.closed.is_set() for p in peers)
    finally:
        for peer in peers:
            peer.close()
    # Closing them frees their places at once: an honest proxy from the same address gets in.
    assert honest_hello_secs(fw.relay_port, fw.fingerprint, laptop_hello(fw), timeout=HONEST_SECS) < HONEST_SECS
    fw.relay_proc.wait_for_output(r"dropped \d+ new QUIC connection\(s\): 16 half-open "
                                  r"\(at most 16 per address, 256 in all\)")


def test_half_open_count() -> None:
    count = HalfOpenCount(per_address=2, total=3)
    assert count.take("a") and count.take("a")
    assert not count.take("a")
    assert count.take("b")
    assert not count.take("c")  # the total
    count.give_back("a")
    assert count.take("c")
    assert not count.take("a")
    for key in ("a", "b", "c"):
        count.give_back(key)
    assert count.total == 0 and count.by_address == {}  # an address without any is forgotten


@pytest.mark.parametrize(("host", "key"), [
    ("192.0.2.7", "192.0.2.7"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
    ("2001:db8:1:2::99", "2001:db8:1:2::/64"),
    ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
])
def test_address_key(host: str, key: str) -> None:
    assert address_key(host) == key


def test_the_relay_still_serves(fw: QuicForwarding) -> None:
    """Runs last: after all of the above, the relay and both proxies are up and forward."""
    fw.assert_up(fw.relay_proc, fw.server_proc, fw.client_proc)
    assert fw.works()
