"""The relay's own pages, as Flask routes over a `Relay`.

- for people: `/` (links), `/frontend/servers/` (every server, HTML or JSON
  by Accept) and `/frontend/relay_up_check`;
- for operators only (`operator_addresses`): `/metrics` (metrics.py),
  `/frontend/audit_log` (audit.py) and `/frontend/unregistered_servers`;
- for those who log in to it ([dashboard] in the relay config): the live
  `/frontend/dashboard` (dashboard.py); 404 while it is off.

In a cluster (`redis_url`) the operators' pages are the whole cluster's,
whichever worker answers: the audit log's last entries and the unregistered
servers come from Redis, and /metrics gathers every node's (cluster/ops.py);
the dashboard's traffic figures are the answering worker's own (it says so).

Pages are templates on the shared look (views.py, templates/), autoescaped.
Every answer the relay makes itself through Flask gets the strict headers of
`trust.RELAY_PAGE_HEADERS` (`add_page_headers`), and an error line becomes a
page for a browser (views.as_page); relayed content keeps its own headers.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, Response, jsonify, request
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from ptth_lib.relay import chart, trust, views
from ptth_lib.relay.basic_auth import DASHBOARD_SCOPE, challenge
from ptth_lib.relay.dashboard import (
    SAMPLE_SECS,
    WINDOW_SECS,
    ServerView,
    format_bytes_rate,
    format_duration,
    format_requests_rate,
)
from ptth_lib.relay.metrics import ErrorAnswer
from ptth_lib.relay.relay import FRONTEND_PREFIX, Relay
from ptth_lib.relay.rendezvous import format_rfc3339
from ptth_lib.relay.responses import RelayedResponse, text

# The audit log page's columns; each entry's other fields go in a last one.
_AUDIT_COLUMNS = ("time", "event", "server", "address")

DASHBOARD_PATH = "/frontend/dashboard"
# The dashboard reloads itself this often: a new sample is there each time.
DASHBOARD_REFRESH_SECS = int(SAMPLE_SECS)


def register(app: Flask, relay: Relay) -> None:
    """Add the relay's pages to `app`."""
    rv = relay.rendezvous

    def operators_only() -> Response | None:
        if relay.is_operator(request):
            return None
        return text(403, "this page is for the relay's operators: it is served only to the addresses "
                         "in operator_addresses (relay config)")

    @app.get("/")
    def _index() -> Response:
        return views.render("index.html", dashboard=relay.config.dashboard.enabled)

    @app.get("/frontend/relay_up_check")
    def _up_check() -> Response:
        node = relay.node
        if node is not None and (not node.joined.is_set() or node.store.is_down):
            return text(503, "Relay is up, but cannot reach its shared state (Redis): it answers 503 until "
                             "Redis is back")
        return text(200, "Relay is up")

    @app.get(FRONTEND_PREFIX)
    def _server_list() -> Response:
        if request.accept_mimetypes.best_match(["text/html", "application/json"]) == "application/json":
            return jsonify(rv.describe_servers())
        servers = [{**s, "about": " on ".join(str(x) for x in (s["version"], s["host"]) if x)}
                   for s in rv.describe_servers()]
        return views.render("servers.html", servers=servers)

    @app.get("/frontend/unregistered_servers")
    def _unregistered() -> Response:
        if refused := operators_only():
            return refused
        return views.render("unregistered.html", unregistered=_unregistered_rows(relay))

    @app.get("/frontend/audit_log")
    def _audit_log() -> Response:
        if refused := operators_only():
            return refused
        if not relay.audit.enabled:
            return text(404, "the audit log is off: set audit_log in the relay config")
        columns: tuple[str, ...] = _AUDIT_COLUMNS
        recent = list(relay.audit.recent)
        if relay.cluster_ops is not None:  # the cluster's entries, each with the worker that recorded it
            columns, recent = _AUDIT_COLUMNS + ("node",), relay.cluster_ops.recent_audit()
        entries = [{"cells": [str(entry.get(col) or "") for col in columns],
                    "details": _audit_details(entry, columns)} for entry in reversed(recent)]
        return views.render("audit.html", columns=columns, entries=entries)

    @app.get(DASHBOARD_PATH)
    def _dashboard() -> Response:
        settings = relay.config.dashboard
        if not settings.enabled:
            return text(404, "the dashboard is off: set enabled = true under [dashboard] in the relay config")
        authorization = request.headers.get("Authorization")
        if not relay.logins.check_entries(DASHBOARD_SCOPE, settings.basic_auth, authorization):
            if authorization:
                relay.audit.record("dashboard_login_rejected", address=relay.client_address(request))
            resp = text(401, "the dashboard needs a user name and password ([dashboard] basic_auth in the "
                             "relay config)")
            resp.headers["WWW-Authenticate"] = challenge(DASHBOARD_SCOPE)
            return resp
        return views.render("dashboard.html", **_dashboard_context(relay))

    @app.get("/metrics")
    def _metrics() -> Response:
        if not relay.config.metrics:
            return text(404, "metrics are off: set metrics = true in the relay config")
        if refused := operators_only():
            return refused
        if relay.cluster_ops is not None:
            return Response(relay.cluster_ops.metrics(sorted(relay.rendezvous.servers)),
                            content_type=CONTENT_TYPE_LATEST)
        body, content_type = relay.metrics.render()
        return Response(body, content_type=content_type)

    @app.errorhandler(HTTPException)
    def _no_such_page(e: HTTPException) -> Any:
        """werkzeug's own answers (no route, wrong method) in the relay's look, for every client.

        Still HTML for curl and PTTH's programs, as werkzeug's page was: their
        error lines name an HTML answer as "not the relay's API" and add a hint
        (errors.describe_answer), which is what a wrong relay_url deserves.
        """
        if e.code is None or e.code < 400:
            return e
        message = "there is no page at this address on the relay" if e.code == 404 else f"{e.code} {e.name}"
        resp = Response(views.error_page(e.code, message), status=e.code, content_type="text/html; charset=utf-8")
        resp.headers["Content-Security-Policy"] = views.PAGE_CSP
        if isinstance(e, MethodNotAllowed) and e.valid_methods:
            resp.headers["Allow"] = ", ".join(e.valid_methods)
        return resp


