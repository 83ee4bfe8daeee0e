"""How a config key is declared and checked, and the values keys hold.

Every program's keys are declared once, in a table of `Key`s (relay.py,
server.py, client.py) with type, default, check and a one-line doc;
`apply_keys` checks a TOML table against one and fills in defaults. Unknown
keys are errors, so a typo never silently falls back to a default; every
error is a `ConfigError` with one line naming the file and the key. The
checks and the small parsers here (addresses, fingerprints, forwards) are
shared by all programs' tables.
"""

from __future__ import annotations

import os
import re
import tempfile
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit

from ptth_lib.errors import ConfigError
from ptth_lib.relay import trust
from ptth_lib.wire import tripcode
from ptth_lib.wire.names import NAME_RE, PORT_NAME_RE

REQUIRED = object()


_TYPE_NAMES: dict[Any, str] = {
    str: "string", bool: "boolean (true or false)", list: "list of tables", dict: "table", int: "whole number",
    (int, float): "number", (datetime, date): "TOML date-time such as 2026-12-31T00:00:00Z",
}


@dataclass(frozen=True)
class Key:
    name: str
    type: type | tuple[type, ...]
    default: Any
    doc: str
    check: Callable[[Any], str | None] | None = None


def check_name(value: str) -> str | None:
    if NAME_RE.match(value):
        return None
    return "must be 1-64 characters of A-Z a-z 0-9 . _ ~ - (it is part of URLs)"


def check_label(value: str) -> str | None:
    if 0 < len(value) <= 64 and value.isprintable():
        return None
    return "must be 1-64 printable characters"


def _http_url(value: str) -> SplitResult | None:
    """`value` split, if it is an http:// or https:// URL with a host and a valid port."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        return None
    return parts if parts.scheme in ("http", "https") and parts.hostname else None


def check_url(value: str) -> str | None:
    if _http_url(value) is not None:
        return None
    return "must be an http:// or https:// URL such as http://127.0.0.1:4000"


def check_web_app_url(value: str) -> str | None:
    """An app's origin, with an optional path prefix; nothing a request could not be built on."""
    parts = _http_url(value)
    if (parts is not None
            and not (parts.query or parts.fragment or parts.username or parts.password or "?" in value
                     or "#" in value)
            and all(" " < c < "\x7f" for c in value)):
        return None
    return ("must be an http:// or https:// URL with an optional path, such as http://127.0.0.1:8080 "
            "(no query, fragment, user:password@ or spaces)")


def check_tripcode(value: str) -> str | None:
    if tripcode.is_valid(value):
        return None
    return "must be a tripcode (44 characters of base64, from ptth_server.py --print-tripcode)"


def check_timeout(value: float) -> str | None:
    if 1 <= value <= 3600:
        return None
    return "must be a number of seconds from 1 to 3600"


def check_listen_timeout(value: float) -> str | None:
    # ptth_server waits 330 s for a listen answer (server_loop.LISTEN_READ_TIMEOUT_SECS).
    if 1 <= value <= 300:
        return None
    return "must be a number of seconds from 1 to 300"


# The most connections max_connections may name: far above what one process's open-files limit allows
# on any common system, still a number a typo (an extra zero or two) does not reach unnoticed.
MAX_MAX_CONNECTIONS = 1_000_000
# The fewest: a relay holds at least a few servers and their visitors.
MIN_MAX_CONNECTIONS = 16


def check_max_connections(value: int) -> str | None:
    if value == 0 or MIN_MAX_CONNECTIONS <= value <= MAX_MAX_CONNECTIONS:
        return None
    return (f"must be 0 (derived from the open-files limit) or a number of connections from "
            f"{MIN_MAX_CONNECTIONS} to {MAX_MAX_CONNECTIONS}")


def check_idle_timeout(value: float) -> str | None:
    if value == 0 or 10 <= value <= 7 * 24 * 3600:
        return None
    return "must be 0 (never) or a number of seconds from 10 to 604800 (a week)"


# A host name suffix for host routing: a dot, then DNS labels.
_HOST_SUFFIX_RE = re.compile(r"^(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)+\Z", re.IGNORECASE)
# A password hash as werkzeug's generate_password_hash writes it: METHOD$SALT$HEX.
_PASSWORD_HASH_RE = re.compile(r"^(scrypt(:[0-9]+){0,3}|pbkdf2:[a-z0-9]+(:[0-9]+)?)\$[^$\s]+\$[0-9a-f]+\Z")
# Largest max_request_body_bytes: 1 TiB, far above anything useful, still a number nginx takes.
_MAX_BODY_LIMIT_BYTES = 1 << 40


