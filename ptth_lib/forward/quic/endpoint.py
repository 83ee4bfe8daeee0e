"""The QUIC relay's UDP socket: which new connections it takes, and how little it gives them.

Anyone who knows the relay's address can send it Initial packets, and the
relay's certificate fingerprint is public; so until a peer's hello is
accepted (`QuicPeer.trust`) it gets as little as possible:

1. Address validation, always: an Initial without a token is answered with a
   Retry (RFC 9000 8.1.2) carrying a token sealed with a per-process key, and
   the relay keeps nothing for it. Only an Initial that echoes a valid token,
   and so comes from the address it claims, can create a connection. A flood
   of Initials, spoofed or not, costs a Retry packet each (smaller than the
   Initial: no amplification) and no memory; an honest proxy pays one round
   trip, once per connection, which it keeps for hours.
2. Half-open connections (handshake or hello not done yet) are capped per
   source address (an IPv6 address by its /64) and in all; beyond either cap
   a new Initial is dropped without state (the peer retransmits it later).
   The relay closes a connection whose hello does not come within
   `relay.HELLO_WAIT_SECS`, which frees its place.
3. A new connection is restricted (`PacedQuicConnection.restrict`): one
   stream, a hello's worth of bytes on it, and UNTRUSTED_DATAGRAM_BYTES of
   datagrams in all (its handshake included), until it is trusted; a peer
   that goes past any of these is closed at once.

The socket is read in batches (udp.py: recvmmsg and GRO where Linux has
them), and each connection is fed its datagrams of a batch at once.
Everything else about a connection is driver.py's; the qh3 internals Retry
and the restriction need are quic_adapter.py's.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import gevent
from qh3.quic.configuration import QuicConfiguration

from ptth_lib.forward.quic.driver import QuicPeer
from ptth_lib.forward.quic.quic_adapter import (
    PacedQuicConnection,
    RetryTokens,
    encode_retry,
    is_initial,
    parse_header,
)
from ptth_lib.forward.quic.udp import UdpSocket
from ptth_lib.wire import tip

logger = logging.getLogger(__name__)

# Bytes a connection that has not said a valid hello yet may send on its one
# stream: the longest tip (a 3-byte header and MAX_TIP_BYTES), so the largest
# possible hello fits and nothing more.
UNTRUSTED_WINDOW_BYTES = 3 + tip.MAX_TIP_BYTES
UNTRUSTED_MAX_STREAMS = 1

# Half-open connections from one address: proxies behind one NAT that all
# reconnect after a relay restart fit easily; one attacker holds no more.
MAX_HALF_OPEN_PER_ADDRESS = 16
# Half-open connections in all. Each costs a TLS handshake and its state, and at
# most quic_adapter.UNTRUSTED_DATAGRAM_BYTES (64 KiB) of what the peer sent, for at
# most HELLO_WAIT_SECS (RELIABILITY.md, "Exhaustion before authentication (QUIC)").
MAX_HALF_OPEN = 256

# RFC 9000 requires an Initial to fill a 1,200-byte datagram (anti-amplification).
MIN_INITIAL_BYTES = 1200

# At most one log line this often about Initials dropped at the caps, however many.
DROP_LOG_SECS = 10.0


def address_key(host: str) -> str:
    """What the per-address cap counts by: the IP, or an IPv6 address's /64 (one site's)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class HalfOpenCount:
    """Half-open connections per address key and in all, under two caps."""

    def __init__(self, per_address: int = MAX_HALF_OPEN_PER_ADDRESS, total: int = MAX_HALF_OPEN) -> None:
        self.per_address_cap = per_address
        self.total_cap = total
        self.by_address: dict[str, int] = {}
        self.total = 0

    def take(self, key: str) -> bool:
        """Count one more half-open connection for `key`; False (nothing counted) at a cap."""
        count = self.by_address.get(key, 0)
        if count >= self.per_address_cap or self.total >= self.total_cap:
            return False
        self.by_address[key] = count + 1
        self.total += 1
        return True

    def give_back(self, key: str) -> None:
        """One of `key`'s half-open connections is trusted or closed."""
        count = self.by_address[key] - 1
        if count:
            self.by_address[key] = count
        else:
            del self.by_address[key]  # the map holds only addresses with half-open connections
        self.total -= 1


