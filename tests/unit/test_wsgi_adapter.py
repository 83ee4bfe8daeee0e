"""What ptth_lib/wsgi.py relies on in gunicorn and gevent, checked against the installed versions.

wsgi.py reaches under the WSGI interface (its docstring says where and why),
and gunicorn and gevent are pinned in requirements.txt. When an upgrade
removes or changes one of those internals, a test here fails naming the
library, its version and what changed, instead of a relay that hangs,
loses the ends of bodies or keeps listens parked after a stop.

gunicorn's side is driven in-process: its own request parser (with the
settings of conf/gunicorn.conf.py) reads from a fake socket, its own
`create` builds the environ, and `iter_body` reads the body through its
readers; its gevent worker is built without being started. gevent's side
runs its WSGI server and sockets in this process. No processes.
"""

from __future__ import annotations

import _socket  # the C socket type beneath both the standard library's and gevent's
import inspect
import os
import runpy
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import gevent.socket
import gunicorn
import pytest
from gevent.pywsgi import WSGIHandler
from gunicorn.config import Config
from gunicorn.http import body as gunicorn_body
from gunicorn.http import wsgi as gunicorn_wsgi
from gunicorn.http.parser import RequestParser
from gunicorn.http.unreader import SocketUnreader, Unreader
from gunicorn.util import load_class
from gunicorn.workers.base import Worker

from ptth_lib import wsgi
from ptth_lib.relay.rendezvous import ListenEndedError

GUNICORN = f"gunicorn {gunicorn.__version__}"
GEVENT = f"gevent {gevent.__version__}"
CONF = Path(__file__).resolve().parents[2] / "conf" / "gunicorn.conf.py"
# The settings of conf/gunicorn.conf.py that change how gunicorn parses a request.
PARSER_SETTINGS = ("http_parser", "limit_request_field_size", "limit_request_fields", "forwarded_allow_ips")


def changed(library: str, what: str) -> str:
    """The failure message: which library, which version, what no longer holds."""
    return f"{library}: {what} (ptth_lib/wsgi.py relies on it; its docstring says why)"


class FakeSocket:
    """A client connection: each recv() hands out at most one of `pieces`, then b"" (end of file)."""

    def __init__(self, *pieces: bytes) -> None:
        self.pieces = list(pieces)
        self.recv_sizes: list[int] = []
        self.sent: list[bytes] = []

    def recv(self, size: int) -> bytes:
        self.recv_sizes.append(size)
        if not self.pieces:
            return b""
        piece = self.pieces[0]
        if len(piece) > size:
            self.pieces[0] = piece[size:]
            return piece[:size]
        self.pieces.pop(0)
        return piece

    def send(self, data: bytes) -> int:
        self.sent.append(bytes(data))
        return len(data)

    sendall = send


def gunicorn_config() -> Config:
    """gunicorn's config with the parser settings of conf/gunicorn.conf.py."""
    conf = runpy.run_path(str(CONF))
    cfg = Config()
    for name in PARSER_SETTINGS:
        cfg.set(name, conf[name])
    return cfg


def gunicorn_request(sock: FakeSocket) -> tuple[RequestParser, dict[str, Any]]:
    """Parse the first request on `sock` as gunicorn's worker does; return the parser and the environ."""
    cfg = gunicorn_config()
    parser = RequestParser(cfg, sock, ("127.0.0.1", 40000))
    req = next(parser)
    _, environ = gunicorn_wsgi.create(req, sock, ("127.0.0.1", 40000), ("127.0.0.1", 4000), cfg)
    return parser, environ


def head(target: str, *headers: str) -> bytes:
    return ("\r\n".join([f"POST {target} HTTP/1.1", "Host: relay", *headers]) + "\r\n\r\n").encode()


NEXT_REQUEST = b"GET /next HTTP/1.1\r\nHost: relay\r\n\r\n"


# ---- gunicorn: the environ -----------------------------------------------------------