def check_host_suffix(value: str) -> str | None:
    if value == "" or (_HOST_SUFFIX_RE.match(value) and len(value) <= 200):
        return None
    return "must be empty (off) or a host name suffix starting with a dot, such as \".tunnel.example.com\""


def check_body_limit(value: int) -> str | None:
    if 0 <= value <= _MAX_BODY_LIMIT_BYTES:
        return None
    return "must be 0 (no limit) or a number of bytes up to 1099511627776 (1 TiB)"


def check_basic_auth(value: list[Any]) -> str | None:
    users: set[str] = set()
    for entry in value:
        user, sep, password_hash = entry.partition(":") if isinstance(entry, str) else ("", "", "")
        if not sep or not user or not user.isprintable() or not _PASSWORD_HASH_RE.match(password_hash):
            shown = entry.partition(":")[0] + ":..." if isinstance(entry, str) else repr(entry)
            return (f"has {shown!r}: each entry must be \"USER:HASH\" with a hash from "
                    "`python ptth_relay.py --hash-password` (werkzeug's format, e.g. \"scrypt:32768:8:1$...$...\")")
        if user in users:
            return f"lists user {user!r} twice"
        users.add(user)
    return None


def check_port_name(value: str) -> str | None:
    if PORT_NAME_RE.match(value):
        return None
    return "must be 1-64 characters of A-Z a-z 0-9 _ - (it is part of URLs)"


def check_forwarded_ports(value: dict[str, Any]) -> str | None:
    for name, address in value.items():
        if check_port_name(name):
            return f"has a bad port name {name!r}: {check_port_name(name)}"
        if not isinstance(address, str) or parse_address(address) is None:
            return f"{name!r} must be a string HOST:PORT such as \"127.0.0.1:22\", not {address!r}"
    return None


def check_allow(value: list[Any]) -> str | None:
    for entry in value:
        server, sep, port = entry.partition(":") if isinstance(entry, str) else ("", "", "")
        if not sep or check_name(server) or (port != "*" and check_port_name(port)):
            return f"has {entry!r}: each entry must be \"SERVER:PORTNAME\" or \"SERVER:*\""
    return None


def check_forward_specs(value: list[Any]) -> str | None:
    for entry in value:
        if not isinstance(entry, str) or parse_forward(entry) is None:
            return f"has {entry!r}: each entry must be \"LOCALPORT:SERVER:PORTNAME\", e.g. \"2200:myserver:ssh\""
    return None


def check_networks(value: list[Any]) -> str | None:
    if not all(isinstance(v, str) for v in value):
        return "must be a list of strings such as [\"127.0.0.1/32\", \"::1/128\"]"
    try:
        trust.parse_networks(value)
    except ValueError as e:
        return f"has {e}"
    return None


def check_requests_per_address(value: int) -> str | None:
    if 1 <= value <= 10_000:
        return None
    return "must be a whole number from 1 to 10000"


def check_key(value: str) -> str | None:
    if not tripcode.is_sendable(value):
        return "must be printable ASCII with no spaces (it travels in an HTTP header)"
    if tripcode.is_strong(value):
        return None
    return (
        f"is too weak: use at least {tripcode.MIN_API_KEY_CHARS} random characters "
        "(delete the line and ptth_server.py will generate one)"
    )


# QUIC packets (UDP payloads) we send, at most: 1,350 bytes fit the common 1,500-byte path MTU
# with room for tunnels. RFC 9000 14 wants at least 1,200; a UDP payload over IPv4 carries at
# most 65,507. Larger than the path MTU (1,500 on most networks, 65,536 on loopback), packets
# are dropped or fragmented. Both ends of a connection may set their own.
DEFAULT_QUIC_MAX_DATAGRAM_SIZE = 1350
MIN_QUIC_MAX_DATAGRAM_SIZE = 1200
MAX_QUIC_MAX_DATAGRAM_SIZE = 65507


def check_max_datagram_size(value: int) -> str | None:
    if isinstance(value, bool) or not MIN_QUIC_MAX_DATAGRAM_SIZE <= value <= MAX_QUIC_MAX_DATAGRAM_SIZE:
        return (f"must be {MIN_QUIC_MAX_DATAGRAM_SIZE} to {MAX_QUIC_MAX_DATAGRAM_SIZE} bytes, a UDP payload that "
                f"fits the path MTU ({DEFAULT_QUIC_MAX_DATAGRAM_SIZE} if unsure; up to 65507 on loopback)")
    return None


