"""Every internal of a WSGI server that PTTH relies on, in one place.

The WSGI interface hides the client's connection and reads request bodies
in ways too slow or too coarse for a tunnel, so the relay reaches under it,
here and only here:

- gunicorn: the client socket (`environ["gunicorn.socket"]`) and the raw
  request target (`environ["RAW_URI"]`); its body readers (`LengthReader`,
  `ChunkedReader`, their `unreader` and `parser`, `Unreader.take_buffered`)
  to hand on each piece of a POST body as it arrives; its worker's
  `wsgi` (the app it loaded) and `alive` (False once it starts to stop), for
  conf/gunicorn.conf.py; its config parser (`WSGIApplication().cfg`), to
  read in a worker how many workers and connections the master was asked
  for; its gevent worker's `handle` (one call per connection, for its whole
  life), wrapped to count connections (`count_gunicorn_connections`); and
  its `Response.force_close` (through `start_response.__self__`), to end a
  connection with its answer;
- gevent: a gevent socket's `_sock` (to peek without waiting beside the
  worker's own reader), and pywsgi's `WSGIHandler` (`get_environ`, `path`,
  `socket`, `server`, `handle`, `close_connection`) for `python ptth_relay.py`
  and `ptth_file_server.py`.

gunicorn and gevent are pinned in requirements.txt; tests/unit/test_wsgi_adapter.py
drives each of these against the installed versions and fails naming the
library, its version and what changed.

Reading bodies: the portable way is `wsgi.input.read(n)`, which under
gunicorn waits until n bytes have arrived and copies each byte through two
BytesIO buffers on the way; profiling the 1 GiB transfer put a third of the
relay's CPU there (BENCHMARKS.md). Under gunicorn `iter_body` reads through
gunicorn's own readers instead: for a body with Content-Length, straight
from the socket after the bytes gunicorn already buffered; for a chunked
body, one chunk at a time from gunicorn's chunk parser, keeping the readers'
bookkeeping right so gunicorn can still reuse or close the connection.
Anything else falls back to `read(n)`.

The socket: the relay needs the raw connection in cases the WSGI
interface does not cover: to cut a response visibly (a shut-down socket,
never a clean end), to stop reading a body it has refused, to notice a
peer hanging up while a long-poll is parked (nothing is read or written
meanwhile) or while its request body waits unread, and to carry a WebSocket.

Web apps (PROTOCOL.md "Web apps"), under gunicorn only:

- `Expect: 100-continue`: gunicorn answers it in `wsgi.create`, before the
  app runs, from `req._expected_100_continue`. conf/gunicorn.conf.py's
  `pre_request` calls `defer_continue`, which clears that flag and
  remembers the debt by socket; the relay pays it (`send_continue`) when
  the server starts fetching the body, and a client answered without it
  never uploads.
- A WebSocket: after `HTTP/1.1 101` the connection is no longer HTTP.
  `take_over` hands the relay the socket and the bytes gunicorn read ahead
  (`Unreader.take_buffered`); the app then returns gunicorn's
  `ALREADY_HANDLED` (`handled`), so gunicorn writes nothing more and, finding
  the socket shut, closes it.
- The access log: gunicorn's `%(h)s` is `REMOTE_ADDR`, which
  `show_client_address` sets to the client's address (through trusted
  proxies) once the relay has decided everything else.

Connections, counted (relay/capacity.py): a `ConnectionGate` hears of each
connection as it opens, says whether the relay holds it, and hears when it
closes; `was_refused` tells a request on a connection it did not hold, which
the relay answers 503 and ends (`close_after_response`). Under gunicorn the
gevent worker's `handle` runs once per connection for its whole life, kept
alive or carrying a WebSocket, so wrapping it counts them all; for gevent's
WSGIServer our handler's `handle` does the same.
"""

from __future__ import annotations

import errno
import io
import os
import select
import signal
import socket
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Protocol
from urllib.parse import urlsplit

import gevent
import gevent.monkey
import gevent.socket
from gevent.pywsgi import WSGIHandler, WSGIServer

from ptth_lib.errors import PtthError

# ---- the client's socket ------------------------------------------------------

