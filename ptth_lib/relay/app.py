"""The relay: a Flask app over the rendezvous.

Routes, thin over `rendezvous.Rendezvous`:

- backend API (servers): `GET /7ZSFUKGV/http_listen/<name>` (long-poll) and
  `POST /7ZSFUKGV/http_response/<id>` (response head in a header, body streamed);
  and `POST /7ZSFUKGV/http_leave/<name>` (a server stopping);
- frontend (clients): `/frontend/servers/<name>/<path>` relayed to the server
  as `/<path>` (the spec's older `/servers/...` redirects there), the server
  list and `/frontend/relay_up_check`;
- operators' pages, served only to `operator_addresses`: `/metrics`
  (metrics.py), `/frontend/audit_log`, `/frontend/unregistered_servers`;
- the scraper API (scraper_api.py) and port forwarding (forward_api.py).

What crosses the relay's edge, which server a path names and whose address
a request comes from are decided in trust.py.

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
from flask import Flask, Response, jsonify, request
from werkzeug.wrappers import Request

from ptth_lib import __version__
from ptth_lib.config import RelayConfig
from ptth_lib.errors import ProtocolError
from ptth_lib.relay import forward_api, scraper_api, trust
from ptth_lib.relay.audit import AuditLog
from ptth_lib.relay.config_watch import ConfigWatcher
from ptth_lib.relay.forwarding import PortForwarding
from ptth_lib.relay.metrics import RelayMetrics
from ptth_lib.relay.rendezvous import (
    ACK_AFTER_CLOSE_SECS,
    LEASE_SECS,
    BodyStream,
    ForbiddenError,
    Lease,
    ListenEnded,
    PendingRequest,
    Rendezvous,
    RendezvousError,
    format_rfc3339,
)
from ptth_lib.relay.trust import BadPathError
from ptth_lib.wire import tripcode
from ptth_lib.wire.envelope import (
    ACK_HEADER,
    API_KEY_HEADER,
    BATCH_HEADER,
    FEATURE_ACK,
    FEATURES_HEADER,
    MAX_REQUESTS_HEADER,
    RESPONSE_HEAD_HEADER,
    SERVER_HOST_HEADER,
    SERVER_VERSION_HEADER,
    WAIT_HEADER,
    clean_report,
    collect_headers,
    decode_response_head,
    encode_requests,
    is_hop_by_hop,
    is_request_id,
    parse_features,
)
from ptth_lib.wsgi import (
    connection_ended,
    connection_socket,
    cut_connection,
    end_on_hangup,
    iter_body,
)

logger = logging.getLogger(__name__)

# Largest piece of a server's POST body handed to the client at once: the
# server's own chunk size, so each chunk crosses the relay as one piece.
RELAY_CHUNK_BYTES = 256 * 1024

# How long after a listen's answer the relay watches its connection for a
# cut (see _requeue_if_lost); ptth_server re-polls within milliseconds.
LISTEN_LEASE_SECS = 10.0
# For a server that does not acknowledge (spec 002): when a listen's connection
# ends, requests still unanswered this long afterwards are taken back.
LISTEN_CLOSE_GRACE_SECS = 0.3

# A header dropped from a server's responses is logged once per server and
# header in this long, not once per response.
DROP_LOG_EVERY_SECS = 3600.0

# URL prefixes that name a server: the frontend's, and the spec's older alias.
FRONTEND_PREFIX = "/frontend/servers/"
ALIAS_PREFIX = "/servers/"
SCRAPER_PREFIX = "/scraper/v1/server/"

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
    # "//x" is not "/x": a proxy in front may match it differently, and werkzeug
    # would answer it with a redirect built from the client's Host header.
    app.url_map.merge_slashes = False
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

    untrusted_proxies_seen: set[str] = set()

    def client_address(req: Request) -> str:
        environ = req.environ
        peer = str(environ.get("REMOTE_ADDR", "unknown"))
        forwarded_for = environ.get("HTTP_X_FORWARDED_FOR")
        if forwarded_for and peer not in untrusted_proxies_seen and len(untrusted_proxies_seen) < 64 \
                and not trust.is_in(peer, rv.config.trusted_proxies):
            untrusted_proxies_seen.add(peer)
            logger.warning("requests from %s carry X-Forwarded-For, but %s is not in trusted_proxies: all "
                           "its clients count as one address (add it to trusted_proxies if it is your proxy)",
                           peer, peer)
        return trust.client_address(peer, forwarded_for, rv.config.trusted_proxies)

    def is_operator(req: Request) -> bool:
        """Tell whether this request may see the operators' pages (metrics, audit log, ...)."""
        environ = req.environ
        peer = str(environ.get("REMOTE_ADDR", ""))
        if not trust.is_in(peer, rv.config.trusted_proxies) and any(h in environ for h in trust.PROXY_HEADERS):
            return False  # came through a proxy we do not trust to say from whom
        return trust.is_in(client_address(req), rv.config.operator_addresses)

    def operators_only() -> Response | None:
        if is_operator(request):
            return None
        return _text(403, "this page is for the relay's operators: it is served only to the addresses "
                          "in operator_addresses (relay config)")

    dropped_logged: dict[tuple[str, str], float] = {}

    def log_dropped(server: str, names: list[str]) -> None:
        now = time.monotonic()
        for name in names:
            key = (server, name)
            if now - dropped_logged.get(key, -DROP_LOG_EVERY_SECS) >= DROP_LOG_EVERY_SECS:
                if len(dropped_logged) >= 10_000:
                    dropped_logged.clear()
                dropped_logged[key] = now
                logger.warning("dropped header %r from server %s's responses: it would act on the "
                               "relay's edge or origin (logged once an hour)", name, server)

    def reject_backend_key(req: Request, e: ForbiddenError, **where: str) -> None:
        """Count and audit a refused backend call; `where` names the server or request."""
        key = req.headers.get(API_KEY_HEADER)
        metrics.backend_auth_rejected.inc()
        audit.record("backend_key_rejected", **where, address=client_address(req), reason=str(e),
                     tripcode=tripcode.derive(key) if key else None)

    def relay_measured(prefix: str, req: Request) -> Response:
        """Relay one client request, counting it in the metrics when its response ends."""
        started = time.monotonic()
        metrics.client_requests_in_flight.inc()
        try:
            target = trust.parse_server_path(_raw_target(req.environ), prefix)
            if target.target is None:
                raise BadPathError("no path after the server name")
            share = trust.fairness_key(client_address(req))
            resp = _relay_client_request(rv, target, share, req, log_dropped)
        except BadPathError as e:
            resp = _text(400, f"bad path: {e}")
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

    @app.after_request
    def _page_headers(resp: Response) -> Response:
        if isinstance(resp, _Relayed):
            return resp
        for name, value in trust.RELAY_PAGE_HEADERS:
            resp.headers.setdefault(name, value)
        location = resp.headers.get("Location")
        parts = urlsplit(location or "")
        if parts.scheme or parts.netloc:
            # werkzeug's own redirects (a missing slash) are built from the
            # client's Host header; a path keeps them on whatever host was asked.
            resp.headers["Location"] = "/" + parts.path.lstrip("/") + (f"?{parts.query}" if parts.query else "")
        return resp

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
        if refused := operators_only():
            return refused
        rows = "".join(
            f"<tr><td>{html.escape(name)}</td><td><code>{html.escape(code)}</code></td>"
            f"<td>{html.escape(address)}</td><td>{format_rfc3339(seen)}</td></tr>"
            for (name, code, address), seen in sorted(rv.unregistered.items(), key=lambda kv: -kv[1])
        )
        body = (
            "<p>Names and tripcodes offered by servers the relay does not know, newest first. "
            "<strong>An entry proves nothing</strong>: anyone who can reach the relay can offer any name "
            "with any tripcode, and several may offer the same name. Register a server only with the "
            "tripcode its operator gave you through a channel you trust (it prints it with "
            "<code>ptth_server.py --print-tripcode</code>).</p>"
            "<table><tr><th>Name</th><th>Tripcode offered</th><th>From</th><th>Last try (UTC)</th></tr>"
            f"{rows}</table>"
        )
        return _page("Unregistered servers", body)

    @app.get("/frontend/audit_log")
    def _audit_log() -> Response:
        if refused := operators_only():
            return refused
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
        if refused := operators_only():
            return refused
        body, content_type = metrics.render()
        return Response(body, content_type=content_type)

    @app.post("/7ZSFUKGV/http_leave/<name>")
    def _leave(name: str) -> Response:
        try:
            server = rv.authenticate(name, request.headers.get(API_KEY_HEADER), client_address(request))
        except ForbiddenError as e:
            reject_backend_key(request, e, server=name[:64])
            raise
        rv.leave(server)
        logger.info("server %s says it is leaving", name)
        return _text(200, "goodbye")

    def scraper_auth(outcome: str, address: str, detail: str | None) -> None:
        if outcome == "rejected":
            metrics.scraper_auth_rejected.labels(detail or "unknown").inc()
            audit.record("scraper_key_rejected", reason=detail, address=address)
        else:
            audit.record("scraper_key_used", key=detail, address=address, path=request.path[:200])

    scraper_api.register(app, lambda: rv.config, lambda: client_address(request), rv.describe_servers,
                         lambda: relay_measured(SCRAPER_PREFIX, request), scraper_auth)

    forward_api.register(app, rv, fw, metrics, audit, lambda: client_address(request),
                         lambda e, name: reject_backend_key(request, e, server=name))

    def listen(name: str, req: Request) -> Response:
        try:
            server = rv.authenticate(name, req.headers.get(API_KEY_HEADER), client_address(req))
        except ForbiddenError as e:
            reject_backend_key(req, e, server=name[:64])
            raise
        server.version = clean_report(req.headers.get(SERVER_VERSION_HEADER)) or server.version
        server.host = clean_report(req.headers.get(SERVER_HOST_HEADER)) or server.host
        acks = FEATURE_ACK in parse_features(req.headers.get(FEATURES_HEADER))
        acked = req.headers.get(ACK_HEADER, "")
        if acks and is_request_id(acked):
            rv.ack(server, acked)  # before parking: a cut while parked must not lose it
        wait = _number(req.headers.get(WAIT_HEADER), 0, 300)
        timeout = rv.config.listen_timeout_secs if wait is None else min(rv.config.listen_timeout_secs, wait)
        sock = connection_socket(req.environ)
        watcher = gevent.spawn(end_on_hangup, sock, gevent.getcurrent(), ListenEnded) if sock else None
        try:
            batch, lease = rv.listen(server, timeout, _number(req.headers.get(MAX_REQUESTS_HEADER), 0, 1024),
                                     lease=acks)
        finally:
            if watcher is not None:
                watcher.kill()
        if not batch:
            return Response(status=204)
        logger.debug("listen by %s takes %d requests", name, len(batch))
        body = encode_requests(p.request for p in batch)
        metrics.relayed_bytes.labels("to_server").inc(len(body))
        resp = Response(body, 200, content_type="application/msgpack")
        if lease is not None:
            resp.headers[BATCH_HEADER] = lease.id
            lease.holder = gevent.spawn(_hold_lease, rv, sock, lease)
        elif sock is not None:
            gevent.spawn(_requeue_if_lost, rv, sock, batch)
        return resp

    def respond(request_id: str, req: Request) -> Response:
        try:
            p = rv.claim(request_id, req.headers.get(API_KEY_HEADER))
        except ForbiddenError as e:
            reject_backend_key(req, e, request=request_id[:64])
            return _refuse(e.status, str(e), req)
        except RendezvousError as e:
            return _refuse(e.status, str(e), req)
        return _relay_server_response(rv, p, req)

    app.wsgi_app = _HotPaths(app.wsgi_app, listen, respond, relay_measured,  # type: ignore[method-assign]
                             lambda: rv.config)
    return app


