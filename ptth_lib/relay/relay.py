"""The relay as one object: its parts, the rules at its edge, and what each request does.

A `Relay` is built from a config and owns every part of the relay:

- the rendezvous (rendezvous.py), where clients' requests meet servers' listens;
- its capacity (capacity.py): the connections it holds, and those it refuses;
- port forwarding's state (forwarding.py);
- the metrics (metrics.py), the dashboard's samples of them (dashboard.py)
  and the audit log (audit.py);
- the config watcher (config_watch.py), which hands it each new config;
- the rules at its edge (trust.py): whose address a request is, who is an
  operator, which headers cross, which server a path names.

Its methods are what the relay does for each request of the backend API
(`listen`, `respond`, `leave`) and of the frontend (`client_request`,
`scraper_request`, `alias_request`): a werkzeug `Request` in, a `Response`
out, no Flask routing. What happens after a listen's answer and during a
response POST is in delivery.py; a request body's fetch in request_body.py;
a WebSocket in upgrade.py. app.py wires a Relay to Flask; hot_paths.py sends
the paths every relayed request takes straight to it (and, with host
routing, every path on a server's host); a test builds one and drives it
directly. About 550 lines: `_relay` holds the one sequence every client
request goes through (login, body, upgrade, headers, queue, head), which
reads best whole.

The relay's state lives in this process, so it runs as exactly one gevent
worker (see conf/gunicorn.conf.py).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import gevent
from werkzeug.wrappers import Request, Response

from ptth_lib.config import RelayConfig
from ptth_lib.errors import BadPathError, ForbiddenError, HttpError, UnknownRequestError
from ptth_lib.extras import require_extra
from ptth_lib.relay import trust
from ptth_lib.relay.audit import AuditLog
from ptth_lib.relay.basic_auth import Logins, challenge
from ptth_lib.relay.body_stream import BodyStream
from ptth_lib.relay.capacity import Capacity, open_files_limit, plan_capacity
from ptth_lib.relay.config_watch import ConfigWatcher
from ptth_lib.relay.dashboard import Dashboard
from ptth_lib.relay.delivery import (
    deliver,
    deliver_answer,
    hold_lease,
    read_answers,
    refuse,
    requeue_if_lost,
)
from ptth_lib.relay.forwarding import ForwardedConnection, PortForwarding
from ptth_lib.relay.metrics import RelayMetrics
from ptth_lib.relay.rendezvous import ListenEndedError, PendingRequest, Rendezvous, ServerState
from ptth_lib.relay.request_body import (
    BODY_HEADERS,
    DONE,
    FETCHING,
    LINGER_SECS,
    Upload,
    body_source,
    fetch,
    watch_client,
)
from ptth_lib.relay.responses import RelayedResponse, TextAnswer, error_response, redirect, text
from ptth_lib.relay.upgrade import (
    WEBSOCKET,
    SwitchedResponse,
    server_reads,
    server_switched,
    wants_websocket,
)
from ptth_lib.wire import tripcode
from ptth_lib.wire.envelope import (
    ACK_HEADER,
    API_KEY_HEADER,
    BATCH_HEADER,
    BODY_LENGTH_UNKNOWN,
    FEATURE_ACK,
    FEATURE_ANSWERS,
    FEATURE_BODIES,
    FEATURE_HEADER_LISTS,
    FEATURE_WEBSOCKET,
    FEATURES_HEADER,
    MAX_REQUESTS_HEADER,
    SERVER_HOST_HEADER,
    SERVER_VERSION_HEADER,
    WAIT_HEADER,
    BadAnswer,
    InlineAnswer,
    ServerResponseHead,
    clean_report,
    collect_headers,
    encode_requests,
    is_request_id,
    parse_features,
)
from ptth_lib.wire.names import NAME_RE
from ptth_lib.wsgi import (
    can_take_over,
    close_after_answer,
    connection_socket,
    cut_connection,
    end_on_hangup,
    forget_continue,
    request_target,
    show_client_address,
    watch_for_hangup,
)

if TYPE_CHECKING:
    from ptth_lib.relay.cluster.node import Node
    from ptth_lib.relay.cluster.ops import ClusterOps

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

# A server that announces none of PTTH's features (a spec 002 server) has its
# listens parked at most this long, whatever listen_timeout_secs says: spec 002
# names no timeout, and 30 s is what such servers have always been answered
# within. PTTH's own servers wait up to 330 s for an answer
# (server/loop.py LISTEN_READ_TIMEOUT_SECS), so they get listen_timeout_secs.
SPEC_002_LISTEN_SECS = 30.0

# What the relay takes and does, in its listen answers' X-PTTH-Features
# (PROTOCOL.md "Web apps"): response heads with lists of values, and it
# relays request bodies and WebSockets to servers that announce them.
RELAY_FEATURES = f"{FEATURE_HEADER_LISTS}, {FEATURE_BODIES}, {FEATURE_WEBSOCKET}, {FEATURE_ANSWERS}"


class Relay:
    """The relay: its state, its policy, and what each request does."""

    def __init__(self, config: RelayConfig, config_path: str | None = None,
                 pool_connections: int | None = None) -> None:
        """Build every part for `config`; with `config_path`, also a watcher that reloads it.

        `pool_connections` is the WSGI server's own limit on connections
        (gunicorn's worker_connections), if it has one: the relay holds fewer.
        Nothing runs until `start()`.
        """
        self.audit = AuditLog(config.audit_log)
        self.node: Node | None = None  # cluster mode's node (cluster/node.py); None: one process
        self.rendezvous: Rendezvous
        self.forwarding: PortForwarding
        if config.redis_url is not None:
            require_extra("cluster", "redis_url (a cluster)")
            from ptth_lib.relay.cluster import build  # imports redis: only in cluster mode
            self.node, self.rendezvous, self.forwarding = build(
                config, on_event=self.audit.record, on_closed=self._forwarded_connection_closed)
        else:
            self.rendezvous = Rendezvous(config, on_event=self.audit.record)
            self.forwarding = PortForwarding(config, on_closed=self._forwarded_connection_closed)
        self.capacity = Capacity(plan_capacity(config.max_connections, open_files_limit(), pool_connections,
                                               cluster=config.redis_url is not None))
        self.metrics = RelayMetrics(self.rendezvous, self.forwarding, self.capacity)
        # Cluster mode: the audit page, /metrics and the config version for the whole cluster.
        self.cluster_ops: ClusterOps | None = None
        if self.node is not None:
            from ptth_lib.relay.cluster.ops import ClusterOps
            self.cluster_ops = ClusterOps(self.node, self.metrics, self.audit)
        self.dashboard = Dashboard(self.rendezvous, self.metrics, self.forwarding)
        self.watcher = (ConfigWatcher(config_path, self.reconfigure, self._config_reload_reported)
                        if config_path is not None else None)
        self._untrusted_proxies_warned: set[str] = set()
        self._drops_logged: dict[tuple[str, str], float] = {}
        self.logins = Logins()
        self._host_names: tuple[object, dict[str, str]] = (None, {})  # (servers table, lowercase -> name)

    @property
    def config(self) -> RelayConfig:
        """The config in force (it may be reloaded)."""
        return self.rendezvous.config

    # ---- life ----------------------------------------------------------------------

    def start(self) -> list[gevent.Greenlet]:
        """Start the greenlets: server presence, forwarded connections, the config file, the dashboard's
        samples, the refusals' log.

        They run for the relay's life; the caller may kill them (a test does).
        """
        greenlets = [gevent.spawn(self.rendezvous.watch_presence), gevent.spawn(self.forwarding.sweep),
                     gevent.spawn(self.dashboard.run), gevent.spawn(self.capacity.run)]
        if self.watcher is not None:
            greenlets.append(gevent.spawn(self.watcher.run))
        if self.node is not None:
            greenlets.extend(self.node.start())
        if self.cluster_ops is not None:
            greenlets.extend(self.cluster_ops.start())
        return greenlets

    def close(self) -> None:
        """The relay is stopping: answer parked listens now (204), abort forwarded connections.

        Downloads in flight go on; a graceful stop would otherwise wait for
        every listen's timeout, and for forwarded connections that may last days.
        """
        self.rendezvous.close()
        self.forwarding.close()
        if self.node is not None:
            self.node.close()

    def reconfigure(self, config: RelayConfig) -> None:
        """Apply a new config without dropping servers or connections that stay allowed.

        max_connections waits for a restart: gunicorn sized its pool of connections from it at start.
        """
        if config.max_connections != self.config.max_connections:
            logger.warning("max_connections changed from %d to %d in the config: it takes effect when the relay "
                           "restarts (it holds %d connections until then)", self.config.max_connections,
                           config.max_connections, self.capacity.max_connections)
        self.audit.set_path(config.audit_log)
        self.rendezvous.reconfigure(config)
        self.forwarding.reconfigure(config)
        if self.cluster_ops is not None:
            self.cluster_ops.reconfigured(config)

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
            self.reject_backend_key(req, e, server=name[:MAX_AUDITED_NAME_CHARS])
            raise

    def reject_backend_key(self, req: Request, e: ForbiddenError, **where: str) -> None:
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
        server.features = parse_features(req.headers.get(FEATURES_HEADER))
        acks = FEATURE_ACK in server.features
        acked = req.headers.get(ACK_HEADER, "")
        acked = acked if acks and is_request_id(acked) else ""
        if req.method == "POST":
            self._take_answers(server, req)
        wait = _number(req.headers.get(WAIT_HEADER), 0, MAX_WAIT_HEADER_SECS)
        longest = rv.config.listen_timeout_secs
        if not server.features:
            longest = min(longest, SPEC_002_LISTEN_SECS)
        timeout = longest if wait is None else min(longest, wait)
        sock = connection_socket(req.environ)
        stop_watching = watch_for_hangup(sock, gevent.getcurrent(), ListenEndedError) if sock else None
        try:
            batch, lease = rv.listen(server, timeout,
                                     _number(req.headers.get(MAX_REQUESTS_HEADER), 0, MAX_REQUESTS_PER_LISTEN),
                                     lease=acks, ack=acked)
        finally:
            if stop_watching is not None:
                stop_watching()
        if not batch:
            return Response(status=204, headers={FEATURES_HEADER: RELAY_FEATURES})
        logger.debug("listen by %s takes %d requests", name, len(batch))
        body = encode_requests(p.request for p in batch)
        self.metrics.relayed_bytes.labels("to_server").inc(len(body))
        resp = Response(body, 200, content_type="application/msgpack", headers={FEATURES_HEADER: RELAY_FEATURES})
        if lease is not None:
            resp.headers[BATCH_HEADER] = lease.id
            lease.holder = gevent.spawn(hold_lease, rv, sock, lease)
        elif sock is not None:
            gevent.spawn(requeue_if_lost, rv, sock, batch)
        return resp

    def _take_answers(self, server: ServerState, req: Request) -> None:
        """Deliver the small answers a listen carries (PROTOCOL.md), before it parks; HttpError if unreadable."""
        name = server.registered.name
        answers = read_answers(req)
        self.metrics.answers_carried.inc(len(answers))
        for answer in answers:
            request_id = answer.request_id
            if self.node is not None and not request_id.startswith(self.node.id):
                if isinstance(answer, InlineAnswer):  # its client is on another node
                    self.node.forward_answer(answer, server.registered.tripcode)
                continue
            try:
                p = self.rendezvous.claim_by_tripcode(request_id, server.registered.tripcode)
            except UnknownRequestError as e:  # its client left, or it timed out, or it came before
                logger.debug("answer from server %s not delivered: %s", name, e)
                continue
            except HttpError as e:  # another server's request
                logger.warning("answer from server %s not delivered: %s", name, e)
                continue
            if isinstance(answer, BadAnswer):
                logger.warning("bad answer for request %s from server %s: %s", request_id, name, answer.reason)
                self.rendezvous.fail(p, f"server {name!r} sent a bad response: {answer.reason}")
            else:
                deliver_answer(self.rendezvous, p, answer)

    def respond(self, request_id: str, req: Request) -> Response:
        """P5 and P7: a server's response POST; its answer says whether the client got it all."""
        self.metrics.answers_posted.inc()
        if self.node is not None:
            at_owner = request_id.startswith(self.node.id)
            self.metrics.response_post(at_owner)
            if not at_owner:
                return self.node.forward_response(request_id, req)  # its client is on another node
        try:
            p = self.rendezvous.claim(request_id, req.headers.get(API_KEY_HEADER))
        except ForbiddenError as e:
            self.reject_backend_key(req, e, request=request_id[:MAX_AUDITED_NAME_CHARS])
            return refuse(e.status, str(e), req)
        except HttpError as e:
            return refuse(e.status, str(e), req)
        return deliver(self.rendezvous, p, req, on_switch=self._switch)

    def _switch(self, p: PendingRequest, head: ServerResponseHead, req: Request) -> Response:
        """The app switched a WebSocket handshake's connection (101): carry it (upgrade.py)."""
        return server_switched(self.forwarding, self.rendezvous, p, head, req.environ)

    def request_body(self, request_id: str, req: Request) -> Response:
        """The server fetches a request's body, or a WebSocket's bytes from the client (PROTOCOL.md)."""
        key = req.headers.get(API_KEY_HEADER)
        try:
            if not key:
                raise ForbiddenError("missing X-ApiKey header")
            if self.node is not None and not request_id.startswith(self.node.id):  # its client is elsewhere
                from ptth_lib.relay.cluster import streams  # cluster mode only: it imports redis
                return streams.forward_body(self.node, request_id, key, req, lambda message: self.reject_backend_key(
                    req, ForbiddenError(message), request=request_id[:MAX_AUDITED_NAME_CHARS]))
            source = body_source(self.rendezvous, self.forwarding, request_id,
                                 lambda code: tripcode.matches(key, code), self.config.request_timeout_secs)
        except ForbiddenError as e:
            self.reject_backend_key(req, e, request=request_id[:MAX_AUDITED_NAME_CHARS])
            return text(403, str(e))
        if isinstance(source, ForwardedConnection):
            return server_reads(self.forwarding, source, req.environ)
        p, upload = source
        environ = req.environ
        return Response(fetch(self.rendezvous, p, upload, lambda: cut_connection(environ)), 200,
                        headers=BODY_HEADERS)

    def leave(self, name: str, req: Request) -> Response:
        """A process of server `name` is stopping: requests for it fail at once if no other listens."""
        server = self.authenticate_server(name, req)
        self.rendezvous.leave(server)
        self.rendezvous.presence_log.record_leaving(name)  # by name, unless a fleet is leaving
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
        return self._serve(target, req, FRONTEND_PREFIX + target.name)

    def host_request(self, host_name: str, req: Request) -> Response:
        """P2 to P6 for any path on NAME + server_host_suffix: the server has that host to itself.

        `host_name` is the host's part before the suffix, as sent (its case
        does not matter). The whole target goes to the server as it is.
        """
        if not NAME_RE.match(host_name):
            return text(400, f"bad host: {host_name[:64]!r} cannot be a server's name")
        servers = self.config.servers
        if self._host_names[0] is not servers:
            self._host_names = (servers, {name.lower(): name for name in servers})
        name = self._host_names[1].get(host_name.lower())
        if name is None:
            return text(404, f"no server named {host_name!r} is registered at this relay")
        return self._serve(trust.ServerPath(name, request_target(req.environ)), req, "", host_mode=True)

    def request_host(self, environ: dict[str, Any], raw: bool = False) -> str:
        """The host the client asked for: a trusted proxy's X-Forwarded-Host, else Host.

        "" if it is not a host name with maybe a port, unless `raw` (for host
        routing, which answers a malformed name under its suffix itself).
        """
        value = str(environ.get("HTTP_HOST", ""))
        forwarded = environ.get("HTTP_X_FORWARDED_HOST")
        if forwarded and trust.is_in(str(environ.get("REMOTE_ADDR", "")), self.config.trusted_proxies):
            value = str(forwarded).split(",", 1)[0].strip()
        return value if raw else trust.clean_host(value)

    def scraper_request(self, req: Request) -> Response:
        """P2 to P6 for `/scraper/v1/server/NAME/...`, once the scraper key is checked."""
        try:
            target = trust.parse_server_path(request_target(req.environ), SCRAPER_PREFIX)
            if target.target is None:
                raise BadPathError("no path after the server name")
        except BadPathError as e:
            return text(400, f"bad path: {e}")
        return self._serve(target, req, SCRAPER_PREFIX + target.name, check_login=False)

    def _serve(self, target: trust.ServerPath, req: Request, prefix: str, host_mode: bool = False,
               check_login: bool = True) -> Response:
        """Relay one client request, counted in the metrics; its connection ends with it if its body was not read."""
        environ = req.environ
        started = time.monotonic()
        self.metrics.client_requests_in_flight.inc()
        address = self.client_address(req)
        try:
            resp = self._relay(target, req, address, prefix, host_mode, check_login)
        except HttpError as e:
            resp = error_response(e)
        if _body_length(environ) is not None:
            resp.call_on_close(lambda: _end_unread_body(environ))
        show_client_address(environ, address)
        return self._measured(resp, started, target.name)

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

    def _measured(self, resp: Response, started: float, server: str) -> Response:
        """Count a client's request in the metrics, overall and for `server`, when its response ends."""
        metrics = self.metrics
        metrics.response_started(server, resp.response)

        def finished() -> None:
            refused = isinstance(resp, TextAnswer) and (resp.status_code >= 500 or resp.status_code == 429)
            refusal = resp.message if isinstance(resp, TextAnswer) and refused else None
            metrics.response_ended(server, resp.status_code, resp.response, refusal)
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

    def _relay(self, target: trust.ServerPath, req: Request, address: str, prefix: str, host_mode: bool,
               check_login: bool) -> Response:
        """Check the visitor, queue the request, wait for the head, stream the body."""
        rv = self.rendezvous
        environ = req.environ
        name, uri = target.name, target.target
        assert uri is not None  # the callers refuse or redirect ".../NAME"
        registered = self.config.servers.get(name)
        login_needed = bool(registered and registered.basic_auth and check_login)
        if login_needed and not self.logins.check(registered, environ.get("HTTP_AUTHORIZATION")):  # type: ignore[arg-type]
            if environ.get("HTTP_AUTHORIZATION"):
                self.audit.record("basic_auth_rejected", server=name, address=address)
            resp = text(401, f"server {name!r} needs a user name and password")
            resp.headers["WWW-Authenticate"] = challenge(name)
            return resp
        body = _body_length(environ)
        limit = self.config.max_request_body_bytes
        if body is not None and limit and body > limit:
            return text(413, f"the request body of {body} bytes is over the relay's limit of {limit} "
                             "(max_request_body_bytes)")
        websocket = wants_websocket(environ)
        if websocket and body is not None:
            return text(400, "a WebSocket handshake has no body")
        state = rv.servers.get(name)
        if websocket and state is not None and FEATURE_WEBSOCKET in state.features and not can_take_over(environ):
            return text(501, "WebSocket needs the relay under gunicorn (conf/gunicorn.conf.py)")
        headers = collect_headers(
            trust.client_headers_for_server(req.headers.items(), host_mode=host_mode,
                                            keep_authorization=not login_needed, websocket=websocket)
            + trust.forwarded_headers(address, self._request_proto(environ), self.request_host(environ), prefix),
            keep=("upgrade", "connection") if websocket else ())
        upload = Upload(environ, None if body == BODY_LENGTH_UNKNOWN else body, limit) if body is not None else None
        environ["ptth.upload"] = upload
        share = trust.fairness_key(address)
        sock = connection_socket(environ)
        waiter = gevent.getcurrent()
        # Waiting may be long: stop if the client hangs up meanwhile. Without a
        # body, only while it waits for its turn (BodyStream notices later).
        watcher = None
        if sock is not None and upload is not None:
            watcher = gevent.spawn(watch_client, upload, waiter)
        elif sock is not None and rv.must_wait_turn(name, share):
            watcher = gevent.spawn(end_on_hangup, sock, waiter, ListenEndedError)
        try:
            p = rv.submit(name, req.method, uri, headers, client=share, body=body,
                          upgrade=WEBSOCKET if websocket else None)
            p.upload = upload
            if upload is None and watcher is not None:
                watcher.kill()
            logger.debug("request %s: %s %s for %s", p.request.id, req.method, uri, name)
            head = rv.wait_for_head(p, (lambda: upload.last_active) if upload is not None else None)
        except ListenEndedError:
            return text(499, "the client hung up before the answer")
        finally:
            if watcher is not None:
                watcher.kill()
        if upload is not None:
            upload.refuse()  # answered without its body: the connection ends after the answer
        try:
            passed, dropped = trust.server_headers_for_client(head.lines(), host_mode=host_mode,
                                                              upgrade=head.status_code == 101)
            if dropped:
                self._log_dropped(name, dropped)
            headers_out = [(_display_case(k), v.decode("latin-1")) for k, v in passed]
            if head.status_code == 101:  # deliver() let it through for a WebSocket handshake only
                assert p.request.upgrade is not None and p.tunnel is not None
                rv.forget(p)  # a WebSocket lasts: it holds no request slot of its client
                switched = [(k, v) for k, v in headers_out if k.lower() not in ("upgrade", "connection")]
                return SwitchedResponse(self.forwarding, p.tunnel, switched, lambda: None)
            if not host_mode:
                headers_out.extend(trust.TRUSTED_RELAYED_HEADERS if p.server.registered.trusted
                                   else trust.RELAYED_HEADERS)
            resp_body: Any
            if req.method == "HEAD" or head.status_code in (204, 304):
                rv.skip_body(p)
                resp_body = []  # a list, not b"": werkzeug would reset Content-Length to 0
            else:
                resp_body = BodyStream(rv, p, lambda reason: cut_connection(environ))
            resp = RelayedResponse(resp_body, status=head.status_code, headers=headers_out)
        except BaseException:
            rv.forget(p)
            raise
        if not any(k == "content-type" for k, _ in passed):
            del resp.headers["Content-Type"]
        return resp

    def _request_proto(self, environ: dict[str, Any]) -> str:
        """The scheme the client used: a trusted proxy's X-Forwarded-Proto, else the relay's own."""
        forwarded = str(environ.get("HTTP_X_FORWARDED_PROTO", "")).split(",")[0].strip().lower()
        if forwarded in ("http", "https") and trust.is_in(str(environ.get("REMOTE_ADDR", "")),
                                                          self.config.trusted_proxies):
            return forwarded
        return "https" if environ.get("wsgi.url_scheme") == "https" else "http"


def _body_length(environ: dict[str, Any]) -> int | None:
    """The client's request body: its length, BODY_LENGTH_UNKNOWN when chunked, None when it has none."""
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return BODY_LENGTH_UNKNOWN
    length = environ.get("CONTENT_LENGTH")
    if length and length.isdigit() and int(length) > 0:
        return int(length)
    return None


def _end_unread_body(environ: dict[str, Any]) -> None:
    """The answer is out: if the server did not take the whole body, the connection ends (PROTOCOL.md)."""
    upload = environ.get("ptth.upload")
    if isinstance(upload, Upload) and upload.state == DONE:
        return
    forget_continue(environ)
    if isinstance(upload, Upload) and upload.state == FETCHING:
        cut_connection(environ)  # the fetch is reading it: it sees the end and cuts the server's GET
    else:
        close_after_answer(environ, LINGER_SECS)


def _number(value: str | None, low: int, high: int) -> int | None:
    """A whole number header from a server, clamped to [low, high]; None if absent or malformed."""
    if not value or not value.isascii() or not value.isdigit() or len(value) > 9:
        return None
    return max(low, min(high, int(value)))


def _display_case(name: str) -> str:
    """content-type -> Content-Type, as clients show headers to people."""
    return "-".join(part.capitalize() for part in name.split("-"))