# Environ keys under which the WSGI server exposes the client's socket:
# gunicorn's own, and ours for gevent's WSGIServer (`_Handler` below).
SOCKET_KEYS = ("gunicorn.socket", "ptth.socket")
# Environ keys holding the request target as the client sent it: gunicorn's
# (and ours for gevent's WSGIServer), and the one other servers use.
RAW_TARGET_KEYS = ("RAW_URI", "REQUEST_URI")


def connection_socket(environ: dict[str, Any]) -> socket.socket | None:
    """The request's connection, or None under a WSGI server that hides it."""
    for key in SOCKET_KEYS:
        if environ.get(key) is not None:
            sock: socket.socket = environ[key]
            return sock
    return None


def request_target(environ: dict[str, Any]) -> str:
    """The request target as the client sent it (percent-escapes intact), in origin form.

    PATH_INFO is already percent-decoded, so "%2F" and "/" would look alike;
    the server's name is read from this instead (relay/trust.py).
    """
    raw: str = ""
    for key in RAW_TARGET_KEYS:
        raw = environ.get(key) or ""
        if raw:
            break
    else:
        raw = environ.get("PATH_INFO", "/")
        if environ.get("QUERY_STRING"):
            raw += "?" + environ["QUERY_STRING"]
    if not raw.startswith("/"):  # absolute-form target
        parts = urlsplit(raw)
        raw = (parts.path or "/") + ("?" + parts.query if parts.query else "")
    return raw


def cut_connection(environ: dict[str, Any]) -> bool:
    """Shut the connection down so the peer sees a cut, not a clean end."""
    sock = connection_socket(environ)
    if sock is None:
        return False
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    return True


def end_on_hangup(sock: socket.socket, waiter: gevent.Greenlet, exception: type[BaseException]) -> None:
    """Throw `exception` into `waiter` as soon as the peer of `sock` hangs up.

    For a greenlet that waits while its peer should send nothing (a parked
    listen, a request waiting for its turn): a listen parked on a dead
    connection would take requests and lose them; NAT boxes and proxies cut
    idle connections.
    """
    if wait_for_hangup(sock):
        gevent.kill(waiter, exception)


def watch_for_hangup(sock: socket.socket, waiter: Any, exception: type[BaseException]) -> Callable[[], None]:
    """Throw `exception` into `waiter` as soon as the peer of `sock` hangs up; returns what stops watching.

    `end_on_hangup` without a greenlet of its own, for a parked listen: a
    libev watcher on the socket calls back in the hub, which costs a listen
    no greenlet, no stack and no switches (BENCHMARKS.md, idle servers).
    `waiter` must call the returned function before it waits on anything
    else. Bytes from the peer (it should send none) end the watching, as
    `wait_for_hangup` does.
    """
    raw = getattr(sock, "_sock", sock)  # gevent's socket would wait; this peeks without
    try:
        watcher = gevent.get_hub().loop.io(sock.fileno(), 1)  # 1: readable
    except (OSError, ValueError):  # closed already: the listen's answer will find out
        return lambda: None

    def readable() -> None:
        try:
            ended = raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return  # nothing after all
        except OSError:
            ended = True  # reset
        except ValueError:
            ended = False  # a socket that cannot peek (TLS): we cannot tell
        watcher.stop()
        if ended:
            waiter.throw(exception)  # from the hub, as a gevent wait's own wake-up switches

    def stop() -> None:
        watcher.stop()
        watcher.close()

    watcher.start(readable)
    return stop


def connection_ended(sock: socket.socket, within: float) -> bool:
    """Tell whether a connection whose peer should send next ends (EOF, reset) within `within` s."""
    raw = getattr(sock, "_sock", sock)  # gevent's socket would wait, beside the worker's own reader
    try:
        with gevent.Timeout(within):
            gevent.socket.wait_read(sock.fileno())
        return bool(raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"")
    except gevent.Timeout:
        return False  # quiet but open
    except BlockingIOError:
        return False  # already read by the worker: the next request came
    except (OSError, ValueError):
        return True  # reset, or the worker saw the end of file first and closed the socket