def add_page_headers(resp: Response) -> Response:
    """Give an answer of the relay's own its security headers, and a Location that is a path.

    For Flask's `after_request`; relayed responses pass unchanged. An error
    line becomes a page when the client prefers HTML (views.as_page).
    """
    if isinstance(resp, RelayedResponse):
        return resp
    resp = views.as_page(resp, request.environ)
    for name, value in trust.RELAY_PAGE_HEADERS:
        resp.headers.setdefault(name, value)
    location = resp.headers.get("Location")
    parts = urlsplit(location or "")
    if parts.scheme or parts.netloc:
        # werkzeug's own redirects (a missing slash) are built from the
        # client's Host header; a path keeps them on whatever host was asked.
        resp.headers["Location"] = "/" + parts.path.lstrip("/") + (f"?{parts.query}" if parts.query else "")
    return resp


def _audit_details(entry: dict[str, Any], columns: tuple[str, ...]) -> str:
    return ", ".join(f"{k}={v}" for k, v in entry.items() if k not in columns and v is not None)


def _unregistered_rows(relay: Relay) -> list[dict[str, str]]:
    """The unregistered names and tripcodes servers offered (to any worker of a cluster), newest first."""
    if relay.cluster_ops is not None:
        entries = [((u.name, u.tripcode, u.address), u.last_seen) for u in relay.cluster_ops.unregistered()]
    else:
        entries = sorted(relay.rendezvous.unregistered.items(), key=lambda kv: -kv[1])
    return [{"name": name, "tripcode": code, "address": address, "seen": format_rfc3339(seen)}
            for (name, code, address), seen in entries]


def _dashboard_context(relay: Relay) -> dict[str, Any]:
    """What dashboard.html shows: totals, a card per server, servers waiting for an admin."""
    now, wall = time.monotonic(), time.time()
    rows = relay.dashboard.view(now)
    servers = [_server_card(row, now, wall) for row in rows]
    return {
        # In a cluster the traffic figures are the answering worker's own (dashboard.py).
        "worker": relay.node.label if relay.node is not None else None,
        "refresh_secs": DASHBOARD_REFRESH_SECS,
        "window_min": int(WINDOW_SECS // 60),
        "updated": time.strftime("%H:%M:%S", time.gmtime(wall)),
        "chart_width": int(chart.WIDTH),
        "chart_height": int(chart.HEIGHT),
        "totals": {
            "servers": len(rows),
            "online": sum(1 for r in rows if r.online),
            "requests": format_requests_rate(sum(r.now.requests_per_sec for r in rows if r.now)),
            "bytes": format_bytes_rate(sum(r.now.bytes_per_sec for r in rows if r.now)),
            "connections": sum(r.open_connections for r in rows),
        },
        "servers": servers,
        "unregistered": _unregistered_rows(relay),
    }


def _server_card(row: ServerView, now: float, wall: float) -> dict[str, Any]:
    """One server's card on the dashboard, its numbers in words and its two charts."""
    if row.since_wall is not None:
        since = (f"{'Online' if row.online else 'Offline'} since "
                 f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(row.since_wall))} UTC "
                 f"({format_duration(wall - row.since_wall)})")
    else:
        since = "Online" if row.online else f"Offline · last seen {row.last_seen or 'never'}"
    requests = chart.chart([(r.at, r.requests_per_sec) for r in row.rates], now, WINDOW_SECS)
    sent = chart.chart([(r.at, r.bytes_per_sec) for r in row.rates], now, WINDOW_SECS)
    return {
        "name": row.name,
        "display_name": row.display_name,
        "online": row.online,
        "since": since,
        "version": row.version,
        "open_connections": row.open_connections,
        "charts": [
            {"kind": "requests", "label": "Requests", "chart": requests, "peak": format_requests_rate(requests.peak),
             "now": format_requests_rate(row.now.requests_per_sec if row.now else 0.0)},
            {"kind": "bytes", "label": "To clients", "chart": sent, "peak": format_bytes_rate(sent.peak),
             "now": format_bytes_rate(row.now.bytes_per_sec if row.now else 0.0)},
        ],
        "errors": _grouped_errors(row.errors),
        "recent_error": any(wall - e.wall < WINDOW_SECS for e in row.errors),
    }


def _grouped_errors(errors: list[ErrorAnswer]) -> list[dict[str, Any]]:
    """The last errors (newest first), the same line repeated shown once with its count and latest time."""
    groups: dict[tuple[int, str], dict[str, Any]] = {}
    for e in errors:
        group = groups.get((e.status, e.message))
        if group is None:
            groups[(e.status, e.message)] = {"status": e.status, "message": e.message, "count": 1,
                                             "time": time.strftime("%H:%M:%S", time.gmtime(e.wall))}
        else:
            group["count"] += 1
    return list(groups.values())
