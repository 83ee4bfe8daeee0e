"""The relay: a Flask app over the rendezvous.

Routes, thin over `rendezvous.Rendezvous`:

- backend API (servers): `GET /7ZSFUKGV/http_listen/<name>` (long-poll) and
  `POST /7ZSFUKGV/http_response/<id>` (response head in a header, body streamed);
- frontend (clients): `/frontend/servers/<name>/<path>` (alias `/servers/...`)
  relayed to the server as `/<path>`, plus the server list, the unregistered
  servers page, the audit log page and `/frontend/relay_up_check`;
- `/metrics` (metrics.py) and the scraper API (scraper_api.py).

The three paths every relayed request takes (listen, response POST, client
request) are dispatched by `_HotPaths` before Flask; everything else is Flask.

The rendezvous state lives in this process, so the relay runs as exactly one
gevent worker (see conf/gunicorn.conf.py).
"""

from __future__ import annotations

import html
import logging
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import gevent
import gevent.socket
from flask import Flask, Response, jsonify, redirect, request
from werkzeug.wrappers import Request

from . import __version__, forward_api, scraper_api, tripcode
from .audit import AuditLog
from .body_reader import iter_body
from .config import RelayConfig
from .config_watch import ConfigWatcher
from .errors import ProtocolError
from .forwarding import PortForwarding
from .metrics import RelayMetrics
from .protocol import (
    API_KEY_HEADER,
    RESPONSE_HEAD_HEADER,
    SERVER_HOST_HEADER,
    SERVER_VERSION_HEADER,
    clean_report,
    collect_headers,
    decode_response_head,
    encode_requests,
    is_hop_by_hop,
)
from .rendezvous import (
    BodyStream,
    ForbiddenError,
    PendingRequest,
    Rendezvous,
    RendezvousError,
    format_rfc3339,
)
from .wsgi_socket import connection_socket, cut_connection, end_on_hangup

logger = logging.getLogger(__name__)

# Largest piece of a server's POST body handed to the client at once: the
# server's own chunk size, so each chunk crosses the relay as one piece.
RELAY_CHUNK_BYTES = 256 * 1024

# How long after a listen's answer the relay watches its connection for a
# cut (see _requeue_if_lost); ptth_server re-polls within milliseconds.
LISTEN_LEASE_SECS = 10.0
# When a listen's connection ends, requests still unanswered this long
# afterwards are taken back. Clients that close after every listen answer in
# milliseconds; a NAT box's next cut should not find them again.
LISTEN_CLOSE_GRACE_SECS = 0.3

# A refused POST body up to this size is read and dropped, so the connection
# can be reused; past it, reading would cost more than a new connection.
SMALL_BODY_BYTES = 64 * 1024

_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"]