class _HotPaths:
    """Plain WSGI in front of Flask for the three paths every relayed request takes.

    A listen, a response POST and a client request each cost a Flask request
    context, routing and signals, which profiling put at a third of the
    relay's CPU for small files (BENCHMARKS.md). These paths skip them; every
    other path (pages, scraper API, metrics) goes to Flask as usual.
    """

    def __init__(self, flask_app: Any, listen: _Handler, respond: _Handler, relay: _Handler,
                 config: Callable[[], RelayConfig]) -> None:
        self._flask_app = flask_app
        self._config = config
        self._backend = (
            ("/7ZSFUKGV/http_listen/", ("GET", "HEAD"), listen),
            ("/7ZSFUKGV/http_response/", ("POST",), respond),
        )
        self._relay = relay

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        path: str = environ.get("PATH_INFO", "")
        if path.startswith("//"):
            # werkzeug would route "//x" as "/x"; a proxy in front may not.
            response: Response | None = _text(400, "bad path: it starts with '//'")
        elif path.startswith(FRONTEND_PREFIX) and len(path) > len(FRONTEND_PREFIX):
            response = self._client(environ)
        elif path.startswith(ALIAS_PREFIX):
            response = self._alias(environ)
        else:
            response = None
            for prefix, methods, handler in self._backend:
                arg, slash, _ = path[len(prefix):].partition("/")
                if not path.startswith(prefix) or not arg or slash:
                    continue
                if environ.get("REQUEST_METHOD") not in methods:
                    response = _text(405, "method not allowed")
                    break
                try:
                    response = handler(arg, Request(environ))
                except RendezvousError as e:
                    response = _error_response(e)
                break
        if response is None:
            return self._flask_app(environ, start_response)
        return response(environ, start_response)

    def _client(self, environ: dict[str, Any]) -> Response:
        """A request for a server: relayed, or ".../NAME" redirected to ".../NAME/"."""
        raw = _raw_target(environ)
        try:
            target = trust.parse_server_path(raw, FRONTEND_PREFIX)
        except BadPathError as e:
            return _text(400, f"bad path: {e}")
        if target.target is None:
            return _redirect(raw.partition("?")[0].rsplit("/", 1)[-1] + "/", 302)
        return self._relay(FRONTEND_PREFIX, Request(environ))

    def _alias(self, environ: dict[str, Any]) -> Response:
        """The spec's older /servers/NAME/...: one redirect to the one prefix operators protect."""
        if not self._config().servers_alias:
            return _text(404, "no such page: servers are at /frontend/servers/NAME/ "
                              "(servers_alias is off in the relay config)")
        raw = _raw_target(environ)
        try:
            trust.parse_server_path(raw, ALIAS_PREFIX)
        except BadPathError as e:
            return _text(400, f"bad path: {e}")
        return _redirect("/frontend" + raw, 308)


