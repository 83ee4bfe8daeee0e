"""The few exception types every part of PTTH shares, and how it treats network faults."""

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


def root_cause(e: BaseException) -> str:
    """One short line for a network error: its innermost cause.

    requests wraps urllib3's MaxRetryError, which wraps the OSError worth
    showing ("[Errno 111] Connection refused"); the outer messages repeat URLs.
    """
    cause = e
    while (cause.__cause__ or cause.__context__) is not None:
        cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
    return (str(cause) or type(cause).__name__)[:200]


def backoff_secs(failures: int) -> float:
    """How long to wait after `failures` failed attempts in a row: doubling, capped, with jitter."""
    delay: float = min(BACKOFF_CAP_SECS, BACKOFF_START_SECS * 2.0 ** min(failures, 16))
    return delay * random.uniform(0.5, 1.0)


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
