"""UDP for QUIC under gevent: datagrams in and out in batches.

On Linux, qh3's `UdpSocketState` (quinn-udp) sends a batch of datagrams to one
address in one sendmsg with UDP GSO (the kernel cuts one buffer into
datagrams) and receives with recvmmsg and GRO (many datagrams per system
call). Elsewhere, or if the socket refuses it, plain sendto/recvfrom, one
datagram per call. Either way the socket stays non-blocking and a receiver
waits for it with gevent.

Nothing here waits to send: a send that finds the socket's buffer full drops
the rest of its batch, as a network would (QUIC retransmits it), because
sends happen in an event-loop callback, which must not block.
"""

from __future__ import annotations

import errno
import logging
import socket
from typing import Any

import gevent.socket
import qh3._hazmat

# quinn-udp's batched socket calls: Unix only.
_UdpSocketState: Any = getattr(qh3._hazmat, "UdpSocketState", None)

logger = logging.getLogger(__name__)

# A receive buffer for any UDP datagram (a peer's packets are far smaller: its max_datagram_size).
MAX_DATAGRAM_BYTES = 65536

# UDP socket buffers: the kernel's defaults (about 200 KiB) dropped hundreds of
# datagrams per MiB at the relay when both directions were busy (bench/forward.py).
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024


def size_buffers(sock: socket.socket) -> None:
    """Ask for larger UDP buffers (the kernel may cap them at net.core.rmem_max)."""
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
        except OSError:
            pass


class UdpSocket:
    """A non-blocking UDP socket that sends and receives datagrams in batches."""

    def __init__(self, sock: socket.socket, batched: bool = True) -> None:
        self.sock = sock
        self._state: Any = None
        if batched and _UdpSocketState is not None:
            try:
                self._state = _UdpSocketState(sock.fileno())
            except (OSError, RuntimeError, ValueError) as e:
                logger.debug("no batched UDP (%s): one datagram per system call", e)

    @property
    def batched(self) -> bool:
        """Tell whether sends use GSO and receives recvmmsg/GRO."""
        return self._state is not None

    def recv_batch(self) -> list[tuple[bytes, Any]]:
        """Datagrams that have arrived, waiting for at least one; ConnectionRefusedError on an ICMP error."""
        if self._state is None:
            data, addr = self.sock.recvfrom(MAX_DATAGRAM_BYTES)
            return [(data, addr)]
        while True:
            try:
                batch: list[tuple[bytes, Any]] = self._state.recv()
            except OSError as e:
                if e.errno == errno.ECONNREFUSED:
                    raise ConnectionRefusedError(e.errno, e.strerror) from None
                if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                    raise
                batch = []
            if batch:
                return batch
            gevent.socket.wait_read(self.sock.fileno())

    def send_batch(self, datagrams: list[bytes], addr: Any) -> None:
        """Send datagrams to addr now; drop what the socket's buffer has no room for."""
        if self._state is None:
            for i, data in enumerate(datagrams):
                try:
                    self.sock.sendto(data, addr)
                except BlockingIOError:
                    logger.debug("socket full: %d datagram(s) dropped", len(datagrams) - i)
                    return
            return
        sent = 0
        while sent < len(datagrams):
            try:
                n = self._state.send(datagrams[sent:], addr)
            except OSError as e:
                sent += getattr(e, "datagrams_sent", 0)
                if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    logger.debug("socket full: %d datagram(s) dropped", len(datagrams) - sent)
                    return
                if e.errno == errno.EIO and self._state.max_gso_segments > 1:
                    self._state.disable_gso()  # e.g. a NIC that cannot segment: one datagram per buffer
                    continue
                raise
            if n <= 0:
                logger.debug("nothing sent: %d datagram(s) dropped", len(datagrams) - sent)
                return
            sent += n

    def close(self) -> None:
        self.sock.close()


def new_socket(family: int) -> gevent.socket.socket:
    """A UDP socket for QUIC, with large buffers."""
    sock = gevent.socket.socket(family, socket.SOCK_DGRAM)
    size_buffers(sock)
    return sock


__all__ = ["MAX_DATAGRAM_BYTES", "UdpSocket", "new_socket", "size_buffers"]
