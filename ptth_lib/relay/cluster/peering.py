"""Peer links: bodies and streams crossing from one relay node to another (CLUSTER.md sections 3-4).

A **peer link** is one TCP connection from a node (the *opener*, through its
`PeerPool`) to another node's `PeerServer`. It carries one **call** at a
time, full duplex: the opener's head (its `kind` names the server's
handler), then data both ways, then an end frame each way. A link whose call
ended cleanly both ways goes back to the pool for the next call; any other
link is dropped, so a half-read stream is never mistaken for the next call.
Nothing here touches Redis; the rendezvous decides who calls whom.

**Handshake** (before any frame; every size fixed, so an unauthenticated
peer can make the server hold at most a few dozen bytes, for at most
HANDSHAKE_SECS, and at most MAX_HANDSHAKING such peers at once)::

    opener -> server   MAGIC, nonce_o (32 bytes)
    server -> opener   MAGIC, nonce_s (32), HMAC-SHA256(secret, b"server" nonce_o nonce_s)
    opener -> server   HMAC-SHA256(secret, b"client" nonce_o nonce_s)
    server -> opener   ACCEPTED (one byte), or the connection closes

Each side proves it knows the cluster secret over the other's fresh nonce;
the role labels keep a proof from being replayed the other way. This
authenticates, it does not encrypt: links are plain TCP on a private network.

**Frames** (after the handshake)::

    type (1 byte) | length (4 bytes, big-endian) | payload (length bytes)

    HEAD  1   a msgpack map; first frame of each direction of a call
    DATA  2   1 to MAX_PIECE_BYTES bytes of body
    END   3   empty; this direction of the call is over (a half-close)
    ABORT 4   empty; the call is cut, the link is dropped

A call is: the opener's HEAD, DATA..., END, and the server's HEAD, DATA...,
END, the two directions interleaved freely. An unknown type, a length over
MAX_PIECE_BYTES, a non-empty END or ABORT, an empty DATA or a frame out of
order drops the link: the other side sees `PeerCutError`.

**Flow.** TCP_NODELAY is on and a piece is sent as one frame the moment it is
given, so keystrokes cross at once. `pieces()` reads the next frame when its
consumer asks for it, so a consumer that stops reading stops the sender once
the two sockets' buffers are full; a link holds no more than the piece in
hand and at most READ_AHEAD_BYTES read past it (which lets the small frames
of a small call arrive in one system call). A direction's last write can
carry its end (`send(piece, end=True)`, `send_head(head, end=True)`): a
small call then costs three writes in all.

**An early answer.** A server handler may answer (say `{"status": 410}` and
END) and return without reading the opener's body to its end. Unless that
rest is short and already on its way (SKIP_REST_BYTES), the server drops the
link, so the opener's next `send` fails with `PeerCutError`. The answer that
arrived before the cut can still be read (Linux keeps received bytes readable
after a reset): `send` until it fails, then `read_head()`. So an opener never
hangs on a peer that stopped reading, and the peer never reads a long body
in vain.

Threads: each link's reads belong to one thread, its writes to one (maybe
another: full duplex); `abort()` may come from any thread. Under gevent's
monkey-patching the threads are greenlets and the sockets cooperative; a
`gevent.Timeout` that interrupts a call leaves the link unclean, so
`close()` drops it.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import ipaddress
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NoReturn, Self

import msgpack

from ptth_lib.errors import ConfigError, PtthError, root_cause

logger = logging.getLogger(__name__)

# ---- the handshake ------------------------------------------------------------

# Sent first by both sides: a stray client (a browser, a port scanner, another
# protocol) is told apart from a peer by its first bytes, and the version can change.
MAGIC = b"PTTH-PEER/1\n"
NONCE_BYTES = 32
PROOF_BYTES = hashlib.sha256().digest_size
ACCEPTED = b"\x01"
# A peer on the same LAN finishes the handshake in two round trips, well under
# a millisecond; 2 s covers a loaded node and still frees a slot held by a
# peer that connects and says nothing (or one byte at a time) quickly.
HANDSHAKE_SECS = 2.0
# Peers still proving themselves, at once. Real peers pass in microseconds, so
# this only ever fills with strangers; past it new connections are closed unread.
MAX_HANDSHAKING = 64

# ---- the frames ---------------------------------------------------------------

FRAME = struct.Struct("!BI")
HEAD, DATA, END, ABORT = 1, 2, 3, 4
_END_FRAME = FRAME.pack(END, 0)
_FRAME_NAMES = {HEAD: "head", DATA: "data", END: "end", ABORT: "abort"}
# The largest payload of one frame. Pieces are 256 KiB in the relay
# (PIECE_BYTES); a longer piece given to send() goes as several frames. The
# reader refuses longer frames before reading them, so a frame costs at most
# this much memory.
MAX_PIECE_BYTES = 1 << 20
# After a small frame, a read takes up to this much, so that the frames of a small
# call arrive in one system call; a link holds at most this much read ahead.
READ_AHEAD_BYTES = 16 * 1024
# Payloads up to this size go out in one send() with their header (one copy);
# longer ones go with sendmsg() from where they are, without a copy.
_COPY_BELOW_BYTES = 64 * 1024

# A handler that returns without reading the rest of the body: the link is kept if
# that rest ends within this many bytes and seconds (an empty body's end frame is
# already there, or a LAN round trip away); else it is dropped, rather than read
# in vain (an early answer to a long upload).
SKIP_REST_BYTES = 64 * 1024
SKIP_REST_SECS = 0.2

# ---- links, pools, servers ----------------------------------------------------

# A server may serve this many authenticated links at once (one thread, or
# greenlet, and one socket each). Each crossing stream (a body, a WebSocket, a
# forwarded connection's direction) holds one link, while idle servers' parked
# listens hold none: of a worker's max_connections (relay/capacity.py) only
# the streams in flight count, so this rarely binds.
MAX_LINKS = 4096
# An idle link is kept this long in an opener's pool: a busy pair of nodes
# reuses links continuously, a quiet one lets them go.
POOL_IDLE_SECS = 30.0
# A server waits about this long (up to a quarter more) for the next call on an
# idle link: longer than the pool keeps it, so the opener is always the side
# that lets an idle link go (a server closing first could meet a call the
# opener sent at that instant).
SERVER_IDLE_SECS = 60.0
# TCP keepalive: a peer host that vanished (power cut, partition) without a
# reset is noticed after about 60 + 3 * 10 s, on links idle in the middle of
# a call (a quiet WebSocket) as anywhere else.
KEEPALIVE_IDLE_SECS = 60
KEEPALIVE_INTERVAL_SECS = 10
KEEPALIVE_PROBES = 3
# Wrong-secret peers are logged at most once per this many seconds (with how
# many more there were), so a stranger hammering the port cannot flood the log.
WARN_EVERY_SECS = 10.0


class PeerCutError(PtthError):
    """The link closed, broke or was aborted before the other side's end frame."""


