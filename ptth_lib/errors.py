"""The few exception types every part of PTTH shares."""

from __future__ import annotations


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
