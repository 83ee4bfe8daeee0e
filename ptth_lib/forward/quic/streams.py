"""What both QUIC proxies and the QUIC relay do with a forwarded connection's stream.

Every stream opens with a tip each way (`read_tip`; spec 004, wire/tip.py);
a refusal is an `Answer` tip and the stream's end (`send_refusal`); after an
accepted tip the stream carries raw bytes, spliced (splice.py) with a TCP
socket at a proxy or with the other side's stream at the relay, through
`QuicStreamEnd`: a stream's end (FIN) is a half-close, a reset (or the
connection closing) a cut.
"""

from __future__ import annotations

import gevent

from ptth_lib.errors import ProtocolError
from ptth_lib.forward.quic.driver import QuicStream, StreamBrokenError
from ptth_lib.forward.splice import CutError, PushEnd
from ptth_lib.wire import tip

# A tip must arrive whole within this long, or the stream is reset.
TIP_WAIT_SECS = 10.0


def read_tip(stream: QuicStream, timeout: float = TIP_WAIT_SECS) -> tuple[tip.TipMessage, bytes]:
    """The stream's opening tip and the raw bytes that came after it in the same read.

    Raises ProtocolError (malformed, or the stream ended first),
    StreamBrokenError, or gevent.Timeout.
    """
    reader = tip.TipReader()
    with gevent.Timeout(timeout):
        while True:
            data = stream.read(tip.MAX_TIP_BYTES + 3)
            if not data:
                raise ProtocolError("the stream ended before its tip")
            message = reader.feed(data)
            if message is not None:
                return message, reader.rest


def send_refusal(stream: QuicStream, reason: str) -> None:
    """Answer a stream's tip with a refusal and end it (if the peer is still there)."""
    try:
        stream.write(tip.encode(tip.refusal(reason)))
        stream.end()
    except StreamBrokenError:
        pass


class QuicStreamEnd(PushEnd):
    """A QUIC stream as a splice end, after its tip; `first` is what followed the tip in its read."""

    def __init__(self, stream: QuicStream, first: bytes = b"", label: str = "QUIC stream") -> None:
        self._stream = stream
        self._first = first
        self._label = label

    def read(self) -> bytes:
        if self._first:
            data, self._first = self._first, b""
            return data
        try:
            return self._stream.read()
        except StreamBrokenError as e:
            raise CutError(f"{self._label}: {e}") from None

    def write(self, data: bytes) -> None:
        try:
            self._stream.write(data)
        except StreamBrokenError as e:
            raise CutError(f"{self._label}: {e}") from None

    def end(self) -> None:
        self._stream.end()

    def abort(self, reason: str) -> None:
        self._stream.abort(reason)

    def close(self) -> None:
        pass  # ended or reset both ways by now; the connection lets go of it
