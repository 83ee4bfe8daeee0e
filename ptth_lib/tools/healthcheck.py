"""Health check for cron: is the relay up, and are the named servers online?

`ptth-healthcheck --relay URL [--server NAME ...] [--max-age SECONDS]
[--scraper-key-file FILE] [--quiet]` asks the relay's up check, then (if servers
are named) its server list: the frontend's JSON, or the scraper API with a key.
Exit 0 when all is well (one "ok" line on stdout unless --quiet), 1 with one line
per problem on stderr, 2 for a bad command line. It only reads, and never shows
the scraper key.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn
from urllib.parse import urlsplit

import requests

from ptth_lib.errors import ConfigError, PtthError, root_cause

# Each HTTP call gets this long to connect and again between reads. The relay
# answers both pages at once, so this trips only on a real outage and keeps a
# whole run (two calls) far inside a 5-minute cron period.
TIMEOUT_SECS = 10.0

# A server re-polls at once, so a healthy one is seen "now"; 120 s lets one that
# is reconnecting with backoff (up to 30 s, server_loop) pass without a mail.
DEFAULT_MAX_AGE_SECS = 120.0

# The server list is one short JSON entry per server; more than this is not PTTH.
MAX_BODY_BYTES = 4 * 1024 * 1024

_PREFIX = "ptth healthcheck: "
_UP_CHECK_PATH = "/frontend/relay_up_check"
_SERVERS_PATH = "/frontend/servers/"
_SCRAPER_PATH = "/scraper/v1/server_list"


class _CheckError(PtthError):
    """The check cannot go on (relay down, list unreadable); the message is the one problem."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of usage + error
        raise ConfigError(message)


def check(relay: str, servers: Sequence[str], max_age_secs: float,
          scraper_key: str | None = None) -> list[str]:
    """Check the relay at `relay` and each named server; return one line per problem."""
    with requests.Session() as session:
        try:
            status, body = _get(session, relay, _UP_CHECK_PATH, {})
            if status != 200 or body.strip() != "Relay is up":
                raise _CheckError(_unexpected(relay, _UP_CHECK_PATH, status, body))
            if not servers:
                return []
            listing = _fetch_servers(session, relay, scraper_key)
        except _CheckError as e:
            msg = str(e)
            return [msg.replace(scraper_key, "<key>") if scraper_key else msg]
    now = datetime.now(UTC)
    problems = (_server_problem(n, listing.get(n), now, max_age_secs) for n in dict.fromkeys(servers))
    return [p for p in problems if p]


def _fetch_servers(session: requests.Session, relay: str, key: str | None) -> dict[str, Any]:
    if key is None:
        status, body = _get(session, relay, _SERVERS_PATH, {"Accept": "application/json"})
    else:
        status, body = _get(session, relay, _SCRAPER_PATH, {"X-ApiKey": key})
        if status == 403:
            raise _CheckError(f"relay {relay} refused the key in --scraper-key-file: {_first_line(body)}")
        if status == 404:
            raise _CheckError(f"relay {relay} has the scraper API disabled ({_SCRAPER_PATH} answered 404): "
                              "remove --scraper-key-file, or set enable_scraper_api = true in its config")
    path = _SCRAPER_PATH if key else _SERVERS_PATH
    if status != 200:
        raise _CheckError(_unexpected(relay, path, status, body))
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, list) or not all(isinstance(s, dict) and isinstance(s.get("name"), str)
                                             for s in data):
        raise _CheckError(f"relay {relay}: {path} did not answer a JSON list of servers; "
                          "is --relay a PTTH relay of this version?")
    return {s["name"]: s for s in data}