def test_gunicorn_environ_has_the_socket_and_the_raw_target() -> None:
    target = "/frontend/servers/a%2Fb/files/x%20y?q=1%2F2"
    sock = FakeSocket(head(target, "Content-Length: 0"))
    _, environ = gunicorn_request(sock)
    assert environ.get("gunicorn.socket") is sock, changed(
        GUNICORN, 'environ["gunicorn.socket"] is no longer the client connection: the relay can neither '
                  "cut a response nor notice a parked listen's server hanging up")
    assert wsgi.connection_socket(environ) is sock
    assert environ.get("RAW_URI") == target, changed(
        GUNICORN, f'environ["RAW_URI"] is {environ.get("RAW_URI")!r}, not the target as sent ({target!r}): '
                  "the relay reads a server's name from the escaped path")
    assert environ["PATH_INFO"] == "/frontend/servers/a/b/files/x y"  # why RAW_URI is needed
    assert wsgi.request_target(environ) == target


# ---- gunicorn: bodies with a Content-Length ---------------------------------------------


def test_unreader_take_buffered_returns_what_it_holds_without_reading() -> None:
    sock = FakeSocket(b"from the socket")
    unreader = SocketUnreader(sock)
    assert isinstance(unreader, Unreader) and hasattr(unreader, "take_buffered"), changed(
        GUNICORN, "Unreader.take_buffered is gone")
    unreader.unread(b"held")
    assert unreader.take_buffered() == b"held", changed(GUNICORN, "Unreader.take_buffered no longer returns "
                                                                  "the bytes read ahead")
    assert sock.recv_sizes == [], changed(GUNICORN, "Unreader.take_buffered reads from the socket")
    assert unreader.take_buffered() == b"", changed(GUNICORN, "Unreader.take_buffered keeps what it returned")
    assert unreader.sock is sock, changed(GUNICORN, "SocketUnreader no longer keeps its socket as `sock`")


def test_a_sized_body_is_read_straight_from_gunicorns_socket() -> None:
    body = b"0123456789"
    # gunicorn reads the head and 4 body bytes at once; the rest arrives later.
    sock = FakeSocket(head("/7ZSFUKGV/http_response/ID", f"Content-Length: {len(body)}") + body[:4],
                      body[4:], NEXT_REQUEST)
    parser, environ = gunicorn_request(sock)
    reader = environ["wsgi.input"].reader
    assert isinstance(environ["wsgi.input"], gunicorn_body.Body) and type(reader).__name__ == "LengthReader", \
        changed(GUNICORN, f"a body with Content-Length is read by {type(environ['wsgi.input']).__name__} over "
                          f"{type(reader).__name__}, not Body over LengthReader")
    assert {"unreader", "length"} <= set(vars(reader)), changed(
        GUNICORN, f"LengthReader no longer has `unreader` and `length` (it has {sorted(vars(reader))})")
    assert wsgi.reads_promptly(environ), changed(
        GUNICORN, "iter_body no longer recognises gunicorn's sized body: it falls back to read(n), a third "
                  "more CPU per byte, and TCP port forwarding refuses to run")
    pieces = wsgi.iter_body(environ, 4)
    assert next(pieces) == b"0123", changed(GUNICORN, "the bytes read with the head are not handed on first")
    assert sock.pieces == [body[4:], NEXT_REQUEST], "read ahead before it was needed"
    assert list(pieces) == [b"4567", b"89"]
    assert reader.length == 0
    assert sock.pieces == [NEXT_REQUEST], "read past the end of the body"
    nxt = next(parser)
    assert nxt.path == "/next", changed(GUNICORN, "after iter_body, gunicorn no longer finds the next request "
                                                  "on the connection")


def test_a_sized_body_hands_back_a_pipelined_request() -> None:
    sock = FakeSocket(head("/7ZSFUKGV/http_response/ID", "Content-Length: 5") + b"hello" + NEXT_REQUEST)
    parser, environ = gunicorn_request(sock)
    assert b"".join(wsgi.iter_body(environ, 1024)) == b"hello"
    assert next(parser).path == "/next", changed(
        GUNICORN, "Unreader.unread no longer puts back what follows the body for the next request")


