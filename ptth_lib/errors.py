"""PTTH's one exception family, and how it treats network faults.

Every error PTTH raises on purpose derives from `PtthError`; bad input also
derives from `ValueError` (as requests' exceptions do). Anything that becomes
an HTTP answer is an `HttpError` carrying its status: the relay maps it to a
one-line text/plain answer (relay/responses.py `error_response`), with
`Retry-After` when trying again later helps. Errors private to one module
(a signal thrown into a greenlet, say) live there, still under `PtthError`.
"""

from __future__ import annotations

import http
import random
from collections.abc import Mapping

# Reconnect delays: start small so a relay restart costs little, cap so that a
# relay that is down for hours sees one attempt per half minute per peer.
BACKOFF_START_SECS = 0.5
BACKOFF_CAP_SECS = 30.0

# The longest piece of a peer's answer (a reason, a Location) quoted in a log or error line.
MAX_QUOTED_CHARS = 200

# What to check when something that should be the relay answers like something else.
RELAY_URL_HINT = "is relay_url the PTTH relay's base URL?"


class PtthError(Exception):
    """Base of every error PTTH raises on purpose."""


class ConfigError(PtthError, ValueError):
    """A config file or command-line value is missing, malformed or unsafe.

    The message is one line meant for the user: which file or flag, which key,
    what is wrong and what is expected.
    """


class ProtocolError(PtthError, ValueError):
    """A peer sent something that does not follow the PTTH wire protocol."""


# ---- errors that become HTTP answers --------------------------------------------

# Seconds a client is told to wait (Retry-After) after a 429 or 503: the
# relay's queues and shares drain within seconds.
RETRY_AFTER_SECS = 5


class HttpError(PtthError):
    """An outcome that becomes an HTTP answer: `status`, and the message as its text.

    Subclasses fix the status; `HttpError(message, status=N)` gives one ad hoc.
    """

    status: int = 500
    retry_after_secs: int | None = None  # sent as Retry-After when set

    def __init__(self, message: str = "", status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class BadRequestError(HttpError, ValueError):
    """A request the relay cannot act on as sent (400)."""

    status = 400


class BadPathError(BadRequestError):
    """A request path the relay refuses to route (400): it could be read two ways."""


class BadNameError(BadRequestError):
    """A malformed name in a path, such as a forwarded port's (400)."""


class ForbiddenError(HttpError):
    """A missing, wrong or unknown key, or a key that may not do this (403)."""

    status = 403


class ScraperAuthError(ForbiddenError):
    """A refused scraper key (403); `reason` is a short label for metrics and the audit log."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class NotFoundError(HttpError):
    """Nothing of that name here (404)."""

    status = 404


class UnknownServerError(NotFoundError):
    """No server of that name is registered at the relay (404)."""


class UnknownRequestError(NotFoundError):
    """No request or connection of that id is waiting: unknown, answered or timed out (404)."""


class ConflictError(HttpError):
    """A stream attached twice, or a decision made twice (409)."""

    status = 409


class TooManyListenersError(HttpError):
    """A server has as many listens parked as it may (429)."""

    status = 429
    retry_after_secs = RETRY_AFTER_SECS


class RequestHeadTooLargeError(HttpError, ValueError):
    """A client's request head over what one listen answer may carry (431)."""

    status = 431


class BadGatewayError(HttpError):
    """The server is offline, did not pick the request up, or answered unusably (502)."""

    status = 502


class RefusedError(BadGatewayError):
    """The server refused a forwarded connection; its reason is the message (502)."""


class ServiceUnavailableError(HttpError):
    """A bound is reached; try again later (503)."""

    status = 503
    retry_after_secs = RETRY_AFTER_SECS


class QueueFullError(ServiceUnavailableError):
    """Too many requests or connections wait for one server, port or client (503)."""


class TooManyFromAddressError(ServiceUnavailableError):
    """One client address waited too long for its turn, or too many of its requests wait (503)."""


class GatewayTimeoutError(HttpError):
    """The server took a request and did not answer in time (504)."""

    status = 504


def root_cause(e: BaseException) -> str:
    """One short line for a network error: its innermost cause.

    requests wraps urllib3's MaxRetryError, which wraps the OSError worth
    showing ("[Errno 111] Connection refused"); the outer messages repeat URLs.
    """
    cause = e
    while (cause.__cause__ or cause.__context__) is not None:
        cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
    return (str(cause) or type(cause).__name__)[:200]


def backoff_secs(failures: int, asked_secs: float = 0.0) -> float:
    """How long to wait after `failures` failed attempts in a row: doubling, capped, with jitter.

    At least `asked_secs` (a Retry-After) before the jitter, so that a fleet
    of servers a full relay refused at once comes back spread over time.
    """
    delay: float = min(BACKOFF_CAP_SECS, max(asked_secs, BACKOFF_START_SECS * 2.0 ** min(failures, 16)))
    return delay * random.uniform(0.5, 1.0)


def retry_after_secs(headers: Mapping[str, str]) -> float:
    """An answer's Retry-After in seconds (0 when absent, or an HTTP date, which the relay never sends)."""
    value = headers.get("Retry-After", "").strip()
    return float(value) if value.isascii() and value.isdigit() and len(value) <= 6 else 0.0


def describe_answer(status: int, headers: Mapping[str, str], body: bytes, hint: str = RELAY_URL_HINT) -> str:
    """One line for an HTTP answer that is not the one wanted, from its status, headers and first bytes.

    The relay says what went wrong in a text/plain line, which is quoted:
    "502 server 'x' is offline". Anything else is not PTTH speaking, so it is
    named, not pasted, with `hint`: "404 Not Found (an HTML page: HINT)". A
    redirect names where it pointed: "302 Found, a redirect to URL (not
    followed: HINT)"; no PTTH program follows one while it carries a key.
    """
    phrase = _phrase(status)
    if 300 <= status < 400:
        location = _printable(headers.get("Location", "")) or "nowhere (no Location)"
        return f"{status} {phrase}, a redirect to {location} (not followed: {hint})"
    content_type = headers.get("Content-Type", "").partition(";")[0].strip().lower()
    if content_type == "text/plain":
        text = body.decode("utf-8", "replace")
        reason = next((line.strip() for line in text.splitlines() if line.strip()), "")
        return f"{status} {_printable(reason) or phrase}"
    if content_type == "text/html":
        what = "an HTML page"
    elif content_type:
        what = f"a {_printable(content_type)} answer"
    else:
        what = "an answer without a Content-Type" if body else "an empty answer"
    return f"{status} {phrase} ({what}: {hint})"


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "(unknown status)"


def _printable(text: str) -> str:
    """A peer's text fit for one log line: no control characters, at most MAX_QUOTED_CHARS."""
    return "".join(c if c.isprintable() else "?" for c in text[:MAX_QUOTED_CHARS])
