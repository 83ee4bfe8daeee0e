"""How ptth_server answers one request: run the file server or ask the web app, POST the response back.

A pool thread of `ServerLoop` calls `Responder.respond` for each request the
relay handed over (P4, P5). Paths under /files/ go to the file server when
`file_server_root` is set, everything else to the web app when `web_app_url`
is (web_app.py); the answer goes to the relay as a POST, the head in the
X-PTTH-2LJYXWC4 header and the body as the upload, which the relay answers
once the client has it all (P7). The upload stops at once when the relay
answers early (the client left), and at shutdown when the grace period is
over. POSTs go on kept-alive connections kept by the relay node they reach
(affinity.py: in a relay cluster, the one that owns the request if one is
idle); the web app's body GETs on each pool thread's own Session.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from urllib.parse import quote

import requests
import urllib3

from ptth_lib.config import ServerConfig
from ptth_lib.errors import PtthError, describe_answer, root_cause
from ptth_lib.requests_adapter import (
    SizedBody,
    closed_when_reused,
    ended_early_when_reused,
    exchange,
    is_answered_early,
)
from ptth_lib.server import file_server
from ptth_lib.server.affinity import SessionPool
from ptth_lib.server.answers import AnswerCarrier
from ptth_lib.server.file_pages import Site
from ptth_lib.server.proxy_headers import client_address
from ptth_lib.server.web_app import AppCutError, WebApp
from ptth_lib.wire.envelope import (
    API_KEY_HEADER,
    FEATURE_ANSWERS,
    INLINE_BODY_BYTES,
    MAX_RESPONSE_HEAD_BYTES,
    NODE_HEADER,
    RESPONSE_HEAD_HEADER,
    RESPONSE_PATH,
    InlineAnswer,
    RelayRequest,
    ServerResponseHead,
    collect_headers,
    encode_response_head,
)

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECS = 10.0
# The relay holds our POST while the client reads; a client slower than this
# between two chunks gets cut by the relay first (rendezvous.BODY_STALL_SECS).
RESPONSE_READ_TIMEOUT_SECS = 150.0

# The relay answers a response POST with a line of text; more is not read.
MAX_ANSWER_BYTES = 4096


class _AbortedError(PtthError):
    """Raised inside a body generator to abandon an upload at shutdown."""


class _AnsweredEarlyError(PtthError):
    """Raised inside a body generator: the relay answered before the body was done.

    The relay only does that when the body is not wanted (the client left, or
    stopped reading): sending the rest would only feed a proxy that reads and
    discards it.
    """


class Responder:
    """Answers the requests of one server, from its pool threads."""

    def __init__(self, config: ServerConfig, new_session: Callable[[], requests.Session],
                 abort: threading.Event, most_idle: int) -> None:
        """`new_session` makes a Session; `abort` set means abandon uploads now; `most_idle`
        connections are kept for POSTs (the pool's threads)."""
        assert config.api_key is not None
        self._root = config.file_server_root
        self._site = Site(config.display_name or config.name, via_relay=True)
        self._api_key: str = config.api_key
        self._response_url = config.relay_url.rstrip("/") + RESPONSE_PATH
        self._new_session = new_session
        self._abort = abort
        self._local = threading.local()
        # Response POSTs' connections, kept by the relay node they reach (one per pool thread at most).
        self._sessions = SessionPool(new_session, most_idle)
        # What the relay takes (X-PTTH-Features of its latest listen answer), set by the loop.
        self.relay_features: frozenset[str] = frozenset()
        self.web_app = (WebApp(config, self.post_once, self._session, new_session, abort,
                               lambda: self.relay_features) if config.web_app_url else None)

    def respond(self, req: RelayRequest, carrier: AnswerCarrier | None = None,
                started: _FileAnswer | None = None) -> None:
        """Answer one request: from the file server for /files/ (if it has a root), else from the web app.

        With a `carrier`, a small complete answer goes with the next listen
        instead of a POST of its own (answers.py). `started` is the file
        answer `start_here` made and could not carry.
        """
        client = client_address(req.headers)
        self._local.carrier = carrier
        try:
            if started is not None:
                self._serve_file(req, client, started)
            elif self._is_for_web_app(req):
                assert self.web_app is not None
                self.web_app.forward(req, client)
            else:
                self._serve_file(req, client)
        except Exception:
            logger.exception("request %s: %s %s failed; answering 500", req.id, req.method, req.uri)
            body = b"the server failed to answer this request\n"
            head = ServerResponseHead(500, {"content-type": b"text/plain; charset=utf-8",
                                            "content-length": str(len(body)).encode()})
            try:
                self.post_once(req.id, head, iter([body]), len(body))
            except Exception as e:  # noqa: BLE001 - the relay may have had an answer already, or be gone
                logger.debug("request %s: the 500 did not go out either: %s", req.id, e)
        finally:
            self._local.carrier = None
            if carrier is not None:
                carrier.settle(req.id)  # whatever happened, the listen need not wait for this one

    def start_here(self, req: RelayRequest, carrier: AnswerCarrier) -> Callable[[], None] | None:
        """Answer a file request in the calling thread if its answer rides on the next listen.

        The listen loop calls this for a batch of one request, in the listen
        thread: a small file's answer is ready in well under a millisecond,
        and going through a pool thread would add two hand-offs between
        threads to the request's time. None: answered. Otherwise the rest of
        the work, for a pool thread: a web app's request (its time is the
        app's), a large or unsized body, or a failure (the pool answers it
        again, and 500 if it fails again). The file server only reads, so
        making its answer twice is harmless.
        """
        if self._is_for_web_app(req):
            return lambda: self.respond(req, carrier)
        self._local.carrier = carrier
        started: _FileAnswer | None = None
        try:
            started = self._file_answer(req, client_address(req.headers), log=True)
            if self._carried(req.id, *started):
                started[1].close()
                return None
        except Exception:  # noqa: BLE001 - a bug of ours: the pool thread meets it again, and answers 500
            if started is not None:
                started[1].close()
            return lambda: self.respond(req, carrier)
        finally:
            self._local.carrier = None
        return lambda: self.respond(req, carrier, started)

    def post_answer(self, answer: InlineAnswer) -> None:
        """POST an answer gathered for a listen that did not go (the server is stopping)."""
        try:
            self.post_once(answer.request_id, answer.head, iter([answer.body]), len(answer.body))
        except Exception as e:  # noqa: BLE001 - one lost answer must not stop the others; the relay 504s it
            logger.warning("response %s not delivered at shutdown: %s", answer.request_id, e)

    def _carried(self, request_id: str, head: ServerResponseHead, body: _CountingBody) -> bool:
        """Give a small complete answer to this request's listen (answers.py); False: POST it instead.

        The body is read here, at most INLINE_BODY_BYTES (its length is
        known); one that does not match its length goes all the same, and the
        relay fails it (502), as it would a POST's.
        """
        carrier: AnswerCarrier | None = getattr(self._local, "carrier", None)
        if carrier is None:
            return False
        if (FEATURE_ANSWERS not in self.relay_features or body.length is None
                or body.length > INLINE_BODY_BYTES or head.status_code == 101):
            carrier.settle(request_id)
            return False
        data = body.read_whole(INLINE_BODY_BYTES)
        if data is None:  # it broke off: its POST meets the same error, and is cut as before
            carrier.settle(request_id)
            return False
        if carrier.offer(InlineAnswer(request_id, head, data)):
            return True
        body.replace(data)  # its listen has gone: the bytes go in a POST
        return False

    def post_once(self, request_id: str, head: ServerResponseHead, chunks: Iterator[bytes],
                  length: int | None) -> None:
        """POST a response once, never again on a new connection (a web app's answer cannot be made twice)."""
        body = _CountingBody(chunks, self._abort, length)
        try:
            if not self._carried(request_id, head, body):
                self._post(request_id, head, body, last_try=True)
        finally:
            body.close()

    def _serve_file(self, req: RelayRequest, client: str, started: _FileAnswer | None = None) -> None:
        """Answer one request, on a new connection if the kept-alive one it went on ended unanswered.

        A kept-alive connection may be closed by a proxy or NAT box (or the
        relay's keep-alive timeout) in the instant it is reused: the POST
        meets a closed connection and nothing of it is read, however much of
        the body seemed to go out (requests_adapter.closed_when_reused, and
        ended_early_when_reused when the close is seen between chunks). The
        file server's answers can be made again (it only reads), so the
        response goes once more on a new connection; if the first did reach
        the relay after all (it cut the POST because the client left), the
        second gets 404 at once and nothing is answered twice. A new
        connection that ends unanswered is not tried again: there the close
        came after the relay had the POST (it cut it: the client left).
        """
        for attempt in (1, 2):
            if attempt == 1 and started is not None:
                head, body = started  # start_here made it, logged it and tried to carry it
            else:
                head, body = self._file_answer(req, client, log=attempt == 1)
            try:
                if attempt == 1 and started is None and self._carried(req.id, head, body):
                    return
                if self._post(req.id, head, body, last_try=attempt == 2, again=attempt == 2):
                    return
            finally:
                body.close()

    def _file_answer(self, req: RelayRequest, client: str, log: bool) -> _FileAnswer:
        """The file server's answer to `req`: its head, and its body ready to send."""
        assert self._root is not None
        headers = {k: v.decode("latin-1") for k, v in req.headers.items()}
        answer = file_server.serve(self._root, req.method, req.uri, headers, self._site)
        head = ServerResponseHead(answer.status, collect_headers(answer.headers))
        if log:
            logger.info("request %s from %s: %s %s -> %d", req.id, client, req.method, req.uri, answer.status)
        has_body = req.method != "HEAD" and answer.status not in (204, 304)
        length = head.headers.get("content-length") if has_body else b"0"
        return head, _CountingBody(answer.body, self._abort, int(length) if length is not None else None)

    def _is_for_web_app(self, req: RelayRequest) -> bool:
        """Tell whether the web app answers `req`: all but /files/, which the file server answers if it has a root."""
        return self.web_app is not None and (self._root is None or not _is_file_path(req.uri))

    def _post(self, request_id: str, head: ServerResponseHead, body: _CountingBody, last_try: bool,
              again: bool = False) -> bool:
        """POST one response; False if it should be tried again: its kept-alive connection ended unanswered.

        `again` says this is the second try, which the relay may answer 404:
        the first reached it after all.
        """
        url = self._response_url.format(id=quote(request_id, safe=""))
        encoded = encode_response_head(head)
        if len(encoded) > MAX_RESPONSE_HEAD_BYTES:  # the relay would refuse it; tell the client why
            logger.warning("response %s: head of %d bytes is over the limit; answering 502", request_id,
                           len(encoded))
            encoded = encode_response_head(ServerResponseHead(502, {"content-length": b"0"}))
            body = _CountingBody(iter(()), self._abort, 0)
        headers = {API_KEY_HEADER: self._api_key, RESPONSE_HEAD_HEADER: encoded}
        # A connection that reaches the request's owner, if one is idle (affinity.py); one whose
        # POST did not end cleanly is closed, never given back.
        session = self._sessions.new() if again else self._sessions.take(request_id)
        try:
            r = exchange(session, "POST", url, headers, (CONNECT_TIMEOUT_SECS, RESPONSE_READ_TIMEOUT_SECS),
                         MAX_ANSWER_BYTES, body.upload())
        except _AbortedError:
            session.close()
            logger.info("response %s abandoned at shutdown after %d bytes", request_id, body.sent)
            return True
        except AppCutError as e:
            session.close()  # closed mid-body: not reusable
            logger.info("response %s cut off after %d bytes: %s", request_id, body.sent, e)
            return True
        except _AnsweredEarlyError:
            session.close()  # its connection carries an unread answer: not reusable
            if not last_try and ended_early_when_reused():
                logger.debug("response %s: kept-alive connection ended unanswered after %d bytes; again on a "
                             "new connection", request_id, body.sent)
                return False
            logger.info("response %s cut off after %d bytes: the client left (the relay answered early)",
                        request_id, body.sent)
            return True
        except (requests.RequestException, urllib3.exceptions.HTTPError) as e:
            session.close()  # whatever happened to that connection, do not reuse it
            if not last_try and closed_when_reused(e):
                logger.debug("response %s: kept-alive connection ended unanswered (%s) after %d bytes; "
                             "again on a new connection", request_id, root_cause(e), body.sent)
                return False
            logger.info("response %s cut off after %d bytes: %s", request_id, body.sent, root_cause(e))
            return True
        self._sessions.give_back(session, r.headers.get(NODE_HEADER))
        if r.status == 200:
            logger.debug("response %s delivered, %d bytes", request_id, body.sent)
        elif r.status == 410:
            logger.info("response %s: the client left after %d bytes", request_id, body.sent)
        elif r.status == 404 and again:
            logger.info("response %s: the relay no longer waits for it: its client left, or the first try "
                        "reached it", request_id)
        else:
            logger.warning("response %s: relay answered %s", request_id, describe_answer(r.status, r.headers, r.body))
        return True

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = self._new_session()
            self._local.session = session
        return session


def _is_file_path(uri: str) -> bool:
    """Tell whether a request target is the file server's: /files and below."""
    path = uri.partition("?")[0]
    return path == "/files" or path.startswith("/files/")


class _CountingBody:
    """A response body on its way to the relay: counts bytes, can be abandoned.

    With a known length the upload carries a Content-Length and goes out as
    the file's own chunks; without one, requests frames it as chunked, which
    costs a copy of every chunk.
    """

    def __init__(self, chunks: Iterator[bytes], abort: threading.Event, length: int | None) -> None:
        self._chunks = chunks
        self._abort = abort
        self.length = length
        self.sent = 0
        self.started = False
        self._read: Iterator[bytes] | None = None  # what read_whole took, if it was not carried

    def upload(self) -> bytes | Iterable[bytes]:
        """What to give requests as `data`."""
        if self.length == 0:
            return b""  # requests would frame a sized but empty iterable as chunked
        if self.length is not None:
            return SizedBody(self.chunks(), self.length)
        return self.chunks()

    def read_whole(self, limit: int) -> bytes | None:
        """The body, read to its end or to just past `limit` bytes, whichever comes first.

        None if reading it failed (a web app that cut its answer): then the
        pieces read and the error come again, in order, from `chunks()`, so
        an upload meets them as it would have.
        """
        pieces: list[bytes] = []
        size = 0
        try:
            for chunk in self._chunks:
                pieces.append(chunk)
                size += len(chunk)
                if size > limit:
                    break
        except Exception as e:  # noqa: BLE001 - whatever the body's source raises, raised again in its place
            self._chunks = _replay(pieces, e)
            return None
        self.sent = size
        return b"".join(pieces)

    def replace(self, data: bytes) -> None:
        """Send `data` (what read_whole read) instead of the rest of the chunks."""
        self.close()
        self._chunks = iter([data] if data else [])
        self.sent = 0

    def chunks(self) -> Iterator[bytes]:
        self.started = True
        for chunk in self._chunks:
            if self._abort.is_set():
                raise _AbortedError("server is stopping")
            if self.sent and is_answered_early():
                raise _AnsweredEarlyError()
            self.sent += len(chunk)
            yield chunk

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close:
            close()


# A file server's answer on its way: its head, and its body ready to send.
_FileAnswer = tuple[ServerResponseHead, "_CountingBody"]


def _replay(pieces: list[bytes], error: Exception) -> Iterator[bytes]:
    yield from pieces
    raise error
