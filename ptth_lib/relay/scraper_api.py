"""The scraper API: machine access to the relay with expiring keys.

Enabled by the relay config's `enable_scraper_api` (else every /scraper/ path
is 404). A client sends its key in `X-ApiKey`; the relay config holds only the
key's hash (its tripcode) with an optional validity window, never the key.

- `GET /scraper/v1/test`: 200 for a valid key.
- `GET /scraper/v1/server_list`: the servers as JSON.
- `/scraper/v1/server/<name>/<path>`: relayed exactly like the frontend.

Failed attempts are limited per client address (through trusted proxies,
the client's own): past the limit, wrong keys get 429 instead of 403. A
valid key always works, even from a limited address: keys are long random
strings that no rate of guessing finds, and one attacker must not lock out
everyone behind the same NAT. Each refusal
says which check failed, never echoing the key.

In a cluster (`redis_url`) the window is the cluster's, kept in Redis
(`SharedFailures`): wrong keys spread over many workers and hosts are counted
together, with the same numbers. The key is still checked first and in the
worker, so a valid key never waits for Redis; only a failure costs a round
trip (and gets 503 while Redis cannot be reached).
"""

from __future__ import annotations

import hmac
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Protocol

from flask import Flask, Response, jsonify, request
from werkzeug.wrappers import Response as WerkzeugResponse

from ptth_lib.config import ScraperKey
from ptth_lib.errors import ScraperAuthError
from ptth_lib.relay.relay import SCRAPER_PREFIX
from ptth_lib.relay.responses import text
from ptth_lib.wire import tripcode
from ptth_lib.wire.envelope import API_KEY_HEADER

if TYPE_CHECKING:
    from ptth_lib.relay.cluster.store import Store
    from ptth_lib.relay.relay import Relay

# Failed attempts allowed per client address within one window, then 429.
MAX_FAILURES_PER_WINDOW = 10
FAILURE_WINDOW_SECS = 60.0
# Addresses tracked at once; the oldest windows are dropped first.
MAX_TRACKED_ADDRESSES = 10_000

# How long a key from --new-scraper-key is valid by default.
DEFAULT_KEY_DAYS = 30


def find_key(keys: tuple[ScraperKey, ...], api_key: str | None, now: datetime) -> ScraperKey:
    """Return the configured key that `api_key` is, if it is valid at `now`; else raise."""
    if not api_key:
        raise ScraperAuthError("missing", "missing X-ApiKey header: send your scraper key in it")
    offered = tripcode.derive(api_key).encode()
    found = None
    for key in keys:  # compare with every key, so the time taken does not tell which matched
        if hmac.compare_digest(offered, key.hash.encode()):
            found = key
    if found is None:
        raise ScraperAuthError("unknown", "unknown scraper key: it is not in the relay config")
    if found.not_before is not None and now < found.not_before:
        raise ScraperAuthError("not_yet_valid", f"scraper key {found.name!r} is not valid until "
                               f"{found.not_before:%Y-%m-%dT%H:%M:%SZ}")
    if found.not_after is not None and now > found.not_after:
        raise ScraperAuthError("expired", f"scraper key {found.name!r} expired at "
                               f"{found.not_after:%Y-%m-%dT%H:%M:%SZ}")
    return found


class Failures(Protocol):
    """Where failed attempts are counted: this process (FailureLimiter) or the cluster (SharedFailures)."""

    def failed(self, address: str, now: float) -> float:
        """A failed attempt from `address`: seconds to wait if it is limited already (not counted), else 0."""
        ...


class FailureLimiter:
    """Counts failed attempts per client address in fixed windows, in this process."""

    def __init__(self) -> None:
        self._windows: dict[str, tuple[float, int]] = {}  # address -> (window start, failures)

    def retry_after(self, address: str, now: float) -> float:
        """Seconds until `address` may try again; 0 if it may now."""
        start, failures = self._windows.get(address, (now, 0))
        if now - start >= FAILURE_WINDOW_SECS or failures < MAX_FAILURES_PER_WINDOW:
            return 0.0
        return start + FAILURE_WINDOW_SECS - now

    def fail(self, address: str, now: float) -> None:
        start, failures = self._windows.get(address, (now, 0))
        if now - start >= FAILURE_WINDOW_SECS:
            start, failures = now, 0
        self._windows.pop(address, None)  # re-insert: dict order is then oldest first
        if len(self._windows) >= MAX_TRACKED_ADDRESSES:
            del self._windows[next(iter(self._windows))]
        self._windows[address] = (start, failures + 1)

    def failed(self, address: str, now: float) -> float:
        wait = self.retry_after(address, now)
        if wait <= 0:
            self.fail(address, now)
        return wait