def test_a_sized_body_cut_short_raises() -> None:
    sock = FakeSocket(head("/7ZSFUKGV/http_response/ID", "Content-Length: 10") + b"0123")
    _, environ = gunicorn_request(sock)
    pieces = wsgi.iter_body(environ, 1024)
    assert next(pieces) == b"0123"
    with pytest.raises(wsgi.BodyBrokeOffError):
        next(pieces)


# ---- gunicorn: chunked bodies --------------------------------------------------------------


def test_a_chunked_body_is_handed_on_chunk_by_chunk() -> None:
    sock = FakeSocket(head("/7ZSFUKGV/http_response/ID", "Transfer-Encoding: chunked"),
                      b"4\r\nabcd\r\n", b"a\r\n0123456789\r\n", b"0\r\n\r\n" + NEXT_REQUEST)
    parser, environ = gunicorn_request(sock)
    reader = environ["wsgi.input"].reader
    assert type(reader).__name__ == "ChunkedReader" and {"parser", "buf"} <= set(vars(reader)), changed(
        GUNICORN, f"a chunked body is read by {type(reader).__name__} with {sorted(vars(reader))}, not a "
                  "ChunkedReader with `parser` (its chunk generator) and `buf`")
    assert inspect.isgenerator(reader.parser), changed(GUNICORN, "ChunkedReader.parser is no longer a "
                                                                 "generator of the chunks' data")
    assert wsgi.reads_promptly(environ), changed(GUNICORN, "iter_body no longer recognises gunicorn's "
                                                           "chunked body")
    pieces = wsgi.iter_body(environ, 4)
    assert next(pieces) == b"abcd"
    assert len(sock.pieces) == 2, changed(GUNICORN, "ChunkedReader.parser waits for the next chunk before "
                                                    "handing on this one: keystrokes would be held back")
    assert list(pieces) == [b"0123", b"4567", b"89"]
    assert reader.parser is None
    assert next(parser).path == "/next", changed(
        GUNICORN, "after iter_body ends a chunked body (ChunkedReader.parser = None), gunicorn no longer "
                  "finds the next request on the connection")


def test_a_chunked_body_cut_short_raises_not_ends() -> None:
    sock = FakeSocket(head("/7ZSFUKGV/http_response/ID", "Transfer-Encoding: chunked"), b"a\r\n01234")
    _, environ = gunicorn_request(sock)
    pieces = wsgi.iter_body(environ, 1024)
    assert next(pieces) == b"01234"
    try:
        rest = list(pieces)
    except Exception:  # noqa: BLE001 - gunicorn's own error (NoMoreData): what the relay expects
        return
    raise AssertionError(changed(GUNICORN, f"a chunked body cut mid-chunk ends cleanly ({rest!r}) instead of "
                                           "raising: the relay would pass a truncated body off as complete"))


def test_a_body_already_read_from_falls_back_to_read() -> None:
    sock = FakeSocket(head("/x", "Content-Length: 6") + b"abcdef")
    _, environ = gunicorn_request(sock)
    assert environ["wsgi.input"].read(2) == b"ab"
    assert not wsgi.reads_promptly(environ)
    assert b"".join(wsgi.iter_body(environ, 2)) == b"cdef"


# ---- gunicorn: web apps (Expect, taking a connection over, the access log) ------------------


