"""The few exception types every part of PTTH shares, and how it treats network faults."""

from __future__ import annotations

import random

# Reconnect delays: start small so a relay restart costs little, cap so that a
# relay that is down for hours sees one attempt per half minute per peer.
BACKOFF_START_SECS = 0.5
BACKOFF_CAP_SECS = 30.0


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