class PeerUnreachableError(PeerCutError):
    """No link could be made to the peer: refused, timed out or unroutable."""


class PeerAuthError(PeerCutError):
    """The peer did not pass the handshake: not a PTTH node, or another cluster secret."""


class _Eof(PtthError):
    """The socket reached its end in the middle of what we were reading."""


# ---- one link -----------------------------------------------------------------


class PeerLink:
    """One stream between two nodes, full duplex, after the handshake.

    `peer` names the other end in messages: the address the opener dialled,
    or the address a server link came from. An opener closes every link it
    opened (`with pool.open(...) as link:` does): a cut while sending leaves
    the socket open, since an early answer may still wait there to be read.
    """

    def __init__(self, sock: socket.socket, peer: str, pool: PeerPool | None = None) -> None:
        self._sock = sock
        self.peer = peer
        self._pool = pool
        self._write_lock = threading.Lock()
        self._dead = False  # the socket is closed; nothing more goes through it
        # Bytes read past the current frame: at most READ_AHEAD_BYTES, and only after a
        # small frame (see _read), so a stream of big pieces is read straight into each piece.
        self._ahead = b""
        self._ahead_at = 0
        self._read_ahead = True
        self._new_call()

    def _new_call(self) -> None:
        self._head_sent = False
        self._out_ended = False
        self._out_torn = False  # a write failed or was interrupted: the frames out may be cut mid-way
        self._head_in: dict[str, Any] | None = None
        self._in_ended = False
        self._in_cut: str | None = None  # why the input broke, once it has

    # ---- writing ----

    def send_head(self, head: dict[str, Any], end: bool = False) -> None:
        """Send this direction's head: once per call, before any data.

        `end=True` ends this direction in the same write, as `end()` would
        after it (a bodiless answer in one system call).
        """
        if self._head_sent:
            raise RuntimeError("a peer link's head is sent once per call")
        payload = msgpack.packb(head)
        if len(payload) > MAX_PIECE_BYTES:
            raise ValueError(f"a peer link head of {len(payload)} bytes is over {MAX_PIECE_BYTES}")
        self._write_frame(HEAD, payload, end)
        self._head_sent = True
        self._out_ended = end

    def send(self, piece: bytes, end: bool = False) -> None:
        """Send `piece` as one data frame now (several if over MAX_PIECE_BYTES); b"" sends nothing.

        Blocks while the other side's buffers are full; raises PeerCutError
        once the link is cut (including after the other side answered early
        and dropped it: its answer may still be read). `end=True` ends this
        direction in the same write, as `end()` would after it.
        """
        self._check_writable()
        view = memoryview(piece)
        if not view:
            if end:
                self.end()
            return
        last = len(view) - 1
        for start in range(0, len(view), MAX_PIECE_BYTES):
            self._write_frame(DATA, view[start:start + MAX_PIECE_BYTES], end and start + MAX_PIECE_BYTES > last)
        self._out_ended = end

    def end(self) -> None:
        """End this direction of the call (a half-close); the other may go on. Twice is once."""
        if self._out_ended:
            return
        self._check_writable()
        self._write_frame(END, b"")
        self._out_ended = True

    def _check_writable(self) -> None:
        if not self._head_sent:
            raise RuntimeError("a peer link sends its head before data or end")
        if self._out_ended:
            raise RuntimeError("a peer link cannot send after its end")

    def _write_frame(self, kind: int, payload: bytes | memoryview, then_end: bool = False) -> None:
        """One frame (and an end frame after it if `then_end`), in one system call when it is small."""
        if self._dead or self._out_torn:
            raise PeerCutError(f"peer link to {self.peer} is cut")
        header = FRAME.pack(kind, len(payload))
        trailer = _END_FRAME if then_end else b""
        with self._write_lock:
            self._out_torn = True  # until the whole frame is out
            try:
                if len(payload) < _COPY_BELOW_BYTES:
                    _send_all(self._sock, header + payload + trailer)
                else:
                    _send_parts(self._sock, [header, payload, trailer])
            except OSError as e:
                raise PeerCutError(f"peer link to {self.peer} cut while sending: {root_cause(e)}") from e
            self._out_torn = False

    # ---- reading ----

    def read_head(self) -> dict[str, Any]:
        """The other side's head for this call (read once, then remembered); raises PeerCutError."""
        if self._head_in is None:
            kind, payload = self._read_frame()
            if kind != HEAD:
                self._bad_input(f"a {_FRAME_NAMES[kind]} frame before the head")
            self._head_in = _decode_head(payload, self)
        return self._head_in

    def pieces(self) -> Iterator[bytes]:
        """The other side's data, piece by piece, until its end frame.

        Each frame is read when the consumer asks for the next piece, not
        before. Raises PeerCutError if the link is aborted, closes or breaks
        first. Reads the head first if nobody has.
        """
        self.read_head()
        while not self._in_ended:
            kind, payload = self._read_frame()
            if kind == END:
                self._in_ended = True
            elif kind == DATA:
                yield payload
            else:
                self._bad_input("a second head in one call")

    def _read_frame(self) -> tuple[int, bytes]:
        """The next frame; an abort or a cut becomes PeerCutError, a bad frame drops the link."""
        if self._in_cut is not None:
            raise PeerCutError(self._in_cut)
        if self._in_ended:
            raise RuntimeError("a peer link reads nothing after the other side's end")
        try:
            kind, length = FRAME.unpack(self._read(FRAME.size))
            if kind not in _FRAME_NAMES or length > MAX_PIECE_BYTES:
                self._bad_input(f"a frame of type {kind} and {length} bytes")
            if (kind in (END, ABORT) and length) or (kind == DATA and not length):
                self._bad_input(f"a {_FRAME_NAMES[kind]} frame of {length} bytes")
            payload = self._read(length) if length else b""
            self._read_ahead = length < READ_AHEAD_BYTES
        except (OSError, _Eof) as e:
            why = "closed" if isinstance(e, _Eof) else root_cause(e)
            self._cut_in(f"peer link to {self.peer} cut before its end: {why}", e)
        if kind == ABORT:
            self._cut_in(f"peer {self.peer} aborted the call")
        return kind, payload

    def _cut_in(self, why: str, cause: BaseException | None = None) -> NoReturn:
        """The other side is gone or gave up: the call is over both ways, so the socket goes now."""
        self._in_cut = why
        self.abort()
        raise PeerCutError(why) from cause

    def _read(self, n: int) -> bytes:
        """Exactly `n` bytes of the stream: what was read ahead, then the socket.

        Small frames come in batches (a head, 1 KiB, an end), so after a small
        frame one recv() of up to READ_AHEAD_BYTES takes the next ones too.
        After a big frame the next header is read alone, so that a big piece
        is received straight into its own bytes object, not copied twice.
        """
        ahead, at = self._ahead, self._ahead_at
        if len(ahead) - at >= n:
            self._ahead_at = at + n
            return ahead[at:at + n]
        got = ahead[at:]
        self._ahead, self._ahead_at = b"", 0
        if not self._read_ahead or n - len(got) >= READ_AHEAD_BYTES:
            rest = _recv_exact(self._sock, n - len(got))
            return got + rest if got else rest
        while len(got) < n:
            data = self._sock.recv(READ_AHEAD_BYTES)
            if not data:
                raise _Eof()
            got += data
        self._ahead, self._ahead_at = got, n
        return got[:n]

    def _skip_rest(self) -> None:
        """Read what is left of the other side's body, if it ends soon and is short.

        A handler that answered without reading a body it did not need (often
        just the end frame, on its way) leaves the link reusable; a long body
        still coming (an early answer to an upload) leaves it unclean.
        """
        deadline = time.monotonic() + SKIP_REST_SECS
        skipped = 0
        try:
            self.read_head()
            while not self._in_ended and skipped <= SKIP_REST_BYTES:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._sock.settimeout(remaining)
                kind, payload = self._read_frame()
                if kind == END:
                    self._in_ended = True
                elif kind == DATA:
                    skipped += len(payload)
                else:
                    self._bad_input("a second head in one call")
        except PeerCutError:
            return
        finally:
            if not self._dead:
                self._sock.settimeout(None)

    def _bad_input(self, what: str) -> NoReturn:
        why = f"peer link to {self.peer} dropped: it sent {what}"
        logger.warning("%s", why)
        self._cut_in(why)

    # ---- ending ----

    def abort(self) -> None:
        """Cut the call: an abort frame if it can go at once, then the socket is closed for good."""
        if self._dead:
            return
        # Only during a call, between whole frames of an open direction; if a send is
        # under way (the lock is taken), the close alone tells the peer.
        in_call = self._head_sent or self._head_in is not None
        if (in_call and not self._out_ended and not self._out_torn
                and self._write_lock.acquire(blocking=False)):
            try:
                # MSG_DONTWAIT: never wait on a peer that does not read; a full buffer
                # just means the peer learns of the cut from the close instead.
                self._sock.sendmsg([FRAME.pack(ABORT, 0)], [], socket.MSG_DONTWAIT)
            except OSError:
                pass
            finally:
                self._write_lock.release()
        self._drop()

    def close(self) -> None:
        """Done with this call: a clean link goes back to its pool, any other is dropped.

        Clean: both heads and both ends went through and every frame in was read.
        On a server's link, a clean close() leaves it to the server, which waits
        for the next call.
        """
        if self._dead:
            return
        if not self.is_clean():
            self.abort()
        elif self._pool is not None:
            self._pool._give_back(self)

    def is_clean(self) -> bool:
        """Whether this call is over both ways with nothing left to read: the link can carry another."""
        return (not self._dead and self._head_sent and self._out_ended and not self._out_torn
                and self._head_in is not None and self._in_ended and self._in_cut is None)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """Whether the socket is closed (aborted, dropped, or the pool let it go)."""
        return self._dead

    def _drop(self) -> None:
        """Close the socket; shutdown() first wakes a thread blocked on it (close() alone may not)."""
        self._dead = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    def _is_quiet(self) -> bool:
        """Whether an idle link is still open with nothing to read: the peer has not closed it."""
        if self._dead or self._ahead_at < len(self._ahead):
            return False
        self._sock.settimeout(0.0)
        try:
            self._sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        finally:
            self._sock.settimeout(None)
        return False  # the peer closed it (b""), or sent something unasked