class QuicServerEndpoint:
    """The relay's UDP socket: every proxy's QUIC connection to it."""

    def __init__(self, sock: socket.socket, configuration: QuicConfiguration,
                 on_peer: Callable[[QuicPeer], None], batched: bool = True) -> None:
        self.sock = sock
        self.udp = UdpSocket(sock, batched)
        self.configuration = configuration
        self.on_peer = on_peer  # called in a new greenlet for each new connection
        self.peers: dict[bytes, QuicPeer] = {}
        self.half_open = HalfOpenCount()
        self._tokens = RetryTokens()  # its key is random, so tokens die with the process
        self._dropped = 0
        self._drop_logged_at = -DROP_LOG_SECS

    def serve_forever(self) -> None:
        while True:
            try:
                batch = self.udp.recv_batch()
            except OSError as e:  # e.g. an ICMP error queued on the socket: not fatal
                logger.debug("recvfrom: %s", e)
                continue
            self.datagrams_received(batch)

    def datagrams_received(self, batch: list[tuple[bytes, Any]]) -> None:
        """A batch from the socket: each connection gets its datagrams in one call, in order."""
        cid_length = self.configuration.connection_id_length
        run: list[bytes] = []  # consecutive datagrams for one connection from one address
        run_peer: QuicPeer | None = None
        run_addr: Any = None
        for data, addr in batch:
            peer = None
            if data and not data[0] & 0x80:  # a short header: the connection id comes right after
                peer = self.peers.get(data[1:1 + cid_length])
            if peer is None:
                if run_peer is not None:
                    run_peer.datagrams_received(run, run_addr)
                    run, run_peer = [], None
                self.datagram_received(data, addr)
                continue
            if run_peer is not None and (peer is not run_peer or addr != run_addr):
                run_peer.datagrams_received(run, run_addr)
                run = []
            run.append(data)
            run_peer, run_addr = peer, addr
        if run_peer is not None:
            run_peer.datagrams_received(run, run_addr)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            header = parse_header(data, self.configuration.connection_id_length)
        except ValueError:
            return
        peer = self.peers.get(header.destination_cid)
        if peer is not None:
            peer.datagrams_received([data], addr)
            return
        if not is_initial(header) or len(data) < MIN_INITIAL_BYTES \
                or header.version not in self.configuration.supported_versions:
            return
        if not header.token:
            self._send_retry(header.version, header.source_cid, header.destination_cid, addr)
            return
        try:
            original_cid = self._tokens.validate(addr, header.destination_cid, header.token, time.monotonic())
        except ValueError:
            return  # forged, expired, or from another address: nothing kept, nothing said
        key = address_key(addr[0])
        if not self.half_open.take(key):
            self._note_drop()
            return
        peer = self._new_peer(original_cid, header.destination_cid, key)
        peer.datagrams_received([data], addr)

    def _send_retry(self, version: int, peer_cid: bytes, original_cid: bytes, addr: Any) -> None:
        retry_cid = os.urandom(self.configuration.connection_id_length)
        token = self._tokens.create(addr, original_cid, retry_cid, time.monotonic())
        try:
            self.udp.send_batch([encode_retry(version, retry_cid, peer_cid, original_cid, token)], addr)
        except OSError as e:  # the peer retransmits its Initial
            logger.debug("sendto failed: %s", e)

    def _note_drop(self) -> None:
        self._dropped += 1
        now = time.monotonic()
        if now - self._drop_logged_at >= DROP_LOG_SECS:
            logger.warning("dropped %d new QUIC connection(s): %d half-open (at most %d per address, %d in all)",
                           self._dropped, self.half_open.total, self.half_open.per_address_cap,
                           self.half_open.total_cap)
            self._dropped = 0
            self._drop_logged_at = now

    def _new_peer(self, original_cid: bytes, retry_cid: bytes, key: str) -> QuicPeer:
        quic = PacedQuicConnection(configuration=self.configuration,
                                   original_destination_connection_id=original_cid,
                                   retry_source_connection_id=retry_cid)
        quic.restrict(UNTRUSTED_WINDOW_BYTES, UNTRUSTED_MAX_STREAMS)
        peer = QuicPeer(quic, self.udp.send_batch)
        cids = {retry_cid, quic.host_cid}

        def on_cid(cid: bytes, issued: bool) -> None:
            if issued:
                cids.add(cid)
                self.peers[cid] = peer
            else:
                cids.discard(cid)
                self.peers.pop(cid, None)

        peer.on_cid = on_cid
        for cid in cids:
            self.peers[cid] = peer
        gevent.spawn(self._watch, peer, cids, key)
        gevent.spawn(self.on_peer, peer)
        return peer

    def _watch(self, peer: QuicPeer, cids: set[bytes], key: str) -> None:
        """Free the half-open place once the peer is trusted or gone; forget it once gone."""
        gevent.wait([peer.trusted, peer.closed], count=1)
        self.half_open.give_back(key)
        peer.closed.wait()
        for cid in cids:
            if self.peers.get(cid) is peer:
                del self.peers[cid]

