"""Every internal of requests and urllib3 that PTTH relies on, in one place.

ptth_server's uploads (response POSTs) need what requests does not offer:

- a Session that never follows a redirect (every request carries a key, which
  must never go to wherever a redirect points);
- the socket an upload is going out on, visible to the thread feeding the
  body, so that it can see the relay's early answer between chunks
  (`is_answered_early`): urllib3's connection classes, subclassed and put in
  the pool manager's `pool_classes_by_scheme`;
- a body of known length sent with Content-Length rather than chunked
  (`SizedBody`: requests looks for `__len__`);
- a request sent with urllib3 through the session's own pool (`exchange`),
  without requests' per-call preparation, which cost as much CPU as the
  exchange itself on the server's hot path (BENCHMARKS.md);
- telling a connection closed with nothing answered from other failures
  (`closed_without_answer`: http.client's RemoteDisconnected, as urllib3 and
  requests wrap it), and whether that connection was a kept-alive one,
  reused (`closed_when_reused`, `ended_early_when_reused`): the socket each
  connection last sent a request on, remembered by the same subclasses.

requests and urllib3 are pinned in requirements.txt; tests/unit/test_requests_adapter.py
checks that what we rely on is still there, naming the library and version.
"""

from __future__ import annotations

import http.client
import select
import socket
import ssl
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from ptth_lib.keepalive import KEEPALIVE_OPTIONS


def new_session(proxies: Mapping[str, str], user_agent: str) -> requests.Session:
    """A Session for one thread: these proxies (read once), no redirects, uploads that see early answers.

    requests would otherwise look up proxy variables and ~/.netrc on every
    request; the relay URL does not change, so neither does the answer.
    """
    session = _NoRedirectSession()
    session.trust_env = False
    session.proxies.update(proxies)
    session.headers["User-Agent"] = user_agent
    adapter = _WatchedAdapter(pool_maxsize=2)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


@dataclass(frozen=True)
class RelayAnswer:
    """The relay's answer: its status, headers and the first bytes of its body."""

    status: int
    headers: Mapping[str, str]
    body: bytes


def exchange(session: requests.Session, method: str, url: str, headers: Mapping[str, str],
             timeout: tuple[float, float], max_answer: int, body: bytes | Iterable[bytes] | None = None
             ) -> RelayAnswer:
    """One request on one of `session`'s connections (a kept-alive one if idle); the answer, its body
    read up to `max_answer` bytes.

    `body` is bytes, a `SizedBody` (sent with Content-Length) or any other
    iterable (sent chunked). The request goes through the session's own pool
    with urllib3 directly: requests' preparation of every call (merging the
    session's settings, preparing and building objects) took as much CPU as
    the exchange itself (BENCHMARKS.md, "Fewer layers per request"). The
    connections are the same watched ones (is_answered_early,
    closed_when_reused); redirects are never followed; failures raise
    urllib3's exceptions. With proxies the call goes through requests, which
    knows how to reach them.
    """
    all_headers: dict[str, Any] = {**session.headers, **headers}
    if session.proxies:
        with session.request(method, url, data=body, headers=headers, stream=True, timeout=timeout) as via_proxy:
            return RelayAnswer(via_proxy.status_code, via_proxy.headers,
                               via_proxy.raw.read(max_answer, decode_content=True))
    chunked = body is not None and not isinstance(body, bytes) and not hasattr(body, "__len__")
    if body is not None and not chunked:
        all_headers["Content-Length"] = str(len(body))  # type: ignore[arg-type]
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    r = _pool(session, url, f"{parts.scheme}://{parts.netloc}").urlopen(
        method, target, body=body, headers=all_headers, chunked=chunked, preload_content=False, retries=False,
        redirect=False, timeout=urllib3.Timeout(connect=timeout[0], read=timeout[1]))
    try:
        # A whole answer gives its connection back to the pool as it is read; close() then closes
        # the connection only if it is still held, with unread bytes on it.
        return RelayAnswer(r.status, r.headers, r.read(max_answer, decode_content=True))
    finally:
        r.close()


def _pool(session: requests.Session, url: str, origin: str) -> HTTPConnectionPool:
    """The session's connection pool for `origin` (made once, as requests would, with its TLS settings)."""
    pools: dict[str, HTTPConnectionPool] = session.__dict__.setdefault("_ptth_pools", {})  # the relay's: one
    if origin not in pools:
        adapter = session.get_adapter(url)
        assert isinstance(adapter, HTTPAdapter)
        prepared = requests.Request("POST", url).prepare()
        pool = adapter.get_connection_with_tls_context(prepared, session.verify, cert=session.cert)
        assert isinstance(pool, HTTPConnectionPool)
        pools[origin] = pool
    return pools[origin]


def response_socket(r: requests.Response) -> socket.socket | None:
    """The socket under a streaming response (urllib3 2's `HTTPResponse.connection`), or None."""
    sock = getattr(getattr(r.raw, "connection", None), "sock", None)
    return sock if isinstance(sock, socket.socket) else None


