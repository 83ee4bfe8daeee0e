"""The relay as one object: its parts, the rules at its edge, and what each request does.

A `Relay` is built from a config and owns every part of the relay:

- the rendezvous (rendezvous.py), where clients' requests meet servers' listens;
- port forwarding's state (forwarding.py);
- the metrics (metrics.py) and the audit log (audit.py);
- the config watcher (config_watch.py), which hands it each new config;
- the rules at its edge (trust.py): whose address a request is, who is an
  operator, which headers cross, which server a path names.

Its methods are what the relay does for each request of the backend API
(`listen`, `respond`, `leave`) and of the frontend (`client_request`,
`scraper_request`, `alias_request`): a werkzeug `Request` in, a `Response`
out, no Flask routing. What happens after a listen's answer and during a
response POST is in delivery.py. app.py wires a Relay to Flask; hot_paths.py sends the three
paths every relayed request takes straight to it; a test builds one and
drives it directly.

The relay's state lives in this process, so it runs as exactly one gevent
worker (see conf/gunicorn.conf.py).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import gevent
from werkzeug.wrappers import Request, Response

from ptth_lib.config import RelayConfig
from ptth_lib.errors import BadPathError, ForbiddenError, HttpError
from ptth_lib.relay import trust
from ptth_lib.relay.audit import AuditLog
from ptth_lib.relay.body_stream import BodyStream
from ptth_lib.relay.config_watch import ConfigWatcher
from ptth_lib.relay.delivery import deliver, hold_lease, refuse, requeue_if_lost
from ptth_lib.relay.forwarding import ForwardedConnection, PortForwarding
from ptth_lib.relay.metrics import RelayMetrics
from ptth_lib.relay.rendezvous import ListenEndedError, Rendezvous, ServerState
from ptth_lib.relay.responses import RelayedResponse, error_response, redirect, text
from ptth_lib.wire import tripcode
from ptth_lib.wire.envelope import (
    ACK_HEADER,
    API_KEY_HEADER,
    BATCH_HEADER,
    FEATURE_ACK,
    FEATURES_HEADER,
    MAX_REQUESTS_HEADER,
    SERVER_HOST_HEADER,
    SERVER_VERSION_HEADER,
    WAIT_HEADER,
    clean_report,
    collect_headers,
    encode_requests,
    is_hop_by_hop,
    is_request_id,
    parse_features,
)
from ptth_lib.wsgi import connection_socket, cut_connection, end_on_hangup, request_target

logger = logging.getLogger(__name__)

# URL prefixes that name a server: the frontend's, the spec's older alias, the scraper API's.
FRONTEND_PREFIX = "/frontend/servers/"
ALIAS_PREFIX = "/servers/"
SCRAPER_PREFIX = "/scraper/v1/server/"

# Bounds on what a listen's headers may ask for: seconds to park (X-PTTH-Wait-Secs)
# and requests to take (X-PTTH-Max-Requests); out-of-range values are clamped.
MAX_WAIT_HEADER_SECS = 300
MAX_REQUESTS_PER_LISTEN = 1024

# A header dropped from a server's responses is logged once per server and
# header in this long, not once per response; the table of those last logged
# is cleared when it holds this many.
DROP_LOG_EVERY_SECS = 3600.0
MAX_DROPS_REMEMBERED = 10_000

# Proxies seen sending X-Forwarded-For without being trusted are warned about
# once each, up to this many.
MAX_UNTRUSTED_PROXIES_WARNED = 64

# The longest name or id from a path quoted in the audit log.
MAX_AUDITED_NAME_CHARS = 64


class Relay:
    """The relay: its state, its policy, and what each request does."""

    def __init__(self, config: RelayConfig, config_path: str | None = None) -> None:
        """Build every part for `config`; with `config_path`, also a watcher that reloads it.

        Nothing runs until `start()`.
        """
        self.audit = AuditLog(config.audit_log)
        self.rendezvous = Rendezvous(config, on_event=self.audit.record)
        self.forwarding = PortForwarding(config, on_closed=self._forwarded_connection_closed)
        self.metrics = RelayMetrics(self.rendezvous, self.forwarding)
        self.watcher = (ConfigWatcher(config_path, self.reconfigure, self._config_reload_reported)
                        if config_path is not None else None)
        self._untrusted_proxies_warned: set[str] = set()
        self._drops_logged: dict[tuple[str, str], float] = {}

    @property
    def config(self) -> RelayConfig:
        """The config in force (it may be reloaded)."""
        return self.rendezvous.config

    # ---- life ----------------------------------------------------------------------

    def start(self) -> list[gevent.Greenlet]:
        """Start the greenlets that watch server presence, forwarded connections and the config file.

        They run for the relay's life; the caller may kill them (a test does).
        """
        greenlets = [gevent.spawn(self.rendezvous.watch_presence), gevent.spawn(self.forwarding.sweep)]
        if self.watcher is not None:
            greenlets.append(gevent.spawn(self.watcher.run))
        return greenlets

    def close(self) -> None:
        """The relay is stopping: answer parked listens now (204), abort forwarded connections.

        Downloads in flight go on; a graceful stop would otherwise wait for
        every listen's timeout, and for forwarded connections that may last days.
        """
        self.rendezvous.close()
        self.forwarding.close()

    def reconfigure(self, config: RelayConfig) -> None:
        """Apply a new config without dropping servers or connections that stay allowed."""
        self.audit.set_path(config.audit_log)
        self.rendezvous.reconfigure(config)
        self.forwarding.reconfigure(config)

    def reload_config(self) -> bool:
        """Read the config file now (SIGHUP); False if there is none or it was rejected."""
        return self.watcher is not None and self.watcher.reload()

    def _config_reload_reported(self, ok: bool, detail: str) -> None:
        self.audit.record("config_reloaded" if ok else "config_rejected", detail=detail)

    def _forwarded_connection_closed(self, conn: ForwardedConnection) -> None:
        self.metrics.count_closed(conn)

    # ---- the edge: who is asking -----------------------------------------------------

    def client_address(self, req: Request) -> str:
        """The client's address: the peer's, or through a trusted proxy, the one it reports."""
        environ = req.environ
        peer = str(environ.get("REMOTE_ADDR", "unknown"))
        forwarded_for = environ.get("HTTP_X_FORWARDED_FOR")
        warned = self._untrusted_proxies_warned
        if forwarded_for and peer not in warned and len(warned) < MAX_UNTRUSTED_PROXIES_WARNED \
                and not trust.is_in(peer, self.config.trusted_proxies):
            warned.add(peer)
            logger.warning("requests from %s carry X-Forwarded-For, but %s is not in trusted_proxies: all "
                           "its clients count as one address (add it to trusted_proxies if it is your proxy)",
                           peer, peer)
        return trust.client_address(peer, forwarded_for, self.config.trusted_proxies)

    def is_operator(self, req: Request) -> bool:
        """Tell whether this request may see the operators' pages (metrics, audit log, ...)."""
        environ = req.environ
        peer = str(environ.get("REMOTE_ADDR", ""))
        if not trust.is_in(peer, self.config.trusted_proxies) and any(h in environ for h in trust.PROXY_HEADERS):
            return False  # came through a proxy we do not trust to say from whom
        return trust.is_in(self.client_address(req), self.config.operator_addresses)

    def authenticate_server(self, name: str, req: Request) -> ServerState:
        """The server `name` if the request carries its key; else count, audit and raise ForbiddenError."""
        try:
            return self.rendezvous.authenticate(name, req.headers.get(API_KEY_HEADER), self.client_address(req))
        except ForbiddenError as e:
            self._reject_backend_key(req, e, server=name[:MAX_AUDITED_NAME_CHARS])
            raise

    def _reject_backend_key(self, req: Request, e: ForbiddenError, **where: str) -> None:
        """Count and audit a refused backend call; `where` names the server or request."""
        key = req.headers.get(API_KEY_HEADER)
        self.metrics.backend_auth_rejected.inc()
        self.audit.record("backend_key_rejected", **where, address=self.client_address(req), reason=str(e),
                          tripcode=tripcode.derive(key) if key else None)

    def _log_dropped(self, server: str, names: list[str]) -> None:
        """Log headers dropped from a server's response, once per server and header an hour."""
        now = time.monotonic()
        logged = self._drops_logged
        for name in names:
            key = (server, name)
            if now - logged.get(key, -DROP_LOG_EVERY_SECS) >= DROP_LOG_EVERY_SECS:
                if len(logged) >= MAX_DROPS_REMEMBERED:
                    logged.clear()
                logged[key] = now
                logger.warning("dropped header %r from server %s's responses: it would act on the "
                               "relay's edge or origin (logged once an hour)", name, server)

    # ---- backend API: servers ----------------------------------------------------------

    def listen(self, name: str, req: Request) -> Response:
        """P1 and P3: park server `name`'s listen until requests come, then hand them over."""
        rv = self.rendezvous
        server = self.authenticate_server(name, req)
        server.version = clean_report(req.headers.get(SERVER_VERSION_HEADER)) or server.version
        server.host = clean_report(req.headers.get(SERVER_HOST_HEADER)) or server.host
        acks = FEATURE_ACK in parse_features(req.headers.get(FEATURES_HEADER))
        acked = req.headers.get(ACK_HEADER, "")
        if acks and is_request_id(acked):
            rv.ack(server, acked)  # before parking: a cut while parked must not lose it
        wait = _number(req.headers.get(WAIT_HEADER), 0, MAX_WAIT_HEADER_SECS)
        timeout = rv.config.listen_timeout_secs if wait is None else min(rv.config.listen_timeout_secs, wait)
        sock = connection_socket(req.environ)
        watcher = gevent.spawn(end_on_hangup, sock, gevent.getcurrent(), ListenEndedError) if sock else None
        try:
            batch, lease = rv.listen(server, timeout,
                                     _number(req.headers.get(MAX_REQUESTS_HEADER), 0, MAX_REQUESTS_PER_LISTEN),
                                     lease=acks)
        finally:
            if watcher is not None:
                watcher.kill()
        if not batch:
            return Response(status=204)
        logger.debug("listen by %s takes %d requests", name, len(batch))
        body = encode_requests(p.request for p in batch)
        self.metrics.relayed_bytes.labels("to_server").inc(len(body))
        resp = Response(body, 200, content_type="application/msgpack")
        if lease is not None:
            resp.headers[BATCH_HEADER] = lease.id
            lease.holder = gevent.spawn(hold_lease, rv, sock, lease)
        elif sock is not None:
            gevent.spawn(requeue_if_lost, rv, sock, batch)
        return resp

    def respond(self, request_id: str, req: Request) -> Response:
        """P5 and P7: a server's response POST; its answer says whether the client got it all."""
        try:
            p = self.rendezvous.claim(request_id, req.headers.get(API_KEY_HEADER))
        except ForbiddenError as e:
            self._reject_backend_key(req, e, request=request_id[:MAX_AUDITED_NAME_CHARS])
            return refuse(e.status, str(e), req)
        except HttpError as e:
            return refuse(e.status, str(e), req)
        return deliver(self.rendezvous, p, req)

    def leave(self, name: str, req: Request) -> Response:
        """A process of server `name` is stopping: requests for it fail at once if no other listens."""
        server = self.authenticate_server(name, req)
        self.rendezvous.leave(server)
        logger.info("server %s says it is leaving", name)
        return text(200, "goodbye")

    # ---- frontend: clients ---------------------------------------------------------------

    def client_request(self, req: Request) -> Response:
        """P2 to P6 for `/frontend/servers/NAME/...`; ".../NAME" redirects to ".../NAME/".

        A path that could be read two ways is refused (400, trust.py).
        """
        raw = request_target(req.environ)
        try:
            target = trust.parse_server_path(raw, FRONTEND_PREFIX)
        except BadPathError as e:
            return text(400, f"bad path: {e}")
        if target.target is None:
            return redirect(raw.partition("?")[0].rsplit("/", 1)[-1] + "/", 302)
        started = time.monotonic()
        self.metrics.client_requests_in_flight.inc()
        try:
            resp = self._relay(target, req)
        except HttpError as e:
            resp = error_response(e)
        return self._measured(resp, started)

    def scraper_request(self, req: Request) -> Response:
        """P2 to P6 for `/scraper/v1/server/NAME/...`, once the scraper key is checked."""
        started = time.monotonic()
        self.metrics.client_requests_in_flight.inc()
        try:
            target = trust.parse_server_path(request_target(req.environ), SCRAPER_PREFIX)
            if target.target is None:
                raise BadPathError("no path after the server name")
            resp = self._relay(target, req)
        except BadPathError as e:
            resp = text(400, f"bad path: {e}")
        except HttpError as e:
            resp = error_response(e)
        return self._measured(resp, started)

    def alias_request(self, req: Request) -> Response:
        """The spec's older /servers/NAME/...: one redirect to the one prefix operators protect."""
        if not self.config.servers_alias:
            return text(404, "no such page: servers are at /frontend/servers/NAME/ "
                             "(servers_alias is off in the relay config)")
        raw = request_target(req.environ)
        try:
            trust.parse_server_path(raw, ALIAS_PREFIX)
        except BadPathError as e:
            return text(400, f"bad path: {e}")
        return redirect("/frontend" + raw, 308)

    def _measured(self, resp: Response, started: float) -> Response:
        """Count a client's request in the metrics when its response ends."""
        metrics = self.metrics

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

    def _relay(self, target: trust.ServerPath, req: Request) -> Response:
        """Queue the request, wait for the head, stream the body."""
        rv = self.rendezvous
        environ = req.environ
        share = trust.fairness_key(self.client_address(req))
        if req.content_length or "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
            return text(501, "request bodies are not relayed through the tunnel")
        name, uri = target.name, target.target
        assert uri is not None  # the callers refuse or redirect ".../NAME"
        forwarded = collect_headers(trust.client_headers_for_server(req.headers.items()))
        sock = connection_socket(environ) if rv.must_wait_turn(name, share) else None
        # Waiting for a turn may be long: stop if the client hangs up meanwhile.
        watcher = (gevent.spawn(end_on_hangup, sock, gevent.getcurrent(), ListenEndedError)
                   if sock is not None else None)
        try:
            p = rv.submit(name, req.method, uri, forwarded, client=share)
        except ListenEndedError:
            return text(499, "the client hung up while waiting for its turn")
        finally:
            if watcher is not None:
                watcher.kill()
        try:
            logger.debug("request %s: %s %s for %s", p.request.id, req.method, uri, name)
            head = rv.wait_for_head(p)
            passed, dropped = trust.server_headers_for_client(head.headers)
            if dropped:
                self._log_dropped(name, dropped)
            headers = [(_display_case(k), v.decode("latin-1")) for k, v in passed.items() if not is_hop_by_hop(k)]
            trusted = p.server.registered.trusted
            headers.extend(trust.TRUSTED_RELAYED_HEADERS if trusted else trust.RELAYED_HEADERS)
            body: Any
            if req.method == "HEAD" or head.status_code in (204, 304):
                rv.skip_body(p)
                body = []  # a list, not b"": werkzeug would reset Content-Length to 0
            else:
                body = BodyStream(rv, p, lambda reason: cut_connection(environ))
            resp = RelayedResponse(body, status=head.status_code, headers=headers)
        except BaseException:
            rv.forget(p)
            raise
        if "content-type" not in passed:
            del resp.headers["Content-Type"]
        return resp


def _number(value: str | None, low: int, high: int) -> int | None:
    """A whole number header from a server, clamped to [low, high]; None if absent or malformed."""
    if not value or not value.isascii() or not value.isdigit() or len(value) > 9:
        return None
    return max(low, min(high, int(value)))


def _display_case(name: str) -> str:
    """content-type -> Content-Type, as clients show headers to people."""
    return "-".join(part.capitalize() for part in name.split("-"))