@dataclass(frozen=True)
class QuicRelayTarget:
    """Where a proxy finds the QUIC relay, and how it knows it is the right one."""

    host: str
    port: int
    fingerprint: str | None  # the pinned SHA-256 of the relay's certificate
    ca_file: str | None  # or CAs to check it with
    max_datagram_size: int = DEFAULT_QUIC_MAX_DATAGRAM_SIZE  # the largest QUIC packet the proxy sends


@dataclass(frozen=True)
class Forward:
    """One local port of ptth_client and what it reaches."""

    local_port: int
    server: str
    port: str


def write_atomically(path: str | os.PathLike[str], text: str, mode: int = 0o600) -> None:
    """Replace the file at `path` with `text` all at once: a temporary file beside it, written,
    given `mode`, synced, then renamed over it. OSError if that fails; no temporary file is left."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML file, turning every failure into a one-line ConfigError."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid TOML: the file is not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None


def check_known(keys: tuple[Key, ...], raw: Mapping[str, Any], where: str) -> None:
    known = {k.name for k in keys}
    for name in raw:
        if name not in known:
            raise ConfigError(f"{where}: unknown key {name!r} (known keys: {', '.join(sorted(known))})")


def apply_keys(keys: tuple[Key, ...], raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Check `raw` against `keys` and fill in defaults; `where` prefixes errors."""
    check_known(keys, raw, where)
    out: dict[str, Any] = {}
    for key in keys:
        if key.name not in raw:
            if key.default is REQUIRED:
                raise ConfigError(f"{where}: missing key {key.name!r} ({key.doc})")
            out[key.name] = key.default
            continue
        value = raw[key.name]
        if (isinstance(value, bool) and key.type is not bool) or not isinstance(value, key.type):
            expected = _TYPE_NAMES.get(key.type, "value of another type")
            raise ConfigError(f"{where}: {key.name!r} must be a {expected}, not {value!r}")
        problem = key.check(value) if key.check else None
        if problem:
            raise ConfigError(f"{where}: {key.name!r} {problem}")
        out[key.name] = value
    return out


_HEX64_RE = re.compile(r"^[0-9a-f]{64}\Z")


_COLON_HEX_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){31}\Z")


def quic_target(relay: str, fingerprint: str | None, ca_file: str | None, neither: str,
                max_datagram_size: int = DEFAULT_QUIC_MAX_DATAGRAM_SIZE) -> QuicRelayTarget:
    """The checked QUIC relay settings; `neither` is the error when there is no way to check the relay."""
    if fingerprint is None and ca_file is None:
        raise ConfigError(neither)
    host, port = must(parse_address(relay))
    return QuicRelayTarget(host, port, normalize_fingerprint(fingerprint) if fingerprint else None, ca_file,
                           max_datagram_size)



def normalize_fingerprint(text: str) -> str | None:
    """A certificate fingerprint as a user may paste it (any case, colons, "sha256:"), as 64
    lowercase hex digits; None if it is not one."""
    value = text.strip().lower().removeprefix("sha256:")
    if _COLON_HEX_RE.match(value):
        value = value.replace(":", "")
    return value if _HEX64_RE.match(value) else None


def parse_address(value: str) -> tuple[str, int] | None:
    """Split "HOST:PORT" (IPv6 as "[::1]:PORT") into (host, port 1-65535), or None."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        return None
    return host, int(port)


def parse_forward(value: str) -> Forward | None:
    """Parse "LOCALPORT:SERVER:PORTNAME", or None if it is not one."""
    parts = value.split(":")
    if len(parts) != 3:
        return None
    local, server, port = parts
    if not (local.isascii() and local.isdigit() and int(local) < 65536):  # 0: any free port
        return None
    if check_name(server) or check_port_name(port):
        return None
    return Forward(int(local), server, port)


def must(value: Any) -> Any:
    assert value is not None  # the key's check has accepted it
    return value


def is_private(path: str | os.PathLike[str]) -> bool:
    """Tell whether a file is unreadable by group and others."""
    return (Path(path).stat().st_mode & 0o077) == 0


def check_peer_bind(value: str) -> str | None:
    """peer_bind: HOST:PORT or HOST:LOW-HIGH, ports 1-65535, LOW <= HIGH."""
    host, _, ports = value.rpartition(":")
    low, dash, high = ports.partition("-")
    if host and low.isdigit() and (not dash or high.isdigit()):
        first, last = int(low), int(high) if dash else int(low)
        if 1 <= first <= last <= 65535:
            return None
    return "must be HOST:PORT or HOST:LOW-HIGH, e.g. 10.0.0.5:41000-41099"
