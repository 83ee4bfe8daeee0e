"""The body of a relayed response, as the WSGI server iterates it: the server's chunks.

A `BodyStream` takes the chunks a server's response POST puts in its
request's body queue (rendezvous.py `put_chunk`) and hands them to the WSGI
server, which writes them to the client. It is where a relayed response is
cut rather than passed off as complete: when the server's body breaks off,
stalls, or does not match its Content-Length, and when the client stops
reading.

Pure gevent, no Flask; cutting the client's connection is the caller's
`cut` function (the relay's goes through wsgi.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import gevent.queue

from ptth_lib.errors import PtthError
from ptth_lib.relay.rendezvous import (
    BODY_CUT,
    BODY_END,
    BODY_STALL_SECS,
    PendingRequest,
    Rendezvous,
)

logger = logging.getLogger(__name__)


class BodyCutError(PtthError):
    """The response body could not be delivered whole; the client must see a cut."""


class BodyStream:
    """The WSGI body of a relayed response: chunks from the server's POST.

    A class rather than a generator so that `close()` frees the request even
    when the WSGI server never starts iterating. When the server's body breaks
    off, stalls, or does not match its Content-Length, `cut()` is called to
    drop the client's connection; if it cannot (returns False), BodyCutError is
    raised so the WSGI server drops it instead. Either way the client never
    sees a short body passed off as complete.
    """

    def __init__(self, rendezvous: Rendezvous, p: PendingRequest, cut: Callable[[str], bool]) -> None:
        self._rv = rendezvous
        self._p = p
        self._cut = cut
        self.sent = 0
        self.was_cut = False
        self._started = False
        self._complete = False
        self._closed = False
        length = p.head.headers.get("content-length") if p.head else None
        self._declared = int(length) if length is not None and length.isdigit() else None

    def __iter__(self) -> BodyStream:
        return self

    def __next__(self) -> bytes:
        if self._closed:
            raise StopIteration
        if not self._started:
            # An empty first chunk makes the WSGI server send the status and
            # headers now, before the first body bytes arrive.
            self._started = True
            return b""
        if self._p.client_gone:  # put_chunk gave up on this client: it read nothing for too long
            return self._break_off(f"client read nothing for {BODY_STALL_SECS:.0f} s")
        try:
            item = self._p.body.get(timeout=BODY_STALL_SECS)
        except gevent.queue.Empty:
            return self._break_off(f"server sent nothing for {BODY_STALL_SECS:.0f} s")
        if item is BODY_CUT:
            return self._break_off("server's response body broke off")
        if item is BODY_END:
            if self._declared is not None and self.sent != self._declared:
                return self._break_off(f"server sent {self.sent} bytes, not its Content-Length {self._declared}")
            self._complete = True
            self.close()
            raise StopIteration
        chunk: bytes = item
        self.sent += len(chunk)
        if self._declared is not None and self.sent > self._declared:
            return self._break_off(f"server sent more than its Content-Length {self._declared}")
        return chunk

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        p = self._p
        if not self._complete:
            p.client_gone = True
            while not p.body.empty():  # unblock a server waiting to put
                p.body.get_nowait()
        p.delivered.set()
        self._rv.forget(p)

    def _break_off(self, reason: str) -> bytes:
        logger.warning("cutting client of request %s: %s", self._p.request.id, reason)
        self.was_cut = True
        self.close()
        if self._cut(reason):
            raise StopIteration
        raise BodyCutError(reason)
