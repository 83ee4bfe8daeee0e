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
