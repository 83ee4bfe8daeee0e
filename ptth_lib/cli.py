"""What the three entry points share: logging set-up and --bind parsing."""

from __future__ import annotations

import logging
import os

from .errors import ConfigError

# PTTH_LOG_LEVEL=DEBUG shows per-request detail; INFO shows state changes.
LOG_LEVEL_ENV = "PTTH_LOG_LEVEL"


def setup_logging() -> None:
    """Log to stderr, one short line per event, unless the host set up logging."""
    root = logging.getLogger()
    if root.handlers:
        return
    level = os.environ.get(LOG_LEVEL_ENV, "INFO").upper()
    logging.basicConfig(
        level=level if level in logging.getLevelNamesMapping() else "INFO",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
    )


def parse_bind(value: str) -> tuple[str, int]:
    """Split HOST:PORT (IPv6 as [::1]:PORT); port 0 means any free port."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ConfigError(f"--bind {value!r}: expected HOST:PORT, e.g. 127.0.0.1:4000")
    return host, int(port)
