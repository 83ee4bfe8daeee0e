"""HTTP/1.1's chunked transfer coding (RFC 9112 7.1), decoded as bytes arrive: no sockets.

ptth_server reads a web app's chunked response itself rather than through
http.client, so that each piece is passed on as soon as it has arrived and
the wait for the next one can be watched (web_app.py). `ChunkedDecoder.feed`
takes whatever arrived, however it is split, and returns the body bytes in
it; `done` tells that the last chunk and the trailers have been seen.
Anything malformed raises `ChunkedError`; lines are bounded, so a hostile
app cannot make it hold more than MAX_LINE_BYTES besides the data.
"""

from __future__ import annotations

from ptth_lib.errors import ProtocolError

# A chunk-size line (with extensions) or a trailer line, at most; http.client allows 64 KiB.
MAX_LINE_BYTES = 64 * 1024
# Trailer lines after the last chunk, at most (they are read and dropped).
MAX_TRAILER_LINES = 100
# Hex digits of a chunk size: 16 is 2**64 bytes, more than any body.
_MAX_SIZE_DIGITS = 16
_HEX = frozenset(b"0123456789abcdefABCDEF")

_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class ChunkedError(ProtocolError):
    """The bytes are not a chunked body."""


class ChunkedDecoder:
    """Decodes one chunked body, fed in pieces of any size."""

    def __init__(self) -> None:
        self._state = _SIZE
        self._line = bytearray()  # a line being read (size, chunk end, trailer)
        self._left = 0  # data bytes left in the current chunk
        self._trailers = 0

    @property
    def done(self) -> bool:
        """The last chunk and its trailers have been read; bytes after it are not the body's."""
        return self._state == _DONE

    def feed(self, data: bytes) -> bytes:
        """The body bytes in `data` (maybe b""); raises ChunkedError if the coding is broken."""
        out: list[bytes] = []
        i, n = 0, len(data)
        while i < n and self._state != _DONE:
            if self._state == _DATA:
                take = min(self._left, n - i)
                out.append(data[i:i + take])
                i += take
                self._left -= take
                if not self._left:
                    self._state = _DATA_END
                continue
            end = data.find(b"\n", i)
            stop = n if end < 0 else end + 1
            if len(self._line) + stop - i > MAX_LINE_BYTES:
                raise ChunkedError("a chunked body's line is too long")
            self._line += data[i:stop]
            i = stop
            if self._state == _DATA_END and not (b"\r\n".startswith(self._line) or self._line == b"\n"):
                raise ChunkedError("chunk data is not followed by CRLF")
            if end >= 0:
                line = bytes(self._line)
                self._line.clear()
                self._end_line(line)
        return b"".join(out)

    def _end_line(self, line: bytes) -> None:
        text = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        if self._state == _DATA_END:
            if text:
                raise ChunkedError("chunk data is not followed by CRLF")
            self._state = _SIZE
        elif self._state == _SIZE:
            size = text.split(b";", 1)[0].strip(b" \t")
            if not size or len(size) > _MAX_SIZE_DIGITS or not _HEX.issuperset(size):
                raise ChunkedError(f"bad chunk size {size[:20]!r}")
            self._left = int(size, 16)
            self._state = _DATA if self._left else _TRAILER
        elif not text:  # _TRAILER: the blank line ends the body
            self._state = _DONE
        else:
            self._trailers += 1
            if self._trailers > MAX_TRAILER_LINES:
                raise ChunkedError("too many trailer lines")
