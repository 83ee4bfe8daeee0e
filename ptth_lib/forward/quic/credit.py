"""Per-stream credit: PTTH's own flow control on top of QUIC's (PROTOCOL.md, "Stream credit").

qh3 grants a stream QUIC credit as soon as it hands the stream's bytes to
Python, read or not, so QUIC's own flow control bounds nothing for PTTH. Both
ends of a connection therefore keep credit of their own, per stream:

- Every bidirectional stream starts with WINDOW bytes of credit each way,
  implicitly (offsets 0 to WINDOW): the tips and the first window of data
  need no record.
- Once the hello is accepted, each end opens one unidirectional *control
  stream* and writes fixed-size records on it, never anything else:

      offset  size  field
      0       8     stream id: unsigned big-endian, a bidirectional stream (id & 2 == 0)
      8       8     max offset: unsigned big-endian, the byte offset of that stream
                    the other end may now send up to (exclusive), never less than before

  The receiver of a stream's data sends a record when its application has
  read a quarter window or more since the last grant; the new max offset is
  what it has read plus WINDOW. So at most WINDOW bytes of a stream are ever
  unread at the receiver.
- A writer never sends past the max offset granted for its stream. A peer
  that does, writes a malformed record (a unidirectional stream id, a
  number above 2^62 - 1, a max offset lower than before), ends or resets its
  control stream, or sends on any other unidirectional stream, is closed at
  once: it is broken or hostile.

No I/O here: `ReceiveCredit` (what we let the peer send), `SendCredit`
(what the peer lets us send) and `RecordReader` (the peer's control stream)
are bookkeeping, driven by driver.QuicPeer.
"""

from __future__ import annotations

import struct

from ptth_lib.errors import ProtocolError

# CREDIT_VERSION (wire/tip.py) is said in the hello (tip.PeerHello.credit): the relay
# refuses a proxy that speaks another, a proxy of an older PTTH (no credit) included.

# A stream's initial credit, each way, and what a grant lets the writer have unread at the
# receiver (quic_adapter.STREAM_WINDOW_BYTES: enough for 100 MiB/s over a 10 ms round trip).
WINDOW = 1024 * 1024

RECORD = struct.Struct(">QQ")

# QUIC's stream ids and offsets are at most 2^62 - 1 (RFC 9000 16).
MAX_VARINT = (1 << 62) - 1


class CreditError(ProtocolError):
    """The peer broke the credit protocol (the message says how): close its connection."""


def encode(stream_id: int, max_offset: int) -> bytes:
    """One record: the other end may send on `stream_id` up to `max_offset`."""
    return RECORD.pack(stream_id, max_offset)


