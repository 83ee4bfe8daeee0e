"""HTTP basic auth at the relay: `basic_auth = ["USER:HASH", ...]` in a [[servers]] table, or in [dashboard].

Checked for every visitor's request to such a server, in path and host
mode, before anything reaches the server; wrong or missing credentials get
401 with a challenge naming the server. The hashes are werkzeug's
(`generate_password_hash`, scrypt by default), which cost tens of
milliseconds of CPU on purpose: a verification runs in gevent's thread pool
(the worker's other greenlets go on meanwhile), and one that succeeded is
remembered for a few minutes under a hash of the credentials and the
stored hash, so a browser's stream of requests costs one verification.
An unknown user costs a verification too, so timing does not tell users apart.

`prompt_entry` is `python ptth_relay.py --hash-password`: it reads a user
name and the password (twice, never from argv) and returns the entry.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import hashlib
import sys
import time

import gevent
from werkzeug.security import check_password_hash, generate_password_hash

from ptth_lib.config import RegisteredServer
from ptth_lib.errors import ConfigError

# How long a verified login is taken without checking its hash again, and
# how many are remembered (the table is emptied of expired ones, or all,
# when full). A password removed from the config stops working at once: the
# stored hash is part of what is remembered.
VERIFIED_SECS = 300.0
MAX_VERIFIED = 10_000

# Credentials longer than this are refused unread: no password hash is fed megabytes.
MAX_CREDENTIALS_CHARS = 1024


# The scope of the dashboard's logins ([dashboard] basic_auth): a space, so no server's name.
DASHBOARD_SCOPE = "relay dashboard"


def challenge(name: str) -> str:
    """The WWW-Authenticate value for server `name`."""
    realm = "".join(c for c in name if c not in '"\\')
    return f'Basic realm="{realm}", charset="UTF-8"'


class Logins:
    """Verifies visitors' credentials against the servers' basic_auth entries."""

    def __init__(self) -> None:
        self._verified: dict[bytes, float] = {}
        self._decoy: str | None = None  # a hash checked for unknown users

    def check(self, server: RegisteredServer, authorization: str | None) -> bool:
        """Tell whether an Authorization header logs in to `server`."""
        return self.check_entries(server.name, server.basic_auth, authorization)

    def check_entries(self, scope: str, entries: tuple[tuple[str, str], ...], authorization: str | None) -> bool:
        """Tell whether an Authorization header logs in as one of `entries` (user, hash) of `scope`.

        `scope` (a server's name, or DASHBOARD_SCOPE) keeps the same user and
        password remembered for one thing from counting for another.
        """
        login = _parse(authorization)
        if login is None:
            return False
        user, password = login
        stored = dict(entries).get(user)
        key = hashlib.sha256("\0".join((scope, user, password, stored or "")).encode("utf-8",
                                                                                    "surrogatepass")).digest()
        now = time.monotonic()
        if stored is not None and self._verified.get(key, 0.0) > now:
            return True
        if stored is None:
            if self._decoy is None:
                self._decoy = generate_password_hash("no such user")
            _verify(self._decoy, password)
            return False
        if not _verify(stored, password):
            return False
        if len(self._verified) >= MAX_VERIFIED:
            self._verified = {k: t for k, t in self._verified.items() if t > now}
            if len(self._verified) >= MAX_VERIFIED:
                self._verified.clear()
        self._verified[key] = now + VERIFIED_SECS
        return True


def _parse(authorization: str | None) -> tuple[str, str] | None:
    if not authorization or len(authorization) > MAX_CREDENTIALS_CHARS:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


def _verify(stored: str, password: str) -> bool:
    """check_password_hash off the worker's thread: scrypt would stop every greenlet meanwhile."""
    ok: bool = gevent.get_hub().threadpool.apply(check_password_hash, (stored, password))
    return ok


def prompt_entry() -> str:
    """Ask for a user name and a password (twice, without echo); the basic_auth entry for them.

    Raises ConfigError (one line) for a bad name, an empty password, or two
    passwords that differ. Prompts go to the terminal or stderr, never stdout.
    """
    sys.stderr.write("user name: ")
    sys.stderr.flush()
    user = sys.stdin.readline().strip()
    if not user or ":" in user or not user.isprintable() or len(user) > 64:
        raise ConfigError("--hash-password: a user name is 1-64 printable characters without ':'")
    password = getpass.getpass("password: ")
    if not password:
        raise ConfigError("--hash-password: the password is empty")
    if getpass.getpass("the same password again: ") != password:
        raise ConfigError("--hash-password: the two passwords differ; nothing was made")
    return f"{user}:{generate_password_hash(password)}"