_Handler = Callable[[str, Request], Response]


class _Relayed(Response):
    """A response relayed from a server: its own security headers, not the relay pages'."""


def _error_response(e: RendezvousError) -> Response:
    resp = _text(e.status, str(e))
    if e.status in (429, 503):
        resp.headers["Retry-After"] = "5"
    return resp


_AUDIT_COLUMNS = ("time", "event", "server", "address")


def _audit_details(entry: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in entry.items() if k not in _AUDIT_COLUMNS and v is not None)


def _number(value: str | None, low: int, high: int) -> int | None:
    """A whole number header from a server, clamped to [low, high]; None if absent or malformed."""
    if not value or not value.isascii() or not value.isdigit() or len(value) > 9:
        return None
    return max(low, min(high, int(value)))


def _relay_client_request(rv: Rendezvous, target: trust.ServerPath, share: str, req: Request,
                          log_dropped: Callable[[str, list[str]], None]) -> Response:
    """P2 to P6 for one client request: queue it, wait for the head, stream the body."""
    environ = req.environ
    if req.content_length or "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return _text(501, "request bodies are not relayed through the tunnel")
    name, uri = target.name, target.target
    assert uri is not None  # the caller redirects ".../NAME" to ".../NAME/"
    forwarded = collect_headers(trust.client_headers_for_server(req.headers.items()))
    sock = connection_socket(environ) if rv.must_wait_turn(name, share) else None
    # Waiting for a turn may be long: stop if the client hangs up meanwhile.
    watcher = gevent.spawn(end_on_hangup, sock, gevent.getcurrent(), ListenEnded) if sock is not None else None
    try:
        p = rv.submit(name, req.method, uri, forwarded, client=share)
    except ListenEnded:
        return _text(499, "the client hung up while waiting for its turn")
    finally:
        if watcher is not None:
            watcher.kill()
    try:
        logger.debug("request %s: %s %s for %s", p.request.id, req.method, uri, name)
        head = rv.wait_for_head(p)
        passed, dropped = trust.server_headers_for_client(head.headers)
        if dropped:
            log_dropped(name, dropped)
        headers = [(_display_case(k), v.decode("latin-1")) for k, v in passed.items() if not is_hop_by_hop(k)]
        trusted = p.server.registered.trusted
        headers.extend(trust.TRUSTED_RELAYED_HEADERS if trusted else trust.RELAYED_HEADERS)
        body: Any
        if req.method == "HEAD" or head.status_code in (204, 304):
            rv.skip_body(p)
            body = []  # a list, not b"": werkzeug would reset Content-Length to 0
        else:
            body = BodyStream(rv, p, lambda reason: cut_connection(environ))
        resp = _Relayed(body, status=head.status_code, headers=headers)
    except BaseException:
        rv.forget(p)
        raise
    if "content-type" not in passed:
        del resp.headers["Content-Type"]
    return resp