def test_expect_100_continue_is_left_to_the_relay() -> None:
    conf = runpy.run_path(str(CONF))
    assert callable(conf.get("pre_request")), "conf/gunicorn.conf.py no longer defers Expect: 100-continue"
    sock = FakeSocket(head("/frontend/servers/a/up", "Content-Length: 4", "Expect: 100-continue") + b"body")
    cfg = gunicorn_config()
    req = next(RequestParser(cfg, sock, ("127.0.0.1", 40000)))
    assert req._expected_100_continue is True, changed(
        GUNICORN, "a request with Expect: 100-continue no longer sets Request._expected_100_continue")
    conf["pre_request"](None, req)
    _, environ = gunicorn_wsgi.create(req, sock, ("127.0.0.1", 40000), ("127.0.0.1", 4000), cfg)
    assert sock.sent == [], changed(GUNICORN, "wsgi.create sends 100 Continue although pre_request cleared "
                                              "_expected_100_continue: clients upload bodies nobody wants")
    assert environ["HTTP_EXPECT"] == "100-continue"
    assert wsgi.owes_continue(environ)
    wsgi.send_continue(environ)
    wsgi.send_continue(environ)
    assert sock.sent == [wsgi.CONTINUE]  # once
    assert not wsgi.owes_continue(environ)


def test_without_expect_nothing_is_owed() -> None:
    sock = FakeSocket(head("/x", "Content-Length: 0"))
    cfg = gunicorn_config()
    req = next(RequestParser(cfg, sock, ("127.0.0.1", 40000)))
    wsgi.defer_continue(req)
    _, environ = gunicorn_wsgi.create(req, sock, ("127.0.0.1", 40000), ("127.0.0.1", 4000), cfg)
    assert not wsgi.owes_continue(environ) and sock.sent == []


def test_a_loopback_peer_cannot_set_the_scheme() -> None:
    sock = FakeSocket(head("/x", "Content-Length: 0", "X-Forwarded-Proto: https"))
    _, environ = gunicorn_request(sock)
    assert environ["wsgi.url_scheme"] == "http", changed(
        GUNICORN, "forwarded_allow_ips = \"\" no longer keeps a peer's X-Forwarded-Proto from wsgi.url_scheme")


def test_a_connection_taken_over_gets_what_gunicorn_read_ahead(worker: Worker) -> None:
    sock = FakeSocket(b"GET /ws HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
                      b"\x81\x05hello")
    from gunicorn.glogging import Logger

    cfg = gunicorn_config()
    worker.cfg = cfg
    worker.log = Logger(cfg)
    req = next(RequestParser(cfg, sock, ("127.0.0.1", 40000)))
    taken: list[tuple[Any, bytes]] = []

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        assert wsgi.can_take_over(environ), changed(GUNICORN, "a GET's wsgi.input has no reader.unreader "
                                                              "with take_buffered: WebSockets cannot be carried")
        taken.append(wsgi.take_over(environ))
        return wsgi.handled()

    worker.wsgi = app
    worker.alive = True
    worker.handle_request(("127.0.0.1", 4000), req, sock, ("127.0.0.1", 40000))
    assert taken == [(sock, b"\x81\x05hello")]
    assert sock.sent == [], changed(GUNICORN, "the worker wrote to a connection the app took over "
                                              "(ALREADY_HANDLED): it would corrupt the WebSocket")


def test_the_access_log_shows_the_client_address() -> None:
    from datetime import timedelta

    from gunicorn.glogging import Logger

    sock = FakeSocket(head("/x", "Content-Length: 0"))
    _, environ = gunicorn_request(sock)
    wsgi.show_client_address(environ, "198.51.100.7")

    class Resp:
        status = "200 OK"
        sent = 0
        headers = ()

    atoms = Logger(gunicorn_config()).atoms(Resp(), [], environ, timedelta(0))
    assert atoms["h"] == "198.51.100.7", changed(GUNICORN, "the access log's %(h)s is no longer REMOTE_ADDR")
    assert environ["ptth.peer"] == "127.0.0.1"


# ---- gunicorn: the gevent worker, for conf/gunicorn.conf.py ------------------------------------


class _FakeApp:
    """What gunicorn's worker loads its WSGI app from."""

    def __init__(self) -> None:
        self.loaded = object()

    def wsgi(self) -> object:
        return self.loaded