class SharedFailures:
    """The same fixed windows for a whole cluster, counted in Redis (one round trip per failure)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def failed(self, address: str, now: float) -> float:
        """As FailureLimiter.failed; ClusterUnavailableError (503) while Redis cannot be reached."""
        result = self._store.scraper_failed(address, MAX_FAILURES_PER_WINDOW, FAILURE_WINDOW_SECS)
        return result.retry_after_secs if result.limited else 0.0


def new_key_snippet(name: str, days: int = DEFAULT_KEY_DAYS) -> tuple[str, str]:
    """A fresh key and the TOML snippet (with its hash) to paste into the relay config."""
    key = tripcode.generate_key()
    not_after = (datetime.now(UTC) + timedelta(days=days)).replace(microsecond=0)
    snippet = (
        "[[scraper_keys]]\n"
        f'name = "{name}"\n'
        f'hash = "{tripcode.derive(key)}"\n'
        f"not_after = {not_after:%Y-%m-%dT%H:%M:%SZ}\n"
    )
    return key, snippet


def register(app: Flask, relay: Relay) -> None:
    """Add the /scraper/ routes to the relay's app.

    Relayed requests go through `relay.scraper_request`, exactly as the
    frontend's; every key check is counted in the metrics and the audit log.
    """
    limiter: Failures = SharedFailures(relay.node.store) if relay.node is not None else FailureLimiter()

    def checked(outcome: str, address: str, detail: str) -> None:
        if outcome == "rejected":
            relay.metrics.scraper_auth_rejected.labels(detail).inc()
            relay.audit.record("scraper_key_rejected", reason=detail, address=address)
        else:
            relay.audit.record("scraper_key_used", key=detail, address=address, path=request.path[:200])

    def authorize() -> Response | None:
        cfg = relay.config
        if not cfg.enable_scraper_api:
            return text(404, "the scraper API is not enabled at this relay")
        address = relay.client_address(request)
        now = time.monotonic()
        try:
            key = find_key(cfg.scraper_keys, request.headers.get(API_KEY_HEADER), datetime.now(UTC))
        except ScraperAuthError as e:
            # The key is checked first, so a valid key works even from an address
            # being limited (behind NAT or a proxy, many people share one).
            wait = limiter.failed(address, now)
            if wait > 0:
                checked("rejected", address, "rate_limited")
                resp = text(429, "too many failed scraper key attempts from your address; try again later")
                resp.headers["Retry-After"] = str(int(wait) + 1)
                return resp
            checked("rejected", address, e.reason)
            return text(e.status, str(e))
        checked("used", address, key.name)
        return None

    @app.get("/scraper/v1/test")
    def _scraper_test() -> Response:
        return authorize() or Response("You're valid!\n", mimetype="text/plain")

    @app.get("/scraper/v1/server_list")
    def _scraper_server_list() -> Response:
        return authorize() or jsonify(relay.rendezvous.describe_servers())

    methods = ["GET", "HEAD"]

    @app.route(SCRAPER_PREFIX + "<name>/", methods=methods)
    @app.route(SCRAPER_PREFIX + "<name>/<path:_path>", methods=methods)
    def _scraper_relay(name: str, _path: str = "") -> WerkzeugResponse:
        # which server: from the raw path, as for the frontend
        return authorize() or relay.scraper_request(request)

    @app.route("/scraper/", defaults={"_rest": ""})
    @app.route("/scraper/<path:_rest>")
    def _scraper_other(_rest: str) -> Response:
        return authorize() or text(404, "no such scraper API path")
