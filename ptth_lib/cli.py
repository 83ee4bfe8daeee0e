"""What the entry points share: logging set-up and --bind parsing."""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

from ptth_lib.errors import ConfigError

# Defaults for --log-level and --log-format, e.g. for the relay under gunicorn.
LOG_LEVEL_ENV = "PTTH_LOG_LEVEL"
LOG_FORMAT_ENV = "PTTH_LOG_FORMAT"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def add_logging_flags(parser: argparse.ArgumentParser) -> None:
    """--log-level and --log-format, defaulting to $PTTH_LOG_LEVEL and $PTTH_LOG_FORMAT."""
    level = os.environ.get(LOG_LEVEL_ENV, "INFO").upper()
    fmt = os.environ.get(LOG_FORMAT_ENV, "text").lower()
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS,
                        default=level if level in LOG_LEVELS else "INFO",
                        help=f"DEBUG adds a line per request (default INFO, or ${LOG_LEVEL_ENV})")
    parser.add_argument("--log-format", type=str.lower, choices=LOG_FORMATS,
                        default=fmt if fmt in LOG_FORMATS else "text",
                        help=f"text, or json for one JSON object per line (default text, or ${LOG_FORMAT_ENV})")


def make_handler(fmt: str) -> logging.Handler:
    """A stderr handler in the given format."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                               datefmt="%Y-%m-%d %H:%M:%S"))
    return handler


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Log to stderr, one line per event, unless the host set up logging already."""
    root = logging.getLogger()
    if root.handlers:
        return
    root.addHandler(make_handler(fmt))
    root.setLevel(level)


def parse_bind(value: str) -> tuple[str, int]:
    """Split HOST:PORT (IPv6 as [::1]:PORT); port 0 means any free port."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ConfigError(f"--bind {value!r}: expected HOST:PORT, e.g. 127.0.0.1:4000")
    return host, int(port)
