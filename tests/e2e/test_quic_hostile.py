"""Hostile peers against the real QUIC relay: no hello, garbage tips, wrong roles, key leaks.

The test process plays the peer with ptth_lib's own QUIC driver (ptth_lib.forward.quic.driver), so
it speaks valid QUIC and TLS and can then misbehave where the relay must be
careful: in the tips. The relay must stay up and keep serving the proxies.
"""

from __future__ import annotations

import socket
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import gevent
import pytest
from conftest import Proc
from quic_cluster import QuicForwarding
from tcp_peers import EchoServer, recv_all

from ptth_lib.forward.quic import cert, driver
from ptth_lib.forward.quic.driver import QuicPeer, StreamBrokenError
from ptth_lib.wire import tip

# The relay waits 10 s for a hello (quic_relay.HELLO_WAIT_SECS); room for a busy machine.
HELLO_DEADLINE_SECS = 25.0
ANSWER_SECS = 15.0
# The hello deadline counts from the connection's first packet, not from its first stream:
# a peer that opens its stream late and trickles its tip is closed as early as a silent one.
LATE_STREAM_SECS = 8.0
WHOLE_CONNECTION_DEADLINE_SECS = 15.0


@pytest.fixture(scope="module")
def fw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuicForwarding]:
    echo = EchoServer()
    f = QuicForwarding(Path(tmp_path_factory.mktemp("quic-hostile")), targets={"echo": echo.port},
                       allow=["alpha:echo"], forwards=["echo"])
    f.start_relay()
    f.start_server()
    f.start_client()
    yield f
    f.close()
    echo.close()


def open_peer(fw: QuicForwarding) -> QuicPeer:
    config = driver.configure(cert.client_configuration(driver.ALPN, fw.fingerprint, None))
    return driver.connect("127.0.0.1", fw.relay_port, config, ANSWER_SECS)


def answer_to(peer: QuicPeer, payload: bytes) -> bytes:
    """Send `payload` on a new stream and read what comes back until the end or a reset."""
    stream = peer.open_stream()
    stream.write(payload)
    got = b""
    with gevent.Timeout(ANSWER_SECS):
        try:
            while data := stream.read():
                got += data
        except StreamBrokenError:
            pass
    return got


def relay_still_serves(fw: QuicForwarding) -> None:
    assert fw.relay_proc.popen.poll() is None, fw.relay_proc.output()[-3000:]
    assert fw.works(), fw.logs()


def test_a_connection_that_never_says_hello_is_closed(fw: QuicForwarding) -> None:
    """One peer stays silent; another opens its stream late and sends its tip a byte at a time."""
    start = time.monotonic()
    silent, trickler = open_peer(fw), open_peer(fw)

    def trickle() -> None:
        gevent.sleep(LATE_STREAM_SECS)
        stream = trickler.open_stream()
        try:
            for byte in tip.encode(tip.PeerHello("client", "laptop", fw.client_key)):
                stream.write(bytes([byte]))
                gevent.sleep(0.5)
        except StreamBrokenError:
            pass

    sender = gevent.spawn(trickle)
    try:
        assert silent.closed.wait(HELLO_DEADLINE_SECS), "the relay kept a connection that never said hello"
        assert trickler.closed.wait(max(0.0, start + WHOLE_CONNECTION_DEADLINE_SECS - time.monotonic())), \
            "the relay gave a late first stream a deadline of its own"
    finally:
        sender.kill()
        silent.close()
        trickler.close()
    relay_still_serves(fw)