def _decode_head(payload: bytes, link: PeerLink) -> dict[str, Any]:
    try:
        head = msgpack.unpackb(payload, raw=False)
    except Exception as e:  # noqa: BLE001 - msgpack raises many types (ValueError, ExtraData, TypeError...)
        link._bad_input(f"a head that is not MsgPack ({type(e).__name__})")
    if not isinstance(head, dict):
        link._bad_input("a head that is not a map")
    return head


# ---- sockets ------------------------------------------------------------------


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly `n` bytes; one recv (no copy) when they are all there. Raises _Eof at the end."""
    data = sock.recv(n)
    if len(data) == n:
        return data
    parts = [data]
    got = len(data)
    while data and got < n:
        data = sock.recv(n - got)
        parts.append(data)
        got += len(data)
    if got < n:
        raise _Eof()
    return b"".join(parts)


def _send_all(sock: socket.socket, data: bytes) -> None:
    """sendall(), with its first try inline: gevent's sendall costs a few µs more than one send()."""
    sent = sock.send(data)
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])


def _send_parts(sock: socket.socket, parts: list[bytes | memoryview]) -> None:
    """Send the parts in order with sendmsg, from where they lie (a piece is not copied)."""
    views = [memoryview(part) for part in parts if part]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]


def _tune(sock: socket.socket) -> None:
    """TCP_NODELAY (pieces cross at once) and keepalive (a vanished host is noticed)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_SECS), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_SECS),
                        ("TCP_KEEPCNT", KEEPALIVE_PROBES)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _recv_by(sock: socket.socket, n: int, deadline: float) -> bytes:
    """Exactly `n` bytes before `deadline` (time.monotonic()); socket.timeout or _Eof otherwise."""
    parts: list[bytes] = []
    got = 0
    while got < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("handshake deadline passed")
        sock.settimeout(remaining)
        data = sock.recv(n - got)
        if not data:
            raise _Eof()
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def _connect_to(host: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection to `host`:`port`. Peers advertise numeric addresses (peer_bind), which are
    connected to directly: create_connection would look each one up first, and under gevent a
    lookup is a trip through a thread, on every new link."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return socket.create_connection((host, port), timeout=timeout)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _proof(secret: bytes, role: bytes, opener_nonce: bytes, server_nonce: bytes) -> bytes:
    return hmac.new(secret, role + opener_nonce + server_nonce, hashlib.sha256).digest()


def _open_handshake(sock: socket.socket, secret: bytes, deadline: float, peer: str) -> None:
    """The opener's half of the handshake; raises PeerAuthError, or OSError/_Eof for a cut."""
    opener_nonce = os.urandom(NONCE_BYTES)
    sock.sendall(MAGIC + opener_nonce)
    reply = _recv_by(sock, len(MAGIC) + NONCE_BYTES + PROOF_BYTES, deadline)
    if not reply.startswith(MAGIC):
        raise PeerAuthError(f"{peer} is not a PTTH relay's peer port")
    server_nonce = reply[len(MAGIC):len(MAGIC) + NONCE_BYTES]
    if not hmac.compare_digest(reply[-PROOF_BYTES:], _proof(secret, b"server", opener_nonce, server_nonce)):
        raise PeerAuthError(f"peer {peer} does not know this cluster's secret")
    sock.sendall(_proof(secret, b"client", opener_nonce, server_nonce))
    try:
        verdict = _recv_by(sock, len(ACCEPTED), deadline)
    except (_Eof, ConnectionResetError):
        verdict = b""
    if verdict != ACCEPTED:
        raise PeerAuthError(f"peer {peer} refused the handshake: does it run with this cluster's secret?")


