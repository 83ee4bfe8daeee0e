"""Plain WSGI in front of Flask for the paths every relayed request takes.

A listen, a response POST, a request body GET and a client request each
cost a Flask request context, routing and signals, which profiling put at a
third of the relay's CPU for small files (BENCHMARKS.md). `HotPaths` matches
their prefixes and calls the `Relay` (relay.py) directly; every other path
(pages, the scraper API, port forwarding, metrics) goes to Flask as usual.

Host routing comes first: with `server_host_suffix` set, a request for a host
NAME + suffix goes to server NAME whatever its path, so no path on a
server's own host reaches the relay's pages or backend API (which live on
the relay's host) and the operator's rules for those hosts stay whole.
"""

from __future__ import annotations

from typing import Any

from werkzeug.wrappers import Request, Response

from ptth_lib.errors import HttpError
from ptth_lib.relay import trust, views
from ptth_lib.relay.relay import ALIAS_PREFIX, FRONTEND_PREFIX, Relay
from ptth_lib.relay.responses import error_response, text
from ptth_lib.wire.envelope import LISTEN_PATH, NODE_HEADER, REQUEST_BODY_PATH, RESPONSE_PATH

# The backend API's hot paths, up to the name or id that ends them.
LISTEN_PREFIX = LISTEN_PATH.removesuffix("{name}")
RESPONSE_PREFIX = RESPONSE_PATH.removesuffix("{id}")
REQUEST_BODY_PREFIX = REQUEST_BODY_PATH.removesuffix("{id}")


class HotPaths:
    """A WSGI app: the hot paths to `relay`, everything else to `flask_app`."""

    def __init__(self, flask_app: Any, relay: Relay) -> None:
        self._flask_app = flask_app
        self._relay = relay
        self._backend = (
            (LISTEN_PREFIX, ("GET", "HEAD", "POST"), relay.listen),  # POST: with answers (PROTOCOL.md)
            (RESPONSE_PREFIX, ("POST",), relay.respond),
            (REQUEST_BODY_PREFIX, ("GET",), relay.request_body),
        )

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        refused = self._relay.capacity.refusal(environ, start_response)  # past max_connections: 503 (capacity.py)
        if refused is not None:
            return views.as_page(refused, environ)(environ, start_response)
        path: str = environ.get("PATH_INFO", "")
        suffix = self._relay.config.server_host_suffix
        host_name = trust.host_server_name(self._relay.request_host(environ, raw=True), suffix) if suffix else None
        if host_name is not None:
            response: Response | None = self._relay.host_request(host_name, Request(environ))
        elif path.startswith("//"):
            # werkzeug would route "//x" as "/x"; a proxy in front may not.
            response = text(400, "bad path: it starts with '//'")
        elif path.startswith(FRONTEND_PREFIX) and len(path) > len(FRONTEND_PREFIX):
            response = self._relay.client_request(Request(environ))
        elif path.startswith(ALIAS_PREFIX):
            response = self._relay.alias_request(Request(environ))
        else:
            response = None
            for prefix, methods, handler in self._backend:
                arg, slash, _ = path[len(prefix):].partition("/")
                if not path.startswith(prefix) or not arg or slash:
                    continue
                if environ.get("REQUEST_METHOD") not in methods:
                    response = text(405, "method not allowed")
                    break
                try:
                    response = handler(arg, Request(environ))
                except HttpError as e:
                    response = error_response(e)
                if self._relay.node is not None:  # which node answered: the server's POSTs can go to owners
                    response.headers[NODE_HEADER] = self._relay.node.id
                break
        if response is None:
            return self._flask_app(environ, start_response)
        response = views.as_page(response, environ)  # an error line, as a page for a browser
        return response(environ, start_response)  # a WebSocket's: gunicorn's ALREADY_HANDLED