def create_app(config: RelayConfig, config_path: str | None = None) -> Flask:
    """Build the relay's Flask app for `config`.

    Starts the greenlets that watch server presence and, given `config_path`,
    the config file for changes (see config_watch.py).
    """
    app = Flask("ptth_relay")
    rv = Rendezvous(config)
    fw = PortForwarding(config)
    rv.on_close = fw.close
    metrics = RelayMetrics(rv, fw)
    audit = AuditLog(config.audit_log)
    rv.on_event = audit.record
    app.extensions["ptth_rendezvous"] = rv
    app.extensions["ptth_forwarding"] = fw
    gevent.spawn(rv.watch_presence)
    gevent.spawn(fw.sweep)
    if config_path is not None:
        def apply(new: RelayConfig) -> None:
            audit.set_path(new.audit_log)
            rv.reconfigure(new)
            fw.reconfigure(new)

        def reported(ok: bool, detail: str) -> None:
            audit.record("config_reloaded" if ok else "config_rejected", detail=detail)

        watcher = ConfigWatcher(config_path, apply, reported)
        app.extensions["ptth_config_watcher"] = watcher
        gevent.spawn(watcher.run)

    def client_address(req: Request) -> str:
        return _client_address(req.environ, rv.config.trust_x_forwarded_for)

    def reject_backend_key(req: Request, e: ForbiddenError, **where: str) -> None:
        """Count and audit a refused backend call; `where` names the server or request."""
        key = req.headers.get(API_KEY_HEADER)
        metrics.backend_auth_rejected.inc()
        audit.record("backend_key_rejected", **where, address=client_address(req), reason=str(e),
                     tripcode=tripcode.derive(key) if key else None)

    def relay_measured(name: str, req: Request) -> Response:
        """Relay one client request, counting it in the metrics when its response ends."""
        started = time.monotonic()
        metrics.client_requests_in_flight.inc()
        try:
            resp = _relay_client_request(rv, name, req)
        except RendezvousError as e:
            resp = _error_response(e)

        def finished() -> None:
            metrics.client_requests_in_flight.dec()
            metrics.client_requests.labels(str(resp.status_code)).inc()
            metrics.client_request_duration.observe(time.monotonic() - started)
            body = resp.response
            if isinstance(body, BodyStream):
                metrics.relayed_bytes.labels("to_client").inc(body.sent)
                if body.was_cut:
                    metrics.client_responses_cut.inc()

        resp.call_on_close(finished)
        return resp

    app.register_error_handler(RendezvousError, _error_response)

    @app.get("/")
    def _index() -> Response:
        return _page("PTTH relay", '<p><a href="frontend/servers/">Server list</a></p>')

    @app.get("/frontend/relay_up_check")
    def _up_check() -> Response:
        return _text(200, "Relay is up")

    @app.get("/frontend/servers/")
    def _server_list() -> Response:
        if request.accept_mimetypes.best_match(["text/html", "application/json"]) == "application/json":
            return jsonify(rv.describe_servers())
        rows = []
        for s in rv.describe_servers():
            name = str(s["name"])
            about = html.escape(" on ".join(str(x) for x in (s["version"], s["host"]) if x))
            seen = html.escape(str(s["last_seen"] or "never"))
            rows.append(
                f'<tr><td><a href="{html.escape(name)}/">{html.escape(str(s["display_name"]))}</a></td>'
                f"<td>{html.escape(name)}</td><td>{'online' if s['online'] else 'offline'}</td>"
                f"<td>{seen}</td><td>{about}</td></tr>"
            )
        table = ("<tr><th>Server</th><th>Name</th><th>Status</th><th>Last seen (UTC)</th><th>Version</th></tr>"
                 + "".join(rows))
        return _page("PTTH servers", f"<table>{table}</table>")

    @app.get("/frontend/unregistered_servers")
    def _unregistered() -> Response:
        rows = "".join(
            f"<tr><td>{html.escape(name)}</td><td><code>{html.escape(code)}</code></td>"
            f"<td>{format_rfc3339(seen)}</td></tr>"
            for name, (code, seen) in sorted(rv.unregistered.items())
        )
        body = (
            "<p>Servers that tried to connect but are not in the relay config. To let one in, "
            "add a <code>[[servers]]</code> table with its name and tripcode.</p>"
            f"<table><tr><th>Name</th><th>Tripcode</th><th>Last try</th></tr>{rows}</table>"
        )
        return _page("Unregistered servers", body)

    @app.get("/frontend/audit_log")
    def _audit_log() -> Response:
        if not audit.enabled:
            return _text(404, "the audit log is off: set audit_log in the relay config")
        rows = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(entry.get(col) or ''))}</td>" for col in _AUDIT_COLUMNS)
            + f"<td>{html.escape(_audit_details(entry))}</td></tr>"
            for entry in reversed(audit.recent)
        )
        head = "".join(f"<th>{col}</th>" for col in (*_AUDIT_COLUMNS, "details"))
        return _page("Audit log", f"<p>Newest first.</p><table><tr>{head}</tr>{rows}</table>")

    @app.get("/metrics")
    def _metrics() -> Response:
        if not rv.config.metrics:
            return _text(404, "metrics are off: set metrics = true in the relay config")
        body, content_type = metrics.render()
        return Response(body, content_type=content_type)

    @app.route("/frontend/servers/<name>", methods=_ALL_METHODS, provide_automatic_options=False)
    @app.route("/servers/<name>", methods=_ALL_METHODS, provide_automatic_options=False)
    def _server_root_redirect(name: str) -> Any:
        return redirect(f"{name}/", code=302)

    def scraper_auth(outcome: str, address: str, detail: str | None) -> None:
        if outcome == "rejected":
            metrics.scraper_auth_rejected.labels(detail or "unknown").inc()
            audit.record("scraper_key_rejected", reason=detail, address=address)
        else:
            audit.record("scraper_key_used", key=detail, address=address, path=request.path[:200])

    scraper_api.register(app, lambda: rv.config, lambda: client_address(request), rv.describe_servers,
                         lambda name: relay_measured(name, request), scraper_auth)

    forward_api.register(app, rv, fw, metrics, audit, lambda: client_address(request),
                         lambda e, name: reject_backend_key(request, e, server=name))

    def listen(name: str, req: Request) -> Response:
        try:
            server = rv.authenticate(name, req.headers.get(API_KEY_HEADER))
        except ForbiddenError as e:
            reject_backend_key(req, e, server=name[:64])
            raise
        server.version = clean_report(req.headers.get(SERVER_VERSION_HEADER)) or server.version
        server.host = clean_report(req.headers.get(SERVER_HOST_HEADER)) or server.host
        sock = connection_socket(req.environ)
        watcher = gevent.spawn(end_on_hangup, sock, gevent.getcurrent()) if sock else None
        try:
            batch = rv.listen(server, rv.config.listen_timeout_secs)
        finally:
            if watcher is not None:
                watcher.kill()
        if not batch:
            return Response(status=204)
        logger.debug("listen by %s takes %d requests", name, len(batch))
        if sock is not None:
            gevent.spawn(_requeue_if_lost, rv, sock, batch)
        body = encode_requests(p.request for p in batch)
        metrics.relayed_bytes.labels("to_server").inc(len(body))
        return Response(body, 200, content_type="application/msgpack")

    def respond(request_id: str, req: Request) -> Response:
        try:
            p = rv.claim(request_id, req.headers.get(API_KEY_HEADER))
        except ForbiddenError as e:
            reject_backend_key(req, e, request=request_id[:64])
            return _refuse(e.status, str(e), req)
        except RendezvousError as e:
            return _refuse(e.status, str(e), req)
        return _relay_server_response(rv, p, req)

    app.wsgi_app = _HotPaths(app.wsgi_app, listen, respond, relay_measured)  # type: ignore[method-assign]
    return app