@pytest.fixture
def worker() -> Iterator[Worker]:
    cls = load_class(runpy.run_path(str(CONF))["worker_class"], section="gunicorn.workers")
    w = cls(1, os.getpid(), [], _FakeApp(), 30, Config(), None)
    yield w
    w.tmp.close()


def test_the_worker_keeps_its_app_as_wsgi(worker: Worker) -> None:
    worker.load_wsgi()
    assert wsgi.worker_app(worker) is worker.app.loaded, changed(
        GUNICORN, "the worker no longer keeps the app it loaded as `wsgi`: post_worker_init finds no relay")
    source = inspect.getsource(Worker.init_process)
    assert source.index("self.load_wsgi()") < source.index("post_worker_init"), changed(
        GUNICORN, "Worker.init_process no longer loads the app before calling post_worker_init")


def test_a_stopping_worker_is_no_longer_alive(worker: Worker) -> None:
    assert worker.alive is True, changed(GUNICORN, "a new worker's `alive` is not True")
    called: list[bool] = []
    watcher = wsgi.call_when_worker_stops(worker, lambda: called.append(True), interval_secs=0.01)
    gevent.sleep(0.05)
    assert called == []
    assert "signal.SIGTERM, self.handle_exit" in inspect.getsource(Worker.init_signals), changed(
        GUNICORN, "SIGTERM (a graceful stop) no longer goes to Worker.handle_exit")
    worker.handle_exit(signal.SIGTERM, None)
    assert worker.alive is False, changed(GUNICORN, "Worker.handle_exit (SIGTERM) no longer sets `alive` "
                                                    "to False: parked listens would wait out their timeout")
    watcher.join(timeout=2)
    assert called == [True]


class _Gate:
    """Holds the first `room` connections; records what it hears."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.heard: list[object] = []

    def opened(self) -> bool:
        self.heard.append("opened")
        self.room -= 1
        return self.room >= 0

    def closed(self, admitted: bool) -> None:
        self.heard.append(("closed", admitted))


def _refusing_app(seen: list[bool]) -> Any:
    """A WSGI app that answers 503 and ends the connection when it came past the gate's room."""
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        refused = wsgi.was_refused(environ)
        seen.append(refused)
        if refused:
            wsgi.close_after_response(start_response)
        start_response("503 Service Unavailable" if refused else "200 OK", [("Content-Length", "2")])
        return [b"no" if refused else b"ok"]
    return app