def wait_for_hangup(sock: socket.socket) -> bool:
    """Wait until a peer that should be sending nothing hangs up; True if it did.

    While a listen is parked, or a response streams to a client that sent its
    whole request, the peer sends nothing, so a readable socket means end of
    file (or a reset): the peer has gone. False means we cannot tell (TLS
    sockets cannot peek) or the peer sent bytes after all.
    """
    try:
        gevent.socket.wait_read(sock.fileno())
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True
    except ValueError:
        return False


# select.poll as the standard library has it: gevent's patched poll knows
# neither POLLRDHUP nor a zero timeout without a trip through the hub.
_poll = gevent.monkey.get_original("select", "poll")
_HANGUP_EVENTS = getattr(select, "POLLRDHUP", 0x2000) | select.POLLHUP | select.POLLERR


def has_hung_up(sock: socket.socket) -> bool:
    """Tell whether the peer has closed or reset the connection, even with bytes still unread.

    For a client whose request body waits for the server to fetch it: the
    socket is readable (the body), so a peek cannot tell an end from data;
    Linux's POLLRDHUP can.
    """
    try:
        poller = _poll()
        poller.register(sock.fileno(), _HANGUP_EVENTS)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


def close_after_answer(environ: dict[str, Any], linger_secs: float) -> None:
    """End the connection once the answer is out, without reading a request body nobody wants.

    Shuts our side for writing (the answer, then a FIN), reads and drops what
    the client still sends for up to `linger_secs` so that closing does not
    reset the connection under an answer it has not read yet (nginx's
    lingering close), then shuts it down: the WSGI server finds it ended
    instead of reading the rest of the body for the next request.
    """
    sock = connection_socket(environ)
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + linger_secs
        while (left := deadline - time.monotonic()) > 0:
            with gevent.Timeout(left, False):
                if not sock.recv(65536):
                    break
                continue
            break
    except OSError:
        pass
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def show_client_address(environ: dict[str, Any], address: str) -> None:
    """Make the WSGI server's access log show `address` (gunicorn logs REMOTE_ADDR as %(h)s)."""
    environ["ptth.peer"] = environ.get("REMOTE_ADDR")
    environ["REMOTE_ADDR"] = address


# ---- Expect: 100-continue, paid when the body is wanted ---------------------------

# Connections whose current request expects a 100 Continue that gunicorn did
# not send (defer_continue); by socket, forgotten with it.
_CONTINUE_OWED: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def defer_continue(req: Any) -> None:
    """gunicorn's pre_request hook: keep gunicorn from answering Expect: 100-continue itself."""
    sock = getattr(getattr(req, "unreader", None), "sock", None)
    if sock is None:
        return
    if getattr(req, "_expected_100_continue", False):
        req._expected_100_continue = False
        _CONTINUE_OWED[sock] = True
    else:
        _CONTINUE_OWED.pop(sock, None)


def owes_continue(environ: dict[str, Any]) -> bool:
    """Tell whether this request expects a 100 Continue that nobody has sent yet."""
    sock = connection_socket(environ)
    return sock is not None and _CONTINUE_OWED.get(sock, False)


def send_continue(environ: dict[str, Any]) -> None:
    """Send the 100 Continue this request is owed, once (nothing if none is owed)."""
    sock = connection_socket(environ)
    if sock is not None and _CONTINUE_OWED.pop(sock, False):
        sock.sendall(CONTINUE)


def forget_continue(environ: dict[str, Any]) -> None:
    """The request is answered without its body: no 100 Continue may follow."""
    sock = connection_socket(environ)
    if sock is not None:
        _CONTINUE_OWED.pop(sock, None)


# ---- connections, counted ---------------------------------------------------------


class ConnectionGate(Protocol):
    """What counts connections (relay/capacity.py Capacity)."""

    def opened(self) -> bool:
        """A connection opened: True if it is held, False if its requests are to be refused."""

    def closed(self, admitted: bool) -> None:
        """A connection closed; `admitted` is what `opened` said of it."""


# Connections the gate did not hold: their requests are refused. By socket, forgotten with it.
_REFUSED: weakref.WeakSet[Any] = weakref.WeakSet()