class ReceiveCredit:
    """What we let the peer send on each stream: granted up to a max offset, and what was read.

    Per stream, at most `window` bytes are received and unread: the peer may
    send up to `granted`, which is at most what the application read plus
    `window`. A stream is tracked from its first byte or read until `forget`.
    """

    def __init__(self, window: int = WINDOW) -> None:
        self.window = window
        self.granted: dict[int, int] = {}  # stream id -> max offset we granted (window if absent)
        self.received: dict[int, int] = {}  # stream id -> bytes received (handed to us by qh3)
        self.consumed: dict[int, int] = {}  # stream id -> bytes the application has read or dropped
        self._due: set[int] = set()  # streams whose next grant is due

    def receive(self, stream_id: int, n: int) -> None:
        """n more bytes arrived on a stream; CreditError if that is past what we granted."""
        received = self.received.get(stream_id, 0) + n
        self.received[stream_id] = received
        granted = self.granted.get(stream_id, self.window)
        if received > granted:
            raise CreditError(f"sent {received} bytes on stream {stream_id}, past its credit of {granted}")

    def read(self, stream_id: int, n: int) -> None:
        """The application read (or dropped) n bytes of a stream; a grant is due once it read a quarter window."""
        consumed = self.consumed.get(stream_id, 0) + n
        self.consumed[stream_id] = consumed
        if consumed + self.window - self.granted.get(stream_id, self.window) >= self.window // 4:
            self._due.add(stream_id)

    def drop(self, stream_id: int) -> None:
        """The application will read no more of this stream (reset or aborted): count all received as read.

        No grant follows: the stream is over, and a peer that sends past its
        credit on it is still caught.
        """
        self.consumed[stream_id] = self.received.get(stream_id, 0)
        self._due.discard(stream_id)

    def grants(self) -> bytes:
        """Records for every stream whose grant is due (none twice), and count them as granted."""
        records = []
        for stream_id in sorted(self._due):
            if stream_id not in self.consumed:  # forgotten meanwhile
                continue
            granted = self.consumed[stream_id] + self.window
            self.granted[stream_id] = granted
            records.append(encode(stream_id, granted))
        self._due.clear()
        return b"".join(records)

    def due(self) -> bool:
        """Tell whether `grants` has records to give."""
        return bool(self._due)

    def unread(self, stream_id: int) -> int:
        """Bytes of a stream received and not read."""
        return self.received.get(stream_id, 0) - self.consumed.get(stream_id, 0)

    def forget(self, stream_id: int) -> None:
        """The stream is over on both sides: drop its counts."""
        self.granted.pop(stream_id, None)
        self.received.pop(stream_id, None)
        self.consumed.pop(stream_id, None)
        self._due.discard(stream_id)


class SendCredit:
    """What the peer lets us send on each stream: its max offset, and what we sent.

    Grants for streams we do not track (not opened yet by either side, or
    forgotten) are ignored: a stream is tracked from `track` until `forget`,
    so the peer cannot make us hold state for streams that do not exist.
    """

    def __init__(self, window: int = WINDOW) -> None:
        self.window = window
        self.max_offset: dict[int, int] = {}  # stream id -> max offset the peer granted
        self.sent: dict[int, int] = {}  # stream id -> bytes we sent (gave to qh3)

    def track(self, stream_id: int) -> None:
        """A stream we may write on: it starts with `window` of credit."""
        self.max_offset.setdefault(stream_id, self.window)
        self.sent.setdefault(stream_id, 0)

    def room(self, stream_id: int) -> int:
        """Bytes we may still send on a stream (0 for a stream not tracked)."""
        return self.max_offset.get(stream_id, 0) - self.sent.get(stream_id, 0)

    def spend(self, stream_id: int, n: int) -> None:
        """We sent n bytes on a stream (n <= room)."""
        assert n <= self.room(stream_id), (stream_id, n, self.room(stream_id))
        self.sent[stream_id] += n

    def grant(self, stream_id: int, max_offset: int) -> bool:
        """The peer's record; True if it gave a tracked stream more room. CreditError if it goes back."""
        current = self.max_offset.get(stream_id)
        if current is None:
            return False
        if max_offset < current:
            raise CreditError(f"lowered stream {stream_id}'s credit from {current} to {max_offset}")
        self.max_offset[stream_id] = max_offset
        return max_offset > current

    def forget(self, stream_id: int) -> None:
        self.max_offset.pop(stream_id, None)
        self.sent.pop(stream_id, None)


class RecordReader:
    """The peer's control stream, in pieces as they come: whole records out, at most 15 bytes held."""

    def __init__(self) -> None:
        self._partial = b""

    def feed(self, data: bytes) -> list[tuple[int, int]]:
        """(stream id, max offset) of each record completed by `data`; CreditError if one is malformed."""
        data = self._partial + data
        whole = len(data) - len(data) % RECORD.size
        self._partial = data[whole:]
        records = []
        for stream_id, max_offset in RECORD.iter_unpack(data[:whole]):
            if stream_id & 2 or stream_id > MAX_VARINT or max_offset > MAX_VARINT:
                raise CreditError(f"sent a malformed credit record (stream {stream_id}, max offset {max_offset})")
            records.append((stream_id, max_offset))
        return records