def test_gunicorn_connections_are_counted_for_their_whole_life(worker: Worker,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """count_gunicorn_connections wraps the gevent worker's per-connection `handle`; refused ones end with 503."""
    import gunicorn.arbiter  # noqa: F401 - what tells wsgi it runs under gunicorn
    from gunicorn.workers.ggevent import GeventWorker

    assert isinstance(worker, GeventWorker), changed(GUNICORN, "conf/gunicorn.conf.py's worker is not GeventWorker")
    assert list(inspect.signature(GeventWorker.handle).parameters) == ["self", "listener", "client", "addr"], \
        changed(GUNICORN, "GeventWorker.handle(listener, client, addr) changed: connections are not counted")
    assert "partial(self.handle, s)" in inspect.getsource(GeventWorker.run), changed(
        GUNICORN, "GeventWorker.run no longer serves each connection with self.handle")
    monkeypatch.setattr(GeventWorker, "handle", GeventWorker.handle)  # put back after the test
    monkeypatch.setattr(GeventWorker, "_ptth_uncounted_handle", GeventWorker.handle, raising=False)
    from gunicorn.glogging import Logger

    gate = _Gate(room=1)
    assert wsgi.count_gunicorn_connections(gate)
    seen: list[bool] = []
    worker.wsgi = _refusing_app(seen)
    worker.log = Logger(worker.cfg)
    listener = gevent.socket.socket()
    listener.bind(("127.0.0.1", 0))
    answers = []
    for _ in range(2):
        client, served = gevent.socket.socketpair()
        client.sendall(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n")
        client.shutdown(socket.SHUT_WR)  # a held connection is kept alive: it ends when the client leaves
        worker.handle(listener, served, ("127.0.0.1", 40000))
        answers.append(client.recv(4096))
        client.close()
    listener.close()
    assert seen == [False, True]
    assert answers[0].startswith(b"HTTP/1.1 200") and b"Connection: keep-alive" in answers[0]
    assert answers[1].startswith(b"HTTP/1.1 503") and b"Connection: close" in answers[1], changed(
        GUNICORN, "Response.force_close (reached as start_response.__self__) no longer ends the connection")
    assert gate.heard == ["opened", ("closed", True), "opened", ("closed", False)]


def test_gevent_wsgi_server_counts_connections_through_a_gate() -> None:
    gate = _Gate(room=1)
    seen: list[bool] = []
    server = wsgi.make_server(_refusing_app(seen), "127.0.0.1", 0, gate)
    server.start()
    answers = []
    try:
        for _ in range(2):
            with gevent.socket.create_connection(("127.0.0.1", server.address[1]), timeout=5) as client:
                client.sendall(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n")
                answers.append(client.recv(4096))
                if len(answers) == 2:
                    assert client.recv(4096) == b"", "a refused connection ends after its answer"
    finally:
        server.stop(timeout=1)
    assert seen == [False, True]
    assert answers[1].startswith(b"HTTP/1.1 503")
    assert gate.heard[:3] == ["opened", ("closed", True), "opened"]


# ---- gevent: sockets ----------------------------------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[gevent.socket.socket, gevent.socket.socket]]:
    a, b = gevent.socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_a_gevent_socket_wraps_a_real_one_we_can_peek_at(pair: tuple[Any, Any]) -> None:
    a, b = pair
    raw = getattr(a, "_sock", None)
    assert isinstance(raw, _socket.socket), changed(
        GEVENT, f"a gevent socket's `_sock` is {raw!r}, not the real socket beneath it")
    with pytest.raises(BlockingIOError):
        raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    b.sendall(b"x")
    gevent.socket.wait_read(a.fileno(), timeout=2)
    assert raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"x"
    assert a.recv(1) == b"x", changed(GEVENT, "peeking at `_sock` consumed a byte")


def test_connection_ended_tells_an_end_from_quiet_and_from_bytes(pair: tuple[Any, Any]) -> None:
    a, b = pair
    assert not wsgi.connection_ended(a, 0.05)  # quiet
    b.sendall(b"GET")
    assert not wsgi.connection_ended(a, 1)  # the next request came
    assert a.recv(3) == b"GET"  # and it is still there for the WSGI server
    b.close()
    assert wsgi.connection_ended(a, 1), changed(GEVENT, "an end of file is no longer seen through `_sock`")


def test_a_hang_up_ends_the_waiting_greenlet(pair: tuple[Any, Any]) -> None:
    a, b = pair
    waiter = gevent.spawn(gevent.sleep, 10)
    watcher = gevent.spawn(wsgi.end_on_hangup, a, waiter, ListenEndedError)
    gevent.sleep(0.05)
    b.close()
    waiter.join(timeout=2)
    watcher.join(timeout=2)
    assert isinstance(waiter.exception, ListenEndedError)


def test_a_hang_up_ends_the_waiting_greenlet_without_a_greenlet_to_watch(pair: tuple[Any, Any]) -> None:
    a, b = pair
    waiter = gevent.spawn(gevent.sleep, 10)
    gevent.sleep(0)
    stop = wsgi.watch_for_hangup(a, waiter, ListenEndedError)
    gevent.sleep(0.05)
    assert not waiter.dead  # quiet: nothing happens
    b.close()
    waiter.join(timeout=2)
    assert isinstance(waiter.exception, ListenEndedError), changed(GEVENT, "a libev io watcher on the socket's "
                                                                            "descriptor no longer sees a hang-up")
    stop()


def test_bytes_or_a_stop_end_the_watching_quietly(pair: tuple[Any, Any]) -> None:
    a, b = pair
    waiter = gevent.spawn(gevent.sleep, 0.3)
    gevent.sleep(0)
    stop = wsgi.watch_for_hangup(a, waiter, ListenEndedError)
    b.sendall(b"GET /next")  # a pipelined request: not a hang-up
    gevent.sleep(0.05)
    b.close()
    waiter.join(timeout=2)
    assert waiter.successful()
    stop()
    other = gevent.spawn(gevent.sleep, 0.3)
    gevent.sleep(0)
    c, d = gevent.socket.socketpair()
    stop = wsgi.watch_for_hangup(c, other, ListenEndedError)
    stop()
    d.close()
    other.join(timeout=2)
    assert other.successful()
    c.close()


def test_a_hang_up_is_seen_with_bytes_still_unread(pair: tuple[Any, Any]) -> None:
    a, b = pair
    b.sendall(b"a request body nobody has read yet")
    assert not wsgi.has_hung_up(a)
    b.shutdown(socket.SHUT_WR)
    assert wsgi.has_hung_up(a), "POLLRDHUP is not seen through the standard library's poll"
    assert a.recv(100).startswith(b"a request body")


# ---- gevent: pywsgi, for python ptth_relay.py and ptth_file_server.py -------------------------


def test_gevent_wsgi_server_gives_the_raw_target_and_the_socket() -> None:
    for name in ("get_environ", "handle"):
        assert callable(getattr(WSGIHandler, name, None)), changed(GEVENT, f"pywsgi.WSGIHandler.{name} is gone")
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        sock = wsgi.connection_socket(environ)
        seen.update(target=wsgi.request_target(environ), raw=environ.get("RAW_URI"), sock=sock,
                    nodelay=sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) if sock else None)
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    server = wsgi.make_server(app, "127.0.0.1", 0)
    server.start()
    try:
        target = "/frontend/servers/a%2Fb/x?q=1"
        with gevent.socket.create_connection(("127.0.0.1", server.address[1]), timeout=5) as client:
            client.sendall(f"GET {target} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n".encode())
            answer = b""
            while chunk := client.recv(4096):
                answer += chunk
    finally:
        server.stop(timeout=1)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok"), answer
    assert seen["raw"] == target and seen["target"] == target, changed(
        GEVENT, f"WSGIHandler.path is {seen['raw']!r}, not the target as sent ({target!r})")
    assert seen["sock"] is not None and hasattr(seen["sock"], "shutdown"), changed(
        GEVENT, "WSGIHandler.socket is no longer the client connection")
    assert seen["nodelay"], changed(GEVENT, "WSGIHandler.handle runs before the connection's socket is set: "
                                            "TCP_NODELAY is off (a 40 ms wait per response)")


@pytest.mark.parametrize(("argv", "env", "workers"), [
    (["gunicorn", "-w", "3", "ptth_relay:app"], {}, 3),
    (["gunicorn", "-c", str(CONF), "ptth_relay:app"], {}, 1),
    (["gunicorn", "-c", str(CONF), "--workers=4", "ptth_relay:app"], {}, 4),
    # ($WEB_CONCURRENCY is read when gunicorn.config is imported: tests/e2e/test_cli.py runs that case.)
    (["gunicorn", "ptth_relay:app"], {"GUNICORN_CMD_ARGS": "-w 6"}, 6),
])
def test_the_worker_count_is_read_as_gunicorn_reads_it(monkeypatch: pytest.MonkeyPatch, argv: list[str],
                                                        env: dict[str, str], workers: int) -> None:
    """gunicorn_sizes() re-reads the master's settings in the worker (the relay refuses more than one)."""
    import gunicorn.arbiter  # noqa: F401 - what tells gunicorn_sizes() it runs under gunicorn

    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.delenv("GUNICORN_CMD_ARGS", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(CONF.parents[1])
    assert wsgi.gunicorn_sizes()[0] == workers, changed(GUNICORN, "its config no longer reads the worker count "
                                                       "from argv, -c or $GUNICORN_CMD_ARGS")