class _HotPaths:
    """Plain WSGI in front of Flask for the three paths every relayed request takes.

    A listen, a response POST and a client request each cost a Flask request
    context, routing and signals, which profiling put at a third of the
    relay's CPU for small files (BENCHMARKS.md). These paths skip them; every
    other path (pages, scraper API, metrics) goes to Flask as usual.
    """

    def __init__(self, flask_app: Any, listen: _Handler, respond: _Handler, relay: _Handler) -> None:
        self._flask_app = flask_app
        self._routes = (
            ("/7ZSFUKGV/http_listen/", ("GET", "HEAD"), listen, False),
            ("/7ZSFUKGV/http_response/", ("POST",), respond, False),
            ("/frontend/servers/", None, relay, True),
            ("/servers/", None, relay, True),
        )

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        path: str = environ.get("PATH_INFO", "")
        for prefix, methods, handler, has_rest in self._routes:
            if not path.startswith(prefix):
                continue
            arg, slash, _ = path[len(prefix):].partition("/")
            if not arg or bool(slash) != has_rest:
                break  # "/frontend/servers/" itself, "/frontend/servers/x" (redirect), etc.: Flask's
            if methods is not None and environ.get("REQUEST_METHOD") not in methods:
                return _text(405, "method not allowed")(environ, start_response)
            try:
                response = handler(arg, Request(environ))
            except RendezvousError as e:
                response = _error_response(e)
            return response(environ, start_response)
        return self._flask_app(environ, start_response)