def _serve_handshake(sock: socket.socket, secret: bytes, deadline: float) -> bool:
    """The server's half up to checking the opener's proof; the caller then sends ACCEPTED.

    False (the caller drops the link) for a peer without the secret; raises
    OSError/_Eof/TimeoutError for a peer that is too slow or hangs up.
    """
    hello = _recv_by(sock, len(MAGIC) + NONCE_BYTES, deadline)
    if not hello.startswith(MAGIC):
        raise _Eof()  # not a peer: treat as a hang-up, quietly
    opener_nonce = hello[len(MAGIC):]
    server_nonce = os.urandom(NONCE_BYTES)
    sock.sendall(MAGIC + server_nonce + _proof(secret, b"server", opener_nonce, server_nonce))
    proof = _recv_by(sock, PROOF_BYTES, deadline)
    return hmac.compare_digest(proof, _proof(secret, b"client", opener_nonce, server_nonce))


def _check_secret(secret: bytes) -> None:
    if not isinstance(secret, bytes) or not secret:
        raise ConfigError("the cluster's peer secret must be non-empty bytes")


def split_address(address: str) -> tuple[str, str]:
    """("host", "port part") of "host:port", "host:lo-hi" or "[v6]:port"; ConfigError if malformed."""
    host, colon, ports = address.rpartition(":")
    if not colon or not host or not ports:
        raise ConfigError(f"peer address {address!r}: expected HOST:PORT or HOST:FIRST-LAST")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, ports


