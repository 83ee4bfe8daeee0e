"""Reading a server's POST body in the relay as it arrives, with few copies.

The portable way is `wsgi.input.read(n)`, which under gunicorn waits until n
bytes have arrived and copies each byte through two BytesIO buffers on the
way; profiling the 1 GiB transfer put a third of the relay's CPU there
(BENCHMARKS.md). Under gunicorn (pinned in requirements.txt) this module reads
the body through gunicorn's own body readers instead: for a body with
Content-Length, straight from the socket after the bytes gunicorn already
buffered; for a chunked body, one chunk at a time from gunicorn's chunk
parser. Either way each piece is handed on as soon as it arrives, and the
reader's bookkeeping is kept right, so gunicorn can still reuse or close the
connection properly afterwards. Anything else falls back to `read(n)`.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any


class BodyBrokeOff(OSError):
    """The connection ended before the body did."""


def iter_body(environ: dict[str, Any], chunk_bytes: int) -> Iterator[bytes]:
    """Yield the request body in pieces of at most `chunk_bytes`, as they arrive.

    Raises BodyBrokeOff, or the WSGI server's own error, if the body is cut short.
    """
    body = environ["wsgi.input"]
    kind = _reader_kind(body)
    if kind == "sized":
        return _iter_sized(body.reader, chunk_bytes)
    if kind == "chunked":
        return _iter_chunked(body.reader, chunk_bytes)
    return _iter_portable(body, chunk_bytes)


def reads_promptly(environ: dict[str, Any]) -> bool:
    """Tell whether iter_body hands on each piece as it arrives, however small.

    The portable fallback does not: `read(n)` waits for n bytes. TCP port
    forwarding needs every keystroke passed on at once, so it needs this.
    """
    return _reader_kind(environ["wsgi.input"]) != "portable"


def _reader_kind(body: Any) -> str:
    reader: Any = getattr(body, "reader", None)
    untouched = isinstance(getattr(body, "buf", None), io.BytesIO) and body.buf.tell() == 0
    kind = type(reader).__name__
    if untouched and kind == "LengthReader" and hasattr(getattr(reader, "unreader", None), "sock"):
        return "sized"
    if untouched and kind == "ChunkedReader" and getattr(reader, "parser", None) is not None \
            and isinstance(getattr(reader, "buf", None), io.BytesIO) and reader.buf.tell() == 0:
        return "chunked"
    return "portable"


def _iter_sized(reader: Any, chunk_bytes: int) -> Iterator[bytes]:
    """gunicorn's LengthReader: what it buffered, then recv() straight from the socket."""
    unreader = reader.unreader
    buffered = unreader.take_buffered()
    if buffered:
        piece, beyond = buffered[:reader.length], buffered[reader.length:]
        if beyond:
            unreader.unread(beyond)  # the next request, pipelined: not ours
        reader.length -= len(piece)
        for start in range(0, len(piece), chunk_bytes):
            yield piece[start:start + chunk_bytes]
    while reader.length > 0:
        data = unreader.sock.recv(min(chunk_bytes, reader.length))
        if not data:
            raise BodyBrokeOff(f"connection closed with {reader.length} bytes of the body missing")
        reader.length -= len(data)
        yield data


def _iter_chunked(reader: Any, chunk_bytes: int) -> Iterator[bytes]:
    """gunicorn's ChunkedReader: each chunk from its parser, as it arrives."""
    for data in reader.parser:
        for start in range(0, len(data), chunk_bytes):
            yield data[start:start + chunk_bytes]
    reader.parser = None  # the body is done: gunicorn reads nothing more of it


def _iter_portable(body: Any, chunk_bytes: int) -> Iterator[bytes]:
    while chunk := body.read(chunk_bytes):
        yield chunk