_Handler = Callable[[str, Request], Response]


def _error_response(e: RendezvousError) -> Response:
    resp = _text(e.status, str(e))
    if e.status in (429, 503):
        resp.headers["Retry-After"] = "5"
    return resp


_AUDIT_COLUMNS = ("time", "event", "server", "address")


def _audit_details(entry: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in entry.items() if k not in _AUDIT_COLUMNS and v is not None)


def _client_address(environ: dict[str, Any], trust_x_forwarded_for: bool) -> str:
    """The client's address; from X-Forwarded-For only if the config says a proxy sets it."""
    if trust_x_forwarded_for:
        forwarded: str = environ.get("HTTP_X_FORWARDED_FOR", "")
        last_hop = forwarded.rsplit(",", 1)[-1].strip()
        if last_hop:
            return last_hop[:64]
    return str(environ.get("REMOTE_ADDR", "unknown"))


def _relay_client_request(rv: Rendezvous, name: str, req: Request) -> Response:
    """P2 to P6 for one client request: queue it, wait for the head, stream the body."""
    environ = req.environ
    if req.content_length or "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return _text(501, "request bodies are not relayed through the tunnel")
    uri = _relayed_uri(environ)
    # X-ApiKey is ours (a scraper key, or a mistake): it must never reach a server.
    forwarded = collect_headers((k, v) for k, v in req.headers.items() if k.lower() != "x-apikey")
    p = rv.submit(name, req.method, uri, forwarded)
    logger.debug("request %s: %s %s for %s", p.request.id, req.method, uri, name)
    head = rv.wait_for_head(p)
    headers = [(_display_case(k), v.decode("latin-1")) for k, v in head.headers.items() if not is_hop_by_hop(k)]
    body: Any
    if req.method == "HEAD" or head.status_code in (204, 304):
        rv.skip_body(p)
        body = []  # a list, not b"": werkzeug would reset Content-Length to 0
    else:
        body = BodyStream(rv, p, lambda reason: cut_connection(environ))
    resp = Response(body, status=head.status_code, headers=headers)
    if "content-type" not in head.headers:
        del resp.headers["Content-Type"]
    return resp


def _relay_server_response(rv: Rendezvous, p: PendingRequest, req: Request) -> Response:
    """P5 and P7: hand the head to the client, copy the body, answer when delivered."""
    environ = req.environ
    try:
        head = decode_response_head(req.headers.get(RESPONSE_HEAD_HEADER))
    except ProtocolError as e:
        logger.warning("bad response head for request %s: %s", p.request.id, e)
        rv.fail(p, str(e))
        return _refuse(400, f"bad response head: {e}", req)
    rv.start_response(p, head)

    declared = req.content_length
    received = 0
    complete = True
    chunks = iter_body(environ, RELAY_CHUNK_BYTES)
    while True:
        try:
            chunk = next(chunks, b"")
        except Exception as e:  # noqa: BLE001 - the WSGI server's body reader: OSError or its parse errors
            logger.warning("response body of request %s broke off: %s", p.request.id, type(e).__name__)
            complete = False
            break
        if not chunk:
            break
        received += len(chunk)
        if not rv.put_chunk(p, chunk):
            logger.info("client of request %s is gone; stopping the server's upload", p.request.id)
            cut_connection(environ)
            return _text(410, "the client is gone")
    if declared is not None and received != declared:
        complete = False
    delivered = rv.end_body(p, complete)
    if not complete:
        cut_connection(environ)
        return _text(400, "response body broke off")
    if not delivered:
        cut_connection(environ)
        return _text(410, "the client is gone")
    return _text(200, "delivered")