@pytest.mark.parametrize("payload", [
    b"GET / HTTP/1.1\r\n\r\n",                       # not a tip at all
    b"\x02\x00\x01\x80",                              # another version
    b"\x01\xff\xff" + b"\x00" * 100,                  # a length over the limit
    b"\x01\x00\x05\xc1\xc1\xc1\xc1\xc1",              # not MsgPack
    tip.encode(tip.Answer(True, "")),       # a valid tip, but not a hello
], ids=["http", "version", "length", "msgpack", "not-hello"])
def test_a_first_stream_that_is_not_a_hello_closes_the_connection(fw: QuicForwarding, payload: bytes) -> None:
    peer = open_peer(fw)
    try:
        answer_to(peer, payload)
        assert peer.closed.wait(HELLO_DEADLINE_SECS), "the relay kept a connection after a bad first stream"
    finally:
        peer.close()
    relay_still_serves(fw)


def test_a_client_key_cannot_claim_a_server_name(fw: QuicForwarding) -> None:
    peer = open_peer(fw)
    try:
        reply = answer_to(peer, tip.encode(tip.PeerHello("server", "alpha", fw.client_key)))
        reader = tip.TipReader()
        answer = reader.feed(reply)
        assert isinstance(answer, tip.HelloAnswer) and not answer.ok, reply
        assert peer.closed.wait(ANSWER_SECS)
    finally:
        peer.close()
    relay_still_serves(fw)  # and the real alpha was not replaced


def test_after_a_hello_a_bad_tip_resets_only_its_stream(fw: QuicForwarding) -> None:
    peer = open_peer(fw)
    try:
        reply = answer_to(peer, tip.encode(tip.PeerHello("client", "laptop", fw.client_key)))
        answer = tip.TipReader().feed(reply)
        assert isinstance(answer, tip.HelloAnswer) and answer.ok, reply
        # A tip a client may not send, then garbage: each stream is refused or reset, nothing more.
        offer = tip.RelayOffer("laptop", "echo", tip.InnerTip(1))
        assert answer_to(peer, tip.encode(offer)) == b""
        assert answer_to(peer, b"\x01" + struct.pack(">H", 3) + b"\x93\x01\x02") == b""
        assert not peer.closed.is_set(), peer.close_reason
        # The same connection still forwards.
        stream = peer.open_stream()
        stream.write(tip.encode(tip.ClientConnect("alpha", "echo", tip.InnerTip(1))))
        with gevent.Timeout(ANSWER_SECS):
            first = stream.read()
        answer = tip.TipReader().feed(first)
        assert isinstance(answer, tip.Answer) and answer.ok, first
        stream.write(b"still here")
        with gevent.Timeout(ANSWER_SECS):
            echoed = b""
            while len(echoed) < 10:
                echoed += stream.read()
        assert echoed == b"still here"
        stream.abort()
    finally:
        peer.close()
    relay_still_serves(fw)


def test_client_settings_from_a_config_file(fw: QuicForwarding, tmp_path: Path) -> None:
    """ptth_quic_client --config: every setting from the file, the key from the file it names."""
    key_file = tmp_path / "client.key"
    key_file.write_text(fw.client_key + "\n")
    config = tmp_path / "ptth_quic_client.toml"
    config.write_text(f'relay = "127.0.0.1:{fw.relay_port}"\nrelay_fingerprint = "{fw.fingerprint}"\n'
                      f'name = "laptop"\napi_key_file = "{key_file}"\nbind = "127.0.0.1"\n'
                      'forward = ["0:alpha:echo"]\n')
    proc = Proc([sys.executable, "ptth_quic_client.py", "--config", str(config)], fw.tmp / "config-client.log")
    try:
        port = int(proc.wait_for_output(r"forwarding 127\.0\.0\.1:(\d+) to alpha:echo over QUIC").group(1))
        with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_SECS) as sock:
            sock.sendall(b"from a config file")
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == b"from a config file"
    finally:
        proc.kill()


def test_keys_never_reach_a_log(fw: QuicForwarding) -> None:
    """Runs last in this file: every key used above must be absent from every process's log."""
    relay_still_serves(fw)
    logs = "\n".join(proc.output() for proc in fw.procs) + (fw.tmp / "config-client.log").read_text()
    for key in (fw.server_key, fw.client_key, fw.other_client_key):
        assert key not in logs
    assert "connected" in logs  # the logs are there to search
