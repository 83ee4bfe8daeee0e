"""The QUIC relay's UDP socket: the connections it takes, and how little it gives them.

Anyone who knows the relay's address can open a QUIC connection to it, and
the relay's certificate fingerprint is public; so until a peer's hello is
accepted (`QuicPeer.trust`) its connection is restricted
(`PacedQuicConnection.restrict`): one stream, and a hello's worth of credit
for it and for the whole connection. The relay closes a connection whose
hello does not come within `quic_relay.HELLO_WAIT_SECS`.

Everything else about a connection is quic_io's.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any

import gevent
from aioquic._buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.packet import QuicPacketType, pull_quic_header

from . import quic_tip
from .quic_io import MAX_DATAGRAM_BYTES, PacedQuicConnection, QuicPeer

logger = logging.getLogger(__name__)

# Credit for a connection that has not said a valid hello yet, in all and for
# its one stream: the longest tip (a 3-byte header and MAX_TIP_BYTES), so the
# largest possible hello fits and nothing more.
UNTRUSTED_WINDOW_BYTES = 3 + quic_tip.MAX_TIP_BYTES
UNTRUSTED_MAX_STREAMS = 1

# RFC 9000 requires an Initial to fill a 1,200-byte datagram (anti-amplification).
MIN_INITIAL_BYTES = 1200


class QuicServerEndpoint:
    """The relay's UDP socket: every proxy's QUIC connection to it."""

    def __init__(self, sock: socket.socket, configuration: QuicConfiguration,
                 on_peer: Callable[[QuicPeer], None]) -> None:
        self.sock = sock
        self.configuration = configuration
        self.on_peer = on_peer  # called in a new greenlet for each new connection
        self.peers: dict[bytes, QuicPeer] = {}

    def serve_forever(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(MAX_DATAGRAM_BYTES)
            except OSError as e:  # e.g. an ICMP error queued on the socket: not fatal
                logger.debug("recvfrom: %s", e)
                continue
            self.datagram_received(data, addr)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            header = pull_quic_header(Buffer(data=data),
                                      host_cid_length=self.configuration.connection_id_length)
        except ValueError:
            return
        peer = self.peers.get(header.destination_cid)
        if peer is not None:
            peer.datagram_received(data, addr)
            return
        if header.packet_type != QuicPacketType.INITIAL or len(data) < MIN_INITIAL_BYTES \
                or header.version not in self.configuration.supported_versions:
            return
        peer = self._new_peer(header.destination_cid)
        peer.datagram_received(data, addr)

    def _new_peer(self, original_cid: bytes) -> QuicPeer:
        quic = PacedQuicConnection(configuration=self.configuration,
                                   original_destination_connection_id=original_cid)
        quic.restrict(UNTRUSTED_WINDOW_BYTES, UNTRUSTED_MAX_STREAMS)
        peer = QuicPeer(quic, self._sendto)
        cids = {original_cid, quic.host_cid}

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
        gevent.spawn(self._forget, peer, cids)
        gevent.spawn(self.on_peer, peer)
        return peer

    def _forget(self, peer: QuicPeer, cids: set[bytes]) -> None:
        peer.closed.wait()
        for cid in cids:
            if self.peers.get(cid) is peer:
                del self.peers[cid]

    def _sendto(self, data: bytes, addr: Any) -> None:
        self.sock.sendto(data, addr)