def _relay_server_response(rv: Rendezvous, p: PendingRequest, req: Request) -> Response:
    """P5 and P7: hand the head to the client, copy the body, answer when delivered."""
    environ = req.environ
    try:
        head = decode_response_head(req.headers.get(RESPONSE_HEAD_HEADER))
    except ProtocolError as e:
        logger.warning("bad response head for request %s from server %s: %s", p.request.id,
                       p.server.registered.name, e)
        rv.fail(p, f"server {p.server.registered.name!r} sent a bad response: {e}")
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


def _raw_target(environ: dict[str, Any]) -> str:
    """The request target as the client sent it (percent-escapes intact), in origin form."""
    raw: str = environ.get("RAW_URI") or environ.get("REQUEST_URI") or ""
    if not raw:
        raw = environ.get("PATH_INFO", "/")
        if environ.get("QUERY_STRING"):
            raw += "?" + environ["QUERY_STRING"]
    if not raw.startswith("/"):  # absolute-form target
        parts = urlsplit(raw)
        raw = (parts.path or "/") + ("?" + parts.query if parts.query else "")
    return raw


def _hold_lease(rv: Rendezvous, sock: socket.socket | None, lease: Lease) -> None:
    """Wait for the server to acknowledge a batch; without it, the batch goes back to the queue.

    The acknowledgement comes with the server's next listen, within
    milliseconds and on whatever connection (a proxy in front may use a new
    one for every request); `Rendezvous.ack` then ends this greenlet. If the
    listen's connection ends first, the answer may not have arrived: then a
    shorter wait.
    """
    try:
        deadline = time.monotonic() + LEASE_SECS
        ended = sock is not None and connection_ended(sock, LEASE_SECS)
        if not lease.acked.is_set():
            lease.acked.wait(ACK_AFTER_CLOSE_SECS if ended else max(0.0, deadline - time.monotonic()))
    except gevent.GreenletExit:
        return  # acknowledged
    if not lease.acked.is_set():
        returned = rv.expire_lease(lease)
        if returned:
            logger.info("listen of %s not acknowledged; %d requests back in the queue",
                        lease.server.registered.name, returned)


def _requeue_if_lost(rv: Rendezvous, sock: socket.socket, batch: list[PendingRequest]) -> None:
    """For a server that does not acknowledge: take a listen's requests back if its connection dies.

    A connection cut by a NAT box or proxy just as the answer is written can
    swallow it (the write succeeds, then the connection resets). Such a
    server re-polls on the same connection at once, so its next bytes there
    confirm that the answer arrived; an end of file instead means it may not
    have, and the requests go back to the queue for the next listen. This is
    a guess (a proxy that closes after every answer makes it wrong, and a slow
    answer is then handed out twice); servers that acknowledge get exactly
    once instead (`_hold_lease`).
    """
    if not connection_ended(sock, LISTEN_LEASE_SECS):
        return
    # Some clients close after every listen: give the server a moment to answer.
    gevent.sleep(LISTEN_CLOSE_GRACE_SECS)
    returned = rv.requeue(batch)
    if returned:
        logger.info("listen connection lost after taking %d requests; %d back in the queue",
                    len(batch), returned)


def _redirect(location: str, status: int) -> Response:
    """A redirect to a path on this host (a relative or "/..." location, never "//host")."""
    resp = _text(status, f"see {location}")
    resp.headers["Location"] = location
    return resp


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