def _handle_through(gate: ConnectionGate, sock: Any, handle: Callable[[], None]) -> None:
    """Run `handle`, a connection's whole life, told to `gate`."""
    admitted = gate.opened()
    if not admitted:
        _REFUSED.add(sock)
    try:
        handle()
    finally:
        gate.closed(admitted)


def was_refused(environ: dict[str, Any]) -> bool:
    """Tell whether this request came on a connection the gate did not hold."""
    sock = connection_socket(environ)
    return sock is not None and sock in _REFUSED


def close_after_response(start_response: Any) -> None:
    """End the connection once this request's answer is out (a `Connection: close` answer)."""
    owner: Any = getattr(start_response, "__self__", None)
    if hasattr(owner, "force_close"):  # gunicorn's Response: it drops a Connection header from the app
        owner.force_close()
    elif hasattr(owner, "close_connection"):  # gevent's WSGIHandler
        owner.close_connection = True


def count_gunicorn_connections(gate: ConnectionGate) -> bool:
    """Under gunicorn's gevent worker, tell `gate` of every connection; False if not under it.

    Call it in the worker before it starts serving (while it loads the
    app): the worker's `run` binds `handle` for its servers then.
    """
    ggevent = sys.modules.get("gunicorn.workers.ggevent")
    worker_class = getattr(ggevent, "GeventWorker", None)
    if worker_class is None or "gunicorn.arbiter" not in sys.modules:
        return False
    handle = getattr(worker_class, "_ptth_uncounted_handle", worker_class.handle)

    def counted_handle(self: Any, listener: Any, client: Any, addr: Any) -> None:
        _handle_through(gate, client, lambda: handle(self, listener, client, addr))

    worker_class._ptth_uncounted_handle = handle
    worker_class.handle = counted_handle
    return True


# ---- taking a connection over (WebSocket) ----------------------------------------


def can_take_over(environ: dict[str, Any]) -> bool:
    """Tell whether `take_over` works here: under gunicorn, with a body reader we know."""
    return environ.get("gunicorn.socket") is not None and hasattr(
        getattr(getattr(environ.get("wsgi.input"), "reader", None), "unreader", None), "take_buffered")


def take_over(environ: dict[str, Any]) -> tuple[socket.socket, bytes]:
    """The client's connection, to carry other bytes than HTTP, and what gunicorn read ahead of them.

    The app must then return `handled()`.
    """
    sock: socket.socket = environ["gunicorn.socket"]
    ahead: bytes = environ["wsgi.input"].reader.unreader.take_buffered()
    return sock, ahead


def handled() -> Any:
    """What the app returns to gunicorn for a connection it took over: gunicorn writes nothing."""
    from gunicorn.workers.base_async import ALREADY_HANDLED  # type: ignore[import-untyped]

    return ALREADY_HANDLED


# ---- request bodies as they arrive (gunicorn's readers) ------------------------

class BodyBrokeOffError(PtthError, OSError):
    """The connection ended before the body did."""


def iter_body(environ: dict[str, Any], chunk_bytes: int) -> Iterator[bytes]:
    """Yield the request body in pieces of at most `chunk_bytes`, as they arrive.

    Raises BodyBrokeOffError, or the WSGI server's own error, if the body is cut short.
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
            raise BodyBrokeOffError(f"connection closed with {reader.length} bytes of the body missing")
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


# ---- gevent's WSGI server, for development and ptth_file_server -----------------

# How long a stopping server lets responses in flight finish.
GRACEFUL_STOP_SECS = 10.0


class ListenError(PtthError):
    """The address cannot be bound; the message says why and what to do."""


class _Handler(WSGIHandler):  # type: ignore[misc]
    def handle(self) -> None:
        # pywsgi writes the headers and the body in separate sends; with Nagle's
        # algorithm on, the body then waits for the client's delayed ACK (40 ms).
        try:
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not TCP (a Unix socket): nothing to do
        gate: ConnectionGate | None = getattr(self.server, "ptth_gate", None)
        if gate is None:
            super().handle()
        else:
            _handle_through(gate, self.socket, super().handle)

    def get_environ(self) -> dict[str, Any]:
        environ: dict[str, Any] = super().get_environ()
        environ["RAW_URI"] = self.path
        environ["ptth.socket"] = self.socket
        return environ


def make_server(app: Any, host: str, port: int, gate: ConnectionGate | None = None) -> WSGIServer:
    """gevent's WSGI server for `app` on HOST:PORT, not yet bound, with our handler; `gate` counts connections."""
    server = WSGIServer((host, port), app, handler_class=_Handler, log=None)
    server.ptth_gate = gate
    return server