def closed_without_answer(e: BaseException) -> bool:
    """Tell whether a request failed because its connection ended (closed or reset) before any answer.

    The caller knows whether the whole request had been sent; a reset is
    what a middlebox gives when it closes a connection with our bytes unread.
    """
    cause: BaseException | None = e
    while cause is not None:
        if isinstance(cause, (http.client.RemoteDisconnected, ConnectionResetError)):
            return True
        cause = cause.__cause__ or cause.__context__ or (cause.args[1] if len(cause.args) > 1
                                                         and isinstance(cause.args[1], BaseException) else None)
    return False


def closed_when_reused(e: BaseException) -> bool:
    """Tell whether this thread's last request failed because the kept-alive connection it reused ended unanswered.

    Every client that keeps connections alive meets this race: the peer, or a
    proxy or NAT box between (which cuts connections idle for a while), closes
    an idle connection in the instant it is reused. urllib3 looks for a close
    before reusing a connection, but one that comes just after that look
    meets the request on its way, so none of it is read. How much of the body
    seemed to go out tells nothing: the kernel takes the first writes, and
    urllib3 ignores a write that fails on a closed connection (EPIPE,
    ECONNRESET) so as to read an answer, then finds none. A request that can
    be made again may go once more on a new connection (as Go's net/http
    does); on a new connection there is no such race, and a close there is
    the peer's own doing.
    """
    return bool(getattr(_uploading, "reused", False)) and closed_without_answer(e)


def ended_early_when_reused() -> bool:
    """Tell whether is_answered_early stopped this thread's upload for the end of a reused kept-alive connection.

    The same race as closed_when_reused, seen another way: over a network the
    close of a connection cut in the instant it was reused may arrive after
    the first chunks of the body went out, and is seen between chunks. An end
    with nothing to read is not an answer.
    """
    return bool(getattr(_uploading, "reused", False) and getattr(_uploading, "ended", False))


class _NoRedirectSession(requests.Session):
    """A Session that never follows a redirect: each request carries the key."""

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs["allow_redirects"] = False
        return super().request(*args, **kwargs)


# Per thread: the connection it is sending a request body on (conn, for
# is_answered_early), whether its last request reused a kept-alive socket
# (reused), and whether is_answered_early found that connection ended with
# nothing to read (ended).
_uploading = threading.local()


class _Watched:
    """Mixed into urllib3's connections: tells the thread which socket a body is going out on, and if it is reused."""

    # The socket the last request went out on. urllib3 closes a connection it
    # finds dropped (sock None), and connects HTTPS before request(), so "the
    # same socket as last time" is what tells a kept-alive one.
    _last_sock: socket.socket | None = None

    def request(self, *args: Any, **kwargs: Any) -> None:
        sock = getattr(self, "sock", None)
        _uploading.reused = sock is not None and sock is self._last_sock
        _uploading.ended = False
        _uploading.conn = self
        try:
            super().request(*args, **kwargs)  # type: ignore[misc]
        finally:
            _uploading.conn = None
            self._last_sock = getattr(self, "sock", None)


class _WatchedHTTPConnection(_Watched, HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, HTTPSConnection):
    pass


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class _WatchedAdapter(HTTPAdapter):
    """requests' adapter with connections that let an upload see an early answer."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        # TCP keepalive (keepalive.py): streams of forwarded connections and WebSockets may idle for hours.
        kwargs.setdefault("socket_options", [*HTTPConnection.default_socket_options, *KEEPALIVE_OPTIONS])
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


def is_answered_early() -> bool:
    """Tell whether the relay has answered (or closed) the connection this thread is uploading on.

    The relay answers a response POST before its body ends only when the body
    is not wanted; a proxy in front (nginx) passes that answer on at once but
    keeps reading, and discarding, the rest of the upload. Between chunks,
    one poll of the socket tells. An end with nothing to read (or a reset) is
    noted for ended_early_when_reused.
    """
    conn = getattr(_uploading, "conn", None)
    sock = getattr(conn, "sock", None)
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        if isinstance(sock, ssl.SSLSocket):
            # Bytes may be a TLS record with no data for us (a session ticket):
            # only application data, or the end, counts.
            timeout = sock.gettimeout()
            sock.setblocking(False)
            try:
                _uploading.ended = sock.recv(1) == b""
            except ssl.SSLWantReadError:
                return False
            finally:
                sock.settimeout(timeout)
        else:
            _uploading.ended = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        return True
    except (OSError, ValueError):
        _uploading.ended = True
        return True  # the connection is gone: the upload cannot go on anyway


class SizedBody:
    """An iterable with a length: requests then sends Content-Length, not chunked."""

    def __init__(self, chunks: Iterator[bytes], length: int) -> None:
        self._chunks = chunks
        self._length = length

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks

    def __len__(self) -> int:
        return self._length