def _refuse(status: int, message: str, req: Request) -> Response:
    """Answer a server's POST without reading its body.

    A small body is left for the WSGI server to discard; a large or chunked
    one is not read at all: the connection is shut once the answer is out.
    """
    resp = _text(status, message)
    length = req.content_length
    if length is None or length > SMALL_BODY_BYTES:
        environ = req.environ
        resp.call_on_close(lambda: cut_connection(environ))
    return resp


def _relayed_uri(environ: dict[str, Any]) -> str:
    """The request target as the client sent it, minus the `/frontend/servers/<name>` prefix.

    Works on the raw target so that percent-escapes (`%3F`, `%23`, `%2F`)
    reach the server unchanged.
    """
    raw: str = environ.get("RAW_URI") or environ.get("REQUEST_URI") or ""
    if not raw:
        raw = environ.get("PATH_INFO", "/")
        if environ.get("QUERY_STRING"):
            raw += "?" + environ["QUERY_STRING"]
    if not raw.startswith("/"):  # absolute-form target
        parts = urlsplit(raw)
        raw = parts.path + ("?" + parts.query if parts.query else "")
    path, sep, query = raw.partition("?")
    # "/frontend/servers/NAME/rest", "/scraper/v1/server/NAME/rest" or "/servers/NAME/rest"
    prefix = 4 if path.startswith("/scraper/") else 3 if path.startswith("/frontend/") else 2
    segments = path.split("/", prefix + 1)
    rest = segments[prefix + 1] if len(segments) > prefix + 1 else ""
    return "/" + rest + sep + query


def _requeue_if_lost(rv: Rendezvous, sock: socket.socket, batch: list[PendingRequest]) -> None:
    """Take a listen's requests back if its connection dies before the server answers.

    A connection cut by a NAT box or proxy just as the answer is written can
    swallow it (the write succeeds, then the connection resets). ptth_server
    re-polls on the same connection at once, so its next bytes there confirm
    that the answer arrived; an end of file instead means it may not have, and
    the requests go back to the queue for the next listen. A request answered
    twice is harmless: the second answer gets 404.
    """
    raw = getattr(sock, "_sock", sock)  # gevent's socket would wait, beside the worker's own reader
    try:
        with gevent.Timeout(LISTEN_LEASE_SECS):
            gevent.socket.wait_read(sock.fileno())
        if raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b"":
            return  # the server's next request: it has the answer
    except gevent.Timeout:
        return  # quiet but open: nothing says the answer was lost
    except BlockingIOError:
        return  # already read by the worker: the next request came
    except (OSError, ValueError):
        pass  # reset, or the worker saw the end of file first and closed the socket
    # The connection ended. Some clients close after every listen, so give the
    # server a moment to answer before taking back what is still unanswered.
    gevent.sleep(LISTEN_CLOSE_GRACE_SECS)
    returned = rv.requeue(batch)
    if returned:
        logger.info("listen connection lost after taking %d requests; %d back in the queue",
                    len(batch), returned)


def _display_case(name: str) -> str:
    """content-type -> Content-Type, as clients show headers to people."""
    return "-".join(part.capitalize() for part in name.split("-"))


def _text(status: int, message: str) -> Response:
    return Response(message + "\n", status=status, content_type="text/plain; charset=utf-8")


def _page(title: str, body: str) -> Response:
    page = (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{title}</title>'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:0.2em 1em;text-align:left}</style>"
        f"</head><body><h1>{title}</h1>{body}"
        f"<footer><small>ptth_relay {__version__}</small></footer></body></html>"
    )
    return Response(page, content_type="text/html; charset=utf-8")