def run(app: Any, host: str, port: int, name: str, on_stop: Callable[[], None] | None = None,
        gate: ConnectionGate | None = None, on_listening: Callable[[], None] | None = None) -> None:
    """Serve `app` until SIGINT or SIGTERM; the caller must have monkey-patched with gevent.

    Prints `NAME: listening on http://HOST:PORT/` to stderr once bound (port 0
    picks a free port), then calls `on_listening`; raises ListenError if the
    address is unusable. `gate` (relay/capacity.py) counts the connections
    and says which to refuse.
    """
    server = make_server(app, host, port, gate)
    try:
        server.init_socket()
    except OSError as e:
        # gevent appends the address to strerror; name lookup errors have negative errnos.
        reason = os.strerror(e.errno) if e.errno and e.errno > 0 else e.strerror or str(e)
        hint = "; pick another --bind or stop what uses it" if e.errno == errno.EADDRINUSE else ""
        raise ListenError(f"cannot listen on {host}:{port}: {reason}{hint}") from None
    shown_host = f"[{host}]" if ":" in host else host
    print(f"{name}: listening on http://{shown_host}:{server.address[1]}/", file=sys.stderr, flush=True)
    if on_listening is not None:
        on_listening()

    def stop() -> None:
        if on_stop:
            on_stop()
        server.stop(timeout=GRACEFUL_STOP_SECS)

    for sig in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(sig, stop)
    server.serve_forever()


# ---- gunicorn's worker, for conf/gunicorn.conf.py -------------------------------

# How often a watcher looks whether the worker has started to stop: well within the
# half second a lease waits for an acknowledgement after its listen's connection ended
# (delivery.hold_lease), so that a connection closed by the stopping worker is told apart.
WORKER_CHECK_SECS = 0.1


def gunicorn_sizes() -> tuple[int | None, int | None]:
    """How many workers, and how many connections each (worker_connections), the gunicorn running this
    process was told to start; (None, None) if not under gunicorn.

    Read again in the worker as gunicorn's master read it, with gunicorn's own
    parser: the command line (inherited by the forked worker), the -c file,
    $GUNICORN_CMD_ARGS and $WEB_CONCURRENCY. A plain
    `gunicorn -w 4 -k gevent ptth_relay:app` runs no hook of ours, so the
    worker is the one place that sees every way of asking for more workers.
    """
    if "gunicorn.arbiter" not in sys.modules:
        return None, None
    from gunicorn.app.wsgiapp import WSGIApplication  # type: ignore[import-untyped]

    try:
        cfg = WSGIApplication().cfg
    except (Exception, SystemExit):  # noqa: BLE001 - gunicorn reports its own errors; then we cannot tell
        return None, None
    workers, connections = cfg.workers, cfg.worker_connections
    return (workers if isinstance(workers, int) else None,
            connections if isinstance(connections, int) else None)


def worker_app(worker: Any) -> Any:
    """The WSGI app a gunicorn worker loaded (set before post_worker_init runs)."""
    return worker.wsgi


def call_when_worker_stops(worker: Any, callback: Callable[[], None],
                           interval_secs: float = WORKER_CHECK_SECS) -> gevent.Greenlet:
    """Call `callback` in a greenlet once gunicorn's worker starts to stop.

    The worker's `alive` turns False on a graceful stop (SIGTERM), before it
    waits for the requests in flight; the callback can end the long ones.
    """
    def watch() -> None:
        while worker.alive:
            gevent.sleep(interval_secs)
        callback()

    return gevent.spawn(watch)
