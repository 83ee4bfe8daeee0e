"""The relay's gunicorn settings, declared once: `ptth-relay` applies them, and so does `conf/gunicorn.conf.py`.

gunicorn reads every module-level name that is one of its settings (as for
`gunicorn -c python:ptth_lib.relay.gunicorn_settings`) and ignores the rest;
helpers here start with `_`. Importing this module reads the relay config
and raises the process's open-files limit to its hard limit, for
`worker_connections` (capacity.py); the hooks import the relay itself only
when gunicorn calls them. The relay config file comes from $PTTH_RELAY_CONFIG
(default ./ptth_relay.toml), which `ptth-relay --config` sets before it
imports this.
"""

from __future__ import annotations

import os
from typing import Any

from ptth_lib.relay.capacity import gunicorn_worker_connections as _worker_connections

# Loopback by default; put nginx (with TLS) in front for the internet. --bind on
# the command line overrides this.
bind = os.environ.get("PTTH_RELAY_BIND", "127.0.0.1:4000")

# Exactly one worker: the rendezvous (parked listens, queued requests, bodies in
# flight) lives in the worker's memory, so a second worker would see half of it.
# With redis_url the relay is a cluster (CLUSTER.md), and -w / --workers may ask for more.
workers = 1

# gevent: every parked long-poll and streaming body is a cheap greenlet.
worker_class = "gevent"

# Connections the worker accepts at once: the relay config's max_connections
# (by default what the open-files limit allows, which this raises to its hard
# limit: LimitNOFILE= in a systemd unit) plus room to answer those past it 503
# at once. gunicorn stops accepting when this is reached, so it must never be
# the limit that bites first (ptth_lib/relay/capacity.py).
worker_connections = _worker_connections()

# With gevent this is a heartbeat of the worker, not a request limit; long-polls
# and long downloads are bounded by the relay's own timeouts.
timeout = 60

# How long a stopping worker lets downloads in flight finish. Parked listens do
# not count: post_worker_init below answers them at once.
graceful_timeout = 40

# Idle keep-alive connections are held this long. A server re-polls at once, so
# its listen connection is never idle; a graceful stop waits for idle ones, so
# keep this short.
keepalive = 5

# The response head travels base64-encoded in the X-PTTH-2LJYXWC4 header, up
# to 16 KiB (ptth_lib.wire.envelope.MAX_RESPONSE_HEAD_BYTES), plus room for the
# name. The worst head these accept (50 fields of 16 KiB, 800 KiB) costs the
# one worker 10 ms to parse with the C parser below; the README's nginx
# bounds heads to 128 KiB before they get here (BENCHMARKS.md, request heads).
limit_request_field_size = 16 * 1024 + 64
limit_request_fields = 50

# gunicorn_h1c, the C parser (requirements.txt): the Python one is quadratic
# in the head's size (92 ms for the worst head above). "fast" fails at start
# if it is missing, rather than running slow.
http_parser = "fast"

# Trust no peer's X-Forwarded-Proto (gunicorn's default trusts this machine's):
# the relay believes proxies only through trusted_proxies in its own config,
# and tells servers the scheme itself (X-Forwarded-Proto, Forwarded).
forwarded_allow_ips = ""

# Never preload: gevent must monkey-patch in the worker before the app loads.
preload_app = False

# Each relay has no need for gunicorn's per-user control socket, and tests run
# many relays side by side.
control_socket_disable = True

# Logs to stderr; the relay's own lines go through gunicorn's error log.
errorlog = "-"
loglevel = os.environ.get("PTTH_LOG_LEVEL", "info").lower()
accesslog = os.environ.get("PTTH_ACCESS_LOG") or None


def on_starting(server: Any) -> None:
    """Check the relay config in the master, before any worker starts.

    A bad config then stops gunicorn with one line instead of a worker crash.
    """
    from ptth_lib.config import relay_config_path
    from ptth_lib.relay.gunicorn_app import check_config

    check_config(relay_config_path())


def post_worker_init(worker: Any) -> None:
    """When the worker starts to stop, answer parked listens at once (204).

    gunicorn's graceful stop waits for every open request, and a parked listen
    lasts up to listen_timeout_secs; the servers reconnect to the new worker.
    (gunicorn's worker attributes are reached through ptth_lib/wsgi.py.)
    """
    from ptth_lib.relay.app import relay_of
    from ptth_lib.wsgi import call_when_worker_stops, worker_app

    relay = relay_of(worker_app(worker))
    if relay is not None:
        call_when_worker_stops(worker, relay.close)


def pre_request(worker: Any, req: Any) -> None:
    """Leave `Expect: 100-continue` to the relay, which answers it when the server fetches the body.

    gunicorn would send 100 Continue before the relay even sees the request,
    and the client would upload a body that a 401, 413 or 405 then wastes.
    (gunicorn's request internals are reached through ptth_lib/wsgi.py.)
    """
    from ptth_lib.wsgi import defer_continue

    defer_continue(req)