def _server_problem(name: str, entry: Any, now: datetime, max_age_secs: float) -> str | None:
    if entry is None:
        return (f"server {name!r} is not registered at the relay: check the name, "
                "or add a [[servers]] table for it to the relay config")
    seen = entry.get("last_seen")
    if seen is None:
        return f"server {name!r} has never connected since the relay started"
    try:
        when = datetime.strptime(seen, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except (TypeError, ValueError):
        return f"server {name!r}: the relay sent a last_seen that is not a UTC time: {seen!r}"
    age = max(0.0, (now - when).total_seconds())  # a relay clock ahead of ours is not an age
    online = entry.get("online") is True
    if online and age <= max_age_secs:
        return None
    state = "is offline" if not online else "is online at the relay but stale"
    return f"server {name!r} {state} (last seen {seen}, {age:.0f} s ago; max-age {max_age_secs:g} s)"


def _get(session: requests.Session, relay: str, path: str, headers: dict[str, str]) -> tuple[int, str]:
    # No redirects: check the URL as configured, and never send the key to another host.
    try:
        with session.get(relay + path, headers=headers, timeout=TIMEOUT_SECS, stream=True,
                         allow_redirects=False) as r:
            body = b""
            for chunk in r.iter_content(64 * 1024):
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    raise _CheckError(f"relay {relay}: {path} answered more than {MAX_BODY_BYTES} bytes")
            location = r.headers.get("Location")
            text = body.decode("utf-8", "replace")
            return r.status_code, f"a redirect to {location}: give --relay the URL it leads to" if location else text
    except requests.Timeout:
        raise _CheckError(f"relay {relay} is not reachable: no answer within {TIMEOUT_SECS:g} s") from None
    except requests.RequestException as e:
        raise _CheckError(f"relay {relay} is not reachable: {root_cause(e)}") from None


def _unexpected(relay: str, path: str, status: int, body: str) -> str:
    return f"relay {relay}: {path} answered HTTP {status}: {_first_line(body) or '(empty body)'}"


def _first_line(text: str) -> str:
    line = next((s.strip() for s in text.splitlines() if s.strip()), "")
    return line[:200]


def _relay_url(value: str) -> str:
    try:
        parts = urlsplit(value)
    except ValueError:  # e.g. an unclosed [ in an IPv6 address
        parts = urlsplit("")
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise argparse.ArgumentTypeError(f"{value!r} is not an http:// or https:// URL, "
                                         "e.g. https://relay.example.com")
    return value.rstrip("/")


def _positive_secs(value: str) -> float:
    try:
        secs = float(value)
    except ValueError:
        secs = math.nan
    if not (math.isfinite(secs) and secs > 0):
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive number of seconds")
    return secs


def _read_key(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            key = f.read(64 * 1024).strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--scraper-key-file {path}: cannot read: {getattr(e, 'strerror', e)}") from None
    if not key or not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
        raise ConfigError(f"--scraper-key-file {path}: must hold one scraper key on one line")
    return key


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check from the command line; return the exit code (0 ok, 1 problems, 2 usage)."""
    from ptth_lib.commands import add_command_flags

    # Run as the installed command, or by the module name cron lines use.
    prog = "ptth-healthcheck" if os.path.basename(sys.argv[0]) == "ptth-healthcheck" else "python -m ptth_lib.healthcheck"
    parser = _Parser(prog=prog, description="Check a PTTH relay and its servers, for cron.")
    parser.add_argument("--relay", required=True, type=_relay_url, help="the relay's base URL")
    parser.add_argument("--server", action="append", default=[], metavar="NAME",
                        help="a server that must be online (repeatable)")
    parser.add_argument("--max-age", type=_positive_secs, default=DEFAULT_MAX_AGE_SECS, metavar="SECONDS",
                        help=f"how long ago a server may have been last seen (default {DEFAULT_MAX_AGE_SECS:g})")
    parser.add_argument("--scraper-key-file", metavar="FILE",
                        help="read the server list through the scraper API with the key in FILE")
    parser.add_argument("--quiet", action="store_true", help="print nothing when all is well")
    add_command_flags(parser)
    try:
        args = parser.parse_args(argv)
        key = _read_key(args.scraper_key_file) if args.scraper_key_file else None
    except ConfigError as e:
        print(f"{_PREFIX}{e} (see --help)", file=sys.stderr)
        return 2
    problems = check(args.relay, args.server, args.max_age, key)
    for problem in problems:
        print(_PREFIX + problem, file=sys.stderr)
    if problems:
        return 1
    if not args.quiet:
        n = len(dict.fromkeys(args.server))
        print(f"ok: relay up, {n} server{'' if n == 1 else 's'} online" if n else "ok: relay up")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