def _port_range(address: str) -> tuple[str, range]:
    host, ports = split_address(address)
    first, dash, last = ports.partition("-")
    if not (first.isdigit() and first.isascii() and (not dash or (last.isdigit() and last.isascii()))):
        raise ConfigError(f"peer_bind {address!r}: the port must be a number or FIRST-LAST")
    lo, hi = int(first), int(last) if dash else int(first)
    if not 0 <= lo <= hi <= 65535 or (lo == 0 and hi != 0):
        raise ConfigError(f"peer_bind {address!r}: ports must be 1-65535 (or 0 for any), first <= last")
    return host, range(lo, hi + 1)


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---- the server ---------------------------------------------------------------


class _RateLimitedWarning:
    """One WARNING line per WARN_EVERY_SECS at most; the lines held back are counted in the next."""

    def __init__(self) -> None:
        self._next_at = 0.0
        self._held = 0
        self._lock = threading.Lock()

    def warn(self, message: str, *args: object) -> None:
        with self._lock:
            now = time.monotonic()
            if now < self._next_at:
                self._held += 1
                return
            held, self._held, self._next_at = self._held, 0, now + WARN_EVERY_SECS
        suffix = f" (and {held} more like it)" if held else ""
        logger.warning(message + suffix, *args)


Handler = Callable[[dict[str, Any], PeerLink], None]


