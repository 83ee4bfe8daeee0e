"""The relay's WSGI app: a `Relay` (relay.py) wired to Flask.

Routes, each thin over the Relay:

- backend API (servers): `GET /7ZSFUKGV/http_listen/<name>` (long-poll),
  `POST /7ZSFUKGV/http_response/<id>` (response head in a header, body
  streamed) and `POST /7ZSFUKGV/http_leave/<name>` (a server stopping);
- frontend (clients): `/frontend/servers/<name>/<path>` relayed to the server
  as `/<path>` (the spec's older `/servers/...` redirects there);
- the relay's own pages (pages.py), the scraper API (scraper_api.py) and
  port forwarding (forward_api.py).

The listen, the response POST and the client request, the paths every
relayed request takes, are dispatched by `HotPaths` (hot_paths.py) before
Flask; everything else is Flask. An `HttpError` raised in a route becomes its
answer (responses.py).
"""

from __future__ import annotations

from typing import Any

from flask import Flask, request
from werkzeug.wrappers import Response

from ptth_lib.config import RelayConfig
from ptth_lib.errors import HttpError
from ptth_lib.relay import forward_api, pages, scraper_api
from ptth_lib.relay.hot_paths import HotPaths
from ptth_lib.relay.relay import Relay
from ptth_lib.relay.responses import error_response
from ptth_lib.wire.envelope import LEAVE_PATH

# Where create_app keeps the Relay, for relay_of.
_EXTENSION = "ptth_relay"


def create_app(config: RelayConfig, config_path: str | None = None, pool_connections: int | None = None) -> Flask:
    """Build the relay for `config` and its Flask app, and start the relay's greenlets.

    Given `config_path`, the relay reloads that file when it changes (config_watch.py);
    `pool_connections` is the WSGI server's own limit on connections, if any (capacity.py).
    """
    relay = Relay(config, config_path, pool_connections)
    relay.start()
    return app_for(relay)


def app_for(relay: Relay) -> Flask:
    """A Flask app serving `relay` (which it does not start)."""
    app = Flask("ptth_relay")
    # "//x" is not "/x": a proxy in front may match it differently, and werkzeug
    # would answer it with a redirect built from the client's Host header.
    app.url_map.merge_slashes = False
    app.extensions[_EXTENSION] = relay
    app.register_error_handler(HttpError, error_response)
    app.after_request(pages.add_page_headers)
    pages.register(app, relay)
    scraper_api.register(app, relay)
    forward_api.register(app, relay)

    @app.post(LEAVE_PATH.format(name="<name>"))
    def _leave(name: str) -> Response:
        return relay.leave(name, request)

    app.wsgi_app = HotPaths(app.wsgi_app, relay)  # type: ignore[method-assign]
    return app


def relay_of(app: Any) -> Relay | None:
    """The Relay behind an app from create_app; None for any other app."""
    relay = getattr(app, "extensions", {}).get(_EXTENSION)
    return relay if isinstance(relay, Relay) else None
