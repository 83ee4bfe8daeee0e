"""The relay's own pages, as Flask routes over a `Relay`.

- for people: `/` (a link to the list), `/frontend/servers/` (every server,
  HTML or JSON by Accept) and `/frontend/relay_up_check`;
- for operators only (`operator_addresses`): `/metrics` (metrics.py),
  `/frontend/audit_log` (audit.py) and `/frontend/unregistered_servers`.

Every answer the relay makes itself through Flask gets the strict headers of
`trust.RELAY_PAGE_HEADERS` (`add_page_headers`); relayed content keeps its own.
"""

from __future__ import annotations

import html
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, Response, jsonify, request

from ptth_lib import __version__
from ptth_lib.relay import trust
from ptth_lib.relay.relay import FRONTEND_PREFIX, Relay
from ptth_lib.relay.rendezvous import format_rfc3339
from ptth_lib.relay.responses import RelayedResponse, text

# The audit log page's columns; each entry's other fields go in a last one.
_AUDIT_COLUMNS = ("time", "event", "server", "address")


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
        return _page("PTTH relay", '<p><a href="frontend/servers/">Server list</a></p>')

    @app.get("/frontend/relay_up_check")
    def _up_check() -> Response:
        return text(200, "Relay is up")

    @app.get(FRONTEND_PREFIX)
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
        if not relay.audit.enabled:
            return text(404, "the audit log is off: set audit_log in the relay config")
        rows = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(entry.get(col) or ''))}</td>" for col in _AUDIT_COLUMNS)
            + f"<td>{html.escape(_audit_details(entry))}</td></tr>"
            for entry in reversed(relay.audit.recent)
        )
        head = "".join(f"<th>{col}</th>" for col in (*_AUDIT_COLUMNS, "details"))
        return _page("Audit log", f"<p>Newest first.</p><table><tr>{head}</tr>{rows}</table>")

    @app.get("/metrics")
    def _metrics() -> Response:
        if not relay.config.metrics:
            return text(404, "metrics are off: set metrics = true in the relay config")
        if refused := operators_only():
            return refused
        body, content_type = relay.metrics.render()
        return Response(body, content_type=content_type)


def add_page_headers(resp: Response) -> Response:
    """Give an answer of the relay's own its security headers, and a Location that is a path.

    For Flask's `after_request`; relayed responses pass unchanged.
    """
    if isinstance(resp, RelayedResponse):
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


def _audit_details(entry: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in entry.items() if k not in _AUDIT_COLUMNS and v is not None)


def _page(title: str, body: str) -> Response:
    page = (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{title}</title>'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:0.2em 1em;text-align:left}</style>"
        f"</head><body><h1>{title}</h1>{body}"
        f"<footer><small>ptth_relay {__version__}</small></footer></body></html>"
    )
    return Response(page, content_type="text/html; charset=utf-8")