class PeerServer:
    """A node's listener for peer links: authenticates each, then serves its calls one by one.

    `handlers` maps a call's `kind` to a function of (head, link): it reads
    the body with `link.pieces()` and answers with `send_head`, `send` and
    `end`; when it returns, it is done with the link. If the call is then over
    both ways, the link waits for the next call. If its answer is ended but
    the body is not read to its end, the rest is skipped if short and quick
    (SKIP_REST_BYTES, SKIP_REST_SECS), else the link is dropped (an early
    answer). If it raises or returns with its answer open, the link is
    aborted (and the exception logged once).
    """

    def __init__(self, bind: str, secret: bytes, handlers: Mapping[str, Handler], *,
                 max_links: int = MAX_LINKS, max_handshaking: int = MAX_HANDSHAKING,
                 handshake_secs: float = HANDSHAKE_SECS, idle_secs: float = SERVER_IDLE_SECS) -> None:
        """Bind to `bind`, "HOST:PORT" or "HOST:FIRST-LAST" (the first free port of the range).

        Raises ConfigError for a malformed `bind`, OSError if no port is free.
        """
        _check_secret(secret)
        self._secret = secret
        self._handlers = dict(handlers)
        self._max_links = max_links
        self._max_handshaking = max_handshaking
        self._handshake_secs = handshake_secs
        self._idle_secs = idle_secs
        self._listener = _bind_first_free(bind)
        host, port = self._listener.getsockname()[:2]
        self.address = _format_address(host, port)
        self._lock = threading.Lock()
        self._links = 0  # open connections past accept, in or after the handshake
        self._handshaking = 0
        self._idle: dict[PeerLink, float] = {}  # links waiting for their next call, since when
        self._closed = False
        self._closing = threading.Event()
        self.links_accepted = 0  # links that passed the handshake, ever: for metrics and tests
        self._refused = _RateLimitedWarning()

    def set_secret(self, secret: bytes) -> None:
        """Prove and demand `secret` from now on (the cluster's secret changed: Redis restarted)."""
        _check_secret(secret)
        self._secret = secret

    def start(self) -> None:
        """Accept links in a thread of their own (a greenlet under gevent), each served by another."""
        threading.Thread(target=self._accept_loop, name=f"peer-server-{self.address}", daemon=True).start()
        threading.Thread(target=self._reap_idle, name=f"peer-reaper-{self.address}", daemon=True).start()

    def close(self) -> None:
        """Stop accepting and let idle links go; calls in progress finish."""
        with self._lock:
            self._closed = True
            idle = list(self._idle)
        self._closing.set()
        for link in idle:
            link._drop()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept() in the loop's thread
        except OSError:
            pass
        self._listener.close()

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, address = self._listener.accept()
            except OSError as e:
                if self._closed:
                    return
                # EMFILE and the like: the node is out of something; pause rather than spin.
                logger.warning("peer server %s cannot accept: %s", self.address, root_cause(e))
                time.sleep(0.1)
                continue
            if not self._take_slot():
                sock.close()
                continue
            threading.Thread(target=self._serve, args=(sock, _format_address(*address[:2])),
                             name="peer-link", daemon=True).start()

    def _take_slot(self) -> bool:
        with self._lock:
            if self._closed or self._handshaking >= self._max_handshaking or self._links >= self._max_links:
                full = not self._closed
            else:
                self._handshaking += 1
                self._links += 1
                return True
        if full:
            self._refused.warn("peer server %s is full (%d links, %d handshaking): a link was refused",
                               self.address, self._links, self._handshaking)
        return False

    def _serve(self, sock: socket.socket, peer: str) -> None:
        try:
            if self._handshake(sock, peer):
                self._serve_calls(PeerLink(sock, peer))
        finally:
            with self._lock:
                self._links -= 1
            sock.close()

    def _handshake(self, sock: socket.socket, peer: str) -> bool:
        try:
            _tune(sock)
            if _serve_handshake(sock, self._secret, time.monotonic() + self._handshake_secs):
                with self._lock:
                    self.links_accepted += 1  # before the opener can know, so a count read after open() is exact
                sock.sendall(ACCEPTED)
                sock.settimeout(None)
                return True
            self._refused.warn("peer link from %s refused: it does not know the cluster's secret", peer)
        except (OSError, _Eof) as e:  # a stranger, a slow peer, a hang-up: nothing to report
            logger.debug("peer link from %s dropped in its handshake: %s", peer,
                         "closed" if isinstance(e, _Eof) else root_cause(e))
        finally:
            with self._lock:
                self._handshaking -= 1
        return False

    def _serve_calls(self, link: PeerLink) -> None:
        while (head := self._next_call(link)) is not None:
            kind = head.get("kind")
            handler = self._handlers.get(kind) if isinstance(kind, str) else None
            if handler is None:
                logger.warning("peer %s called %.64r, which this node does not serve", link.peer, kind)
                link.abort()
                return
            try:
                handler(head, link)
            except (PeerCutError, OSError) as e:  # this link, or the handler's client, was cut: expected
                logger.info("peer call %s from %s cut: %s", kind, link.peer,
                            e if isinstance(e, PeerCutError) else root_cause(e))
                link.abort()
                return
            except Exception:
                logger.exception("peer call %s from %s failed", kind, link.peer)
                link.abort()
                return
            if link.closed:
                return
            if not link._out_ended:
                logger.error("peer call %s from %s: its handler returned without ending its answer",
                             kind, link.peer)
                link.abort()
                return
            if not link.is_clean():
                link._skip_rest()
            if not link.is_clean():
                link.abort()  # an early answer, the body still coming: dropped quietly
                return
            link._new_call()

    def _next_call(self, link: PeerLink) -> dict[str, Any] | None:
        """The next call's head, or None when the opener lets the link go (or it idles out)."""
        with self._lock:
            if self._closed:
                link._drop()
                return None
            self._idle[link] = time.monotonic()
        try:
            return link.read_head()
        except PeerCutError as e:
            logger.debug("peer link from %s ends between calls: %s", link.peer, e)
            return None
        finally:
            with self._lock:
                self._idle.pop(link, None)

    def _reap_idle(self) -> None:
        """Drop links idle past idle_secs: a sweep every quarter of it, rather than a timer per call."""
        while not self._closing.wait(self._idle_secs / 4):
            now = time.monotonic()
            with self._lock:
                stale = [link for link, since in self._idle.items() if now - since >= self._idle_secs]
            for link in stale:
                link._drop()  # its thread, blocked reading, wakes up to the end of the link


