"""The names and ids that travel in URLs and messages, and their one rule each.

Server and client names and port names are path segments of the relay's
URLs (and of QUIC tips), so they are kept to URL-safe characters; request,
batch and connection ids are made by the relay and checked wherever they
come back, so that nothing else can smuggle text into a path or a log line.
"""

from __future__ import annotations

import re

# A server's or client's name: part of URLs unescaped (/frontend/servers/NAME/).
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._~-]{0,63}\Z")

# A forwarded port's name (the spec's opaque server ports): a path segment too.
PORT_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")

# Ids as the relay makes them (request ids, batch ids).
ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")


def is_name(value: str) -> bool:
    """Tell whether `value` is a valid server or client name."""
    return bool(NAME_RE.match(value))


def is_port_name(value: str) -> bool:
    """Tell whether `value` is a valid forwarded port name."""
    return bool(PORT_NAME_RE.match(value))


def is_id(value: str) -> bool:
    """Tell whether `value` has the shape of a relay-made id."""
    return bool(ID_RE.match(value))


# How many characters of an id a log line shows.
SHORT_ID_CHARS = 8


def short_id(value: str) -> str:
    """An id as log lines show it: its last SHORT_ID_CHARS characters (a relay cluster's ids
    begin with their worker's id, which all of that worker's ids share)."""
    return value[-SHORT_ID_CHARS:]