def _bind_first_free(bind: str) -> socket.socket:
    host, ports = _port_range(bind)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for port in ports:
        sock = socket.socket(family, socket.SOCK_STREAM)
        # Restarting a worker must not wait for its old links' TIME_WAIT; this
        # never lets two live listeners share a port (that is SO_REUSEPORT).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(128)
            return sock
        except OSError as e:
            sock.close()
            if e.errno != errno.EADDRINUSE:
                raise OSError(e.errno, f"peer_bind {bind}: cannot listen on {host}:{port}: {e.strerror}") from e
    raise OSError(errno.EADDRINUSE, f"peer_bind {bind}: every port is taken; widen the range")


# ---- the pool -----------------------------------------------------------------


class PeerPool:
    """An opener's links to other nodes: reuses idle ones, makes (and authenticates) new ones."""

    def __init__(self, secret: bytes, max_idle_per_peer: int = 8, connect_timeout: float = 1.0,
                 idle_secs: float = POOL_IDLE_SECS) -> None:
        _check_secret(secret)
        self._secret = secret
        self._max_idle = max_idle_per_peer
        self._connect_timeout = connect_timeout
        self._idle_secs = idle_secs
        self._idle: dict[str, list[tuple[float, PeerLink]]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._swept_at = time.monotonic()
        self.links_made = 0  # links connected and authenticated, ever: for metrics and tests

    def set_secret(self, secret: bytes) -> None:
        """Use `secret` for new links from now on; idle links made with the old one are dropped."""
        _check_secret(secret)
        with self._lock:
            self._secret = secret
            idle = [link for links in self._idle.values() for _, link in links]
            self._idle.clear()
        for link in idle:
            link._drop()

    def open(self, address: str, head: dict[str, Any]) -> PeerLink:
        """A link to `address` ("host:port") carrying a new call, its head sent.

        Raises PeerUnreachableError if the peer cannot be reached, PeerAuthError
        if it fails the handshake.
        """
        link = self._take_idle(address)
        if link is not None:
            try:
                link.send_head(head)
                return link
            except PeerCutError:  # it died idle: the head never got there, so a new link is safe
                link.abort()
        link = self._connect(address)
        try:
            link.send_head(head)
        except BaseException:
            link.abort()
            raise
        return link

    def close(self) -> None:
        """Let every idle link go; links in use are dropped when closed."""
        with self._lock:
            self._closed = True
            idle = [link for links in self._idle.values() for _, link in links]
            self._idle.clear()
        for link in idle:
            link._drop()

    def idle_links(self, address: str) -> int:
        """How many idle links to `address` the pool holds now."""
        with self._lock:
            return len(self._idle.get(address, ()))

    def _take_idle(self, address: str) -> PeerLink | None:
        self._sweep()
        while True:
            with self._lock:
                links = self._idle.get(address)
                if not links:
                    return None
                since, link = links.pop()  # the most recently used: the least likely to have idled out
            if time.monotonic() - since < self._idle_secs and link._is_quiet():
                return link
            link._drop()

    def _give_back(self, link: PeerLink) -> None:
        link._new_call()
        with self._lock:
            links = self._idle.setdefault(link.peer, [])
            if not self._closed and len(links) < self._max_idle:
                links.append((time.monotonic(), link))
                return
        link._drop()

    def _sweep(self) -> None:
        """Drop idle links past their time, every peer's, at most once a second."""
        now = time.monotonic()
        expired: list[PeerLink] = []
        with self._lock:
            if now - self._swept_at < 1.0:
                return
            self._swept_at = now
            for address, links in list(self._idle.items()):
                keep = [(since, link) for since, link in links if now - since < self._idle_secs]
                expired += [link for since, link in links if now - since >= self._idle_secs]
                if keep:
                    self._idle[address] = keep
                else:
                    del self._idle[address]
        for link in expired:
            link._drop()

    def _connect(self, address: str) -> PeerLink:
        host, port = split_address(address)
        if not (port.isdigit() and port.isascii()):
            raise ConfigError(f"peer address {address!r}: expected HOST:PORT")
        deadline = time.monotonic() + self._connect_timeout
        try:
            sock = _connect_to(host, int(port), self._connect_timeout)
        except OSError as e:
            raise PeerUnreachableError(f"peer {address} is unreachable: {root_cause(e)}") from e
        try:
            _tune(sock)
            _open_handshake(sock, self._secret, deadline, address)
            sock.settimeout(None)
        except PeerAuthError:
            sock.close()
            raise
        except (OSError, _Eof) as e:
            sock.close()
            why = root_cause(e) if isinstance(e, OSError) else "it closed the connection"
            raise PeerUnreachableError(f"peer {address} failed its handshake: {why}") from e
        with self._lock:
            self.links_made += 1
        return PeerLink(sock, address, self)
